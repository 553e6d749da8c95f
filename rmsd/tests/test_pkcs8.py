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


# --- the KDF and key parameters, read back by OpenSSL (rmsd writes them with asn1crypto) -----------

# What rmsd promises (rmsd.pkcs8): scrypt N = 2**14, r = 8, p = 1 (OpenSSL's `pkcs8 -scrypt` defaults),
# a 32-byte key for AES-256-CBC, a 16-byte salt and IV. Written out here, not imported, so a weakened
# constant in rmsd fails these tests instead of moving them along.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def _asn1(path: Path) -> list[tuple[int, str, str]]:
    """(depth, primitive type, value) of every primitive in `openssl asn1parse` output."""
    parsed = []
    for line in openssl("asn1parse", "-inform", "DER", "-in", str(path)).stdout.splitlines():
        if "prim:" not in line:
            continue
        depth = int(line.split("d=", 1)[1].split()[0])
        kind, _, value = line.split("prim:", 1)[1].partition(":")
        parsed.append((depth, kind.split("[", 1)[0].strip(), value.strip()))  # OCTET STRING [HEX DUMP]:AB..
    return parsed


def test_scrypt_parameters_as_openssl_reads_them(key_der):
    path, _password, _row = key_der
    primitives = _asn1(path)
    kinds = [(kind, value) for _depth, kind, value in primitives]
    at = kinds.index(("OBJECT", "scrypt"))
    salt, n, r, p, key_length = primitives[at + 1:at + 6]
    assert salt[1] == "OCTET STRING" and len(bytes.fromhex(salt[2])) == 16
    assert all(kind == "INTEGER" for _d, kind, _v in (n, r, p, key_length))
    cost, block_size, parallelization, length = (int(v, 16) for _d, _k, v in (n, r, p, key_length))
    assert cost >= 2**14
    assert (cost, block_size, parallelization) == (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    assert length == 32  # an AES-256 key
    cipher = kinds.index(("OBJECT", "aes-256-cbc"))
    iv = primitives[cipher + 1]
    assert iv[1] == "OCTET STRING" and len(bytes.fromhex(iv[2])) == 16


def test_cluster_key_size_as_openssl_reads_it(key_der):
    path, password, _row = key_der
    text = openssl("pkey", "-inform", "DER", "-in", str(path), "-passin", "env:RMSD_TEST_PW", "-noout", "-text",
                   password=password).stdout
    assert "Private-Key: (2048 bit" in text


@pytest.mark.parametrize("size", [512, 1024, 2047])
def test_key_sizes_below_2048_are_refused(database, size):
    from rmsd import admin
    from rmsd.errors import RmsdError
    from rmsd.keys import provider_for

    with pytest.raises(RmsdError, match="key_size"):
        provider_for("password", key_password="pw").generate(size)
    with pytest.raises(RmsdError, match="key_size"):
        provision(database, key_size=size)
    assert database.dump() is None or database.count("cluster_keys") == 0
    provision(database)
    with pytest.raises(RmsdError, match="key_size"):
        admin.ensure_cluster_key(cluster="c1", key_password="x", key_size=size, max_age=1,
                                 **database.admin_args())
