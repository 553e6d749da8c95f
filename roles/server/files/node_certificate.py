"""Certify a node's TLS key with the operator's CA, on the controller (the CA key stays here).

    node_certificate.py --ca-certificate CA.pem --ca-key CA.key [--valid-days N] [--renew-days N]

Reads {"request": CSR PEM, "current": certificate PEM or ""} on stdin and prints
{"certificate": PEM, "issued": bool}. The current certificate is kept when it still fits: same key as
the request, the same names, issued by this CA, and valid for more than --renew-days. Uses the
`cryptography` package, which ansible-core already needs. Errors: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def names(obj) -> set:
    try:
        return set(obj.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def still_fits(current: x509.Certificate, request: x509.CertificateSigningRequest, ca: x509.Certificate,
               valid_days: int, renew_days: int) -> bool:
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (controllers may run Python 3.10)
    try:
        current.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another issuer or a bad signature: issue anew
        return False
    if public_der(current.public_key()) != public_der(request.public_key()) or names(current) != names(request):
        return False
    expires = current.not_valid_after_utc
    # Renew when expiry nears, unless a new certificate would not last longer (the CA itself expires first).
    renewed_expiry = min(now + datetime.timedelta(days=valid_days), ca.not_valid_after_utc)
    return expires - now > datetime.timedelta(days=renew_days) or renewed_expiry <= expires


def issue(request: x509.CertificateSigningRequest, ca: x509.Certificate, ca_key, valid_days: int) -> x509.Certificate:
    if not request.is_signature_valid:
        raise ValueError("the certificate request's signature is not valid")
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (controllers may run Python 3.10)
    sans = names(request)
    if not sans:
        raise ValueError("the certificate request names no address (subjectAltName)")
    subject = request.subject if request.subject.get_attributes_for_oid(NameOID.COMMON_NAME) else x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "rmsd node")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(request.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--ca-certificate", required=True)
    parser.add_argument("--ca-key", required=True)
    parser.add_argument("--valid-days", type=int, default=397)
    parser.add_argument("--renew-days", type=int, default=30)
    args = parser.parse_args()
    try:
        given = json.load(sys.stdin)
        with open(args.ca_certificate, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        with open(args.ca_key, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
        if public_der(ca_key.public_key()) != public_der(ca.public_key()):
            raise ValueError(f"{args.ca_key} is not the key of {args.ca_certificate}")
        request = x509.load_pem_x509_csr(given["request"].encode())
        current = given.get("current") or ""
        if current:
            certificate = x509.load_pem_x509_certificate(current.encode())
            if still_fits(certificate, request, ca, args.valid_days, args.renew_days):
                print(json.dumps({"certificate": current, "issued": False}))
                return 0
        pem = issue(request, ca, ca_key, args.valid_days).public_bytes(serialization.Encoding.PEM).decode()
        print(json.dumps({"certificate": pem, "issued": True}))
        return 0
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"node_certificate.py: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
