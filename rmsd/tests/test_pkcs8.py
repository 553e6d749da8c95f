"""The cluster key at rest: PKCS#8 PBES2 (scrypt + AES-256-CBC), opened by OpenSSL with the right
password only; the password itself is never stored."""

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import cluster_key, provision


def openssl(*args: str, password: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, RMSD_TEST_PW=password) if password is not None else None
    return subprocess.run(["openssl", *args], capture_output=True, text=True, env=env, check=check)


@pytest.fixture
def key_der(database, tmp_path):
    password = f"pw-{secrets.token_hex(12)}"
    provision(database, key_password=password)
    _row, key_row, _key, _slc = cluster_key(database, password=password)
    path = tmp_path / "cluster-key.der"
    path.write_bytes(key_row.encrypted_private_key)
    return path, password, key_row


def test_encrypted_key_is_pbes2_scrypt_aes256cbc(key_der):
    path, _password, _row = key_der
    parsed = openssl("asn1parse", "-inform", "DER", "-in", str(path)).stdout
    objects = [line.rsplit(":", 1)[1].strip() for line in parsed.splitlines() if "prim: OBJECT" in line]
    assert objects == ["PBES2", "scrypt", "aes-256-cbc"]
    # No private key structure is visible in clear: the only other primitives are the scrypt
    # parameters, the IV and one opaque OCTET STRING.
    assert "rsaEncryption" not in parsed


def test_openssl_opens_the_key_with_the_right_password_only(key_der):
    path, password, row = key_der
    opened = openssl("pkey", "-inform", "DER", "-in", str(path), "-passin", "env:RMSD_TEST_PW", "-pubout",
                     password=password)
    assert opened.stdout == row.public_key_pem

    wrong = openssl("pkey", "-inform", "DER", "-in", str(path), "-passin", "env:RMSD_TEST_PW", "-noout",
                    password=password + "x", check=False)
    assert wrong.returncode != 0
    assert "PRIVATE KEY" not in wrong.stdout


def _stored_bytes(database, pg_server) -> bytes:
    if database.kind == "sqlite":
        files = sorted(database.sqlite_file.parent.iterdir())
    else:
        files = [p for p in Path(pg_server.data_dir).rglob("*") if p.is_file()]
    return b"".join(p.read_bytes() for p in files)


def test_password_never_reaches_the_database_files(database, key_der, request):
    _path, password, row = key_der
    pg_server = request.getfixturevalue("pg") if database.kind == "postgresql" else None
    stored = _stored_bytes(database, pg_server)
    # What was written is readable in these files (so the search below can find things) ...
    assert row.public_key_pem.splitlines()[1].encode() in stored
    # ... and the password is not among it, in any common encoding.
    for form in (password.encode(), password.encode("utf-16-le"), password.encode().hex().encode()):
        assert form not in stored
