"""Trusted publishing domain (TPD): a cluster's keys, SLCs, rights policy templates and content registry in
one password-encrypted file, the unit of backup and migration. Imported into a cluster, its keys become
archived: they open content published under them, and never sign or publish again.

The file is a compact JWE (PBES2-HS512+A256KW, A256GCM; typ rmsd-tpd+jwe) around a JSON document, so any
JOSE library opens it. Inside, each private key is a PKCS#8 EncryptedPrivateKeyInfo (scrypt + AES-256)
under the same password, so it stays protected by a memory-hard KDF even once the envelope is opened,
and `openssl pkey` reads it. Keys revoked as compromised travel without their private half."""

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from asn1crypto import pem
from cryptography.hazmat.primitives import serialization
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from rmsd import clusters, pkcs8, pki
from rmsd.errors import RmsdError
from rmsd.keys import KeyNotExportable, KeyProvider, NewKey, check_strength, key_id_of

FORMAT, VERSION = "rmsd-tpd", 1
TYP = "rmsd-tpd+jwe"
ALG, ENC = "PBES2-HS512+A256KW", "A256GCM"
P2C = 300_000  # PBKDF2 iterations of the envelope (the most joserfc accepts)
MIN_PASSWORD_LENGTH = 12
# joserfc refuses ciphertexts over 64 KB by default (a guard for tokens from the network); a TPD is the
# operator's own file and holds a whole content registry, about 300 bytes per PL.
MAX_BYTES = 4 * 1024**3
_REGISTRY = jwe.JWERegistry(algorithms=[ALG, ENC])
_REGISTRY.max_ciphertext_length = MAX_BYTES


def check_password(password: str | None) -> None:
    if not password or len(password) < MIN_PASSWORD_LENGTH:
        raise RmsdError(f"the trusted publishing domain password must be at least {MIN_PASSWORD_LENGTH} characters")


def build(conn: sa.Connection, row, open_key, password: str, now: datetime) -> dict:
    """The TPD document of cluster `row`; `open_key(key_row)` opens a stored key (a ClusterKey)."""
    keys = []
    for key in clusters.keys_of(conn, row.id):
        entry = {
            "id": key.id, "status": key.status, "protection": key.protection, "size": key.size,
            "created_at": key.created_at.isoformat(), "status_changed_at": key.status_changed_at.isoformat(),
            "public_key_pem": key.public_key_pem, "wrap_alg": key.wrap_alg, "sign_alg": key.sign_alg,
            "private_key_pem": None, "not_exported": None,
        }
        if key.status == "compromised":
            entry["not_exported"] = "revoked as compromised: its private key is never used again"
        else:
            try:
                der = open_key(key).export_pkcs8(password)
                entry["private_key_pem"] = pem.armor("ENCRYPTED PRIVATE KEY", der).decode()
            except KeyNotExportable as err:
                entry["not_exported"] = str(err)
        keys.append(entry)
    certs = clusters.certificates_of(conn, row.id)
    templates = clusters.templates_of(conn, row.id)
    registry = clusters.content_of(conn, row.id)
    return {
        "format": FORMAT, "version": VERSION, "cluster": row.name, "role": row.role, "exported_at": now.isoformat(),
        "keys": keys,
        "certificates": [
            {"serial": c.serial, "kind": c.kind, "key_id": c.key_id, "issuer_key_id": c.issuer_key_id, "pem": c.pem,
             "revoked": c.revoked_at is not None}
            for c in certs
        ],
        "rights_templates": [{"name": t.name, "description": t.description, "rights": t.rights} for t in templates],
        "content": [
            {"pl_id": c.pl_id, "content_id": c.content_id, "owner": c.owner, "key_id": c.key_id, "rights": c.rights,
             "created_at": c.created_at.isoformat(), "supersedes": c.supersedes, "superseded_by": c.superseded_by,
             "superseded_at": c.superseded_at.isoformat() if c.superseded_at else None}
            for c in registry
        ],
    }


def manifest(document: dict) -> dict:
    """What a TPD holds, without its (randomly encrypted) key material or export time: two exports of
    an unchanged cluster have the same manifest."""
    return {
        "cluster": document["cluster"],
        "keys": [{k: v for k, v in key.items() if k != "private_key_pem"} | {"exported": bool(key["private_key_pem"])}
                 for key in document["keys"]],
        "certificates": document["certificates"],
        "rights_templates": document["rights_templates"],
        "content": document["content"],
    }


def summary(document: dict) -> dict:
    """Metadata of a TPD for the operator: which keys it carries and which it could not."""
    return {
        "cluster": document["cluster"],
        "keys": [{"id": k["id"], "status": k["status"], "exported": bool(k["private_key_pem"])}
                 for k in document["keys"]],
        "not_exported": [{"id": k["id"], "reason": k["not_exported"]} for k in document["keys"] if k["not_exported"]],
        "certificates": len(document["certificates"]),
        "rights_templates": len(document["rights_templates"]),
        "content": len(document["content"]),
    }


def seal(document: dict, password: str) -> str:
    header = {"alg": ALG, "enc": ENC, "typ": TYP, "p2c": P2C, "cty": "json"}
    payload = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return jwe.encrypt_compact(header, payload, OctKey.import_key(password.encode()), registry=_REGISTRY)


def unseal(data: str, password: str) -> dict:
    """The TPD document in `data`; RmsdError when it is no TPD or the password does not open it."""
    not_opened = "the file is not a trusted publishing domain that this password opens"
    if len(data) > MAX_BYTES * 4 // 3 + 4096:
        raise RmsdError(f"the file is larger than a trusted publishing domain can be ({MAX_BYTES // 1024**3} GiB)")
    try:
        opened = jwe.decrypt_compact(data.strip(), OctKey.import_key(password.encode()), registry=_REGISTRY)
        if opened.plaintext is None:
            raise RmsdError(not_opened)
        document = json.loads(opened.plaintext)
    except (JoseError, ValueError, TypeError):
        raise RmsdError(not_opened) from None
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise RmsdError(f"the file is not an {FORMAT} version {VERSION} trusted publishing domain")
    return document


def import_plan(conn: sa.Connection, row, document: dict) -> dict:
    """What importing `document` into cluster `row` adds: {keys, compromise, certificates, templates,
    content, skipped}; empty lists when everything is there already."""
    statuses = {k.id: k.status for k in clusters.keys_of(conn, row.id)}
    plan: dict[str, list[Any]] = {
        "keys": [], "compromise": [], "certificates": [], "rights_templates": [], "content": [], "skipped": [],
    }
    for key in document["keys"]:
        if key["id"] in statuses:
            # A compromise travels; nothing else about a key this cluster already has changes.
            if key["status"] == "compromised" and statuses[key["id"]] != "compromised":
                plan["compromise"].append(key["id"])
        elif key["private_key_pem"]:
            # Checked before anything is written: a weak key is refused, not archived.
            check_strength(serialization.load_pem_public_key(key["public_key_pem"].encode()),
                           f"key {key['id']} in the trusted publishing domain")
            plan["keys"].append(key["id"])
        elif key["status"] == "compromised":  # kept public-only: it never signs or opens anything again
            plan["keys"].append(key["id"])
        else:
            plan["skipped"].append({"id": key["id"], "reason": key["not_exported"]})
    known_keys = set(statuses) | set(plan["keys"])
    have = clusters.certificate_serials(conn, row.id)
    plan["certificates"] = [c["serial"] for c in document["certificates"]
                            if c["serial"] not in have and (c["kind"] == "root" or c["key_id"] in known_keys)]
    names = {t.name for t in clusters.templates_of(conn, row.id)}
    plan["rights_templates"] = [t["name"] for t in document["rights_templates"] if t["name"] not in names]
    pl_ids = clusters.content_pl_ids(conn, row.id)
    plan["content"] = [c["pl_id"] for c in document["content"]
                       if c["pl_id"] not in pl_ids and c["key_id"] in known_keys]
    return plan


def apply_import(conn: sa.Connection, row, document: dict, plan: dict, provider: KeyProvider, password: str,
                 now: datetime) -> None:
    """Carry out `plan` in the caller's transaction: keys as archived (decrypt-only) or compromised."""
    by_id = {k["id"]: k for k in document["keys"]}
    for key_id in plan["keys"]:
        key = by_id[key_id]
        if key["private_key_pem"]:
            _kind, _headers, der = pem.unarmor(key["private_key_pem"].encode())
            new = provider.adopt(pkcs8.decrypt(der, password))
        else:  # compromised: kept public-only, so content under it is refused with the reason
            public = serialization.load_pem_public_key(key["public_key_pem"].encode())
            new = _public_only(key, public)
        if new.key_id != key_id:
            raise RmsdError(f"key {key_id} in the trusted publishing domain does not match its private key")
        status = "compromised" if key["status"] == "compromised" else "archived"
        clusters.insert_key(conn, row.id, provider, new, now, status=status, imported_from=document["cluster"])
    for key_id in plan["compromise"]:
        clusters.set_key_status(conn, key_id, "compromised", now)
    for cert in (c for c in document["certificates"] if c["serial"] in set(plan["certificates"])):
        clusters.insert_slc(conn, row.id, pki.load_pem(cert["pem"]), cert["issuer_key_id"], cert["key_id"], now,
                            kind=cert["kind"])
        if cert["kind"] == "root" and cert["revoked"]:
            clusters.revoke_root_slcs(conn, row.id, [cert["key_id"]], now)
    for template in (t for t in document["rights_templates"] if t["name"] in set(plan["rights_templates"])):
        clusters.save_template(conn, row.id, template["name"], template["description"], template["rights"], now)
    for item in (c for c in document["content"] if c["pl_id"] in set(plan["content"])):
        clusters.insert_content(conn, row.id, item)


def _public_only(key: dict, public_key) -> NewKey:
    return NewKey(key_id=key_id_of(public_key), size=key["size"], public_key_pem=key["public_key_pem"],
                  wrap_alg=key["wrap_alg"], sign_alg=key["sign_alg"])
