"""Certify a node's TLS key with the operator's CA, on the controller (the CA key stays here).

    node_certificate.py --ca-certificate CA.pem --ca-key CA.key --dns NAME --address IP [--extra-name NAME]...
                        [--valid-days N] [--renew-days N]

The names come from the inventory, never from the host: CN and the first DNS name are --dns (the node's
server_instance), the IP address is --address (its server_listen_address; a wildcard address such as 0.0.0.0
names no host and is left out), then every --extra-name (server_tls_extra_names: DNS names or IP addresses).
Wildcards and names that are not DNS names are refused. The managed host is not trusted: of its certificate
request only the key is used, once the request's signature proves the host holds it and the key is of a type
and size this CA certifies; its subject, names, extensions and attributes are ignored.

Reads {"request": CSR PEM, "current": certificate PEM or "", "ca_key_passphrase": str or ""} on stdin (the
passphrase of an encrypted CA key travels there, never on a command line) and prints {"certificate": PEM,
"issued": bool, "names": [...]}. Without a request it checks the names and the CA only and prints {"names":
[...]}. The current certificate is kept when it still fits: issued by this CA for the request's key, exactly
the inventory's names, a server certificate only, valid now and for more than --renew-days (or as long as a
new one would be). Uses the `cryptography` package, which ansible-core already needs. Errors: one line on
stderr, exit 1; they never hold the passphrase.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import re
import socket
import sys

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
CN_MAX = 64  # ub-common-name (RFC 5280); a longer name is in the subjectAltName only
RSA_BITS = (2048, 8192)
CURVES = (ec.SECP256R1, ec.SECP384R1)
PROOF_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
# What this script puts in a certificate; a current certificate with anything else is issued anew.
EXTENSIONS = {ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
              ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
              ExtensionOID.SUBJECT_KEY_IDENTIFIER}


class Refused(Exception):
    """Input this CA does not sign for, with what to do about it."""


KEY_ADVICE = ("use EC P-256 (what rmsd tls-request makes), P-384, Ed25519, or RSA of 2048 to 8192 bits with "
              "exponent 65537: move the node's key (node.key in its TLS folder) away and run again to make a new one")


def public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def dns_name(name: str, what: str) -> x509.DNSName:
    """An LDH host name, lower case: no wildcard, nothing a resolver or a TLS client would read as an address."""
    if "*" in name:
        raise Refused(f"{what} {name!r} is a wildcard; a node's certificate names that node alone, so give its "
                      "own DNS name")
    if not name.isascii():
        raise Refused(f"{what} {name!r} is not ASCII; give an internationalized name in its xn-- (A-label) form")
    lower = name.lower()
    if len(lower) > 253 or not all(LABEL.fullmatch(label) for label in lower.split(".")):
        raise Refused(f"{what} {name!r} is not a DNS name: labels of 1 to 63 letters, digits and '-' (not first "
                      "or last), separated by '.', no trailing '.', 253 characters at most")
    try:
        socket.inet_aton(lower)  # 127.1, 0x7f.1 and 2130706433 are addresses too
        looks_like_address = True
    except OSError:
        looks_like_address = lower.rsplit(".", 1)[-1].isdigit()
    if looks_like_address:
        raise Refused(f"{what} {name!r} looks like an IP address, not a DNS name; give addresses in "
                      "server_listen_address or server_tls_extra_names as they are (a.b.c.d), and a DNS name here")
    return x509.DNSName(lower)


def ip_name(text: str, what: str) -> x509.IPAddress:
    address = ipaddress.ip_address(text)
    if address.is_unspecified or address.is_multicast or getattr(address, "scope_id", None):
        raise Refused(f"{what} {text!r} is not the address of one host (a wildcard, multicast or scoped "
                      "address); give the address the node is reached at")
    return x509.IPAddress(address)


def policy_names(dns: str, address: str, extra: list[str]) -> list[x509.GeneralName]:
    """The names the node's certificate carries, from the inventory alone: its name, its address, the extra ones."""
    names: list[x509.GeneralName] = [dns_name(dns, "the node's name (server_instance)")]
    try:
        listen = ipaddress.ip_address(address)
    except ValueError:
        raise Refused(f"the listen address {address!r} (server_listen_address) is not an IP address; the node "
                      "listens on an address, give further names in server_tls_extra_names") from None
    if not listen.is_unspecified:  # 0.0.0.0 or :: names no host
        names.append(ip_name(address, "the listen address (server_listen_address)"))
    for name in extra:
        what = "the extra name (server_tls_extra_names)"
        try:
            ipaddress.ip_address(name)
        except ValueError:
            names.append(dns_name(name, what))
        else:
            names.append(ip_name(name, what))
    return list(dict.fromkeys(names))


def subject_of(names: list[x509.GeneralName]) -> x509.Name:
    common_name = names[0].value
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if len(common_name) <= CN_MAX else [])


def check_key(key) -> None:
    """Refuse a key this CA does not certify, saying which key it is."""
    if isinstance(key, rsa.RSAPublicKey):
        if not RSA_BITS[0] <= key.key_size <= RSA_BITS[1] or key.public_numbers().e != 65537:
            raise Refused(f"the node's key is RSA of {key.key_size} bits with exponent {key.public_numbers().e}; "
                          + KEY_ADVICE)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, CURVES):
            raise Refused(f"the node's key is EC on the curve {key.curve.name}; " + KEY_ADVICE)
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise Refused(f"the node's key is of a type this CA does not certify ({type(key).__name__}); " + KEY_ADVICE)


def proven_key(request_pem: str):
    """The key of the host's certificate request, once the request's own signature proves the host holds it."""
    try:
        request = x509.load_pem_x509_csr(request_pem.encode())
    except ValueError:
        raise Refused("the host's certificate request is no PEM certificate request; see what rmsd tls-request "
                      "prints on the host") from None
    try:
        key = request.public_key()
        check_key(key)
        proof_hash = request.signature_hash_algorithm
        valid = request.is_signature_valid
    except UnsupportedAlgorithm:
        raise Refused("the host's certificate request uses a key or signature algorithm this CA does not "
                      "certify; " + KEY_ADVICE) from None
    if not isinstance(key, ed25519.Ed25519PublicKey) and not isinstance(proof_hash, PROOF_HASHES):
        raise Refused(f"the host's certificate request is signed with {proof_hash.name if proof_hash else 'no hash'}"
                      ", too weak to prove the host holds the key; rmsd tls-request signs with SHA-256")
    if not valid:
        raise Refused("the signature of the host's certificate request does not verify: it does not prove that "
                      "the host holds the key; run again, and look at the host if it happens again")
    return key


def still_fits(current: x509.Certificate, key, names: list[x509.GeneralName], ca: x509.Certificate,
               valid_days: int, renew_days: int) -> bool:
    """Everything about the certificate slurped from the host is checked again: it is the host's word."""
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (controllers may run Python 3.10)
    try:
        current.verify_directly_issued_by(ca)
        subject, extensions = current.subject, current.extensions
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
        purposes = list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        sans = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm, x509.ExtensionNotFound):
        return False  # another issuer, a bad signature, or not what this script issues: issue anew
    if (public_der(current.public_key()) != public_der(key) or subject != subject_of(names)
            or len(sans) != len(names) or set(sans) != set(names)
            or {e.oid for e in extensions} - EXTENSIONS or constraints.ca
            or usage.key_cert_sign or usage.crl_sign or purposes != [ExtendedKeyUsageOID.SERVER_AUTH]):
        return False
    expires = current.not_valid_after_utc
    renewed_expiry = min(now + datetime.timedelta(days=valid_days), ca.not_valid_after_utc)
    if current.not_valid_before_utc > now or expires > renewed_expiry:
        return False  # not valid yet, or lasting longer than the policy gives
    # Renew when expiry nears, unless a new certificate would not last longer (the CA itself expires first).
    return expires - now > datetime.timedelta(days=renew_days) or renewed_expiry <= expires


def issue(key, names: list[x509.GeneralName], ca: x509.Certificate, ca_key, valid_days: int) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (controllers may run Python 3.10)
    subject = subject_of(names)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca.not_valid_after_utc))
        # Critical when the subject is empty (RFC 5280, 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(names), critical=not subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPublicKey),
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(ca_key, None if isinstance(ca_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
              else hashes.SHA256())
    )


def load_ca(certificate_path: str, key_path: str, passphrase: str):
    with open(certificate_path, "rb") as f:
        try:
            ca = x509.load_pem_x509_certificate(f.read())
        except ValueError:
            raise Refused(f"{certificate_path} holds no PEM certificate (server_tls_ca_certificate)") from None
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise Refused(f"{certificate_path} is not a CA certificate (basicConstraints CA:TRUE); give the CA's "
                      "certificate in server_tls_ca_certificate")
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (controllers may run Python 3.10)
    if not ca.not_valid_before_utc <= now < ca.not_valid_after_utc:
        raise Refused(f"the CA certificate {certificate_path} is not valid now (valid from "
                      f"{ca.not_valid_before_utc:%Y-%m-%d %H:%M} until {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC);"
                      " renew the CA")
    with open(key_path, "rb") as f:
        data = f.read()
    try:
        ca_key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError:  # cryptography: a passphrase missing for an encrypted key, or given for a plain one
        if passphrase:
            raise Refused(f"the CA key {key_path} is not encrypted, yet a passphrase was given; encrypt it with "
                          "that passphrase (openssl pkey -aes256), or leave server_tls_ca_key_passphrase "
                          "empty") from None
        raise Refused(f"the CA key {key_path} is encrypted; give its passphrase in server_tls_ca_key_passphrase "
                      "(from a vault)") from None
    except (ValueError, UnsupportedAlgorithm):
        if passphrase:
            raise Refused(f"the passphrase (server_tls_ca_key_passphrase) does not open the CA key {key_path}, "
                          "or the file holds no PEM private key; give the passphrase it was encrypted "
                          "with") from None
        raise Refused(f"{key_path} holds no PEM private key (server_tls_ca_key)") from None
    if public_der(ca_key.public_key()) != public_der(ca.public_key()):
        raise Refused(f"{key_path} is not the key of {certificate_path}")
    return ca, ca_key


def current_certificate(pem: str) -> x509.Certificate | None:
    """The host's current certificate, if the file holds exactly one certificate and nothing else."""
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return None
    return certificate if certificate.public_bytes(serialization.Encoding.PEM).decode().strip() == pem.strip() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--ca-certificate", required=True)
    parser.add_argument("--ca-key", required=True)
    parser.add_argument("--dns", required=True, help="the node's name (server_instance): CN and first DNS name")
    parser.add_argument("--address", required=True, help="the node's listen address; a wildcard one is left out")
    parser.add_argument("--extra-name", action="append", default=[], help="a further DNS name or IP address")
    parser.add_argument("--valid-days", type=int, default=397)
    parser.add_argument("--renew-days", type=int, default=30)
    args = parser.parse_args()
    try:
        given = json.load(sys.stdin)
        if not isinstance(given, dict):
            raise Refused("stdin holds no JSON object")
        names = policy_names(args.dns, args.address, args.extra_name)
        shown = [f"{'DNS' if isinstance(n, x509.DNSName) else 'IP'}:{n.value}" for n in names]
        ca, ca_key = load_ca(args.ca_certificate, args.ca_key, str(given.get("ca_key_passphrase") or ""))
        if not given.get("request"):
            print(json.dumps({"names": shown}))
            return 0
        key = proven_key(str(given["request"]))
        current_pem = str(given.get("current") or "")
        current = current_certificate(current_pem)
        if current and still_fits(current, key, names, ca, args.valid_days, args.renew_days):
            print(json.dumps({"certificate": current_pem, "issued": False, "names": shown}))
            return 0
        pem = issue(key, names, ca, ca_key, args.valid_days).public_bytes(serialization.Encoding.PEM).decode()
        print(json.dumps({"certificate": pem, "issued": True, "names": shown}))
        return 0
    except (OSError, ValueError, KeyError, TypeError, Refused) as err:
        print(f"node_certificate.py: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
