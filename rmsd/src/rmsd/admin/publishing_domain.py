"""Trusted publishing domains: a cluster's keys, SLCs, templates and content registry exported to a
password-encrypted file (backup, migration), and imported into a cluster as decrypt-only keys."""

import os
from pathlib import Path
from typing import Any

from rmsd import clusters, passwords, tpd
from rmsd.admin.common import Result, Unlock, check_absolute, check_name, check_state, file_mode, token_settings
from rmsd.admin.store import Store, opened
from rmsd.config import write_atomic
from rmsd.errors import RmsdError
from rmsd.schema import utcnow

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
    check_name("cluster", cluster)
    check_state(state, TPD_STATES)
    check_absolute("path", path)
    if state == "exported":  # the password a new export is encrypted with meets the policy
        passwords.check("the trusted publishing domain password", password)
    else:
        tpd.check_password(password)
    with opened(database_url, database_password) as store:
        protection = store.read(lambda conn: getattr(clusters.get_cluster(conn, cluster), "key_protection", None))
        unlock = Unlock(key_password, token=token_settings(protection, pkcs11, key_password) if protection else None)
        if state == "exported":
            return _export(store, cluster, unlock, Path(path), password, backup, check_mode)
        return _import(store, cluster, unlock, Path(path), password, check_mode)


def _export(store: Store, cluster, unlock: Unlock, path: Path, password, backup, check_mode) -> Result:
    def document(conn):
        row = clusters.get_cluster(conn, cluster)
        if row is None:
            return None
        unlock.open_active_key(conn, row)
        return tpd.build(conn, row, lambda key: unlock.provider(key.protection).load(key), password, utcnow())

    wanted = store.read(document)
    if wanted is None:
        raise store.missing(cluster, "there is nothing to export")
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
    facts: dict[str, Any] = {"tpd": dict(tpd.summary(wanted), path=str(path)), "backup_file": None}
    warnings = [f"cluster key {k['id']} is not in the export: {k['not_exported']}" for k in wanted["keys"]
                if k["not_exported"] and k["status"] != "compromised"]
    unchanged = existing is not None and tpd.manifest(existing) == tpd.manifest(wanted) and file_mode(path) == 0o600
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


def _import(store: Store, cluster, unlock: Unlock, path: Path, password, check_mode) -> Result:
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
        unlock.open_active_key(conn, row)
        return tpd.import_plan(conn, row, document)

    plan = store.read(planned)
    if plan is None:
        raise store.missing(cluster, "provision it, then import into it")
    facts = {"tpd": dict(tpd.summary(document), path=str(path)), "imported": _reported(plan)}
    warnings = [f"key {s['id']} was not imported: {s['reason']}" for s in plan["skipped"]]
    if not any(plan[k] for k in ("keys", "compromise", "certificates", "rights_templates", "content")):
        return Result(changed=False, facts=facts, warnings=warnings)
    diff = {"before": {}, "after": {k: v for k, v in _reported(plan).items() if v and k != "skipped"}}
    if not check_mode:
        with store.writing(cluster) as conn:
            row = clusters.get_cluster(conn, cluster)
            plan = tpd.import_plan(conn, row, document)  # again, under the lock
            tpd.apply_import(conn, row, document, plan, unlock.provider(row.key_protection), password, utcnow())
        facts["imported"] = _reported(plan)
    return Result(changed=True, diff=diff, facts=facts, warnings=warnings)


def _reported(plan: dict) -> dict:
    """The plan as a result shows it: content as a count, since a registry holds up to millions of PLs."""
    return dict(plan, content=len(plan["content"]))
