"""JOSE for RMS: publishing licenses (PL) and use licenses (UL), both compact JWS signed by a
cluster key; content keys travel as compact JWE wrapped to a cluster key or to a RAC key."""

import json
import uuid
from datetime import datetime, timedelta

from joserfc import jwe, jws
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from rmsd.errors import InvalidRequestError
from rmsd.identity import parse_principal, principal_key
from rmsd.keys import ClusterKey

RIGHTS = ("OWNER", "VIEW", "EDIT", "PRINT", "EXPORT", "EXTRACT", "FORWARD", "REPLY")
PL_TYPE = "rmsd-pl+jws"
UL_TYPE = "rmsd-ul+jws"
CONTENT_ENC = "A256GCM"
UL_VALIDITY = timedelta(days=30)
_JWE = jwe.JWERegistry(algorithms=["RSA-OAEP-256", "RSA-OAEP", CONTENT_ENC])
_JWS = jws.JWSRegistry(algorithms=["RS256"])


def wrap_content_key(content_key: bytes, public_key, alg: str, kid: str) -> str:
    recipient = public_key if isinstance(public_key, RSAKey) else RSAKey.import_key(public_key)
    return jwe.encrypt_compact({"alg": alg, "enc": CONTENT_ENC, "kid": kid}, content_key, recipient, registry=_JWE)


def unwrap_content_key(wrapped: str, key: ClusterKey) -> bytes:
    not_opened = "the content key in the publishing license does not open"
    try:
        plaintext = jwe.decrypt_compact(wrapped, key.jose_key(), registry=_JWE).plaintext
    except (JoseError, ValueError):
        raise InvalidRequestError(not_opened) from None
    if plaintext is None:
        raise InvalidRequestError(not_opened)
    return plaintext


def _sign(key: ClusterKey, typ: str, claims: dict) -> str:
    header = {"alg": key.sign_alg, "kid": key.key_id, "typ": typ}
    return jws.serialize_compact(header, json.dumps(claims, separators=(",", ":")), key.jose_key(), registry=_JWS)


def header_of(token: str) -> dict:
    """The unverified protected header (to find which key to verify with)."""
    try:
        return jws.extract_compact(token.encode()).protected
    except (JoseError, ValueError):
        raise InvalidRequestError("not a compact JWS") from None


def verify(token: str, public_key, typ: str) -> dict:
    try:
        obj = jws.deserialize_compact(token, RSAKey.import_key(public_key), registry=_JWS)
    except (JoseError, ValueError):
        raise InvalidRequestError("the license signature does not verify") from None
    if obj.protected.get("typ") != typ:
        raise InvalidRequestError(f"expected a {typ} token")
    return json.loads(obj.payload)


def normalize_rights(rights: dict[str, list[str]]) -> dict[str, list[str]]:
    """Rights keyed by canonical principals (see rmsd.identity: `group:NAME`, `user:ID` or a bare user id);
    InvalidRequestError for a key outside the grammar or an ambiguous one (a bare `Group:x`). Keys naming
    the same principal (`bob` and `user:bob`) are merged."""
    if not rights or not isinstance(rights, dict):
        raise InvalidRequestError("rights must grant at least one principal something")
    out: dict[str, set[str]] = {}
    for principal, granted in rights.items():
        if not principal or not isinstance(granted, list) or not granted:
            raise InvalidRequestError(f"rights for {principal!r} must be a non-empty list")
        unknown = sorted(set(map(str, granted)) - set(RIGHTS))
        if unknown:
            raise InvalidRequestError(f"unknown rights {unknown}; known rights: {', '.join(RIGHTS)}")
        out.setdefault(principal_key(*parse_principal(principal)), set()).update(granted)
    return {principal: sorted(granted) for principal, granted in out.items()}


def issue_pl(
    key: ClusterKey, cluster: str, content_id: str, owner: str, rights: dict, content_key: bytes, now: datetime,
    template: str | None = None,
) -> tuple[str, dict]:
    claims = {
        "iss": cluster,
        "pl_id": uuid.uuid4().hex,
        "content_id": content_id,
        "owner": owner,
        "rights": rights,
        "key_id": key.key_id,
        "wrapped_key": wrap_content_key(content_key, key.public_key, key.wrap_alg, key.key_id),
        "iat": int(now.timestamp()),
    }
    if template is not None:
        claims["template"] = template
    return _sign(key, PL_TYPE, claims), claims


def granted_rights(pl: dict, user: str, groups: list[str]) -> list[str]:
    """What `user` (the token's exact "sub"), in `groups` (the token's "groups" claim), may do with the
    content; the owner may do everything. Every comparison is exact (code points, no case folding): the
    user's id only ever matches user principals, group principals only match through `groups`."""
    if user == pl["owner"]:
        return list(RIGHTS)
    member_of = frozenset(groups)
    granted = set()
    for key, rights in pl["rights"].items():
        try:
            kind, name = parse_principal(key)
        except InvalidRequestError:
            continue  # an ambiguous key of a PL issued before the grammar: it grants no one anything
        if (kind == "user" and name == user) or (kind == "group" and name in member_of):
            granted.update(rights)
    return sorted(granted)


def issue_ul(
    key: ClusterKey, cluster: str, pl: dict, user: str, rights: list[str], rac_public_key, rac_serial: str,
    content_key: bytes, now: datetime,
) -> str:
    claims = {
        "iss": cluster,
        "pl_id": pl["pl_id"],
        "content_id": pl["content_id"],
        "sub": user,
        "rights": rights,
        "rac_serial": rac_serial,
        "wrapped_key": wrap_content_key(content_key, rac_public_key, "RSA-OAEP-256", rac_serial),
        "iat": int(now.timestamp()),
        "exp": int((now + UL_VALIDITY).timestamp()),
    }
    return _sign(key, UL_TYPE, claims)
