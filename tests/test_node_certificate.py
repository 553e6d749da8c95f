"""roles/server/files/node_certificate.py: the controller signs a node's certificate request with the
operator's CA, for the names the inventory gives the node and nothing the host asks for, and signs again
only when the certificate no longer fits. A managed host is not trusted: its request and the certificate
read back from it are hostile input. Certificates are checked with openssl, not with the library that
issued them; the role's wiring (names, passphrase, nothing logged at -vvv) with one playbook run."""

from __future__ import annotations

import contextlib
import datetime
import getpass
import grp
import importlib.util
import io
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "roles" / "server" / "files" / "node_certificate.py"
NOW = datetime.datetime.now(datetime.UTC)
NODE, ADDRESS = "rms-root-1", "127.0.6.11"
INVENTORY = ("--dns", NODE, "--address", ADDRESS)
# What openssl shows of a certificate for INVENTORY: its names, and a server certificate only.
EXPECTED = {"subject": f"CN={NODE}", "X509v3 Subject Alternative Name": f"DNS:{NODE}, IP Address:{ADDRESS}",
            "X509v3 Basic Constraints": "CA:FALSE", "X509v3 Extended Key Usage": "TLS Web Server Authentication",
            "X509v3 Key Usage": "Digital Signature"}
PASSPHRASE = "ca-pass-5e0d7a1c9b"  # distinctive, so a leak into any output is unambiguous
HYPOTHESIS = settings(max_examples=25, deadline=None, database=None, derandomize=True)


def make_ca(tmp: Path, name: str, days: int, passphrase: str = "", key=None, is_ca: bool = True) -> tuple[Path, Path]:
    """A self-signed CA valid for `days` from an hour ago (a negative number: expired since)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = NOW - datetime.timedelta(hours=1) if days > 0 else NOW - datetime.timedelta(days=30)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
                  else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    key_path.chmod(0o600)
    return cert_path, key_path


def make_request(key, address: str, dns: str) -> str:
    """What rmsd tls-request sends: CN and DNS name, and the address."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address)),
                                                        x509.DNSName(dns)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def load_script():
    spec = importlib.util.spec_from_file_location("node_certificate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NODE_CERTIFICATE = load_script()


def run_script(ca: tuple[Path, Path], request: str, current: str = "", *args: str, inventory=INVENTORY,
               passphrase: str = "", in_process: bool = True) -> subprocess.CompletedProcess:
    """The script as the role runs it: arguments, JSON on stdin, an answer on stdout or one line on stderr. In this
    process by default (the classes below run it hundreds of times), as its own process when asked."""
    argv = ["--ca-certificate", str(ca[0]), "--ca-key", str(ca[1]), *inventory, *args]
    stdin = json.dumps({"request": request, "current": current, "ca_key_passphrase": passphrase})
    if not in_process:
        return subprocess.run([sys.executable, str(SCRIPT), *argv], input=stdin, capture_output=True, text=True,
                              check=False)
    out, err = io.StringIO(), io.StringIO()
    with (mock.patch.object(sys, "argv", [str(SCRIPT), *argv]), mock.patch.object(sys, "stdin", io.StringIO(stdin)),
          contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
        rc = NODE_CERTIFICATE.main()
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def sign(ca: tuple[Path, Path], request: str, current: str = "", *args: str, **kwargs) -> dict:
    proc = run_script(ca, request, current, *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def refusal(ca: tuple[Path, Path], request: str, current: str = "", *args: str, **kwargs) -> str:
    """The one line a refusal prints; nothing on stdout."""
    proc = run_script(ca, request, current, *args, **kwargs)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("node_certificate.py: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def openssl_view(pem: str) -> dict[str, str]:
    """The subject and every extension of a certificate as openssl shows them ({name: value})."""
    text = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-text"], input=pem,
                          capture_output=True, text=True, check=True).stdout
    subject, text = text.split("\n", 1)
    extensions = text.split("X509v3 extensions:\n", 1)[1].split("\n    Signature Algorithm:", 1)[0]
    view = {"subject": subject.removeprefix("subject=")}
    for header, body in re.findall(r"^ {12}(\S[^\n]*?):(?: critical)? *\n((?: {16}[^\n]*\n?)*)", extensions, re.MULTILINE):
        view[header] = " ".join(body.split())
    return view


def assert_only_inventory_names(pem: str, expected: dict[str, str] = EXPECTED) -> None:
    view = openssl_view(pem)
    aki = view.pop("X509v3 Authority Key Identifier", None)
    assert aki, view
    assert view == expected


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("ca"), "ca", 400)


@pytest.fixture(scope="module")
def node_key():
    return ec.generate_private_key(ec.SECP256R1())


def test_issues_a_server_certificate_openssl_accepts(tmp_path, ca, node_key):
    answer = sign(ca, make_request(node_key, ADDRESS, NODE), in_process=False)
    assert answer["issued"] and answer["names"] == [f"DNS:{NODE}", f"IP:{ADDRESS}"]
    cert = tmp_path / "node.pem"
    cert.write_text(answer["certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca[0]), "-purpose", "sslserver",
                               "-verify_ip", ADDRESS, "-verify_hostname", NODE, str(cert)],
                              capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("OK"), verified.stdout + verified.stderr
    assert_only_inventory_names(answer["certificate"])
    assert "PRIVATE KEY" not in answer["certificate"]


def test_a_certificate_that_fits_is_kept(ca, node_key):
    request = make_request(node_key, ADDRESS, NODE)
    first = sign(ca, request)["certificate"]
    again = sign(ca, request, first)
    assert (again["certificate"], again["issued"]) == (first, False)


@pytest.mark.parametrize("change", ["address", "name", "extra_name", "key", "ca", "near_expiry", "valid_days"])
def test_a_certificate_that_no_longer_fits_is_issued_anew(tmp_path, ca, node_key, change):
    request = make_request(node_key, ADDRESS, NODE)
    # near_expiry: issued for 10 days, renewed when fewer than 30 remain.
    first = sign(ca, request, "", *(["--valid-days", "10"] if change == "near_expiry" else []))["certificate"]
    inventory, args = INVENTORY, []
    if change == "address":
        inventory = ("--dns", NODE, "--address", "127.0.6.12")
    elif change == "name":
        inventory = ("--dns", "rms-root-9", "--address", ADDRESS)
    elif change == "extra_name":
        inventory = (*INVENTORY, "--extra-name", "rms.corp.example.com")
    elif change == "key":
        request = make_request(ec.generate_private_key(ec.SECP256R1()), ADDRESS, NODE)
    elif change == "ca":
        ca = make_ca(tmp_path, "other-ca", 400)
    elif change == "valid_days":  # the policy now issues for less time than the certificate has left
        args = ["--valid-days", "100"]
    answer = sign(ca, request, first, *args, inventory=inventory)
    assert answer["issued"] and answer["certificate"] != first


def test_a_ca_expiring_first_does_not_reissue_on_every_run(tmp_path, node_key):
    """The certificate ends with the CA; a new one would not last longer, so reruns change nothing."""
    short = make_ca(tmp_path, "short-ca", 2)
    request = make_request(node_key, ADDRESS, NODE)
    first = sign(short, request)
    assert first["issued"]
    assert sign(short, request, first["certificate"])["issued"] is False


@pytest.mark.parametrize("problem", ["not_a_ca", "expired"])
def test_a_ca_that_cannot_issue_is_refused(tmp_path, node_key, problem):
    broken = make_ca(tmp_path, problem, -1 if problem == "expired" else 400, is_ca=problem != "not_a_ca")
    message = refusal(broken, make_request(node_key, ADDRESS, NODE))
    assert ("is not a CA certificate" if problem == "not_a_ca" else "is not valid now") in message


def test_a_ca_with_an_ed25519_key_issues_too(tmp_path, node_key):
    ed_ca = make_ca(tmp_path, "ed-ca", 400, key=ed25519.Ed25519PrivateKey.generate())
    cert = tmp_path / "node.pem"
    cert.write_text(sign(ed_ca, make_request(node_key, ADDRESS, NODE))["certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ed_ca[0]), "-purpose", "sslserver",
                               "-verify_hostname", NODE, str(cert)], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_name_longer_than_a_common_name_is_in_the_subject_alternative_name_only(tmp_path, ca, node_key):
    """A CN holds 64 characters at most (RFC 5280); with an empty subject the subjectAltName is critical."""
    name = "a" * 40 + "." + "b" * 40 + ".corp.example.com"
    cert = tmp_path / "node.pem"
    cert.write_text(sign(ca, make_request(node_key, ADDRESS, NODE), inventory=("--dns", name, "--address",
                                                                                ADDRESS))["certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca[0]), "-purpose", "sslserver",
                               "-verify_hostname", name, str(cert)], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    text = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName", "-in", str(cert)],
                          capture_output=True, text=True, check=True).stdout
    assert text.splitlines()[:3] == ["subject=", "X509v3 Subject Alternative Name: critical",
                                     f"    DNS:{name}, IP Address:{ADDRESS}"]


def test_a_key_that_is_not_the_cas_is_refused(tmp_path, ca, node_key):
    other = make_ca(tmp_path, "other", 400)
    message = refusal((ca[0], other[1]), make_request(node_key, ADDRESS, NODE), in_process=False)
    assert "is not the key of" in message


# --- The names come from the inventory: whatever the request asks for -----------------------------------------

FOREIGN_DNS = st.sampled_from(["rms-root-2", "*.corp.example.com", "*", "pg.corp.example.com", "rms-lb",
                               "localhost", "rms-root-1.evil.example", "RMS-ROOT-1", "xn--e1afmkfd"])
GENERAL_NAMES = st.one_of(
    FOREIGN_DNS.map(x509.DNSName),
    st.ip_addresses().map(x509.IPAddress),
    st.sampled_from(["https://pg.corp.example.com/", "spiffe://corp/rms-root-2"]).map(x509.UniformResourceIdentifier),
    st.sampled_from(["admin@corp.example.com", "corp.example.com"]).map(x509.RFC822Name),
    # A Microsoft UPN (otherName), a registeredID and a directoryName.
    st.just(x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), b"\x0c\x0fadmin@corp.test")),
    st.just(x509.RegisteredID(ObjectIdentifier("1.2.3.4.5"))),
    st.just(x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pg.corp.example.com")]))),
)
SUBJECTS = st.lists(st.sampled_from([
    x509.NameAttribute(NameOID.COMMON_NAME, "*.corp.example.com"),
    x509.NameAttribute(NameOID.COMMON_NAME, "rms-root-2"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Operator CA"),
    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "root"),
    x509.NameAttribute(NameOID.EMAIL_ADDRESS, "admin@corp.example.com"),
]), max_size=4).map(x509.Name)
ALL_USAGES = {"digital_signature": True, "content_commitment": True, "key_encipherment": True,
              "data_encipherment": True, "key_agreement": True, "key_cert_sign": True, "crl_sign": True,
              "encipher_only": False, "decipher_only": False}
EXTENSIONS = st.lists(st.sampled_from([
    (x509.BasicConstraints(ca=True, path_length=None), True),
    (x509.KeyUsage(**ALL_USAGES), True),
    (x509.NameConstraints(permitted_subtrees=[x509.DNSName("corp.example.com")], excluded_subtrees=None), True),
    (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING,
                            ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]), False),
    (x509.OCSPNoCheck(), False),
    (x509.UnrecognizedExtension(ObjectIdentifier("1.2.3.4.5.6"), b"\x05\x00"), True),
]), unique_by=lambda e: type(e[0]), max_size=6)
ATTRIBUTES = st.lists(st.sampled_from([(AttributeOID.CHALLENGE_PASSWORD, b"let me in"),
                                       (AttributeOID.UNSTRUCTURED_NAME, b"rms-root-2")]),
                      unique_by=lambda a: a[0], max_size=2)


@given(subject=SUBJECTS, sans=st.lists(GENERAL_NAMES, max_size=6), extensions=EXTENSIONS, attributes=ATTRIBUTES)
@HYPOTHESIS
def test_a_request_gets_only_the_inventorys_names(ca, node_key, subject, sans, extensions, attributes):
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    for oid, value in attributes:
        builder = builder.add_attribute(oid, value)
    request = builder.sign(node_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    assert_only_inventory_names(sign(ca, request)["certificate"])


@given(extra=st.lists(st.one_of(st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z](\.[a-z][a-z0-9]{0,10}){0,3}\Z"),
                                st.ip_addresses(v=4).filter(lambda a: not (a.is_unspecified or a.is_multicast))
                                .map(str)), max_size=3),
       address=st.sampled_from([ADDRESS, "::1", "0.0.0.0", "::"]))
@HYPOTHESIS
def test_valid_inventory_names_are_certified_exactly(ca, node_key, extra, address):
    inventory = ("--dns", NODE, "--address", address, *(f"--extra-name={name}" for name in extra))
    answer = sign(ca, make_request(node_key, "127.0.0.1", "something-else"), inventory=inventory)
    shown = {"IPv4": "IP Address:{}", "IPv6": "IP Address:{}"}
    names = [f"DNS:{NODE}"]
    for name in ([] if ipaddress.ip_address(address).is_unspecified else [address]) + extra:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            entry = f"DNS:{name}"
        else:  # openssl writes IPv6 addresses in full, upper case
            entry = shown[f"IPv{ip.version}"].format(ip if ip.version == 4 else ":".join(
                f"{int(g, 16):X}" for g in ip.exploded.split(":")))
        if entry not in names:
            names.append(entry)
    assert_only_inventory_names(answer["certificate"], {**EXPECTED, "X509v3 Subject Alternative Name": ", ".join(names)})


# --- Inventory names that are no host's name are refused, saying which variable to fix -------------------------

WILDCARDS = st.sampled_from(["*", "*.corp.example.com", "rms-*.corp.example.com", "*rms-root-1", "a.*.b"])
NOT_DNS = st.one_of(
    st.sampled_from(["", ".", "rms root 1", "rms_root_1", "-rms", "rms-", "a..b", "rms-root-1.", "a" * 64,
                     ".".join(["a" * 63] * 4) + ".a", "rms/../x", "rms;rm -rf", "rms\n", "ümlaut.example"]),
    # No NUL: no command line carries one.
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12).filter(
        lambda s: not re.fullmatch(r"[A-Za-z0-9.-]*", s)))
ADDRESS_LIKE = st.one_of(st.ip_addresses(v=4).map(str), st.sampled_from(["127.1", "0x7f.1", "2130706433", "10.0.0",
                                                                        "017.0.0.1", "1.2.3.400"]))


@given(name=st.one_of(WILDCARDS, NOT_DNS, ADDRESS_LIKE))
@HYPOTHESIS
def test_a_node_name_that_is_no_dns_name_is_refused(ca, node_key, name):
    message = refusal(ca, make_request(node_key, ADDRESS, NODE), inventory=(f"--dns={name}", "--address", ADDRESS))
    assert "(server_instance)" in message
    assert ("wildcard" if "*" in name else "") in message


@given(name=st.one_of(WILDCARDS, NOT_DNS,
                      st.sampled_from(["127.1", "0x7f.1", "224.0.0.1", "ff02::1", "0.0.0.0", "::", "fe80::1%eth0"])))
@HYPOTHESIS
def test_an_extra_name_that_is_no_host_is_refused(ca, node_key, name):
    message = refusal(ca, make_request(node_key, ADDRESS, NODE), inventory=(*INVENTORY, f"--extra-name={name}"))
    assert "(server_tls_extra_names)" in message


@pytest.mark.parametrize("address", ["rms-root-1", "10.0.0.1/24", "*", ""])
def test_a_listen_address_that_is_no_address_is_refused(ca, node_key, address):
    message = refusal(ca, make_request(node_key, ADDRESS, NODE), inventory=("--dns", NODE, f"--address={address}"))
    assert "(server_listen_address)" in message


def test_without_a_request_the_names_and_the_ca_are_checked(ca):
    """What the role runs first, before the node's key is made."""
    assert sign(ca, "", inventory=(*INVENTORY, "--extra-name", "10.0.0.5")) == {
        "names": [f"DNS:{NODE}", f"IP:{ADDRESS}", "IP:10.0.0.5"]}
    assert "wildcard" in refusal(ca, "", inventory=("--dns", "*.corp.example.com", "--address", ADDRESS))


# --- Only a key the request proves, of a type and size this CA certifies ----------------------------------------

def tampered(request_pem: str, how: str, other_key) -> str:
    """The request with its signature broken, or naming another key than the one that signed it."""
    request = asn1_csr.CertificationRequest.load(x509.load_pem_x509_csr(request_pem.encode())
                                                 .public_bytes(serialization.Encoding.DER))
    if how == "flipped_signature_bit":
        signature = bytearray(request["signature"].native)
        signature[len(signature) // 2] ^= 0x01
        request["signature"] = bytes(signature)
    else:  # another key: another member's, or the CA's
        info = asn1_csr.CertificationRequestInfo.load(request["certification_request_info"].dump())
        info["subject_pk_info"] = asn1_keys.PublicKeyInfo.load(other_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        request["certification_request_info"] = info
    der = request.dump(force=True)
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("how", ["flipped_signature_bit", "another_members_key", "the_cas_key"])
def test_a_request_that_does_not_prove_its_key_is_refused(ca, node_key, how):
    other = (serialization.load_pem_private_key(ca[1].read_bytes(), None).public_key() if how == "the_cas_key"
             else ec.generate_private_key(ec.SECP256R1()).public_key())
    message = refusal(ca, tampered(make_request(node_key, ADDRESS, NODE), how, other))
    assert "does not verify" in message and "holds the key" in message


WEAK_KEYS = {
    "rsa_1024": lambda: rsa.generate_private_key(65537, 1024),
    "rsa_exponent_3": lambda: rsa.generate_private_key(3, 2048),
    "ec_p521": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ec_secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
    "dsa": lambda: dsa.generate_private_key(1024),
    "ed448": ed448.Ed448PrivateKey.generate,
}


@pytest.mark.parametrize("kind", WEAK_KEYS)
def test_a_key_this_ca_does_not_certify_is_refused(ca, kind):
    key = WEAK_KEYS[kind]()
    algorithm = None if kind == "ed448" else hashes.SHA256()
    request = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode())
    message = refusal(ca, request)
    assert "the node's key is" in message and "move the node's key" in message


def test_a_request_signed_with_sha1_is_refused(tmp_path, ca, node_key):
    key = tmp_path / "node.key"
    key.write_bytes(node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    request = subprocess.run(["openssl", "req", "-new", "-key", str(key), "-sha1", "-subj", f"/CN={NODE}"],
                             capture_output=True, text=True, check=True).stdout
    assert "signed with sha1" in refusal(ca, request)


@pytest.mark.parametrize("kind", ["rsa_2048", "ec_p384", "ed25519"])
def test_the_keys_this_ca_certifies(tmp_path, ca, kind):
    key = {"rsa_2048": lambda: rsa.generate_private_key(65537, 2048),
           "ec_p384": lambda: ec.generate_private_key(ec.SECP384R1()),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()
    request = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .sign(key, None if kind == "ed25519" else hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
               .decode())
    cert = tmp_path / "node.pem"
    cert.write_text(sign(ca, request)["certificate"])
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca[0]), "-purpose", "sslserver",
                               "-verify_hostname", NODE, str(cert)], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    usage = "Digital Signature, Key Encipherment" if kind.startswith("rsa") else "Digital Signature"
    assert openssl_view(cert.read_text())["X509v3 Key Usage"] == usage


# --- The current certificate read back from the host is checked again in full ------------------------------------

def forged_current(ca: tuple[Path, Path], key, change: str) -> str:
    """A certificate the CA's key signed, for the node's key, that differs from policy by `change`."""
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    sans = [x509.DNSName(NODE), x509.IPAddress(ipaddress.ip_address(ADDRESS))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE)])
    usage = {**ALL_USAGES, "content_commitment": False, "key_encipherment": False, "data_encipherment": False,
             "key_agreement": False, "key_cert_sign": False, "crl_sign": False}
    purposes, is_ca, extra = [ExtendedKeyUsageOID.SERVER_AUTH], False, None
    start, end = NOW - datetime.timedelta(minutes=5), NOW + datetime.timedelta(days=300)
    if change == "wildcard_san":
        sans.append(x509.DNSName("*.corp.example.com"))
    elif change == "another_members_name":
        sans.append(x509.DNSName("rms-root-2"))
    elif change == "another_address":
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.6.10")))
    elif change == "another_subject":
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pg.corp.example.com")])
    elif change == "ca_true":
        is_ca = True
    elif change == "cert_sign":
        usage["key_cert_sign"] = True
    elif change == "client_auth":
        purposes = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    elif change == "name_constraints":
        extra = x509.NameConstraints(permitted_subtrees=[x509.DNSName("corp.example.com")], excluded_subtrees=None)
    elif change == "longer_than_policy":
        end = NOW + datetime.timedelta(days=399)
    elif change == "not_yet_valid":
        start = NOW + datetime.timedelta(days=1)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
               .add_extension(x509.KeyUsage(**usage), critical=True))
    if extra:
        builder = builder.add_extension(extra, critical=True)
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    return pem + ("junk after the certificate\n" if change == "trailing_content" else "")


CURRENT_CHANGES = ["wildcard_san", "another_members_name", "another_address", "another_subject", "ca_true",
                   "cert_sign", "client_auth", "name_constraints", "longer_than_policy", "not_yet_valid",
                   "trailing_content"]


def test_a_current_certificate_as_policy_gives_it_is_kept(ca, node_key):
    """The control for the cases below: the same forgery without a change fits."""
    current = forged_current(ca, node_key, "none")
    assert sign(ca, make_request(node_key, ADDRESS, NODE), current)["issued"] is False


@pytest.mark.parametrize("change", CURRENT_CHANGES)
def test_a_current_certificate_naming_more_than_the_inventory_is_issued_anew(ca, node_key, change):
    current = forged_current(ca, node_key, change)
    answer = sign(ca, make_request(node_key, ADDRESS, NODE), current)
    assert answer["issued"] and answer["certificate"] != current
    assert_only_inventory_names(answer["certificate"])


@given(garbage=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                         st.just("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")))
@HYPOTHESIS
def test_a_current_certificate_that_is_garbage_is_replaced(ca, node_key, garbage):
    answer = sign(ca, make_request(node_key, ADDRESS, NODE), garbage)
    assert answer["issued"]
    assert_only_inventory_names(answer["certificate"])


# --- The CA key's passphrase ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encrypted_ca(tmp_path_factory):
    return make_ca(tmp_path_factory.mktemp("encrypted-ca"), "ca", 400, passphrase=PASSPHRASE)


def test_an_encrypted_ca_key_signs_with_its_passphrase(encrypted_ca, node_key):
    answer = sign(encrypted_ca, make_request(node_key, ADDRESS, NODE), passphrase=PASSPHRASE)
    assert answer["issued"]
    assert_only_inventory_names(answer["certificate"])


@pytest.mark.parametrize("given_passphrase", ["", "wrong-passphrase", PASSPHRASE + " "])
def test_an_encrypted_ca_key_without_its_passphrase_is_refused(encrypted_ca, node_key, given_passphrase):
    proc = run_script(encrypted_ca, make_request(node_key, ADDRESS, NODE), passphrase=given_passphrase)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "server_tls_ca_key_passphrase" in proc.stderr
    assert ("is encrypted" if not given_passphrase else "does not open") in proc.stderr
    assert PASSPHRASE not in proc.stderr and (not given_passphrase or given_passphrase not in proc.stderr)


def test_a_passphrase_for_a_plain_ca_key_is_refused(ca, node_key):
    message = refusal(ca, make_request(node_key, ADDRESS, NODE), passphrase=PASSPHRASE)
    assert "is not encrypted" in message and PASSPHRASE not in message


# --- The role's wiring: one playbook run ------------------------------------------------------------------------

def test_the_role_certifies_inventory_names_and_logs_no_passphrase(tmp_path, encrypted_ca):
    """Three nodes in one run at -vvv: one is certified for its inventory names; one whose name is a wildcard is
    refused before its key is made; one with a wrong passphrase is refused and keeps no certificate. The CA key's
    passphrase appears nowhere in the output."""
    base = tmp_path / "nodes"
    group = grp.getgrgid(os.getgid()).gr_name
    hosts = {
        "good": {"server_instance": "rms-good-1", "server_listen_address": "127.0.6.21",
                 "server_tls_extra_names": ["rms.corp.example.com"]},
        "wildcard": {"server_instance": "*.corp.example.com", "server_listen_address": "127.0.6.22"},
        "wrong": {"server_instance": "rms-wrong-1", "server_listen_address": "127.0.6.23",
                  "server_tls_ca_key_passphrase": "not-the-" + PASSPHRASE[::-1]},
    }
    inventory = {"all": {"hosts": hosts, "vars": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "server_base_dir": str(base), "server_venv_dir": sys.prefix, "server_rmsd_ready": True,
        "server_user": getpass.getuser(), "server_group": group,
        "server_tls_ca_certificate": str(encrypted_ca[0]), "server_tls_ca_key": str(encrypted_ca[1]),
        "server_tls_ca_key_passphrase": PASSPHRASE}}}
    (tmp_path / "inventory.yml").write_text(json.dumps(inventory))
    (tmp_path / "play.yml").write_text(json.dumps([{
        "name": "Node certificates", "hosts": "all", "gather_facts": False,
        "tasks": [{"name": "TLS", "ansible.builtin.include_role": {"name": "rmsops.rms.server", "tasks_from": "tls"}}],
    }]))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false")
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "inventory.yml", "play.yml",
                           "-vvv"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert PASSPHRASE not in output and PASSPHRASE[::-1] not in output
    assert re.search(r"^good\s+:.*failed=0", output, re.MULTILINE), output

    assert_only_inventory_names((base / "rms-good-1" / "tls" / "node.crt").read_text(), {
        **EXPECTED, "subject": "CN=rms-good-1",
        "X509v3 Subject Alternative Name": "DNS:rms-good-1, IP Address:127.0.6.21, DNS:rms.corp.example.com"})
    assert "(server_instance) '*.corp.example.com' is a wildcard" in output
    assert not (base / "*.corp.example.com").exists(), "refused before anything was made for it"
    assert "does not open the CA key" in output
    assert not (base / "rms-wrong-1").exists(), "refused before anything was made for it"
