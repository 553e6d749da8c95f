"""What rmsd issues (X.509 with `cryptography`, JOSE with `joserfc`) checked with other
implementations: the `openssl` CLI for certificates and keys, `jwcrypto` for JWS and JWE."""

import json
import os
import subprocess

import pytest
from conftest import KEY_PASSWORD, cluster_key, provision, sqlite_database
from cryptography.hazmat.primitives import serialization
from jwcrypto import jwe, jwk, jws

from rmsd import pki
from rmsd.client import RmsClient, User, encrypt_content
from rmsd.schema import utcnow


def openssl(*args, password=None, check=True):
    env = dict(os.environ, RMSD_TEST_PW=password) if password else None
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, env=env, check=check)


@pytest.fixture(scope="module")
def issued(node, tmp_path_factory):
    """An SLC, a RAC for dave, a PL by dave and a UL for dave, all from the running node, as files."""
    out = tmp_path_factory.mktemp("interop")
    client = RmsClient(node.url)
    dave = User.new("dave@example.com", node.token("dave@example.com"))
    (out / "slc.pem").write_text(client.slc()["chain"][0])
    (out / "rac.pem").write_text(client.certify(dave))
    content_key, _blob = encrypt_content(b"interop")
    pl = client.publish(dave, "doc-interop", content_key, {"erin@example.com": ["VIEW"]})["pl"]
    ul = client.license(dave, pl)["ul"]
    dave_key_pem = dave.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"dir": out, "pl": pl, "ul": ul, "content_key": content_key, "dave_key_pem": dave_key_pem}


def test_openssl_verifies_the_rac_against_the_slc(issued):
    d = issued["dir"]
    result = openssl("verify", "-CAfile", d / "slc.pem", d / "rac.pem")
    assert result.stdout.strip() == f"{d / 'rac.pem'}: OK"


def test_openssl_verifies_the_self_signed_slc(issued):
    d = issued["dir"]
    assert openssl("verify", "-CAfile", d / "slc.pem", d / "slc.pem").stdout.strip().endswith(": OK")
    subject = openssl("x509", "-in", d / "slc.pem", "-noout", "-subject").stdout.split("=", 1)[1]
    issuer = openssl("x509", "-in", d / "slc.pem", "-noout", "-issuer").stdout.split("=", 1)[1]
    assert subject == issuer and "c1 SLC" in subject


def test_openssl_rejects_a_rac_from_another_root(issued, tmp_path):
    # Same cluster name (same issuer DN), different key: OpenSSL finds no issuer for it.
    other = sqlite_database(tmp_path)
    provision(other)
    _row, _key_row, other_key, other_slc = cluster_key(other)
    csr = pki.load_csr(User.new("dave@example.com", "").csr_pem())
    (tmp_path / "foreign.pem").write_text(pki.to_pem(pki.issue_rac(other_key, pki.load_pem(other_slc),
                                                                   "dave@example.com", csr, utcnow())))
    result = openssl("verify", "-CAfile", issued["dir"] / "slc.pem", tmp_path / "foreign.pem", check=False)
    assert result.returncode != 0
    assert "verification failed" in result.stderr


def _x509_text(path) -> str:
    return openssl("x509", "-in", path, "-noout", "-text").stdout


def test_slc_extensions_make_it_a_ca_for_racs(issued):
    text = _x509_text(issued["dir"] / "slc.pem")
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0" in text
    usage = "Digital Signature, Key Encipherment, Certificate Sign, CRL Sign"
    assert f"X509v3 Key Usage: critical\n                {usage}\n" in text
    assert "URI:https://rms.example.com" in text
    assert "Public-Key: (2048 bit)" in text


def test_rac_extensions_bind_the_user_and_forbid_signing_certificates(issued):
    text = _x509_text(issued["dir"] / "rac.pem")
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "X509v3 Key Usage: critical\n                Digital Signature, Key Encipherment\n" in text
    assert "email:dave@example.com" in text
    assert "Certificate Sign" not in text


def _slc_public_jwk(issued) -> jwk.JWK:
    pem = openssl("x509", "-in", issued["dir"] / "slc.pem", "-pubkey", "-noout").stdout
    return jwk.JWK.from_pem(pem.encode())


def _verified_claims(token: str, key: jwk.JWK) -> tuple[dict, dict]:
    signed = jws.JWS()
    signed.deserialize(token)
    signed.verify(key)
    return signed.jose_header, json.loads(signed.payload)


def test_jwcrypto_verifies_pl_and_ul_with_the_slc_key(issued):
    key = _slc_public_jwk(issued)
    pl_header, pl = _verified_claims(issued["pl"], key)
    ul_header, ul = _verified_claims(issued["ul"], key)
    assert (pl_header["alg"], pl_header["typ"]) == ("RS256", "rmsd-pl+jws")
    assert (ul_header["alg"], ul_header["typ"]) == ("RS256", "rmsd-ul+jws")
    assert pl["content_id"] == ul["content_id"] == "doc-interop"
    assert ul["sub"] == "dave@example.com" and ul["pl_id"] == pl["pl_id"]
    serial = openssl("x509", "-in", issued["dir"] / "rac.pem", "-noout", "-serial").stdout.strip()
    assert int(serial.split("=")[1], 16) == int(ul["rac_serial"], 16)


def test_jwcrypto_rejects_a_license_checked_with_another_key(issued):
    other = jwk.JWK.generate(kty="RSA", size=2048)
    with pytest.raises(jws.InvalidJWSSignature):
        _verified_claims(issued["ul"], other)


def test_ul_content_key_opens_with_the_rac_private_key_in_jwcrypto(issued):
    _header, ul = _verified_claims(issued["ul"], _slc_public_jwk(issued))
    wrapped = jwe.JWE()
    wrapped.deserialize(ul["wrapped_key"], key=jwk.JWK.from_pem(issued["dave_key_pem"]))
    assert wrapped.jose_header["alg"] == "RSA-OAEP-256" and wrapped.jose_header["enc"] == "A256GCM"
    assert wrapped.payload == issued["content_key"]


def test_pl_content_key_opens_with_the_cluster_key_exported_by_openssl(node, issued, tmp_path):
    _row, key_row, _key, _slc = cluster_key(node.database)
    der = tmp_path / "cluster-key.der"
    der.write_bytes(key_row.encrypted_private_key)
    private_pem = openssl("pkey", "-inform", "DER", "-in", der, "-passin", "env:RMSD_TEST_PW",
                          password=KEY_PASSWORD).stdout
    assert "BEGIN PRIVATE KEY" in private_pem
    _header, pl = _verified_claims(issued["pl"], _slc_public_jwk(issued))
    assert pl["key_id"] == key_row.id
    wrapped = jwe.JWE()
    wrapped.deserialize(pl["wrapped_key"], key=jwk.JWK.from_pem(private_pem.encode()))
    assert wrapped.jose_header["kid"] == key_row.id
    assert wrapped.payload == issued["content_key"]
