"""Bearer-token authentication: JWTs from a configured issuer, verified against its JWKS."""

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from rmsd.errors import AuthenticationError, RmsdError

ALLOWED_ALGS = ["RS256", "PS256", "ES256"]
JWKS_TTL = 300.0
LEEWAY = 30


@dataclass(frozen=True)
class Principal:
    subject: str
    groups: tuple[str, ...]


class TokenVerifier:
    def __init__(self, issuer: str, audience: str, jwks_uri: str):
        if not issuer or not jwks_uri:
            raise RmsdError("identity_issuer and identity_jwks_uri must be set to authenticate users")
        self.issuer, self.audience, self.jwks_uri = issuer, audience, jwks_uri
        self._keys: KeySet | None = None
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _load_jwks(self) -> KeySet:
        url = urlparse(self.jwks_uri)
        try:
            if url.scheme == "file":
                data = json.loads(Path(url.path).read_text())
            elif url.scheme in ("http", "https"):
                response = httpx.get(self.jwks_uri, timeout=5.0)
                response.raise_for_status()
                data = response.json()
            else:
                raise RmsdError(f"identity_jwks_uri scheme {url.scheme!r} is not supported (file, http, https)")
            return KeySet.import_key_set(data)
        except (OSError, ValueError, httpx.HTTPError, JoseError) as err:
            raise AuthenticationError(f"the issuer's JWKS at {self.jwks_uri} cannot be read: {err}") from None

    def _keyset(self, refresh: bool = False) -> KeySet:
        with self._lock:
            if refresh or self._keys is None or time.monotonic() - self._fetched > JWKS_TTL:
                self._keys = self._load_jwks()
                self._fetched = time.monotonic()
            return self._keys

    def verify(self, token: str) -> Principal:
        try:
            try:
                decoded = jwt.decode(token, self._keyset(), algorithms=ALLOWED_ALGS)
            except (ValueError, JoseError) as err:
                if "kid" not in str(err).lower() and "key" not in str(err).lower():
                    raise
                # The issuer may have rotated its signing key: fetch the JWKS again once.
                decoded = jwt.decode(token, self._keyset(refresh=True), algorithms=ALLOWED_ALGS)
            claims = jwt.JWTClaimsRegistry(
                leeway=LEEWAY,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True},
                sub={"essential": True},
            )
            claims.validate(decoded.claims)
        except (ValueError, JoseError) as err:
            raise AuthenticationError(f"bearer token rejected: {err}") from None
        subject = str(decoded.claims["sub"])
        if not subject or any(ord(c) < 32 or ord(c) == 127 for c in subject):
            raise AuthenticationError("bearer token rejected: 'sub' must be printable text")
        groups = decoded.claims.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise AuthenticationError("bearer token rejected: 'groups' must be a list of strings")
        return Principal(subject=subject, groups=tuple(groups))
