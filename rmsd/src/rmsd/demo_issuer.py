"""A local JWT issuer for the demo and the tests: one RSA signing key in a folder, its JWKS beside it.
Not for production: point rmsd at your identity provider's issuer and JWKS instead."""

import json
import os
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import RSAKey

ISSUER = "https://issuer.rmsd.invalid/demo"
AUDIENCE = "rmsd"


def init(directory: Path) -> bool:
    """Create the issuer in `directory` unless it exists; True when created."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = directory / "signing-key.json"
    if key_path.exists():
        return False
    key = RSAKey.generate_key(2048, parameters={"kid": f"demo-{int(time.time())}", "use": "sig", "alg": "RS256"})
    fd = os.open(key_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key.as_dict(private=True), f)
    (directory / "jwks.json").write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    (directory / "issuer.json").write_text(json.dumps({"issuer": ISSUER, "audience": AUDIENCE}))
    return True


def jwks_uri(directory: Path) -> str:
    return (directory / "jwks.json").resolve().as_uri()


def token(directory: Path, subject: str, groups=(), ttl: int = 300, audience: str = AUDIENCE,
          issuer: str = ISSUER, now: float | None = None, claims: dict | None = None) -> str:
    """A signed JWT; `claims` overrides the usual ones (a None value leaves that claim out)."""
    key = RSAKey.import_key(json.loads((directory / "signing-key.json").read_text()))
    now = int(now if now is not None else time.time())
    made = {"iss": issuer, "aud": audience, "sub": subject, "iat": now, "nbf": now, "exp": now + ttl}
    if groups:
        made["groups"] = list(groups)
    made.update(claims or {})
    claims = {name: value for name, value in made.items() if value is not None}
    return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)

