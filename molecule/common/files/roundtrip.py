"""RAC -> PL -> UL through the balancers: users are certified by the root cluster (through its
balancer), then a document is published to and licensed by each cluster named on the command line
(through that cluster's balancer). The UL is opened with the publishing cluster's SLC and the
content decrypted; a user without rights is refused.

usage: roundtrip.py --ca CA --issuer-dir DIR --root URL [--template NAME] NAME=URL [NAME=URL ...]
Run with the python of rmsd's virtualenv. Exits non-zero when anything fails.
"""

import argparse
import ssl
import sys
from pathlib import Path

import httpx
from rmsd.client import (
    RmsClient,
    ServiceError,
    User,
    b64url,
    decrypt_content,
    encrypt_content,
    open_use_license,
)
from rmsd.demo_issuer import token

DOCUMENT = b"Budget 2027: for the finance department only."


def client(url: str, ca: str) -> RmsClient:
    rms = RmsClient(url)
    # The balancers' certificates come from the scenario's CA.
    rms.http = httpx.Client(base_url=url, timeout=15.0, verify=ssl.create_default_context(cafile=ca))
    return rms


def roundtrip(name: str, url: str, root: RmsClient, ca: str, issuer: Path, template: str | None) -> bool:
    rms = client(url, ca)
    slc = rms.slc()
    print(f"[{name}] cluster {slc['cluster']} ({slc['role']}) at {url}, SLC chain of {len(slc['chain'])}")
    bob = User.new("bob@example.com", token(issuer, "bob@example.com", ["finance", "dept"]))
    alice = User.new("alice@example.com", token(issuer, "alice@example.com"))
    mallory = User.new("mallory@example.com", token(issuer, "mallory@example.com"))
    for user in (alice, bob, mallory):
        root.certify(user)
    print(f"[{name}] RACs issued by the root cluster to {alice.subject}, {bob.subject}, {mallory.subject}")

    content_key, blob = encrypt_content(DOCUMENT)
    published = rms.publish(alice, f"doc-{name}-budget", content_key, {"group:finance": ["VIEW", "PRINT"]})
    granted = rms.license(bob, published["pl"])
    claims, opened = open_use_license(granted["ul"], slc["chain"][0], bob)
    if decrypt_content(opened, blob) != DOCUMENT:
        print(f"[{name}] FAILED: the decrypted content differs from the original")
        return False
    print(f"[{name}] PL {published['pl_id']} -> UL for {bob.subject} with rights {', '.join(claims['rights'])}; "
          "content decrypted")
    try:
        rms.license(mallory, published["pl"])
    except ServiceError as err:
        if err.status != 403:
            raise
        print(f"[{name}] UL refused for {mallory.subject}: HTTP {err.status}")
    else:
        print(f"[{name}] FAILED: {mallory.subject} got a use license without rights")
        return False

    if template:
        body = {"content_id": f"doc-{name}-template", "content_key": b64url(content_key), "template": template}
        response = rms.http.post("/publishing", json=body, headers={"Authorization": f"Bearer {alice.token}"})
        response.raise_for_status()
        rights = rms.license(bob, response.json()["pl"])["rights"]
        print(f"[{name}] PL from template {template} -> UL for {bob.subject} with rights {', '.join(rights)}")
        if not rights:
            print(f"[{name}] FAILED: the template granted nothing")
            return False
    print(f"[{name}] round trip OK")
    return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ca", required=True)
    parser.add_argument("--issuer-dir", required=True, type=Path)
    parser.add_argument("--root", required=True, help="URL of the root cluster (its balancer)")
    parser.add_argument("--template", action="append", default=[], metavar="CLUSTER=NAME",
                        help="also publish from this rights policy template on that cluster")
    parser.add_argument("clusters", nargs="+", metavar="NAME=URL")
    args = parser.parse_args()
    templates = dict(item.split("=", 1) for item in args.template)
    root = client(args.root, args.ca)
    ok = True
    for item in args.clusters:
        name, url = item.split("=", 1)
        ok = roundtrip(name, url, root, args.ca, args.issuer_dir, templates.get(name)) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
