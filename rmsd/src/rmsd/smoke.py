"""One real round trip through one node with a real user's bearer token: what a rollout checks before it puts a
restarted node back behind its balancer. The user gets a RAC, publishes a small document to themselves (as its
owner) and gets a use license for it, which must open the document with their RAC key; the node must name itself
in GET /health. Nothing secret is printed: the token comes from the environment, the result is metadata."""

import base64
import binascii
import json
import uuid

from rmsd.client import RmsClient, User, decrypt_content, encrypt_content, open_use_license
from rmsd.errors import RmsdError

DOCUMENT = b"rmsd round trip check"


def subject_of(token: str) -> str:
    """The token's `sub`, read without verifying it (the node verifies it): only to name the user's RAC request."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        subject = claims["sub"]
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        raise RmsdError("the bearer token is not a JWT with a subject (sub)") from None
    if not isinstance(subject, str) or not subject:
        raise RmsdError("the bearer token is not a JWT with a subject (sub)")
    return subject


def roundtrip(url: str, token: str, ca_file: str | None = None, timeout: float = 10.0) -> dict:
    """{node, version, cluster, content_id, key_id}; RmsdError (or ServiceError) when a step fails."""
    client = RmsClient(url, timeout=timeout, ca_file=ca_file)
    health = client.health()
    slc = client.slc()
    user = User.new(subject_of(token), token)
    client.certify(user)
    content_key, blob = encrypt_content(DOCUMENT)
    content_id = f"rmsd-roundtrip-check-{uuid.uuid4()}"
    published = client.publish(user, content_id, content_key, {"group:rmsd-roundtrip-check": ["VIEW"]})
    granted = client.license(user, published["pl"])
    _claims, opened = open_use_license(granted["ul"], slc["chain"][0], user)
    if decrypt_content(opened, blob) != DOCUMENT:
        raise RmsdError(f"the use license from {url} opened a content key that does not decrypt the document")
    return {"node": health.get("node"), "version": health.get("version"), "cluster": slc.get("cluster"),
            "content_id": content_id, "key_id": published["key_id"]}
