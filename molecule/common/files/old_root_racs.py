"""RACs of a root key revoked as compromised, against every licensing cluster: what an attacker who stole
the root key could do once the key is revoked and the licensing clusters re-enrolled.

  prepare: before the rotation, a user gets a RAC from the root cluster (under the key about to be
           revoked), publishes a document at each licensing cluster and opens it there, so each licensing
           node has verified that RAC. The user's key, the RAC, the root SLC it was issued under and the
           PLs go into the state file (0600).
  check:   after the rotation, each licensing cluster must refuse (403) the RAC issued before the rotation
           and a RAC minted with the compromised root key, and open the document with a RAC the root
           cluster issues now. The compromised key's private half comes from where an attacker with a copy
           of the configuration database and the key password finds it: its PKCS#8 blob, opened here by
           the cryptography package, which also signs the minted RAC (not rmsd's issuer), in the layout rmsd
           gives RACs.

usage: old_root_racs.py --state FILE --issuer-dir DIR --root URL [--ca CA] --licensing URL (each cluster)
         prepare | check --database-url URL --database-password-file FILE --key-password-file FILE
The password files are the scenario's own (0600), read here so no secret is on a command line. Run with the
python of rmsd's virtualenv. Prints one line per licensing cluster; exits 1 when one does not answer as it
must.
"""

import argparse
import json
import os
import ssl
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from rmsd.client import RmsClient, ServiceError, User, encrypt_content
from rmsd.clusters import key_row
from rmsd.db import make_engine
from rmsd.demo_issuer import token
from rmsd.keys import key_id_of

SUBJECT = "rac-check@example.com"
CONTENT_ID = "doc-old-root-rac-check"


def client(url: str, ca: str | None) -> RmsClient:
    rms = RmsClient(url)
    if ca:
        rms.http = httpx.Client(base_url=url, timeout=15.0, verify=ssl.create_default_context(cafile=ca))
    return rms


def save(path: Path, state: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)


def prepare(args) -> int:
    user = User.new(SUBJECT, token(args.issuer_dir, SUBJECT))
    root = client(args.root, args.ca)
    root_slc = root.slc()["chain"][0]  # the SLC of the root cluster's active key, which issues the RAC
    root.certify(user)
    x509.load_pem_x509_certificate(user.rac_pem.encode()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(root_slc.encode()))
    state = {"private_key": user.private_key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()).decode(),
             "rac": user.rac_pem, "root_slc": root_slc, "pls": {}}
    for url in args.licensing:
        rms = client(url, args.ca)
        published = rms.publish(user, CONTENT_ID, encrypt_content(b"checked with old root RACs")[0],
                                {SUBJECT: ["VIEW"]})
        rms.license(user, published["pl"])  # the licensing node verifies (and keeps) this RAC
        state["pls"][url] = published["pl"]
        print(f"{url}: published {CONTENT_ID} and opened it with a RAC of root key {cert_key_id(root_slc)}")
    save(args.state, state)
    return 0


def cert_key_id(pem: str) -> str:
    return key_id_of(x509.load_pem_x509_certificate(pem.encode()).public_key())


def mint_rac(issuer_key, issuer_slc: x509.Certificate, subject: str, user_key) -> str:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject[:64])]))
        .issuer_name(issuer_slc.subject)
        .public_key(user_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier("urn:rmsd:user-id:" + quote(subject.encode(), safe="")),
            x509.RFC822Name(subject)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_slc.public_key()),
                       critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def secret(path: Path) -> str:
    return path.read_text().rstrip("\n")


def stolen_root_key(args, key_id: str):
    """The compromised root key's private half, from its PKCS#8 blob in the configuration database."""
    engine = make_engine(args.database_url, secret(args.database_password_file))
    try:
        with engine.connect() as conn:
            row = key_row(conn, key_id)
    finally:
        engine.dispose()
    if row is None or row.status != "compromised" or row.encrypted_private_key is None:
        raise SystemExit(f"root key {key_id} is no compromised key with its private half in the database")
    key_password = secret(args.key_password_file).encode()
    return serialization.load_der_private_key(row.encrypted_private_key, key_password)


def answer(rms: RmsClient, user: User, pl: str) -> int:
    try:
        rms.license(user, pl)
    except ServiceError as err:
        return err.status
    return 200


def check(args) -> int:
    state = json.loads(args.state.read_text())
    key = serialization.load_pem_private_key(state["private_key"].encode(), None)
    fresh = User(SUBJECT, token(args.issuer_dir, SUBJECT), key)
    client(args.root, args.ca).certify(fresh)  # under the root cluster's active key
    old_slc = x509.load_pem_x509_certificate(state["root_slc"].encode())
    old_key_id = cert_key_id(state["root_slc"])
    minted = mint_rac(stolen_root_key(args, old_key_id), old_slc, SUBJECT, key)
    ok = True
    for url in args.licensing:
        rms, pl = client(url, args.ca), state["pls"][url]
        seen = {"issued_before": answer(rms, User(SUBJECT, fresh.token, key, state["rac"]), pl),
                "minted": answer(rms, User(SUBJECT, fresh.token, key, minted), pl),
                "fresh": answer(rms, fresh, pl)}
        wanted = {"issued_before": 403, "minted": 403, "fresh": 200}
        ok = ok and seen == wanted
        print(json.dumps({"licensing_cluster": url, "revoked_root_key": old_key_id, "answers": seen,
                          "as_required": seen == wanted}))
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--issuer-dir", required=True, type=Path)
    parser.add_argument("--root", required=True, help="URL of the root cluster (its balancer)")
    parser.add_argument("--ca", help="CA of the balancers' certificates")
    parser.add_argument("--licensing", action="append", required=True, help="URL of a licensing cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare")
    p = sub.add_parser("check")
    p.add_argument("--database-url", required=True, help="the root cluster's configuration database")
    p.add_argument("--database-password-file", required=True, type=Path)
    p.add_argument("--key-password-file", required=True, type=Path, help="the root cluster's key password")
    args = parser.parse_args()
    return prepare(args) if args.command == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
