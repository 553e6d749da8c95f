"""The point-in-time restore drill's client, through the balancer over TLS.

  restore_drill.py publish --out FILE CONTENT_ID   certify alice, publish CONTENT_ID for bob, license it once;
                                                  FILE gets {"pl", "pl_id", "content_id"}
  restore_drill.py license --pl-file FILE          certify bob anew and ask for a use license: prints
                                                  {"status": 200 or the refusal's, "detail": ...}
Common options: --url URL --ca CA --issuer-dir DIR. Run with the python of rmsd's virtualenv.
"""

import argparse
import json
import ssl
import sys
from pathlib import Path

import httpx
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.demo_issuer import token

DOCUMENT = b"Minutes of the board, restored or not."


def client(args) -> RmsClient:
    rms = RmsClient(args.url)
    rms.http = httpx.Client(base_url=args.url, timeout=30.0, verify=ssl.create_default_context(cafile=args.ca))
    return rms


def user(args, rms: RmsClient, subject: str) -> User:
    made = User.new(subject, token(args.issuer_dir, subject, ["board"]))
    rms.certify(made)
    return made


def publish(args) -> int:
    rms = client(args)
    alice, bob = user(args, rms, "alice@example.com"), user(args, rms, "bob@example.com")
    content_key, blob = encrypt_content(DOCUMENT)
    published = rms.publish(alice, args.content_id, content_key, {"bob@example.com": ["VIEW"]})
    granted = rms.license(bob, published["pl"])
    _claims, opened = open_use_license(granted["ul"], rms.slc()["chain"][0], bob)
    assert decrypt_content(opened, blob) == DOCUMENT
    args.out.write_text(json.dumps({k: published[k] for k in ("pl", "pl_id")} | {"content_id": args.content_id}))
    print(json.dumps({"published": args.content_id, "pl_id": published["pl_id"]}))
    return 0


def license_(args) -> int:
    rms = client(args)
    bob = user(args, rms, "bob@example.com")
    try:
        granted = rms.license(bob, json.loads(args.pl_file.read_text())["pl"])
    except ServiceError as err:
        print(json.dumps({"status": err.status, "detail": err.detail}))
    else:
        print(json.dumps({"status": 200, "detail": f"use license with rights {granted['rights']}"}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--issuer-dir", required=True, type=Path)
    commands = parser.add_subparsers(dest="command", required=True)
    publishing = commands.add_parser("publish")
    publishing.add_argument("--out", required=True, type=Path)
    publishing.add_argument("content_id")
    licensing = commands.add_parser("license")
    licensing.add_argument("--pl-file", required=True, type=Path)
    args = parser.parse_args()
    return publish(args) if args.command == "publish" else license_(args)


if __name__ == "__main__":
    sys.exit(main())
