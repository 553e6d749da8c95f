"""Revocation statements: a cluster key's own signed word that it was revoked as compromised.

A licensing cluster makes one with each of its keys it revokes, while it can still sign with it (before a
PKCS#11 token destroys it), keeps it with the key, and hands it to the root cluster at every enrollment; the
root cluster then never certifies that key again. The root takes a revocation only with its statement: a
compact JWS signed by the revoked key, carrying that key's public half (its id is a digest of it, the id the
root recorded when it certified the key), over the licensing cluster's name. Only a holder of the private key
can make one, and a statement says something of its own key only: presented again, by anyone, it revokes
that same key, which is what its holder declared."""

import json
from collections.abc import Callable, Iterable
from datetime import datetime

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from rmsd.errors import InvalidRequestError, RmsdError
from rmsd.keys import ClusterKey, key_id_of

TYPE = "rmsd-key-revocation+jws"
_JWS = jws.JWSRegistry(algorithms=["RS256"])


def make(key: ClusterKey, cluster: str, now: datetime) -> str:
    """The statement, signed by `key`, that licensing cluster `cluster` revoked it as compromised."""
    header = {"alg": key.sign_alg, "typ": TYPE, "kid": key.key_id}
    claims = {"cluster": cluster, "revoked_key_id": key.key_id, "iat": int(now.timestamp()),
              "public_key": RSAKey.import_key(key.public_key).as_dict(private=False)}
    return jws.serialize_compact(header, json.dumps(claims, separators=(",", ":")), key.jose_key(), registry=_JWS)


def verify(statement: str, cluster: str) -> str:
    """The id of the key `statement` revokes for licensing cluster `cluster`; InvalidRequestError when it is
    not a statement of that cluster signed by the key it names."""
    refused = "a revocation statement is not a compact JWS signed by the key it revokes, for this cluster"
    try:
        # The key to verify with is the one the statement names, which its id (a digest of it) then binds.
        named = json.loads(jws.extract_compact(statement.encode()).payload)
        if not isinstance(named, dict) or not isinstance(named.get("public_key"), dict):
            raise InvalidRequestError(refused)
        public = RSAKey.import_key(named["public_key"])
        if public.is_private:
            raise InvalidRequestError(refused)
        verified = jws.deserialize_compact(statement, public, registry=_JWS)
        claims = json.loads(verified.payload)
    except (JoseError, ValueError, TypeError, KeyError):
        raise InvalidRequestError(refused) from None
    key_id = key_id_of(public.raw_value)
    if verified.protected.get("typ") != TYPE or claims.get("revoked_key_id") != key_id or \
            claims.get("cluster") != cluster:
        raise InvalidRequestError(refused)
    return key_id


def statements_for(rows: Iterable, open_key: Callable, cluster: str, now: datetime) -> tuple[dict[str, str], list[str]]:
    """({key id: statement}, [key ids with none]) for the key rows of licensing cluster `cluster` it revokes:
    the statement stored with the key (its `revocation`), else one signed now with the key `open_key(row)`
    opens. A key nothing can sign with any more (destroyed in its token, kept public-only) has none."""
    statements, unsigned = {}, []
    for row in rows:
        if row.revocation:
            statements[row.id] = row.revocation
            continue
        try:
            statements[row.id] = make(open_key(row), cluster, now)
        except (RmsdError, TypeError, ValueError):
            unsigned.append(row.id)
    return statements, unsigned
