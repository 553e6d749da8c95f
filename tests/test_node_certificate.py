"""roles/server/files/node_certificate.py: the controller signs a node's certificate request with the
operator's CA, and signs again only when the certificate no longer fits. Checked with openssl, not with
the library that issued the certificates."""

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SCRIPT = Path(__file__).resolve().parents[1] / "roles" / "server" / "files" / "node_certificate.py"
NOW = datetime.datetime.now(datetime.UTC)


def make_ca(tmp: Path, name: str, days: int) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_request(key, address: str, dns: str) -> str:
    from ipaddress import ip_address
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(address)), x509.DNSName(dns)]),
                           critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def sign(ca: tuple[Path, Path], request: str, current: str = "", *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--ca-certificate", str(ca[0]), "--ca-key", str(ca[1]), *args],
                          input=json.dumps({"request": request, "current": current}), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture()
def node_key():
    return ec.generate_private_key(ec.SECP256R1())


def test_issues_a_server_certificate_openssl_accepts(tmp_path, node_key):
    ca = make_ca(tmp_path, "ca", 400)
    answer = sign(ca, make_request(node_key, "127.0.6.11", "rms-root-1"))
    assert answer["issued"]
    cert = tmp_path / "node.pem"
    cert.write_text(answer["certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca[0]), "-purpose", "sslserver",
                               "-verify_ip", "127.0.6.11", "-verify_hostname", "rms-root-1", str(cert)],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified.stdout + verified.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(cert)], capture_output=True, text=True,
                          check=True).stdout
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text
    assert "PRIVATE KEY" not in answer["certificate"]


def test_a_certificate_that_fits_is_kept(tmp_path, node_key):
    ca = make_ca(tmp_path, "ca", 400)
    request = make_request(node_key, "127.0.6.11", "rms-root-1")
    first = sign(ca, request)["certificate"]
    again = sign(ca, request, first)
    assert again == {"certificate": first, "issued": False}


@pytest.mark.parametrize("change", ["address", "key", "ca", "near_expiry"])
def test_a_certificate_that_no_longer_fits_is_issued_anew(tmp_path, node_key, change):
    ca = make_ca(tmp_path, "ca", 400)
    request = make_request(node_key, "127.0.6.11", "rms-root-1")
    # near_expiry: issued for 10 days, renewed when fewer than 30 remain.
    first = sign(ca, request, "", *(["--valid-days", "10"] if change == "near_expiry" else []))["certificate"]
    if change == "address":
        request = make_request(node_key, "127.0.6.12", "rms-root-1")
    elif change == "key":
        request = make_request(ec.generate_private_key(ec.SECP256R1()), "127.0.6.11", "rms-root-1")
    elif change == "ca":
        ca = make_ca(tmp_path, "other-ca", 400)
    answer = sign(ca, request, first)
    assert answer["issued"] and answer["certificate"] != first


def test_a_ca_expiring_first_does_not_reissue_on_every_run(tmp_path, node_key):
    """The certificate ends with the CA; a new one would not last longer, so reruns change nothing."""
    ca = make_ca(tmp_path, "short-ca", 2)
    request = make_request(node_key, "127.0.6.11", "rms-root-1")
    first = sign(ca, request)
    assert first["issued"]
    assert sign(ca, request, first["certificate"])["issued"] is False


def test_a_key_that_is_not_the_cas_is_refused(tmp_path, node_key):
    ca = make_ca(tmp_path, "ca", 400)
    other = make_ca(tmp_path, "other", 400)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--ca-certificate", str(ca[0]), "--ca-key", str(other[1])],
                          input=json.dumps({"request": make_request(node_key, "127.0.6.11", "n"), "current": ""}),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "is not the key of" in proc.stderr and proc.stdout == ""
