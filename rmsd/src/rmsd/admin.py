"""The admin API: idempotent `ensure_*` calls with check mode and a metadata-only diff.
This is what the Ansible collection calls; it never returns key material or secrets."""

import ipaddress
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import sqlalchemy as sa

from rmsd import clusters, compromise, db, failpoints, licenses, pki, rotation, tpd
from rmsd import enrollment as enrollment_lib
from rmsd.config import (
    NodeConfig,
    Secrets,
    check_http_limits,
    check_tls_paths,
    check_tls_validity,
    load_tls_files,
    node_url,
    read_text_or_none,
    write_atomic,
)
from rmsd.errors import RmsdError
from rmsd.keys import KEY_SIZES, PROTECTIONS, TokenSettings, provider_for
from rmsd.schema import utcnow

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("root", "licensing")
STATES = ("present", "decommissioned", "absent")
TOKEN_ACTIONS = ("destroy", "disable")  # what becomes of a compromised key in a PKCS#11 token
HEARTBEAT_STALE_AFTER = 3  # heartbeats missed before a node counts as down


@dataclass
class Result:
    changed: bool
    diff: dict = field(default_factory=lambda: {"before": {}, "after": {}})
    facts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _check_name(what: str, value: str) -> None:
    if not value or not NAME.match(value):
        raise RmsdError(f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'")


def _check_url(what: str, value: str | None, required: bool) -> None:
    if not value:
        if required:
            raise RmsdError(f"{what} is required: the URL clients reach the cluster at, e.g. https://rms.example.com")
        return
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RmsdError(f"{what} {value!r} is not an http(s) URL")


def _engine(database_url: str, database_password: str | None) -> sa.Engine:
    return db.make_engine(database_url, database_password)


def _read(engine: sa.Engine, database_url: str, fn):
    """Run `fn(conn)` read-only; None when the database does not exist yet or has no schema. A database
    on an older schema is read as the next write will find it: migrated, in a transaction rolled back."""
    if not db.database_exists(engine):
        return None
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("clusters"):
                return None
            revision = db.schema_revision(conn)
            if revision == db.HEAD_REVISION:
                return fn(conn)
        with engine.connect() as conn:
            transaction = conn.begin()
            try:
                db.migrate(conn)
                conn.info["schema_revision_read"] = revision
                return fn(conn)
            finally:
                transaction.rollback()
    except sa.exc.OperationalError as err:
        raise db.connect_error(err, database_url) from None


def _cluster_view(conn, row) -> dict:
    key = clusters.active_key_row(conn, row.id)
    slc = clusters.current_slc_row(conn, row.id, key.id)
    return {
        "name": row.name,
        "role": row.role,
        "state": row.state,
        "intranet_url": row.intranet_url,
        "extranet_url": row.extranet_url,
        "key_protection": row.key_protection,
        "key_size": row.key_size,
        "active_key_id": key.id,
        "slc_fingerprint_sha256": slc.fingerprint_sha256 if slc else None,
        "slc_not_after": slc.not_after.isoformat() if slc else None,
        # root: its own key; licensing: the root cluster key its SLC chains to.
        "slc_issuer_key_id": slc.issuer_key_id if slc else None,
    }


def _open_active_key(conn, row, key_password: str | None, previous_key_password: str | None = None, token=None):
    """Prove the key password (or the token) opens the active key (RmsdError otherwise). While the
    password changes, the previous one may open it instead."""
    key_row = clusters.active_key_row(conn, row.id)
    try:
        return provider_for(key_row.protection, key_password=key_password, token=token).load(key_row)
    except RmsdError as err:
        if previous_key_password:
            try:
                return provider_for(row.key_protection, key_password=previous_key_password).load(key_row)
            except RmsdError:
                pass
        raise RmsdError(f"{err}. Nothing was changed.") from None


@contextmanager
def _writing(engine, database_url, name):
    """A write transaction on cluster `name`: locked against concurrent runs, schema up to date."""
    try:
        with engine.begin() as conn:
            db.lock(conn, name)
            db.migrate(conn)
            yield conn
    except sa.exc.OperationalError as err:
        raise db.connect_error(err, database_url) from None


def ensure_cluster(
    *, name, database_url, database_password=None, role="root", key_protection="password", key_password=None,
    previous_key_password=None, key_size=2048, intranet_url=None, extranet_url=None, enrollment_url=None,
    enrollment_credential=None, enrollment_ca_path=None, pkcs11=None, state="present", force=False, check_mode=False,
) -> Result:
    _check_name("cluster name", name)
    if state not in STATES:
        raise RmsdError(f"state must be one of {', '.join(STATES)}, not {state!r}")
    engine = _engine(database_url, database_password)
    try:
        if state == "absent":
            return _cluster_absent(engine, database_url, name, force, check_mode)
        if role not in ROLES:
            raise RmsdError(f"role {role!r} is not supported; use one of {', '.join(ROLES)}")
        if key_protection not in PROTECTIONS:
            raise RmsdError(f"key_protection {key_protection!r} is not supported; use one of {', '.join(PROTECTIONS)}")
        if key_size not in KEY_SIZES:
            raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {key_size}")
        _check_url("intranet_url", intranet_url, required=True)
        _check_url("extranet_url", extranet_url, required=False)
        if role == "licensing":
            _check_url("enrollment_url", enrollment_url, required=True)
            if enrollment_ca_path and not os.path.isfile(enrollment_ca_path):
                raise RmsdError(f"enrollment_ca_path {enrollment_ca_path!r} is not a file")
        elif enrollment_url or enrollment_credential:
            raise RmsdError("enrollment_url and enrollment_credential are for role=licensing only: a root cluster "
                            "certifies itself")
        token = _token(key_protection, pkcs11, key_password, previous_key_password)
        provider = provider_for(key_protection, key_password=key_password, token=token)
        wanted = {
            "name": name, "role": role, "state": "decommissioned" if state == "decommissioned" else "provisioned",
            "intranet_url": intranet_url, "extranet_url": extranet_url, "key_protection": key_protection,
            "key_size": key_size,
        }
        enrollment = {"url": enrollment_url, "ca_path": enrollment_ca_path, "credential": enrollment_credential}
        passwords = (key_password, previous_key_password, token)
        existing = _read(engine, database_url, lambda conn: _existing_cluster(conn, name, *passwords))
        if existing is None:
            if state == "decommissioned":
                raise RmsdError(f"cluster {name!r} does not exist in {database_url}; there is nothing to decommission")
            return _provision(engine, database_url, wanted, provider, enrollment, check_mode)
        return _update_cluster(engine, database_url, existing, wanted, passwords, enrollment, force, check_mode)
    finally:
        engine.dispose()


def _token(key_protection, pkcs11, key_password=None, previous_key_password=None) -> TokenSettings | None:
    """The token settings for key_protection=pkcs11; errors for options that don't fit the protection."""
    token = TokenSettings.from_options(pkcs11)
    if key_protection == "pkcs11":
        if token is None:
            raise RmsdError("key_protection=pkcs11 needs pkcs11 (module, token_label and pin): the token the cluster "
                            "keys are generated in. Nothing was changed.")
        if key_password or previous_key_password:
            raise RmsdError("key_password is for key_protection=password; the keys of a pkcs11 cluster are opened "
                            "with the token PIN (pkcs11.pin). Nothing was changed.")
    elif token is not None:
        raise RmsdError(f"pkcs11 is for key_protection=pkcs11; this cluster's keys are protected by "
                        f"{key_protection}. Nothing was changed.")
    return token


def _existing_cluster(conn, name, key_password, previous_key_password, token):
    row = clusters.get_cluster(conn, name)
    if row is None:
        other = clusters.other_cluster(conn, name)
        if other is not None:
            raise RmsdError(
                f"this configuration database already holds cluster {other.name!r}; every cluster has its own "
                f"configuration database: give cluster {name!r} another database_url"
            )
        return None
    _open_active_key(conn, row, key_password, previous_key_password, token)
    revision = conn.info.get("schema_revision_read", db.schema_revision(conn))
    untrusted = clusters.untrusted_root_key_ids(conn, row.id)
    trusted = [pki.cert_key_id(cert) for cert in clusters.trust_anchors(conn, row)] if row.role == "licensing" else []
    return dict(_cluster_view(conn, row), schema_revision=revision, untrusted_root_key_ids=untrusted,
                trusted_root_key_ids=trusted)


def _provision(engine, database_url, wanted, provider, enrollment, check_mode) -> Result:
    after = dict(wanted, active_key_id="(new key)")
    result = Result(changed=True, diff={"before": {}, "after": after}, facts={"cluster": after})
    if check_mode:
        return result
    # Generate (and enroll) before taking the lock: those are the slow parts.
    new_key = provider.generate(wanted["key_size"])
    slcs = None
    if wanted["role"] == "licensing":
        slcs = _enroll(wanted, new_key.loaded, enrollment)
    now = utcnow()
    db.prepare_sqlite_file(engine)
    # One transaction: schema, cluster, key and SLC appear together or not at all.
    with _writing(engine, database_url, wanted["name"]) as conn:
        row = clusters.get_cluster(conn, wanted["name"])
        if row is not None:
            # Provisioned concurrently by another run: converge on what is there.
            return Result(changed=False, facts={"cluster": _cluster_view(conn, row)})
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
        view = _cluster_view(conn, clusters.get_cluster(conn, wanted["name"]))
    result.diff["after"] = view
    result.facts["cluster"] = view
    return result


def _enroll(wanted, key, enrollment, root=None, revoked_key_ids=()):
    root = root or enrollment_lib.fetch_root_slc(enrollment["url"], enrollment["ca_path"])
    if root.state != "provisioned":
        raise RmsdError(f"root cluster {root.cluster!r} is {root.state}; it enrolls no licensing clusters")
    return enrollment_lib.enroll(
        enrollment["url"], enrollment["ca_path"], cluster=wanted["name"], key=key,
        intranet_url=wanted["intranet_url"], extranet_url=wanted["extranet_url"],
        credential=enrollment["credential"], expected_root=root, revoked_key_ids=revoked_key_ids,
    )


IMMUTABLE = {
    "role": "a cluster's role cannot change; provision a new cluster with the role you want and move servers to it",
    "key_protection": "key protection cannot change in place; it applies when a new cluster key is generated "
    "(key rollover) or to a newly provisioned cluster",
    "key_size": "the size of the existing cluster key cannot change; key_size applies when a new cluster key is "
    "generated (key rollover). Set key_size to the current value to keep this cluster as it is",
}


def _update_cluster(engine, database_url, current, wanted, passwords, enrollment, force, check_mode) -> Result:
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
    if revision != db.HEAD_REVISION:
        changes["schema_revision"] = db.HEAD_REVISION  # _writing migrates
    root = None
    untrusted, trusted = current.pop("untrusted_root_key_ids"), current.pop("trusted_root_key_ids")
    if current["role"] == "licensing":
        root = enrollment_lib.fetch_root_slc(enrollment["url"], enrollment["ca_path"])
        if current["slc_issuer_key_id"] != root.key_id:
            # The root cluster has a new key: a licensing cluster re-enrolls its own (unchanged) key.
            changes["slc_issuer_key_id"] = root.key_id
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
        if "slc_issuer_key_id" in changes:
            with engine.connect() as conn:
                row = clusters.get_cluster(conn, name)
                key = _open_active_key(conn, row, *passwords)
                revoked = clusters.compromised_key_ids(conn, row.id)
            slcs = _enroll(wanted, key, enrollment, root, revoked)
        with _writing(engine, database_url, name) as conn:
            row = clusters.get_cluster(conn, name)
            now = utcnow()
            if slcs is not None:
                clusters.save_enrollment(conn, row.id, slcs[0], slcs[1], now)
            if root is not None:
                clusters.revoke_root_slcs(conn, row.id, root.revoked_key_ids, now)
            columns = {k: changes[k] for k in ("state", "intranet_url", "extranet_url") if k in changes}
            if columns:
                clusters.update_cluster(conn, row.id, now, **columns)
            after = _cluster_view(conn, clusters.get_cluster(conn, name))
    return Result(changed=True, diff={"before": before, "after": changes}, facts={"cluster": after})


def _cluster_absent(engine, database_url, name, force, check_mode) -> Result:
    def current(conn):
        row = clusters.get_cluster(conn, name)
        if row is None:
            return None
        return _cluster_view(conn, row), sum(clusters.content_counts(conn, row.id).values())

    found = _read(engine, database_url, current)
    if found is None:
        return Result(changed=False, facts={"cluster": {}})
    view, content_count = found
    if content_count and not force:
        raise RmsdError(
            f"cluster {name!r} protects {content_count} content item(s); removing it destroys the keys they need. "
            "Export a trusted publishing domain first, then set force=true to unprovision. Nothing was changed."
        )
    if not check_mode:
        with _writing(engine, database_url, name) as conn:
            row = clusters.get_cluster(conn, name)
            if row is not None:
                clusters.delete_cluster(conn, row.id)
    return Result(changed=True, diff={"before": view, "after": {}}, facts={"cluster": {}})


# --- cluster keys: compromise, rollover, password -------------------------------------------------


def ensure_cluster_key(
    *, cluster, database_url, database_password=None, key_password=None, previous_key_password=None,
    compromised_keys=None, max_age=None, key_size=None, reenroll=False, enrollment_url=None,
    enrollment_credential=None, enrollment_ca_path=None, pkcs11=None, compromised_key_in_token=None, check_mode=False,
) -> Result:
    """The cluster's keys as desired: the keys listed in `compromised_keys` revoked (an active one is
    replaced by a brand-new key pair and a new SLC), an active key no older than `max_age` days (else
    it is archived and replaced), every key encrypted with `key_password` (`previous_key_password`
    opens them while they are not yet). `reenroll` renews a licensing cluster's SLC for its active key;
    it is refused for a compromised key. A licensing cluster enrolls a new key with the root cluster
    at `enrollment_url` (with `enrollment_credential`). In a pkcs11 cluster (token `pkcs11`), new keys
    are generated in the token, and `compromised_key_in_token` says whether a compromised key is
    destroyed there or kept, unable to sign or decrypt ("disable")."""
    _check_name("cluster", cluster)
    if compromised_key_in_token not in (None, *TOKEN_ACTIONS):
        raise RmsdError(f"compromised_key_in_token must be one of {', '.join(TOKEN_ACTIONS)}, not "
                        f"{compromised_key_in_token!r}")
    if max_age is not None and int(max_age) < 1:
        raise RmsdError(f"max_age is the age in days after which the active key is replaced; at least 1, not {max_age}")
    if key_size is not None and key_size not in KEY_SIZES:
        raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {key_size}")
    desired = rotation.Desired(rotation.check_key_ids(compromised_keys), None if max_age is None else int(max_age),
                               bool(reenroll))
    engine = _engine(database_url, database_password)
    try:
        protection = _read(engine, database_url, lambda conn: getattr(clusters.get_cluster(conn, cluster),
                                                                      "key_protection", None))
        if protection is None:
            raise RmsdError(f"cluster {cluster!r} does not exist in {database_url}; provision it first")
        token = _token(protection, pkcs11, key_password, previous_key_password)
        passwords = (key_password, previous_key_password, token)
        row, keys, reencrypt = _read(engine, database_url, lambda conn: _key_state(conn, cluster, *passwords))
        if reenroll and row.role != "licensing":
            raise RmsdError("reenroll is for licensing clusters: a root cluster certifies itself. Nothing was changed.")
        now = utcnow()
        plan = rotation.make_plan(keys, desired, reencrypt=reencrypt, now=now)
        warnings = [
            f"cluster key {k.id} is compromised and stays so: a compromised key is never used again"
            for k in keys if k.status == "compromised" and k.id not in desired.compromised_keys
        ]
        token_plan = _token_plan(keys, plan, token, compromised_key_in_token)
        if not plan:
            result = Result(changed=False, facts=_key_facts(keys, now), warnings=warnings)
            return _settle_token(result, token_plan, compromised_key_in_token, check_mode)
        enrollment = None
        if row.role == "licensing" and (plan.replace or plan.reenroll):
            _check_url("enrollment_url", enrollment_url, required=True)
            enrollment = {"url": enrollment_url, "ca_path": enrollment_ca_path, "credential": enrollment_credential}
        diff = {
            "before": {"keys": {k.id: k.status for k in keys}, "key_password": "(set)"},
            "after": {"keys": plan.statuses_after(keys), "key_password": "(changed)" if plan.reencrypt else "(set)"},
        }
        if token is not None:  # the token PIN opens the keys; there is no key password
            for side in diff.values():
                del side["key_password"]
        if plan.reenroll:
            diff["after"]["slc"] = "(renewed by the root cluster)"
        if check_mode:
            result = Result(changed=True, diff=diff, facts=_key_facts(keys, now, plan.rotation(keys)),
                            warnings=warnings)
            return _settle_token(result, token_plan, compromised_key_in_token, check_mode)
        keys, plan, rotated = _rotate(engine, database_url, row, desired, plan, passwords, key_size or row.key_size,
                                      enrollment)
        if not plan:  # another run did it meanwhile
            result = Result(changed=False, facts=_key_facts(keys, utcnow()), warnings=warnings)
        else:
            diff["after"]["keys"] = {k.id: k.status for k in keys}
            result = Result(changed=True, diff=diff,
                            facts=_key_facts(keys, utcnow(), rotated, plan.reencrypt, plan.reenroll), warnings=warnings)
        return _settle_token(result, _token_plan(keys, None, token, compromised_key_in_token), compromised_key_in_token,
                             check_mode)
    finally:
        engine.dispose()


def _token_plan(keys, plan, token, action):
    """pkcs11: [(key row, state in the token)] of the keys compromised (after `plan`) that the token
    still holds other than `action` wants. RmsdError when there are any and no action is given."""
    if token is None:
        return []
    provider = provider_for("pkcs11", token=token)
    compromised = set(plan.compromise) if plan else set()
    pending = []
    for key in keys:
        if key.protection != "pkcs11" or (key.status != "compromised" and key.id not in compromised):
            continue
        state = provider.token_state(key)
        if state == "present" or (state == "disabled" and action == "destroy"):
            pending.append((key, state))
    if pending and action is None:
        ids = ", ".join(k.id for k, _ in pending)
        raise RmsdError(
            f"compromised cluster key(s) {ids} can still sign and decrypt in PKCS#11 token {token.token_label!r}: set "
            "compromised_key_in_token to destroy (the key is gone from the token) or disable (kept, but it can "
            "neither sign nor decrypt). Nothing was changed."
        )
    return [(provider, key, state) for key, state in pending]


def _settle_token(result: Result, token_plan, action, check_mode) -> Result:
    """Destroy or disable the compromised keys `token_plan` lists, after their revocation is committed,
    so a run killed in between does it on the rerun."""
    if not token_plan:
        return result
    after = {"destroy": "destroyed", "disable": "disabled"}[action]
    result.changed = True
    result.diff["before"]["token"] = {key.id: state for _, key, state in token_plan}
    result.diff["after"]["token"] = {key.id: after for _, key, _ in token_plan}
    if not check_mode:
        for provider, key, _ in token_plan:
            provider.settle_compromised(key, action)
    result.facts["token"] = result.diff["after"]["token"]
    return result


def _key_state(conn, name, key_password, previous_key_password, token=None):
    """(cluster row, key rows, whether the password must change); RmsdError when neither password opens
    the active key."""
    row = clusters.get_cluster(conn, name)
    if row is None:
        return None
    if token is not None:
        _open_active_key(conn, row, None, token=token)
        return row, clusters.keys_of(conn, row.id), False
    try:
        _open_active_key(conn, row, key_password)
        return row, clusters.keys_of(conn, row.id), False
    except RmsdError:
        if not previous_key_password:
            raise
    try:
        _open_active_key(conn, row, previous_key_password)
    except RmsdError:
        raise RmsdError(
            f"neither key_password nor previous_key_password opens the active key of cluster {name!r}. "
            "Nothing was changed."
        ) from None
    return row, clusters.keys_of(conn, row.id), True


def _key_facts(keys, now, rotated=None, password_changed=False, reenrolled=False) -> dict:
    return {
        "cluster_keys": [rotation.key_view(k, now) for k in keys],
        "active_key_id": next(k.id for k in keys if k.status == "active"),
        "rotation": rotated or {}, "password_changed": password_changed, "reenrolled": reenrolled,
    }


def _rotate(engine, database_url, row, desired, plan, passwords, key_size, enrollment):
    """Carry `plan` out: (keys after, the plan done, the rotation facts); the plan done is empty when
    another run did it meanwhile. The new key pair and a licensing cluster's enrollment come first,
    outside the lock (they are slow); then one transaction under the lock, planned again there."""
    key_password, previous_key_password, token = passwords
    new_provider = provider_for(row.key_protection, key_password=key_password, token=token)
    # What opens the stored keys until this run re-encrypts them.
    old_provider = provider_for(row.key_protection, key_password=previous_key_password if plan.reencrypt
                                else key_password, token=token)
    new_key = new_provider.generate(key_size) if plan.replace else None
    failpoints.reach("rotation.generated")
    slcs = None
    if enrollment is not None:
        with engine.connect() as conn:
            revoked = sorted(set(clusters.compromised_key_ids(conn, row.id)) | set(plan.compromise))
            key = new_key.loaded if new_key else old_provider.load(clusters.active_key_row(conn, row.id))
        wanted = {"name": row.name, "intranet_url": row.intranet_url, "extranet_url": row.extranet_url}
        slcs = _enroll(wanted, key, enrollment, revoked_key_ids=revoked)
        failpoints.reach("rotation.enrolled")
    with _writing(engine, database_url, row.name) as conn:
        failpoints.reach("rotation.locked")
        keys = clusters.keys_of(conn, row.id)
        try:
            old_provider.load(clusters.active_key_row(conn, row.id))
            reencrypt = plan.reencrypt
        except RmsdError:
            reencrypt = False  # another run changed the password meanwhile
        plan = rotation.make_plan(keys, desired, reencrypt=reencrypt, now=utcnow())
        if not plan:
            return keys, plan, {}
        if plan.replace and new_key is None:
            raise RmsdError(f"cluster {row.name!r} changed while this run prepared; run it again. Nothing was changed.")
        rotated = plan.rotation(keys, new_key.key_id if new_key else None)
        rotation.apply(conn, row, keys, plan, old_provider=old_provider, new_provider=new_provider, new_key=new_key,
                       slcs=slcs, now=utcnow())
        keys = clusters.keys_of(conn, row.id)
    failpoints.reach("rotation.committed")
    return keys, plan, rotated


# --- trusted publishing domain (backup, migration) -----------------------------------------------

TPD_STATES = ("exported", "imported")


def ensure_trusted_publishing_domain(
    *, cluster, database_url, database_password=None, key_password=None, pkcs11=None, path, password,
    state="exported", backup=True, check_mode=False,
) -> Result:
    """state=exported: `path` holds the cluster's current TPD, encrypted with `password` (0600). An
    existing file is replaced only when what it holds differs; with `backup` it is kept aside first.
    state=imported: the keys of the TPD at `path` are in the cluster as archived (decrypt-only) keys,
    with its SLCs, templates and content registry; keys revoked as compromised stay revoked. Keys in a
    PKCS#11 token (`pkcs11`) are not extractable: the TPD lists them without their private half, and
    the result warns about each; keys imported into a pkcs11 cluster go into its token."""
    _check_name("cluster", cluster)
    if state not in TPD_STATES:
        raise RmsdError(f"state must be one of {', '.join(TPD_STATES)}, not {state!r}")
    if not path or not os.path.isabs(path):
        raise RmsdError(f"path must be an absolute path, not {path!r}")
    tpd.check_password(password)
    engine = _engine(database_url, database_password)
    try:
        protection = _read(engine, database_url, lambda conn: getattr(clusters.get_cluster(conn, cluster),
                                                                      "key_protection", None))
        unlock = (key_password, _token(protection, pkcs11, key_password) if protection else None)
        if state == "exported":
            return _tpd_export(engine, database_url, cluster, unlock, Path(path), password, backup, check_mode)
        return _tpd_import(engine, database_url, cluster, unlock, Path(path), password, check_mode)
    finally:
        engine.dispose()


def _tpd_export(engine, database_url, cluster, unlock, path, password, backup, check_mode) -> Result:
    key_password, token = unlock

    def document(conn):
        row = clusters.get_cluster(conn, cluster)
        if row is None:
            return None
        _open_active_key(conn, row, key_password, token=token)
        return tpd.build(conn, row, lambda key: provider_for(key.protection, key_password=key_password,
                                                             token=token).load(key), password, utcnow())

    wanted = _read(engine, database_url, document)
    if wanted is None:
        raise RmsdError(f"cluster {cluster!r} does not exist in {database_url}; there is nothing to export")
    existing, existing_error = None, None
    if path.exists():
        try:
            existing = tpd.unseal(path.read_text(), password)
        except (RmsdError, UnicodeDecodeError) as err:
            existing_error = str(err)
        if existing_error and not backup:
            raise RmsdError(
                f"{path} exists and is not a trusted publishing domain this password opens ({existing_error}). It "
                "may be the only copy of older keys: set backup=true to keep it aside, or move it. Nothing was changed."
            )
    facts = {"tpd": dict(tpd.summary(wanted), path=str(path)), "backup_file": None}
    warnings = [f"cluster key {k['id']} is not in the export: {k['not_exported']}" for k in wanted["keys"]
                if k["not_exported"] and k["status"] != "compromised"]
    unchanged = existing is not None and tpd.manifest(existing) == tpd.manifest(wanted) and _mode(path) == 0o600
    if unchanged:
        return Result(changed=False, facts=facts, warnings=warnings)
    before = {"path": str(path), "state": "absent"} if not path.exists() else (
        dict(tpd.summary(existing), path=str(path)) if existing else {"path": str(path), "state": "unreadable"})
    diff = {"before": before, "after": facts["tpd"]}
    if not check_mode:
        if path.exists() and backup:
            facts["backup_file"] = _backup(path)
        write_atomic(path, tpd.seal(wanted, password) + "\n", 0o600)
    return Result(changed=True, diff=diff, facts=facts, warnings=warnings)


def _backup(path: Path) -> str:
    """Keep `path` aside as path.<UTC time>~ (0600), as Ansible's backup option does."""
    target = path.with_name(f"{path.name}.{utcnow():%Y%m%dT%H%M%S%f}~")
    os.link(path, target)
    os.chmod(target, 0o600)
    return str(target)


def _tpd_import(engine, database_url, cluster, unlock, path, password, check_mode) -> Result:
    key_password, token = unlock
    try:
        document = tpd.unseal(path.read_text(), password)
    except FileNotFoundError:
        raise RmsdError(f"{path} does not exist; give the path of an exported trusted publishing domain") from None
    except UnicodeDecodeError:
        raise RmsdError(f"{path} is not a trusted publishing domain") from None

    def planned(conn):
        row = clusters.get_cluster(conn, cluster)
        if row is None:
            return None
        _open_active_key(conn, row, key_password, token=token)
        return tpd.import_plan(conn, row, document)

    plan = _read(engine, database_url, planned)
    if plan is None:
        raise RmsdError(f"cluster {cluster!r} does not exist in {database_url}; provision it, then import into it")
    facts = {"tpd": dict(tpd.summary(document), path=str(path)), "imported": plan}
    warnings = [f"key {s['id']} was not imported: {s['reason']}" for s in plan["skipped"]]
    if not any(plan[k] for k in ("keys", "compromise", "certificates", "rights_templates", "content")):
        return Result(changed=False, facts=facts, warnings=warnings)
    diff = {"before": {}, "after": {k: v for k, v in plan.items() if v and k != "skipped"}}
    if not check_mode:
        with _writing(engine, database_url, cluster) as conn:
            row = clusters.get_cluster(conn, cluster)
            plan = tpd.import_plan(conn, row, document)  # again, under the lock
            provider = provider_for(row.key_protection, key_password=key_password, token=token)
            tpd.apply_import(conn, row, document, plan, provider, password, utcnow())
        facts["imported"] = plan
    return Result(changed=True, diff=diff, facts=facts, warnings=warnings)


# --- content under compromised keys ---------------------------------------------------------------


def ensure_compromise_report(
    *, cluster, database_url, database_password=None, json_path=None, csv_path=None, notify=False,
    sender=None, outbox_dir=None, smtp_host=None, smtp_port=25, smtp_starttls=False, smtp_username=None,
    smtp_password=None, template_dir=None, check_mode=False,
) -> Result:
    """The per-owner report of content under compromised keys, written to `json_path` / `csv_path`
    when it changed; with `notify`, every owner with content still to republish is sent one notice per
    compromised key (over SMTP at `smtp_host`, or into `outbox_dir`), never twice."""
    _check_name("cluster", cluster)
    for what, value in (("json_path", json_path), ("csv_path", csv_path), ("outbox_dir", outbox_dir),
                        ("template_dir", template_dir)):
        if value and not os.path.isabs(value):
            raise RmsdError(f"{what} must be an absolute path, not {value!r}")
    smtp = None
    if notify:
        if not sender or "@" not in sender:
            raise RmsdError("notify needs sender, the address the notices come from (e.g. rms-admins@example.com)")
        if bool(smtp_host) == bool(outbox_dir):
            raise RmsdError("notify needs exactly one of smtp_host (send the notices) or outbox_dir (keep them there)")
        if smtp_host:
            smtp = compromise.Smtp(smtp_host, int(smtp_port), bool(smtp_starttls), smtp_username, smtp_password)
    engine = _engine(database_url, database_password)
    try:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            keys = [k for k in clusters.keys_of(conn, row.id) if k.status == "compromised"]
            return row, keys, compromise.affected_content(conn, row.id), compromise.notices_sent(conn, row.id)

        found = _read(engine, database_url, current)
        if found is None:
            raise RmsdError(f"cluster {cluster!r} does not exist in {database_url}")
        row, keys, items, sent = found
        compromised = [{"id": k.id, "compromised_at": k.status_changed_at.isoformat()} for k in keys]
        data = compromise.report(cluster, compromised, items)
        files = {p: text for p, text in ((json_path, compromise.render_json(data)),
                                         (csv_path, compromise.render_csv(items))) if p}
        stale = [p for p, text in files.items() if read_text_or_none(p) != text or _mode(p) != 0o640]
        due = compromise.due_notices(items, sent) if notify else {}
        notices = []
        for (owner, key_id), pending in sorted(due.items()):
            context = {
                "owner": owner, "items": pending,
                "cluster": {"name": row.name, "intranet_url": row.intranet_url, "extranet_url": row.extranet_url},
                "key": next(k for k in compromised if k["id"] == key_id),
            }
            subject, body = compromise.render_notice(template_dir, context)  # a bad template fails before sending
            notices.append((owner, key_id, len(pending), compromise.message(sender, owner, subject, body)))
        summary = {k: data[k] for k in ("cluster", "compromised_keys", "pending", "republished")}
        summary["owners"] = [{k: o[k] for k in ("owner", "pending", "republished")} for o in data["owners"]]
        facts = {"report": summary, "notified": [n[0] for n in notices]}
        if not stale and not notices:
            return Result(changed=False, facts=facts)
        diff = {"before": {"files": {}, "notices": []}, "after": {
            "files": {p: "(rewritten)" for p in stale}, "notices": [f"{n[0]} (key {n[1]})" for n in notices],
        }}
        if not check_mode:
            for p in stale:
                write_atomic(p, files[p], 0o640)
            for owner, key_id, count, msg in notices:
                # Recorded in the same transaction as the sending: a notice that did not go out is not
                # recorded and goes out on the next run.
                with _writing(engine, database_url, cluster) as conn:
                    channel = compromise.deliver(msg, smtp, outbox_dir)
                    compromise.record_notice(conn, row.id, owner, key_id, count, channel, utcnow())
        return Result(changed=True, diff=diff, facts=facts)
    finally:
        engine.dispose()


# --- enrollment credentials (root cluster) --------------------------------------------------------

MIN_SECRET_LENGTH = 24
CREDENTIAL_VALIDITY = (60, 7 * 24 * 3600)  # seconds


def ensure_enrollment_credential(
    *, cluster, scope, database_url, database_password=None, secret=None, valid_for=900, state="present",
    check_mode=False,
) -> Result:
    """On the root cluster: let licensing cluster `scope` enroll with `secret` for `valid_for` seconds.
    Only a salted scrypt hash of the secret is stored. present: unchanged while a credential for
    `scope` with this secret is still valid; otherwise a fresh one replaces it."""
    _check_name("cluster", cluster)
    _check_name("scope", scope)
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    if state == "present":
        if not secret or len(secret) < MIN_SECRET_LENGTH:
            raise RmsdError(f"secret must be at least {MIN_SECRET_LENGTH} characters (a random string)")
        low, high = CREDENTIAL_VALIDITY
        if not low <= int(valid_for) <= high:
            raise RmsdError(f"valid_for must be between {low} and {high} seconds, not {valid_for}")
    engine = _engine(database_url, database_password)
    try:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            if row.role != "root":
                raise RmsdError(f"cluster {cluster!r} is a {row.role} cluster; enrollment credentials live on the root")
            if scope == cluster:
                raise RmsdError("scope names the licensing cluster that may enroll, not the root cluster itself")
            cred = clusters.credential_row(conn, row.id, scope)
            if cred is None:
                return {}
            return {
                "scope": scope, "expires_at": cred.expires_at,
                "matches": bool(secret) and clusters.secret_matches(cred, secret),
            }

        found = _read(engine, database_url, current)
        if found is None:
            raise RmsdError(f"root cluster {cluster!r} does not exist in {database_url}; provision it first")
        now = utcnow()
        before = {"scope": scope, "expires_at": found["expires_at"].isoformat()} if found else {}
        if state == "absent":
            if not found:
                return Result(changed=False, facts={"credential": {}})
            if not check_mode:
                with _writing(engine, database_url, cluster) as conn:
                    clusters.delete_credential(conn, clusters.get_cluster(conn, cluster).id, scope)
            return Result(changed=True, diff={"before": before, "after": {}}, facts={"credential": {}})
        if found and found["matches"] and found["expires_at"] > now:
            return Result(changed=False, facts={"credential": before})
        expires_at = now + timedelta(seconds=int(valid_for))
        after = {"scope": scope, "expires_at": expires_at.isoformat()}
        if not check_mode:
            with _writing(engine, database_url, cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.save_credential(conn, row.id, scope, secret, expires_at, now)
        # The secret is never part of the diff, only that it is (re)set.
        return Result(changed=True, diff={"before": before, "after": dict(after, secret="(set)")},
                      facts={"credential": after})
    finally:
        engine.dispose()


# --- rights policy templates ----------------------------------------------------------------------


def ensure_rights_template(
    *, cluster, name, database_url, database_password=None, rights=None, description="", state="present",
    check_mode=False,
) -> Result:
    """A named rights policy of cluster `cluster` that publishing licenses can reference."""
    _check_name("cluster", cluster)
    _check_name("template name", name)
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    description = description or ""
    if len(description) > 512:
        raise RmsdError("description is longer than 512 characters")
    if state == "present":
        try:
            rights = licenses.normalize_rights(rights or {})
        except RmsdError as err:
            raise RmsdError(f"rights of template {name!r}: {err}") from None
    engine = _engine(database_url, database_password)
    try:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            template = clusters.template_row(conn, row.id, name)
            return {} if template is None else _template_view(template)

        found = _read(engine, database_url, current)
        if found is None:
            raise RmsdError(f"cluster {cluster!r} does not exist in {database_url}; provision it first")
        if state == "absent":
            if not found:
                return Result(changed=False, facts={"template": {}})
            if not check_mode:
                with _writing(engine, database_url, cluster) as conn:
                    clusters.delete_template(conn, clusters.get_cluster(conn, cluster).id, name)
            return Result(changed=True, diff={"before": found, "after": {}}, facts={"template": {}})
        wanted = {"name": name, "description": description, "rights": rights}
        if found == wanted:
            return Result(changed=False, facts={"template": wanted})
        if not check_mode:
            with _writing(engine, database_url, cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.save_template(conn, row.id, name, description, rights, utcnow())
        return Result(changed=True, diff={"before": found, "after": wanted}, facts={"template": wanted})
    finally:
        engine.dispose()


def _template_view(row) -> dict:
    return {"name": row.name, "description": row.description, "rights": row.rights}


# --- servers -------------------------------------------------------------------------------------


def ensure_server(
    *, cluster, name, database_url, database_password=None, key_password=None, previous_key_password=None,
    listen_address="127.0.0.1", port=8080, config_path, secret_path, identity_issuer=None, identity_audience="rmsd",
    identity_jwks_uri=None, pkcs11=None, tls_certificate=None, tls_key=None, http_limits=None, state="present",
    check_mode=False,
) -> Result:
    """A node of `cluster`: registered, with its configuration file and its 0600 secret file. A node of
    a pkcs11 cluster gets the token (`pkcs11`: module, token_label, pin; the PIN goes to the secret file).
    With `tls_certificate` and `tls_key` (paths of PEM files already on the node) it serves HTTPS.
    `http_limits`: rmsd.limits.HTTP_LIMITS to set (the others keep their defaults)."""
    _check_name("cluster", cluster)
    _check_name("server name", name)
    for what, path in (("config_path", config_path), ("secret_path", secret_path)):
        if not path or not os.path.isabs(path):
            raise RmsdError(f"{what} must be an absolute path, not {path!r}")
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    engine = _engine(database_url, database_password)
    try:
        if state == "absent":
            return _server_absent(engine, database_url, cluster, name, config_path, secret_path, check_mode)
        try:
            ipaddress.ip_address(listen_address)
        except ValueError:
            raise RmsdError(f"listen_address {listen_address!r} is not an IP address") from None
        if not 1 <= int(port) <= 65535:
            raise RmsdError(f"port {port} is out of range 1-65535")
        check_tls_paths(tls_certificate, tls_key)
        chosen_limits = check_http_limits(http_limits)
        warnings = _check_tls_files(tls_certificate, tls_key, check_mode) if tls_certificate else []
        token = TokenSettings.from_options(pkcs11)
        config = NodeConfig(
            name=name, cluster=cluster, database_url=database_url, listen_address=listen_address, port=int(port),
            secret_path=secret_path, identity_issuer=identity_issuer, identity_audience=identity_audience,
            identity_jwks_uri=identity_jwks_uri, pkcs11_module=token and token.module,
            pkcs11_token_label=token and token.token_label, tls_certificate=tls_certificate or None,
            tls_key=tls_key or None, **chosen_limits,
        )
        secrets = Secrets(key_password=key_password, previous_key_password=previous_key_password or None,
                          database_password=database_password, pkcs11_pin=token and token.pin)
        result = _server_present(engine, database_url, config, config_path, secrets, check_mode)
        result.warnings.extend(warnings)
        return result
    finally:
        engine.dispose()


def _check_tls_files(tls_certificate, tls_key, check_mode) -> list[str]:
    """The node's certificate and key: readable, matching, the certificate valid now (RmsdError otherwise,
    before anything is written). In check mode files not there yet are a warning: an earlier task of the
    same run (e.g. one that gets the certificate signed) would have written them."""
    missing = [path for path in (tls_certificate, tls_key) if not os.path.exists(path)]
    if missing:
        if check_mode:
            it = "them" if len(missing) > 1 else "it"
            warning = (f"{' and '.join(missing)} not found; assuming an earlier task writes {it}. A real run fails "
                       "if it is still missing then")
            return [warning]
        raise RmsdError(
            f"{' and '.join(missing)} not found: tls_certificate and tls_key must be on the node before it joins "
            "(rmsd tls-request makes the key and a certificate request for it). Nothing was changed."
        )
    try:
        files = load_tls_files(tls_certificate, tls_key)
        check_tls_validity(files, tls_certificate, utcnow())
    except RmsdError as err:
        raise RmsdError(f"{err}. Nothing was changed.") from None
    return []


def _server_present(engine, database_url, config: NodeConfig, config_path, secrets: Secrets, check_mode) -> Result:
    def registration(conn):
        row = clusters.get_cluster(conn, config.cluster)
        if row is None:
            return None
        token = TokenSettings.for_node(config, secrets)
        _open_active_key(conn, row, secrets.key_password, secrets.previous_key_password, token)
        for other in clusters.servers_of(conn, row.id):
            if other.name != config.name and (other.listen_address, other.port) == (
                config.listen_address, config.port,
            ):
                raise RmsdError(
                    f"{config.listen_address}:{config.port} is already used by server {other.name!r} of this cluster; "
                    "give this server another listen_address or port"
                )
        server = clusters.server_row(conn, row.id, config.name)
        if server is None:
            return row.state, None
        return row.state, {"listen_address": server.listen_address, "port": server.port, "tls": server.tls}

    found = _read(engine, database_url, registration)
    if found is None and check_mode:
        # In a check run the cluster may be one that an earlier task would have provisioned.
        found = ("provisioned", None)
    if found is None:
        raise RmsdError(
            f"cluster {config.cluster!r} does not exist in {database_url}; provision it first with rmsops.rms.cluster"
        )
    _state, registered = found
    wanted_reg = {"listen_address": config.listen_address, "port": config.port, "tls": config.tls}
    config_text = config.render()
    secret_text = secrets.render()
    secret_path = config.secret_path
    config_changed = read_text_or_none(config_path) != config_text
    secret_changed = read_text_or_none(secret_path) != secret_text or _mode(secret_path) != 0o600
    reg_changed = registered != wanted_reg
    changed = config_changed or secret_changed or reg_changed
    facts = {
        "server": {
            "name": config.name, "cluster": config.cluster, "listen_address": config.listen_address,
            "port": config.port, "url": config.url, "config_path": config_path, "secret_path": secret_path,
            "tls": config.tls, "tls_certificate": config.tls_certificate, "tls_key": config.tls_key,
        },
        "config_changed": config_changed or secret_changed,
    }
    diff = {
        "before": {
            "registration": registered,
            "config": read_text_or_none(config_path),
            "secret_file": "present" if os.path.exists(secret_path) else "absent",
        },
        "after": {
            "registration": wanted_reg,
            "config": config_text,
            # Secret content is never shown, only whether it changes.
            "secret_file": "will be rewritten (0600)" if secret_changed else "present",
        },
    }
    if changed and not check_mode:
        with _writing(engine, database_url, config.cluster) as conn:
            row = clusters.get_cluster(conn, config.cluster)
            clusters.save_server(conn, row.id, config.name, config.listen_address, config.port, utcnow(),
                                 tls=config.tls)
        write_atomic(secret_path, secret_text, 0o600)
        write_atomic(config_path, config_text, 0o640)
    return Result(changed=changed, diff=diff if changed else {"before": {}, "after": {}}, facts=facts)


def _mode(path) -> int | None:
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None


def _server_absent(engine, database_url, cluster, name, config_path, secret_path, check_mode) -> Result:
    def registered(conn):
        row = clusters.get_cluster(conn, cluster)
        return row is not None and clusters.server_row(conn, row.id, name) is not None

    is_registered = bool(_read(engine, database_url, registered))
    files = [p for p in (config_path, secret_path) if os.path.exists(p)]
    if not is_registered and not files:
        return Result(changed=False, facts={"server": {}, "config_changed": False})
    if not check_mode:
        if is_registered:
            with _writing(engine, database_url, cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.delete_server(conn, row.id, name)
        for path in files:
            Path(path).unlink(missing_ok=True)
    before = {"registered": is_registered, "files": files}
    return Result(changed=True, diff={"before": before, "after": {"registered": False, "files": []}},
                  facts={"server": {}, "config_changed": True})


# --- information ----------------------------------------------------------------------------------


def cluster_info(*, name, database_url, database_password=None) -> dict:
    _check_name("cluster name", name)
    engine = _engine(database_url, database_password)
    try:
        info = _read(engine, database_url, lambda conn: _info(conn, name))
    finally:
        engine.dispose()
    return info or {
        "exists": False, "cluster": {}, "nodes": [], "cluster_keys": [], "slc": {}, "root_slc": {},
        "untrusted_root_key_ids": [],
        "content_per_key": {}, "rights_templates": [], "enrollment_credentials": [], "enrollments": [],
    }


def _info(conn, name) -> dict | None:
    row = clusters.get_cluster(conn, name)
    if row is None:
        return None
    now = utcnow()
    view = _cluster_view(conn, row)
    slc_row = clusters.current_slc_row(conn, row.id, view["active_key_id"])
    slc = pki.load_pem(slc_row.pem)
    nodes = []
    for server in clusters.servers_of(conn, row.id):
        beat = server.last_heartbeat
        # A node that beats every 10 s and has missed a few counts as down.
        up = beat is not None and (now - beat).total_seconds() < 10 * HEARTBEAT_STALE_AFTER
        nodes.append({
            "name": server.name, "listen_address": server.listen_address, "port": server.port,
            "tls": server.tls, "url": node_url(server.listen_address, server.port, server.tls),
            "joined_at": server.joined_at.isoformat(),
            "last_heartbeat": beat.isoformat() if beat else None, "status": "up" if up else "down",
        })
    keys = [rotation.key_view(k, now) for k in clusters.keys_of(conn, row.id)]
    root_slc, untrusted = {}, []
    if row.role == "licensing":
        root_row = clusters.root_slc_row(conn, row.id, slc_row.issuer_key_id)
        root_slc = _cert_view(pki.load_pem(root_row.pem), root_row)
        untrusted = clusters.untrusted_root_key_ids(conn, row.id)
    return {
        "exists": True,
        "cluster": view,
        "nodes": nodes,
        "cluster_keys": keys,
        "slc": dict(_cert_view(slc, slc_row), issuer_key_id=slc_row.issuer_key_id),
        "root_slc": root_slc,
        # licensing: root keys revoked as compromised, whose SLCs and RACs it no longer trusts
        "untrusted_root_key_ids": untrusted,
        "content_per_key": clusters.content_counts(conn, row.id),
        "rights_templates": [_template_view(t) for t in clusters.templates_of(conn, row.id)],
        # Metadata only: the secret's hash never leaves the database.
        "enrollment_credentials": [
            {
                "scope": c.scope, "expires_at": c.expires_at.isoformat(), "expired": c.expires_at <= now,
                "last_used_at": c.last_used_at.isoformat() if c.last_used_at else None,
            }
            for c in clusters.credentials_of(conn, row.id)
        ],
        "enrollments": [
            {
                "licensing_cluster": e.licensing_cluster, "key_id": e.key_id, "issuer_key_id": e.issuer_key_id,
                "slc_fingerprint_sha256": e.fingerprint_sha256, "not_after": e.not_after.isoformat(),
                "created_at": e.created_at.isoformat(),
                "revoked_at": e.revoked_at.isoformat() if e.revoked_at else None,
            }
            for e in clusters.enrollments_of(conn, row.id)
        ],
    }


def _cert_view(cert, cert_row) -> dict:
    return {
        "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
        "serial": cert_row.serial, "fingerprint_sha256": cert_row.fingerprint_sha256, "key_id": cert_row.key_id,
        "not_before": cert_row.not_before.isoformat(), "not_after": cert_row.not_after.isoformat(),
    }
