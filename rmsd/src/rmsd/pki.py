"""X.509 for RMS: server licensor certificates (SLC) and rights account certificates (RAC)."""

import hashlib
from datetime import datetime, timedelta
from typing import cast
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from rmsd.errors import InvalidRequestError
from rmsd.keys import ClusterKey, key_id_of

SLC_VALIDITY = timedelta(days=5 * 365)
RAC_VALIDITY = timedelta(days=365)
MIN_RAC_KEY_SIZE = 2048
MAX_RAC_KEY_SIZE = 16384
RAC_PUBLIC_EXPONENT = 65537
# The user id in a RAC: this URN in the subjectAltName, the id's UTF-8 percent-encoded (RFC 3986, every
# octet but the unreserved ones, upper-case hex), so any Unicode id is kept whole and has one encoding.
USER_ID_URN = "urn:rmsd:user-id:"
LEGACY_USER_URN = "urn:rmsd:user:"  # RACs issued before USER_ID_URN: the raw (ASCII) id
CN_MAX = 64  # octets of UTF-8 a CN may hold (cryptography enforces ub-common-name so)


def slc_subject(cluster_name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rmsd"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{role} cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} SLC"),
        ]
    )


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_pem(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def key_usage(certifies: bool) -> x509.KeyUsage:
    """Every key rmsd certifies signs and has content keys wrapped to it; a root SLC's also certifies."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=True, data_encipherment=False,
        key_agreement=False, key_cert_sign=certifies, crl_sign=certifies, encipher_only=False, decipher_only=False,
    )


def issue_root_slc(
    key: ClusterKey, cluster_name: str, urls: list[str], now: datetime
) -> x509.Certificate:
    """The root cluster's SLC: self-issued by the cluster key; it certifies RACs and licensing SLCs."""
    subject = slc_subject(cluster_name, "root")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + SLC_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(certifies=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    if urls:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in urls]), critical=False
        )
    return key.sign_certificate(builder)


def cluster_csr(key: ClusterKey, cluster_name: str) -> str:
    """A PKCS#10 request for a licensing cluster's SLC, signed by its cluster key.

    Built with asn1crypto and signed through `ClusterKey.sign`, so any key provider (an HSM too)
    can make it: the private key never has to be in this process."""
    from asn1crypto import csr as asn1_csr
    from asn1crypto import keys as asn1_keys
    from asn1crypto import pem
    from asn1crypto import x509 as asn1_x509

    spki = key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    info = asn1_csr.CertificationRequestInfo({
        "version": "v1",
        "subject": asn1_x509.Name.build({
            "organization_name": "rmsd",
            "organizational_unit_name": "licensing cluster",
            "common_name": f"{cluster_name} SLC",
        }),
        "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
        "attributes": [],
    })
    request = asn1_csr.CertificationRequest({
        "certification_request_info": info,
        "signature_algorithm": {"algorithm": "sha256_rsa"},
        "signature": key.sign(info.dump()),
    })
    return pem.armor("CERTIFICATE REQUEST", request.dump()).decode()


def issue_licensing_slc(
    root_key: ClusterKey, root_slc: x509.Certificate, cluster_name: str, csr: x509.CertificateSigningRequest,
    urls: list[str], now: datetime,
) -> x509.Certificate:
    """A licensing cluster's SLC: its cluster key certified by the root cluster's active key. It signs
    licenses, not certificates, so it is no CA."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(slc_subject(cluster_name, "licensing"))
        .issuer_name(root_slc.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + SLC_VALIDITY, root_slc.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(certifies=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(
            # The root SLC is this deployment's own, certifying an RSA cluster key.
            x509.AuthorityKeyIdentifier.from_issuer_public_key(cast(rsa.RSAPublicKey, root_slc.public_key())),
            critical=False,
        )
    )
    if urls:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in urls]), critical=False
        )
    return root_key.sign_certificate(builder)


def cert_key_id(cert: x509.Certificate) -> str:
    """The cluster key id (see rmsd.keys.key_id_of) of a certificate's subject key."""
    return key_id_of(cert.public_key())


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise InvalidRequestError("csr is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise InvalidRequestError("csr signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise InvalidRequestError(f"the RAC key must be RSA of at least {MIN_RAC_KEY_SIZE} bits")
    size, exponent = public_key.key_size, public_key.public_numbers().e
    if not MIN_RAC_KEY_SIZE <= size <= MAX_RAC_KEY_SIZE:
        raise InvalidRequestError(
            f"the RAC key is RSA of {size} bits: it must be RSA of at least {MIN_RAC_KEY_SIZE} bits "
            f"(and at most {MAX_RAC_KEY_SIZE})"
        )
    if exponent != RAC_PUBLIC_EXPONENT:
        shown = str(exponent) if exponent.bit_length() <= 64 else f"a {exponent.bit_length()}-bit number"
        raise InvalidRequestError(
            f"the RAC key's RSA public exponent is {shown}: only {RAC_PUBLIC_EXPONENT} is accepted"
        )
    return csr


def issue_rac(
    key: ClusterKey, slc: x509.Certificate, subject: str, csr: x509.CertificateSigningRequest, now: datetime,
    validity: timedelta = RAC_VALIDITY,
) -> x509.Certificate:
    """A RAC binding the authenticated `subject` (from the bearer token, not from the CSR) to the
    CSR's public key, issued by the root cluster key. The full id is in the subjectAltName (see
    USER_ID_URN); the CN is only a readable label. Valid for at most `validity` (never more than
    RAC_VALIDITY), and never beyond the SLC."""
    validity = min(validity, RAC_VALIDITY)
    names = [x509.NameAttribute(NameOID.COMMON_NAME, rac_common_name(subject))]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(names))
        .issuer_name(slc.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + validity, slc.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            key_usage(certifies=False),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName(_rac_names(subject)), critical=False)
        .add_extension(
            # The SLC is this root cluster's own, certifying its RSA cluster key.
            x509.AuthorityKeyIdentifier.from_issuer_public_key(cast(rsa.RSAPublicKey, slc.public_key())),
            critical=False,
        )
    )
    return key.sign_certificate(builder)


def user_id_uri(subject: str) -> str:
    return USER_ID_URN + quote(subject.encode("utf-8"), safe="")


def rac_common_name(subject: str) -> str:
    """The RAC's CN: the user id when its UTF-8 fits in the 64 octets X.509 allows a CN, else its start,
    an ellipsis and a hash of the whole id. Readable, never used to tell users apart."""
    if 0 < len(subject.encode("utf-8")) <= CN_MAX:
        return subject
    digest = hashlib.sha256(subject.encode("utf-8")).hexdigest()[:16]
    suffix = f"\u2026 (sha256:{digest})"
    room, start = CN_MAX - len(suffix.encode("utf-8")), ""
    for c in subject:
        if len((start + c).encode("utf-8")) > room:
            break
        start += c
    return start + suffix


def _rac_names(subject: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(user_id_uri(subject))]
    local, at, domain = subject.partition("@")
    if at and local and domain and subject.isascii() and subject.isprintable() and " " not in subject:
        names.append(x509.RFC822Name(subject))  # for other software's eyes; rac_subject reads the URN
    return names


def rac_subject(rac: x509.Certificate) -> str:
    """The full user id a RAC was issued to, from its USER_ID_URN (RACs issued before it: their legacy
    name). InvalidRequestError when it names no user, or more than one."""
    try:
        san = rac.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidRequestError("the RAC names no user") from None
    uris = [n.value for n in san if isinstance(n, x509.UniformResourceIdentifier)]
    encoded = [u.removeprefix(USER_ID_URN) for u in uris if u.startswith(USER_ID_URN)]
    if len(encoded) > 1:
        raise InvalidRequestError("the RAC names more than one user")
    if encoded:
        try:
            subject = unquote(encoded[0], encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            raise InvalidRequestError("the RAC's user id is not UTF-8") from None
        if user_id_uri(subject) != USER_ID_URN + encoded[0]:
            raise InvalidRequestError("the RAC's user id is not canonically encoded")
        return subject
    for name in san:  # a RAC issued before USER_ID_URN: the id as it was written then
        if isinstance(name, x509.RFC822Name):
            return name.value
        if isinstance(name, x509.UniformResourceIdentifier) and name.value.startswith(LEGACY_USER_URN):
            return name.value.removeprefix(LEGACY_USER_URN)
    raise InvalidRequestError("the RAC names no user")


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate, now: datetime) -> bool:
    """True when `cert` was signed by `issuer`'s key and is valid at `now`."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()
