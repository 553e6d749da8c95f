"""Clusters: provisioned (root, or licensing enrolled with the root), updated, decommissioned, removed."""

import os

from rmsd import clusters, db, passwords, pki, revocation
from rmsd.admin.common import (
    Enrollment,
    Result,
    Unlock,
    check_name,
    check_state,
    check_url,
    cluster_view,
    token_settings,
)
from rmsd.admin.store import Store, opened
from rmsd.errors import RmsdError
from rmsd.keys import KEY_SIZES, PROTECTIONS
from rmsd.schema import utcnow

ROLES = ("root", "licensing")
STATES = ("present", "decommissioned", "absent")
IMMUTABLE = {
    "role": "a cluster's role cannot change; provision a new cluster with the role you want and move servers to it",
    "key_protection": "key protection cannot change in place; it applies when a new cluster key is generated "
    "(key rollover) or to a newly provisioned cluster",
    "key_size": "the size of the existing cluster key cannot change; key_size applies when a new cluster key is "
    "generated (key rollover). Set key_size to the current value to keep this cluster as it is",
}


def ensure_cluster(
    *, name, database_url, database_password=None, role="root", key_protection="password", key_password=None,
    previous_key_password=None, key_size=2048, intranet_url=None, extranet_url=None, enrollment_url=None,
    enrollment_credential=None, enrollment_ca_path=None, pkcs11=None, state="present", force=False,
    root_key_replaced=False, check_mode=False,
) -> Result:
    """`root_key_replaced` (check mode, licensing clusters): an earlier step of the same run replaces the root
    cluster's active key, so the re-enrollment a real run then makes is reported although the root cluster
    still shows its current key. A real run ignores it: the root cluster's SLC tells."""
    check_name("cluster name", name)
    check_state(state, STATES)
    with opened(database_url, database_password) as store:
        if state == "absent":
            return _cluster_absent(store, name, force, check_mode)
        if role not in ROLES:
            raise RmsdError(f"role {role!r} is not supported; use one of {', '.join(ROLES)}")
        if key_protection not in PROTECTIONS:
            raise RmsdError(f"key_protection {key_protection!r} is not supported; use one of {', '.join(PROTECTIONS)}")
        if key_size not in KEY_SIZES:
            raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {key_size}")
        check_url("intranet_url", intranet_url, required=True)
        check_url("extranet_url", extranet_url, required=False)
        if role == "licensing":
            check_url("enrollment_url", enrollment_url, required=True)
            if enrollment_ca_path and not os.path.isfile(enrollment_ca_path):
                raise RmsdError(f"enrollment_ca_path {enrollment_ca_path!r} is not a file")
        elif enrollment_url or enrollment_credential:
            raise RmsdError("enrollment_url and enrollment_credential are for role=licensing only: a root cluster "
                            "certifies itself")
        token = token_settings(key_protection, pkcs11, key_password, previous_key_password)
        unlock = Unlock(key_password, previous_key_password, token)
        wanted = {
            "name": name, "role": role, "state": "decommissioned" if state == "decommissioned" else "provisioned",
            "intranet_url": intranet_url, "extranet_url": extranet_url, "key_protection": key_protection,
            "key_size": key_size,
        }
        enrollment = Enrollment(enrollment_url, enrollment_ca_path, enrollment_credential)
        existing = store.read(lambda conn: _existing_cluster(conn, name, unlock))
        if existing is None:
            if state == "decommissioned":
                raise store.missing(name, "there is nothing to decommission")
            if key_protection == "password":  # a new cluster's password meets the policy
                passwords.check("key_password", key_password)
            return _provision(store, wanted, unlock.provider(key_protection), enrollment, check_mode)
        return _update_cluster(store, existing, wanted, unlock, enrollment, force, check_mode,
                               root_key_replaced=bool(root_key_replaced))


def _existing_cluster(conn, name, unlock: Unlock):
    row = clusters.get_cluster(conn, name)
    if row is None:
        other = clusters.other_cluster(conn, name)
        if other is not None:
            raise RmsdError(
                f"this configuration database already holds cluster {other.name!r}; every cluster has its own "
                f"configuration database: give cluster {name!r} another database_url"
            )
        return None
    unlock.open_active_key(conn, row)
    revision = conn.info.get("schema_revision_read", db.schema_revision(conn))
    untrusted = clusters.untrusted_root_key_ids(conn, row.id)
    trusted = [pki.cert_key_id(cert) for cert in clusters.trust_anchors(conn, row)] if row.role == "licensing" else []
    return dict(cluster_view(conn, row), schema_revision=revision, untrusted_root_key_ids=untrusted,
                trusted_root_key_ids=trusted)


def _provision(store: Store, wanted, provider, enrollment: Enrollment, check_mode) -> Result:
    after = dict(wanted, active_key_id="(new key)")
    result = Result(changed=True, diff={"before": {}, "after": after}, facts={"cluster": after})
    if check_mode:
        return result
    # Generate (and enroll) before taking the lock: those are the slow parts.
    new_key = provider.generate(wanted["key_size"])
    slcs = None
    if wanted["role"] == "licensing":
        slcs = enrollment.enroll(wanted["name"], wanted["intranet_url"], wanted["extranet_url"], new_key.loaded)
    now = utcnow()
    db.prepare_sqlite_file(store.engine)
    # One transaction: schema, cluster, key and SLC appear together or not at all.
    with store.writing(wanted["name"]) as conn:
        row = clusters.get_cluster(conn, wanted["name"])
        if row is not None:
            # Provisioned concurrently by another run: converge on what is there.
            return Result(changed=False, facts={"cluster": cluster_view(conn, row)})
        if clusters.other_cluster(conn, wanted["name"]) is not None:
            raise RmsdError("this configuration database already holds another cluster")
        common = {
            "name": wanted["name"], "intranet_url": wanted["intranet_url"], "extranet_url": wanted["extranet_url"],
            "provider": provider, "new_key": new_key, "now": now,
        }
        if slcs is None:
            clusters.provision_root(conn, **common)
        else:
            clusters.provision_licensing(conn, slc=slcs[0], root_slc=slcs[1], **common)
        view = cluster_view(conn, clusters.get_cluster(conn, wanted["name"]))
    result.diff["after"] = view
    result.facts["cluster"] = view
    return result


def _update_cluster(store: Store, current, wanted, unlock: Unlock, enrollment: Enrollment, force,
                    check_mode, root_key_replaced=False) -> Result:
    name = current["name"]
    for option, how in IMMUTABLE.items():
        if current[option] != wanted[option]:
            raise RmsdError(
                f"cluster {name!r} has {option}={current[option]!r}, asked for {wanted[option]!r}: {how}. "
                "Nothing was changed."
            )
    if current["state"] == "decommissioned" and wanted["state"] == "provisioned" and not force:
        raise RmsdError(
            f"cluster {name!r} is decommissioned: it only serves use licenses. Decommissioning is one-way; set "
            "force=true to let it issue certificates and publishing licenses again. Nothing was changed."
        )
    changes = {k: wanted[k] for k in ("state", "intranet_url", "extranet_url") if current[k] != wanted[k]}
    revision = current.pop("schema_revision")
    if db.older_schema(revision):
        changes["schema_revision"] = db.HEAD_REVISION  # store.writing migrates
    root = None
    untrusted, trusted = current.pop("untrusted_root_key_ids"), current.pop("trusted_root_key_ids")
    if current["role"] == "licensing":
        root = enrollment.fetch_root()
        if current["slc_issuer_key_id"] != root.key_id:
            # The root cluster has a new key: a licensing cluster re-enrolls its own (unchanged) key.
            changes["slc_issuer_key_id"] = root.key_id
        elif check_mode and root_key_replaced:
            changes["slc_issuer_key_id"] = "(the root cluster's new key)"
        if set(trusted) & set(root.revoked_key_ids):
            # The root cluster revoked keys as compromised: stop trusting their SLCs (and RACs).
            changes["untrusted_root_key_ids"] = sorted(set(untrusted) | (set(trusted) & set(root.revoked_key_ids)))
    if not changes:
        return Result(changed=False, facts={"cluster": current})
    before = dict(current, schema_revision=revision, untrusted_root_key_ids=untrusted)
    before = {k: before[k] for k in changes}
    after = dict(current, **changes)
    if not check_mode:
        slcs = None
        statements: dict[str, str] = {}
        if "slc_issuer_key_id" in changes:
            with store.engine.connect() as conn:
                row = clusters.get_cluster(conn, name)
                key = unlock.open_active_key(conn, row)
                revoked = [k for k in clusters.keys_of(conn, row.id) if k.status == "compromised"]
                statements, _unsigned = revocation.statements_for(revoked, unlock.open_key, name, utcnow())
            slcs = enrollment.enroll(name, wanted["intranet_url"], wanted["extranet_url"], key, root, statements)
        with store.writing(name) as conn:
            row = clusters.get_cluster(conn, name)
            now = utcnow()
            if slcs is not None:
                clusters.save_enrollment(conn, row.id, slcs[0], slcs[1], now)
                clusters.save_revocations(conn, statements)
            if root is not None:
                clusters.revoke_root_slcs(conn, row.id, root.revoked_key_ids, now)
            columns = {k: changes[k] for k in ("state", "intranet_url", "extranet_url") if k in changes}
            if columns:
                clusters.update_cluster(conn, row.id, now, **columns)
            after = cluster_view(conn, clusters.get_cluster(conn, name))
    return Result(changed=True, diff={"before": before, "after": changes}, facts={"cluster": after})


def _cluster_absent(store: Store, name, force, check_mode) -> Result:
    def current(conn):
        row = clusters.get_cluster(conn, name)
        if row is None:
            return None
        return cluster_view(conn, row), sum(clusters.content_counts(conn, row.id).values())

    found = store.read(current)
    if found is None:
        return Result(changed=False, facts={"cluster": {}})
    view, content_count = found
    if content_count and not force:
        raise RmsdError(
            f"cluster {name!r} protects {content_count} content item(s); removing it destroys the keys they need. "
            "Export a trusted publishing domain first, then set force=true to unprovision. Nothing was changed."
        )
    if not check_mode:
        with store.writing(name) as conn:
            row = clusters.get_cluster(conn, name)
            if row is not None:
                clusters.delete_cluster(conn, row.id)
    return Result(changed=True, diff={"before": view, "after": {}}, facts={"cluster": {}})
