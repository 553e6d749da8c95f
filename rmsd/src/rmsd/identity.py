"""Bearer-token authentication: JWTs from a configured issuer, verified against its JWKS."""

import json
import math
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
from joserfc import jwt
from joserfc.errors import BadSignatureError, ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import KeySet

from rmsd import caches
from rmsd.errors import AuthenticationError, InvalidRequestError, RmsdError

ALLOWED_ALGS = ["RS256", "PS256", "ES256"]
JWKS_TTL = 300.0
LEEWAY = 30
REQUIRED_CLAIMS = ("exp", "iss", "aud", "sub")

# --- the principal grammar (documented in rmsd/README.md, "Identities and principals") ------------
#
#   identifier = 1*256 <Unicode scalar value, except general categories Cc (control) and Cs (surrogate)>
#   user-id    = identifier           ; the bearer token's "sub", compared code point by code point
#   group-name = identifier           ; one entry of the bearer token's "groups" claim, compared the same way
#   principal  = "user:" user-id / "group:" group-name / bare-user-id     ; a key of a PL's rights
#   bare-user-id = user-id whose text before its first ":" is not "user" or "group" in any case or
#                  compatibility form (NFKC, case-folded, whitespace and format characters removed)
#
# A user principal (`user:ID` or bare `ID`) matches the authenticated user whose "sub" is exactly ID; a
# group principal matches only through the token's "groups" claim. A user's own id never matches a group.
MAX_IDENTIFIER = 256  # characters; the configuration database stores owners and RAC subjects in 256
MAX_GROUPS = 4096
USER_PREFIX, GROUP_PREFIX = "user:", "group:"
_RESERVED = ("user", "group")


def identifier_problem(value: object) -> str | None:
    """Why `value` is no identifier (user id or group name) of the grammar above; None when it is one."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_IDENTIFIER:
        return f"must be at most {MAX_IDENTIFIER} characters (it has {len(value)})"
    for c in value:
        category = unicodedata.category(c)
        if category == "Cc":
            return f"must not contain control characters (U+{ord(c):04X})"
        if category == "Cs":
            return "must be valid Unicode (it holds a lone surrogate)"
    return None


def _looks_prefixed(value: str) -> bool:
    """True when `value`'s text before its first ':' reads as 'user' or 'group' to a human."""
    head, colon, _rest = value.partition(":")
    if not colon:
        return False
    folded = unicodedata.normalize("NFKC", head).casefold()
    folded = "".join(c for c in folded if not c.isspace() and unicodedata.category(c) != "Cf")
    return folded in _RESERVED


def parse_principal(key: object) -> tuple[str, str]:
    """A rights key as ("user", user-id) or ("group", group-name); InvalidRequestError when it is not one
    of the grammar, or a bare id that could be read as a prefixed one."""
    if not isinstance(key, str):
        raise InvalidRequestError("a rights principal must be a string")
    if key.startswith(USER_PREFIX):
        kind, name = "user", key.removeprefix(USER_PREFIX)
    elif key.startswith(GROUP_PREFIX):
        kind, name = "group", key.removeprefix(GROUP_PREFIX)
    elif _looks_prefixed(key):
        head, _colon, rest = key.partition(":")
        raise InvalidRequestError(
            f"rights principal {key!r} is ambiguous: prefixes are 'user:' and 'group:' exactly (lower case); "
            f"write 'user:{key}' for the user with that id, or 'group:{rest}' for a group"
        )
    else:
        kind, name = "user", key
    problem = identifier_problem(name)
    if problem:
        raise InvalidRequestError(f"rights principal {key[:80]!r}: the {kind} {'id' if kind == 'user' else 'name'} "
                                  f"{problem}")
    return kind, name


def principal_key(kind: str, name: str) -> str:
    """The canonical rights key: `group:NAME`; a user's bare id unless it needs the `user:` prefix."""
    if kind == "group":
        return GROUP_PREFIX + name
    return USER_PREFIX + name if name.startswith((USER_PREFIX, GROUP_PREFIX)) or _looks_prefixed(name) else name


@dataclass(frozen=True)
class Principal:
    subject: str
    groups: tuple[str, ...]


class TokenVerifier:
    def __init__(self, issuer: str, audience: str, jwks_uri: str | None):
        if not issuer or not jwks_uri:
            raise RmsdError("identity_issuer and identity_jwks_uri must be set to authenticate users")
        self.issuer, self.audience, self.jwks_uri = issuer, audience, jwks_uri
        self._keys: KeySet | None = None
        self._fetched = self._fetched_wall = 0.0
        self._lock = threading.Lock()
        # Tokens verified once, until they expire or the JWKS is read again (a key the issuer dropped
        # stops verifying then).
        self.tokens = caches.VerifiedCache("token")

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
                self._fetched_wall = time.time()
                self.tokens.clear()
            return self._keys

    def verify(self, token: str) -> Principal:
        """The token's principal; AuthenticationError (HTTP 401) with a message of ours, never the JOSE
        library's error codes, when the token is not acceptable."""
        digest = caches.digest(token)
        found = self.tokens.get(digest)
        if found is not None:
            return found
        fetched = self._fetched_wall  # before verifying: a JWKS read meanwhile must not lengthen the entry's life
        principal, exp = self._verify(token)
        # Kept until the token's own expiry (without the leeway) and the JWKS's next reading, whichever
        # comes first ("nbf" and "iat", once passed, stay passed).
        if exp is not None:
            self.tokens.put(digest, principal, min(exp, fetched + JWKS_TTL))
        return principal

    def _verify(self, token: str) -> tuple[Principal, float | None]:
        try:
            try:
                decoded = jwt.decode(token, self._keyset(), algorithms=ALLOWED_ALGS)
            except (ValueError, JoseError) as err:
                if "kid" not in str(err).lower() and "key" not in str(err).lower():
                    raise
                # The issuer may have rotated its signing key: fetch the JWKS again once.
                decoded = jwt.decode(token, self._keyset(refresh=True), algorithms=ALLOWED_ALGS)
        except AuthenticationError:
            raise
        except BadSignatureError:
            raise AuthenticationError("bearer token rejected: its signature does not verify") from None
        except (ValueError, JoseError) as err:
            reason = "it is not signed by a key of the issuer" if "key" in str(err).lower() else "not a valid JWS"
            raise AuthenticationError(f"bearer token rejected: {reason}") from None
        claims = decoded.claims
        if not isinstance(claims, dict):
            raise AuthenticationError("bearer token rejected: its payload is not a JSON object of claims")
        missing = [name for name in REQUIRED_CLAIMS if claims.get(name) is None]
        if missing:
            raise AuthenticationError(
                f"bearer token rejected: claim {', '.join(repr(m) for m in missing)} missing "
                f"({', '.join(REQUIRED_CLAIMS)} are required)"
            )
        problem = identifier_problem(claims["sub"])
        if problem:
            raise AuthenticationError(f"bearer token rejected: 'sub' (the user id) {problem}")
        registry = jwt.JWTClaimsRegistry(
            leeway=LEEWAY,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise AuthenticationError("bearer token rejected: it has expired") from None
        except ClaimError as err:
            raise AuthenticationError(f"bearer token rejected: {_claim_message(err.claim)}") from None
        except (ValueError, TypeError, OverflowError, JoseError):
            raise AuthenticationError("bearer token rejected: its claims are not valid") from None
        subject = claims["sub"]
        groups = claims.get("groups") or []
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise AuthenticationError(f"bearer token rejected: 'groups' must be a list of at most {MAX_GROUPS} names")
        for group in groups:
            problem = identifier_problem(group)
            if problem:
                raise AuthenticationError(f"bearer token rejected: every entry of 'groups' {problem}")
        exp = claims.get("exp")
        numeric = isinstance(exp, int | float) and not isinstance(exp, bool)
        expires = float(exp) if numeric and math.isfinite(exp) else None  # type: ignore[arg-type]
        return Principal(subject=subject, groups=tuple(dict.fromkeys(groups))), expires


def _claim_message(claim: str) -> str:
    return {
        "iss": "it was not issued by the issuer this node trusts",
        "aud": "it is meant for another audience than this node",
        "exp": "'exp' is not a valid NumericDate",
        "nbf": "it is not valid yet ('nbf' is in the future)",
        "iat": "it was issued in the future ('iat')",
        "sub": "'sub' must be a string",
    }.get(claim, f"claim {claim!r} is not valid")
