"""Bearer-token authentication: JWTs from a configured issuer, verified against its JWKS."""

import json
import logging
import math
import threading
import time
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
from joserfc import jws, jwt
from joserfc.errors import BadSignatureError, ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import KeySet

from rmsd import caches, transport
from rmsd.errors import AuthenticationError, InvalidRequestError, RmsdError

log = logging.getLogger("rmsd.identity")

ALLOWED_ALGS = ["RS256", "PS256", "ES256"]
LEEWAY = 30
# The issuer's JWKS (documented in rmsd/README.md, "Identities and principals").
JWKS_TTL = 300.0  # seconds a key set read is used before it is read again (identity_jwks_ttl_seconds)
MAX_JWKS_TTL = 86_400
FORCED_REFRESH_INTERVAL = 30.0  # a token's unknown kid reads the JWKS again at most once in this many seconds
FETCH_SECONDS = 5.0  # one read of the JWKS, connection to last byte
MAX_JWKS_BYTES = 1024 * 1024
MAX_KID = 256  # a longer kid is no key of the issuer's and causes no fetch
# Requests that wait for one fetch; more are answered at once (they would hold the threads that serve the node).
MAX_WAITING = 8
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


def check_jwks_uri(uri: str) -> None:
    """RmsdError unless the JWKS is read over https, from a file, or over plain http on loopback: whoever can
    change the keys on their way can sign tokens for any user."""
    transport.refuse_clear_url(uri, "the issuer's signing keys (anyone on the path could forge tokens for any "
                               "user)", "identity_jwks_uri", allowed=("https", "file"))


@dataclass(frozen=True)
class _KeySet:
    keys: KeySet
    kids: frozenset[str]
    fetched_at: float  # wall clock (the token cache's), when its fetch started

    def lacks(self, header: dict) -> bool:
        """True when a token with this JWS header names a key this set lacks (and is worth a fetch)."""
        kid = header.get("kid")
        return (isinstance(kid, str) and 0 < len(kid) <= MAX_KID and header.get("alg") in ALLOWED_ALGS
                and kid not in self.kids)


def _shown(uri: str) -> str:
    """The URI without user information or query (which could hold a credential), for messages."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _download(uri: str, shown: str) -> bytes:
    """GET `uri` (the certificate verified; no redirect followed; no content encoding), at most
    MAX_JWKS_BYTES read within FETCH_SECONDS, else RmsdError."""
    deadline = time.monotonic() + FETCH_SECONDS
    headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
    with httpx.Client(timeout=FETCH_SECONDS, follow_redirects=False) as client:
        with client.stream("GET", uri, headers=headers) as response:
            if response.is_redirect:
                location = response.headers.get("location", "")[:200]
                raise RmsdError(f"the issuer's JWKS at {shown} answered a redirect to {location!r}, which is not "
                                "followed: set identity_jwks_uri to the URL that serves the keys")
            response.raise_for_status()
            encoding = response.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise RmsdError(f"the issuer's JWKS at {shown} came with content encoding {encoding[:40]!r}; "
                                "rmsd reads it uncompressed")
            data = bytearray()
            for chunk in response.iter_raw():
                data += chunk
                if len(data) > MAX_JWKS_BYTES:
                    raise RmsdError(f"the issuer's JWKS at {shown} is larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise RmsdError(f"the issuer's JWKS at {shown} took longer than {FETCH_SECONDS:.0f} s to read")
            return bytes(data)


class TokenVerifier:
    """Verifies bearer tokens against the issuer's JWKS. The JWKS is read outside any lock a request waits
    on, by one fetch at a time that every request needing it shares: on a schedule (`jwks_ttl`) in the
    background while requests go on verifying with the key set they have; for a token whose `kid` the key
    set lacks (the issuer rotated its key) at most once per `forced_interval`. A fetch that fails keeps the
    last good key set."""

    def __init__(self, issuer: str, audience: str, jwks_uri: str | None, jwks_ttl: float | None = None,
                 forced_interval: float = FORCED_REFRESH_INTERVAL):
        if not issuer or not jwks_uri:
            raise RmsdError("identity_issuer and identity_jwks_uri must be set to authenticate users")
        check_jwks_uri(jwks_uri)
        jwks_ttl = JWKS_TTL if jwks_ttl is None else jwks_ttl
        if isinstance(jwks_ttl, bool) or not isinstance(jwks_ttl, int | float) or not 1 <= jwks_ttl <= MAX_JWKS_TTL:
            raise RmsdError(f"identity_jwks_ttl_seconds must be a number of seconds from 1 to {MAX_JWKS_TTL} "
                            f"(unset: {JWKS_TTL:.0f}), not {jwks_ttl!r}")
        self.issuer, self.audience, self.jwks_uri = issuer, audience, jwks_uri
        self.jwks_ttl, self.forced_interval = float(jwks_ttl), forced_interval
        # After a failed fetch, the next one waits this long (a short TTL retries sooner).
        self.retry_interval = min(self.jwks_ttl, FORCED_REFRESH_INTERVAL)
        self._lock = threading.Lock()  # guards the fields below; never held during a fetch
        self._current: _KeySet | None = None
        self._fetching: threading.Event | None = None  # set when the fetch under way ends
        self._waiting = 0  # requests waiting for it
        self._next_fetch = 0.0  # monotonic: when the key set is read again
        self._last_forced = -math.inf  # monotonic: when a token's unknown kid last caused a fetch
        self._failing_since: float | None = None
        self.fetches = self.failures = 0
        # Tokens verified once, until they expire or the key set they were verified with is JWKS_TTL old
        # (a key the issuer dropped stops verifying then). A new key set never clears it.
        self.tokens = caches.VerifiedCache("token")

    # --- the key set --------------------------------------------------------------------------------

    def _key_set(self) -> _KeySet:
        """The key set to verify with now. When it is due to be read again, a fetch starts in the background
        and this answers the current one; only before the first key set is there does a caller wait."""
        with self._lock:
            current = self._current
            if current is not None and time.monotonic() < self._next_fetch:
                return current
            if current is None and self._fetching is None and time.monotonic() < self._next_fetch:
                raise AuthenticationError(self._unreadable())  # the last attempt failed: not before the retry
            fetching = self._start_fetch()
            if current is not None:
                return current
            if self._waiting >= MAX_WAITING:
                raise AuthenticationError(self._unreadable())
            self._waiting += 1
        self._wait(fetching)
        with self._lock:
            if self._current is None:
                raise AuthenticationError(self._unreadable())
            return self._current

    def _forced_refresh(self) -> bool:
        """Read the JWKS again for a token whose kid the key set lacks: join the fetch under way, or start one
        unless one was forced less than `forced_interval` ago. True when a fetch ended meanwhile."""
        with self._lock:
            if self._waiting >= MAX_WAITING:
                return False
            if self._fetching is None:
                now = time.monotonic()
                if now - self._last_forced < self.forced_interval:
                    return False
                self._last_forced = now
            fetching = self._start_fetch()
            self._waiting += 1
        return self._wait(fetching)

    def _wait(self, fetching: threading.Event) -> bool:
        """Wait for the fetch to end (bounded: FETCH_SECONDS, and a fetch has no longer); the caller counted
        itself in `_waiting`."""
        try:
            return fetching.wait(FETCH_SECONDS + 1)
        finally:
            with self._lock:
                self._waiting -= 1

    def _start_fetch(self) -> threading.Event:
        """The fetch under way, or a new one in a thread of its own (call with the lock held)."""
        if self._fetching is None:
            self._fetching = threading.Event()
            threading.Thread(target=self._fetch, args=(self._fetching,), name="jwks-fetch", daemon=True).start()
        return self._fetching

    def _fetch(self, done: threading.Event) -> None:
        started, started_wall = time.monotonic(), time.time()
        try:
            keys = self._load_jwks()
        except Exception as err:  # whatever went wrong, the last good key set stays
            if not isinstance(err, RmsdError):
                err = RmsdError(f"reading the issuer's JWKS at {_shown(self.jwks_uri)} failed: {type(err).__name__}")
            with self._lock:
                self.fetches += 1
                self.failures += 1
                self._next_fetch = time.monotonic() + self.retry_interval
                first = self._failing_since is None
                if first:
                    self._failing_since = started
                kept = "keeps verifying with the key set read before" if self._current else "has no key set yet"
            if first:  # once per outage, not per attempt or request
                log.error("%s; this node %s and tries again every %.0f s", err, kept, self.retry_interval)
        else:
            with self._lock:
                self.fetches += 1
                # Read at `started` at the earliest: tokens verified with it are kept until that + TTL at most.
                self._current = _KeySet(keys, frozenset(str(key.kid) for key in keys), started_wall)
                self._next_fetch = started + self.jwks_ttl
                outage, self._failing_since = self._failing_since, None
            if outage is not None:
                log.warning("the issuer's JWKS at %s is readable again after %.0f s", _shown(self.jwks_uri),
                            time.monotonic() - outage)
        finally:
            with self._lock:
                self._fetching = None
            done.set()

    def _unreadable(self) -> str:
        return (f"bearer token not verified: the issuer's signing keys (JWKS at {_shown(self.jwks_uri)}) could not "
                f"be read yet; try again later (this node reads them again within {self.retry_interval:.0f} s)")

    def _load_jwks(self) -> KeySet:
        """The issuer's key set, read within FETCH_SECONDS and MAX_JWKS_BYTES (RmsdError otherwise)."""
        shown = _shown(self.jwks_uri)
        try:
            url = urlsplit(self.jwks_uri)
            if url.scheme == "file":
                with open(url2pathname(url.path), "rb") as f:
                    data = f.read(MAX_JWKS_BYTES + 1)
                if len(data) > MAX_JWKS_BYTES:
                    raise RmsdError(f"the issuer's JWKS at {shown} is larger than {MAX_JWKS_BYTES} bytes")
            else:
                data = _download(self.jwks_uri, shown)
            keys = KeySet.import_key_set(json.loads(data))
        except RmsdError:
            raise
        except httpx.HTTPStatusError as err:
            raise RmsdError(f"the issuer's JWKS at {shown} cannot be read: HTTP {err.response.status_code}") from None
        except (OSError, httpx.HTTPError) as err:
            reason = (err.strerror if isinstance(err, OSError) else str(err)) or type(err).__name__
            raise RmsdError(f"the issuer's JWKS at {shown} cannot be read: {reason}") from None
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError, JoseError) as err:
            raise RmsdError(f"the issuer's JWKS at {shown} is not a JSON Web Key Set with a usable key "
                            f"({type(err).__name__})") from None
        return keys

    # --- tokens -------------------------------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        """The token's principal; AuthenticationError (HTTP 401) with a message of ours, never the JOSE
        library's error codes, when the token is not acceptable."""
        digest = caches.digest(token)
        found = self.tokens.get(digest)
        if found is not None:
            return found
        principal, exp, read_at = self._verify(token)
        # Kept until the token's own expiry (without the leeway) and the JWKS_TTL after the key set it was
        # verified with was read, whichever comes first ("nbf" and "iat", once passed, stay passed).
        if exp is not None:
            self.tokens.put(digest, principal, min(exp, read_at + self.jwks_ttl))
        return principal

    def _verify(self, token: str) -> tuple[Principal, float | None, float]:
        """(principal, expiry, when the key set that verified it was read)."""
        key_set = self._key_set()
        try:
            header = jws.extract_compact(token.encode()).headers()
            if key_set.lacks(header) and self._forced_refresh():
                # The issuer may have rotated its signing key: verify with the key set just read.
                key_set = self._key_set()
            decoded = jwt.decode(token, key_set.keys, algorithms=ALLOWED_ALGS)
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
        return Principal(subject=subject, groups=tuple(dict.fromkeys(groups))), expires, key_set.fetched_at


def _claim_message(claim: str) -> str:
    return {
        "iss": "it was not issued by the issuer this node trusts",
        "aud": "it is meant for another audience than this node",
        "exp": "'exp' is not a valid NumericDate",
        "nbf": "it is not valid yet ('nbf' is in the future)",
        "iat": "it was issued in the future ('iat')",
        "sub": "'sub' must be a string",
    }.get(claim, f"claim {claim!r} is not valid")
