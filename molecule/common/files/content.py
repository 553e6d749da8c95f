"""Protected documents that outlive a scenario step: publish one, open it later (fresh RAC from the root
cluster, use license, decrypt), republish it under the cluster's new key. What a user's RMS client does,
kept in a state file (0600: it holds the test users' keys) between calls.

usage: content.py --state FILE --issuer-dir DIR --root URL [--ca CA] publish NAME URL
       content.py ... open NAME --expect opened|refused
       content.py ... republish NAME
Run with the python of rmsd's virtualenv. Prints one line per call; exits 1 when --expect is not met.
"""

import argparse
import base64
import json
import os
import ssl
import sys
from pathlib import Path

import httpx
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.demo_issuer import token

OWNER, READER = "alice@example.com", "bob@example.com"


def client(url: str, ca: str | None) -> RmsClient:
    rms = RmsClient(url)
    if ca:
        rms.http = httpx.Client(base_url=url, timeout=15.0, verify=ssl.create_default_context(cafile=ca))
    return rms


def user(args, subject: str) -> User:
    """A user with a fresh RAC from the root cluster (an old one may come from a revoked root key)."""
    person = User.new(subject, token(args.issuer_dir, subject))
    client(args.root, args.ca).certify(person)
    return person


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, state: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=1)


def publish(args, state: dict, supersedes: str | None = None) -> None:
    doc = state[args.name] if supersedes else {"url": args.url, "content_id": f"doc-{args.name}"}
    text = f"The document {args.name}, readable by {READER} only.".encode()
    content_key, blob = encrypt_content(text)
    rms = client(doc["url"], args.ca)
    published = rms.publish(user(args, OWNER), doc["content_id"], content_key, {READER: ["VIEW"]},
                            supersedes=supersedes)
    doc.update(pl=published["pl"], pl_id=published["pl_id"], key_id=published["key_id"],
               blob=base64.b64encode(blob).decode(), text=text.decode())
    state[args.name] = doc
    verb = "republished" if supersedes else "published"
    print(f"{verb} {doc['content_id']} at {doc['url']}: PL {published['pl_id']} under cluster key {published['key_id']}"
          + (f", superseding PL {supersedes}" if supersedes else ""))


def open_document(args, state: dict) -> bool:
    doc = state[args.name]
    reader = user(args, READER)
    rms = client(doc["url"], args.ca)
    try:
        ul = rms.license(reader, doc["pl"])
    except ServiceError as err:
        print(f"refused {doc['content_id']} (PL {doc['pl_id']}, key {doc['key_id']}): HTTP {err.status}: {err.detail}")
        return args.expect == "refused"
    _claims, content_key = open_use_license(ul["ul"], rms.slc()["chain"][0], reader)
    opened = decrypt_content(content_key, base64.b64decode(doc["blob"])).decode()
    if opened != doc["text"]:
        print(f"FAILED: {doc['content_id']} decrypted to something else")
        return False
    print(f"opened {doc['content_id']} (PL {doc['pl_id']}, key {doc['key_id']}) as {READER}: {opened!r}")
    return args.expect == "opened"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--issuer-dir", required=True, type=Path)
    parser.add_argument("--root", required=True, help="URL of the root cluster (its balancer)")
    parser.add_argument("--ca", help="CA of the balancers' certificates")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish")
    p.add_argument("name")
    p.add_argument("url")
    p = sub.add_parser("open")
    p.add_argument("name")
    p.add_argument("--expect", choices=["opened", "refused"], required=True)
    p = sub.add_parser("republish")
    p.add_argument("name")
    args = parser.parse_args()
    state = load(args.state)
    if args.command == "publish":
        publish(args, state)
    elif args.command == "republish":
        publish(args, state, supersedes=state[args.name]["pl_id"])
    else:
        return 0 if open_document(args, state) else 1
    save(args.state, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
