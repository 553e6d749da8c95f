"""Cluster key lifecycle on the configuration database: keys revoked as compromised (an active one is
replaced by a brand-new key pair, never re-enrolled), scheduled rollover, and the key password change.

`plan` decides from the stored keys and the desired state; `apply` carries a plan out inside the
caller's locked transaction, so a rotation happens completely or not at all."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from rmsd import clusters, failpoints, pki
from rmsd.errors import RmsdError
from rmsd.keys import KeyProvider, NewKey

KEY_ID_LENGTH = 40

# Points of a rotation where the crash tests kill the process (rmsd.failpoints).
STEPS = (
    "rotation.generated",  # the new key pair exists in this process only
    "rotation.enrolled",  # licensing: the root cluster certified the new key
    "rotation.locked",  # inside the transaction, nothing written yet
    "rotation.revoked",  # old key marked, new key not stored yet (same transaction)
    "rotation.stored",  # new key and SLC stored, not committed
    "rotation.committed",  # committed; nothing told to the caller yet
)

REENROLL_REFUSED = (
    "cluster key {key_id} is listed in compromised_keys, and re-enrollment is no remedy for a compromised key: it "
    "renews the SLC of the same key pair, so whoever holds the key can go on using it. Remove reenroll: rmsd "
    "then generates a brand-new key pair, revokes the compromised one and gets the new key its SLC. Nothing was "
    "changed."
)


@dataclass(frozen=True)
class Desired:
    """What the operator declares about a cluster's keys."""

    compromised_keys: list[str]
    max_age_days: int | None = None
    reenroll: bool = False


@dataclass
class Plan:
    compromise: list[str] = field(default_factory=list)  # keys to revoke as compromised
    replace: str | None = None  # why the active key is replaced: compromised | max_age
    reencrypt: bool = False  # the cluster key password changes
    reenroll: bool = False  # licensing: renew the active key's SLC (same key)

    def __bool__(self) -> bool:
        return bool(self.compromise or self.replace or self.reencrypt or self.reenroll)

    def statuses_after(self, keys: list) -> dict[str, str]:
        """Key id -> status once carried out; the new key as "(new key)"."""
        after = {k.id: ("compromised" if k.id in self.compromise else k.status) for k in keys}
        if self.replace:
            after[_active(keys).id] = "compromised" if self.replace == "compromised" else "archived"
            after["(new key)"] = "active"
        return after

    def rotation(self, keys: list, new_key_id: str | None = None) -> dict:
        """The replacement of the active key, for the caller: {} when there is none."""
        if not self.replace:
            return {}
        return {"reason": self.replace, "retired_key_id": _active(keys).id, "new_key_id": new_key_id or "(new key)"}


def _active(keys: list):
    return next(k for k in keys if k.status == "active")


def check_key_ids(key_ids) -> list[str]:
    out = []
    for key_id in key_ids or []:
        if not isinstance(key_id, str) or len(key_id) != KEY_ID_LENGTH or any(c not in "0123456789abcdef"
                                                                              for c in key_id):
            raise RmsdError(f"compromised_keys: {key_id!r} is not a cluster key id (40 lowercase hex digits, as "
                            "cluster information lists them)")
        if key_id not in out:
            out.append(key_id)
    return out


def make_plan(keys: list, desired: Desired, *, reencrypt: bool, now: datetime) -> Plan:
    """What must happen to `keys` (cluster_keys rows) for them to be as `desired`."""
    by_id = {k.id: k for k in keys}
    unknown = [k for k in desired.compromised_keys if k not in by_id]
    if unknown:
        raise RmsdError(
            f"compromised_keys names {', '.join(unknown)}, which this cluster does not have; its keys are "
            f"{', '.join(f'{k.id} ({k.status})' for k in keys)}. Nothing was changed."
        )
    active = _active(keys)
    if desired.reenroll and active.id in desired.compromised_keys:
        raise RmsdError(REENROLL_REFUSED.format(key_id=active.id))
    plan = Plan(
        compromise=[k for k in desired.compromised_keys if by_id[k].status != "compromised"],
        reencrypt=reencrypt,
    )
    if active.id in desired.compromised_keys:
        plan.replace = "compromised"
    elif desired.max_age_days is not None and now - active.created_at >= timedelta(days=desired.max_age_days):
        plan.replace = "max_age"
    plan.reenroll = desired.reenroll and plan.replace is None
    return plan


def apply(
    conn: sa.Connection, cluster, keys: list, plan: Plan, *, old_provider: KeyProvider, new_provider: KeyProvider,
    new_key: NewKey | None, slcs, now: datetime,
) -> None:
    """Carry `plan` out in the caller's transaction. `slcs`: for a licensing cluster the (SLC, root SLC)
    the root cluster issued for the new key (or, with reenroll, the active key); None on a root cluster."""
    if plan.reencrypt:
        # Every stored private key, compromised ones too: none stays under the old password.
        for row in keys:
            if row.encrypted_private_key is not None:
                clusters.set_key_ciphertext(conn, row.id, new_provider.reencrypt(row, old_provider))
    for key_id in plan.compromise:
        clusters.set_key_status(conn, key_id, "compromised", now)
    failpoints.reach("rotation.revoked")
    if plan.replace:
        if new_key is None:
            raise RmsdError(f"replacing the active key of cluster {cluster.name!r} needs a new key. "
                            "Nothing was changed.")
        active = _active(keys)
        if plan.replace != "compromised":
            clusters.set_key_status(conn, active.id, "archived", now)
        clusters.insert_key(conn, cluster.id, new_provider, new_key, now)
        if slcs is None:
            slc = pki.issue_root_slc(new_key.cluster_key(), cluster.name, _urls(cluster), now)
            clusters.insert_slc(conn, cluster.id, slc, new_key.key_id, new_key.key_id, now)
        else:
            clusters.save_enrollment(conn, cluster.id, slcs[0], slcs[1], now)
        clusters.update_cluster(conn, cluster.id, now, key_size=new_key.size)
    elif plan.reenroll:
        clusters.save_enrollment(conn, cluster.id, slcs[0], slcs[1], now)
    failpoints.reach("rotation.stored")


def _urls(cluster) -> list[str]:
    return [u for u in (cluster.intranet_url, cluster.extranet_url) if u]


def key_view(row, now: datetime) -> dict:
    """What anyone may know about a cluster key: metadata, never key material."""
    return {
        "id": row.id, "status": row.status, "protection": row.protection, "size": row.size,
        "created_at": row.created_at.isoformat(), "age_days": (now - row.created_at).days,
        "status_changed_at": row.status_changed_at.isoformat(), "imported_from": row.imported_from,
        "wrap_alg": row.wrap_alg, "sign_alg": row.sign_alg,
    }

