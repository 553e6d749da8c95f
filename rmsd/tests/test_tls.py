"""HTTPS on the node: `rmsd serve` with a certificate from a throwaway CA, checked with httpx and with the
`openssl` CLI (another TLS implementation); ensure_server's checks of the certificate and key; and
`rmsd tls-request`, which makes the node's key and a certificate request without the key leaving the node."""

import ipaddress
import os
import ssl
import stat
import subprocess
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import tomli_w
from alembic.command import downgrade
from conftest import KEY_PASSWORD, RMSD, free_port, make_issuer, provision, sqlite_database, start_node, stop_node
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rmsd import admin, db, demo_issuer
from rmsd.errors import RmsdError
from rmsd.schema import utcnow

ADDRESS = "127.0.0.1"
DNS = "rms-n1.test"


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path  # the CA certificate (PEM)

    def issue(self, public_key, path: Path, *, address=ADDRESS, dns=DNS, not_before=None, days=30) -> Path:
        """A server certificate for `public_key`, written (PEM) to `path`."""
        not_before = not_before or utcnow() - timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName(dns)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


def make_ca(directory: Path, name: str) -> Ca:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    now = utcnow()
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(key, cert, path)


def write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key


def tls_request(key: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RMSD), "tls-request", "--key", str(key), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def openssl(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True, timeout=30, check=False)


def csr_public_key(csr_pem: str) -> bytes:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    return csr.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def tls_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def server_args(database, directory: Path, issuer_dir: Path, *, name="n1", port=None, **tls) -> dict:
    return {
        "cluster": "c1", "name": name, "key_password": KEY_PASSWORD, "listen_address": ADDRESS,
        "port": port or free_port(), "config_path": str(directory / "etc" / f"{name}.toml"),
        "secret_path": str(directory / "etc" / f"{name}.secret"), "identity_issuer": demo_issuer.ISSUER,
        "identity_audience": demo_issuer.AUDIENCE, "identity_jwks_uri": demo_issuer.jwks_uri(issuer_dir),
        **database.admin_args(), **tls,
    }


def start_tls_node(config_path: Path, log_path: Path, ca_file: Path, timeout: float = 30.0):
    """Start `rmsd serve` and wait until /health answers over HTTPS (verified against `ca_file`)."""
    return start_node(config_path, log_path, timeout, verify=tls_context(ca_file))


@pytest.fixture
def pki_dir(tmp_path) -> dict:
    """A CA, a node key and its certificate, a second key and another CA (all throwaway, under tmp_path)."""
    tls = tmp_path / "tls"
    ca = make_ca(tls / "ca", "rmsops")
    key = write_key(tls / "n1.key")
    cert = ca.issue(key.public_key(), tls / "n1.crt")
    write_key(tls / "other.key")
    return {"ca": ca, "key": tls / "n1.key", "cert": cert, "other_key": tls / "other.key",
            "other_ca": make_ca(tls / "other-ca", "other")}


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    """A root cluster with one node serving HTTPS; its key made by `rmsd tls-request`, its certificate signed by
    a throwaway CA from the request."""
    base = tmp_path_factory.mktemp("tls-node")
    ca = make_ca(base / "ca", "rmsops")
    key_path = base / "tls" / "n1.key"
    request = tls_request(key_path, "--address", ADDRESS, "--dns", DNS)
    assert request.returncode == 0, request.stderr
    csr = x509.load_pem_x509_csr(request.stdout.encode())
    cert_path = ca.issue(csr.public_key(), base / "tls" / "n1.crt")
    database = sqlite_database(base)
    provision(database)
    issuer_dir = make_issuer(base / "issuer")
    args = server_args(database, base, issuer_dir, tls_certificate=str(cert_path), tls_key=str(key_path))
    result = admin.ensure_server(**args)
    assert result.facts["server"]["url"] == f"https://{ADDRESS}:{args['port']}"
    url, process = start_tls_node(Path(args["config_path"]), base / "serve.log", ca.path)
    try:
        yield {"url": url, "port": args["port"], "ca": ca, "cert": cert_path, "key": key_path, "base": base,
               "database": database, "config_path": Path(args["config_path"])}
    finally:
        stop_node(process)


# --- rmsd serve over HTTPS ------------------------------------------------------------------------


def test_health_answers_over_https(tls_node):
    response = httpx.get(f"{tls_node['url']}/health", verify=tls_context(tls_node["ca"].path), timeout=10)
    assert response.status_code == 200 and response.json()["node"] == "n1"
    assert response.url.scheme == "https"


def test_node_registration_reads_https(tls_node):
    info = admin.cluster_info(name="c1", **tls_node["database"].admin_args())
    (node,) = info["nodes"]
    assert node["url"] == tls_node["url"] and node["tls"] is True
    assert node["status"] == "up"


def test_plain_http_to_the_tls_port_fails(tls_node):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{ADDRESS}:{tls_node['port']}/health", timeout=10)


def test_another_ca_does_not_verify_the_node(tls_node, tmp_path):
    other = make_ca(tmp_path / "other", "other")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_node['url']}/health", verify=tls_context(other.path), timeout=10)


def test_openssl_sees_the_node_certificate(tls_node):
    proc = openssl("s_client", "-connect", f"{ADDRESS}:{tls_node['port']}", "-CAfile", str(tls_node["ca"].path),
                   "-verify_return_error", "-verify_ip", ADDRESS, "-brief")
    assert proc.returncode == 0, proc.stderr
    assert "Verification: OK" in proc.stderr
    shown = openssl("s_client", "-connect", f"{ADDRESS}:{tls_node['port']}", "-CAfile", str(tls_node["ca"].path))
    served = shown.stdout[shown.stdout.index("-----BEGIN CERTIFICATE-----"):]
    served = served[:served.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    assert served.strip() == tls_node["cert"].read_text().strip()


def test_tls_1_2_and_1_3_are_served_and_1_1_is_refused(tls_node):
    target = f"{ADDRESS}:{tls_node['port']}"
    ca = str(tls_node["ca"].path)
    for version in ("-tls1_2", "-tls1_3"):
        proc = openssl("s_client", "-connect", target, "-CAfile", ca, "-verify_return_error", version, "-brief")
        assert proc.returncode == 0, (version, proc.stderr)
    # SECLEVEL=0 lets this client offer TLS 1.1 at all, so what refuses it must be the node: the client sent
    # its hello (no local "no protocols available") and the node answered with an alert or hung up.
    weak = ("-cipher", "DEFAULT@SECLEVEL=0")
    old = openssl("s_client", "-connect", target, "-CAfile", ca, "-tls1_1", *weak, "-brief")
    assert old.returncode != 0, old.stderr
    assert "no protocols available" not in old.stderr and "TLSv1.1" not in old.stdout + old.stderr
    assert "alert protocol version" in old.stderr or "unexpected eof" in old.stderr, old.stderr
    assert openssl("s_client", "-connect", target, "-CAfile", ca, "-tls1_2", *weak, "-brief").returncode == 0


def test_node_config_holds_paths_not_the_key(tls_node):
    text = tls_node["config_path"].read_text()
    node = tomllib.loads(text)["node"]
    assert (node["tls_certificate"], node["tls_key"]) == (str(tls_node["cert"]), str(tls_node["key"]))
    assert "PRIVATE KEY" not in text


def test_serve_with_a_key_that_does_not_match_exits_2(tls_node, tmp_path):
    other_key = tmp_path / "other.key"
    write_key(other_key)
    config = tomllib.loads(tls_node["config_path"].read_text())
    config["node"]["tls_key"] = str(other_key)
    config["node"]["port"] = free_port()
    config_path = tmp_path / "n1.toml"
    config_path.write_text(tomli_w.dumps(config))
    proc = subprocess.run([str(RMSD), "serve", "--config", str(config_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"rmsd: tls_key {other_key} does not belong to the certificate"), proc.stderr
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr


def test_serve_with_a_missing_certificate_exits_2(tls_node, tmp_path):
    config = tomllib.loads(tls_node["config_path"].read_text())
    config["node"]["tls_certificate"] = str(tmp_path / "missing.crt")
    config_path = tmp_path / "n1.toml"
    config_path.write_text(tomli_w.dumps(config))
    proc = subprocess.run([str(RMSD), "serve", "--config", str(config_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert f"rmsd: cannot read tls_certificate {tmp_path / 'missing.crt'}" in proc.stderr


# --- ensure_server --------------------------------------------------------------------------------


def test_ensure_server_with_tls_is_idempotent(tmp_path, pki_dir):
    database = sqlite_database(tmp_path)
    provision(database)
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"), tls_certificate=str(pki_dir["cert"]),
                       tls_key=str(pki_dir["key"]))
    runs = [admin.ensure_server(**args, check_mode=check) for check in (True, False, True, False)]
    assert [r.changed for r in runs] == [True, True, False, False]
    assert all(not r.warnings for r in runs)
    for result in runs:
        server = result.facts["server"]
        assert server["url"] == f"https://{ADDRESS}:{args['port']}" and server["tls"] is True
        assert server["tls_key"] == str(pki_dir["key"])
    assert runs[1].diff["after"]["registration"]["tls"] is True
    key_text = pki_dir["key"].read_text()
    assert key_text.splitlines()[1] not in repr([r.diff for r in runs] + [r.facts for r in runs])
    info = admin.cluster_info(name="c1", **database.admin_args())
    assert info["nodes"][0]["url"] == f"https://{ADDRESS}:{args['port']}"


def test_a_node_turns_to_https_and_back(tmp_path, pki_dir):
    database = sqlite_database(tmp_path)
    provision(database)
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"))
    plain = admin.ensure_server(**args)
    assert plain.facts["server"]["url"].startswith("http://") and plain.facts["server"]["tls"] is False
    assert "tls" not in Path(args["config_path"]).read_text()
    tls = {"tls_certificate": str(pki_dir["cert"]), "tls_key": str(pki_dir["key"])}
    turned = admin.ensure_server(**args, **tls)
    assert turned.changed and turned.facts["config_changed"]
    assert turned.diff["before"]["registration"]["tls"] is False and turned.diff["after"]["registration"]["tls"]
    assert admin.cluster_info(name="c1", **database.admin_args())["nodes"][0]["url"].startswith("https://")
    back = admin.ensure_server(**args)
    assert back.changed and admin.cluster_info(name="c1", **database.admin_args())["nodes"][0]["tls"] is False


def test_a_key_that_does_not_match_changes_nothing(tmp_path, pki_dir):
    database = sqlite_database(tmp_path)
    provision(database)
    issuer_dir = make_issuer(tmp_path / "issuer")
    before = database.dump()
    args = server_args(database, tmp_path, issuer_dir, tls_certificate=str(pki_dir["cert"]),
                       tls_key=str(pki_dir["other_key"]))
    for check_mode in (True, False):
        with pytest.raises(RmsdError, match="does not belong to the certificate") as err:
            admin.ensure_server(**args, check_mode=check_mode)
        assert "Nothing was changed" in str(err.value) and "PRIVATE KEY" not in str(err.value)
    assert not Path(args["config_path"]).exists() and not Path(args["secret_path"]).exists()
    assert database.dump() == before


def test_a_mismatched_key_leaves_an_existing_registration_alone(tmp_path, pki_dir):
    database = sqlite_database(tmp_path)
    provision(database)
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"))
    admin.ensure_server(**args)
    config_before, dump_before = Path(args["config_path"]).read_text(), database.dump()
    with pytest.raises(RmsdError, match="does not belong"):
        admin.ensure_server(**args, tls_certificate=str(pki_dir["cert"]), tls_key=str(pki_dir["other_key"]))
    assert Path(args["config_path"]).read_text() == config_before and database.dump() == dump_before
    assert admin.cluster_info(name="c1", **database.admin_args())["nodes"][0]["url"].startswith("http://")


def test_missing_files_warn_in_check_mode_and_fail_for_real(tmp_path, pki_dir):
    database = sqlite_database(tmp_path)
    provision(database)
    missing_cert, missing_key = tmp_path / "later" / "n1.crt", tmp_path / "later" / "n1.key"
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"), tls_certificate=str(missing_cert),
                       tls_key=str(missing_key))
    check = admin.ensure_server(**args, check_mode=True)
    assert check.changed and check.facts["server"]["url"].startswith("https://")
    assert len(check.warnings) == 1 and str(missing_cert) in check.warnings[0]
    before = database.dump()
    with pytest.raises(RmsdError, match="not found.*Nothing was changed"):
        admin.ensure_server(**args)
    assert not Path(args["config_path"]).exists() and database.dump() == before


def test_an_expired_certificate_is_refused(tmp_path, pki_dir):
    database = sqlite_database(tmp_path)
    provision(database)
    key = serialization.load_pem_private_key(pki_dir["key"].read_bytes(), password=None)
    expired = pki_dir["ca"].issue(key.public_key(), tmp_path / "expired.crt",
                                  not_before=utcnow() - timedelta(days=60), days=30)
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"), tls_certificate=str(expired),
                       tls_key=str(pki_dir["key"]))
    with pytest.raises(RmsdError, match="is not valid now.*renew it"):
        admin.ensure_server(**args)
    assert not Path(args["config_path"]).exists()


@pytest.mark.parametrize("tls", [
    {"tls_certificate": "/etc/rmsd/n1.crt"},
    {"tls_key": "/etc/rmsd/n1.key"},
    {"tls_certificate": "n1.crt", "tls_key": "n1.key"},
])
def test_tls_options_go_together_as_absolute_paths(tmp_path, tls):
    database = sqlite_database(tmp_path)
    provision(database)
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"), **tls)
    with pytest.raises(RmsdError, match="go together|absolute path"):
        admin.ensure_server(**args, check_mode=True)


def test_registration_on_the_0003_schema_reads_http_then_upgrades(database, tmp_path, pki_dir):
    provision(database)
    args = server_args(database, tmp_path, make_issuer(tmp_path / "issuer"))
    admin.ensure_server(**args)
    engine = database.engine()
    with engine.begin() as conn:
        downgrade(db._alembic_config(conn), "0003")
    engine.dispose()
    info = admin.cluster_info(name="c1", **database.admin_args())
    assert info["nodes"][0]["url"] == f"http://{ADDRESS}:{args['port']}" and info["nodes"][0]["tls"] is False
    # Read as migrated in a rolled-back transaction: still 0003 on disk.
    engine = database.engine()
    with engine.connect() as conn:
        assert db.schema_revision(conn) == "0003"
    engine.dispose()
    assert not admin.ensure_server(**args, check_mode=True).changed
    done = admin.ensure_server(**args, tls_certificate=str(pki_dir["cert"]), tls_key=str(pki_dir["key"]))
    assert done.changed
    assert admin.cluster_info(name="c1", **database.admin_args())["nodes"][0]["url"].startswith("https://")


# --- rmsd tls-request -----------------------------------------------------------------------------


def test_tls_request_makes_a_0600_key_and_a_csr(tmp_path):
    key_path = tmp_path / "tls" / "n1.key"
    first = tls_request(key_path, "--address", ADDRESS, "--dns", DNS, "--dns", "rms.test")
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert "created" in first.stderr
    key_pem = key_path.read_text()
    assert "PRIVATE KEY" in key_pem
    assert first.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert first.stdout.count("-----BEGIN") == 1
    for line in key_pem.splitlines()[1:-1]:
        assert line not in first.stdout + first.stderr
    # The openssl CLI reads the request independently of the library that wrote it.
    csr_file = tmp_path / "n1.csr"
    csr_file.write_text(first.stdout)
    text = openssl("req", "-in", str(csr_file), "-noout", "-text", "-verify")
    assert text.returncode == 0, text.stderr
    assert f"CN = {DNS}" in text.stdout or f"CN={DNS}" in text.stdout
    assert f"IP Address:{ADDRESS}" in text.stdout
    assert f"DNS:{DNS}" in text.stdout and "DNS:rms.test" in text.stdout
    assert "prime256v1" in text.stdout or "P-256" in text.stdout
    assert [p.name for p in key_path.parent.iterdir()] == ["n1.key"]  # no temp file left

    again = tls_request(key_path, "--address", ADDRESS, "--dns", DNS)
    assert again.returncode == 0, again.stderr
    assert "reused" in again.stderr and key_path.read_text() == key_pem
    assert csr_public_key(again.stdout) == csr_public_key(first.stdout)
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert csr_public_key(first.stdout) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_tls_request_without_dns_names_the_address(tmp_path):
    key_path = tmp_path / "n2.key"
    proc = tls_request(key_path, "--address", "::1", "--key-type", "rsa")
    assert proc.returncode == 0, proc.stderr
    csr_file = tmp_path / "n2.csr"
    csr_file.write_text(proc.stdout)
    text = openssl("req", "-in", str(csr_file), "-noout", "-text")
    assert "CN = ::1" in text.stdout or "CN=::1" in text.stdout
    assert "IP Address:0:0:0:0:0:0:0:1" in text.stdout or "IP Address:::1" in text.stdout
    assert "DNS:" not in text.stdout and "2048 bit" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["--address", "rms.test"], "is not an IP address"),
    (["--address", ADDRESS, "--dns", "bad name"], "is not a DNS name"),
])
def test_tls_request_refuses_bad_input(tmp_path, args, message):
    key_path = tmp_path / "n1.key"
    proc = tls_request(key_path, *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
    assert not key_path.exists()


def test_tls_request_refuses_a_file_that_is_no_key(tmp_path):
    key_path = tmp_path / "n1.key"
    key_path.write_text("not a key\n")
    proc = tls_request(key_path, "--address", ADDRESS)
    assert proc.returncode == 2 and "holds no unencrypted PEM private key" in proc.stderr
    assert key_path.read_text() == "not a key\n"


def test_tls_request_needs_an_absolute_key_path(tmp_path):
    proc = subprocess.run([str(RMSD), "tls-request", "--key", "n1.key", "--address", ADDRESS], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "absolute path" in proc.stderr
    assert not (tmp_path / "n1.key").exists()
    assert not os.listdir(tmp_path)
