"""Cluster keys: revoked as compromised, rolled over by age, re-encrypted with a new key password, a
licensing cluster's SLC renewed; what becomes of a compromised key in a PKCS#11 token."""

from typing import Any

from rmsd import clusters, failpoints, passwords, revocation, rotation
from rmsd.admin.common import Enrollment, Result, Unlock, check_name, check_url, token_settings
from rmsd.admin.store import Store, opened
from rmsd.errors import RmsdError
from rmsd.keys import KEY_SIZES
from rmsd.schema import utcnow

TOKEN_ACTIONS = ("destroy", "disable")  # what becomes of a compromised key in a PKCS#11 token


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
    check_name("cluster", cluster)
    if compromised_key_in_token not in (None, *TOKEN_ACTIONS):
        raise RmsdError(f"compromised_key_in_token must be one of {', '.join(TOKEN_ACTIONS)}, not "
                        f"{compromised_key_in_token!r}")
    if max_age is not None and int(max_age) < 1:
        raise RmsdError(f"max_age is the age in days after which the active key is replaced; at least 1, not {max_age}")
    if key_size is not None and key_size not in KEY_SIZES:
        raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {key_size}")
    desired = rotation.Desired(rotation.check_key_ids(compromised_keys), None if max_age is None else int(max_age),
                               bool(reenroll))
    with opened(database_url, database_password) as store:
        protection = store.read(lambda conn: getattr(clusters.get_cluster(conn, cluster), "key_protection", None))
        if protection is None:
            raise store.missing(cluster, "provision it first")
        unlock = Unlock(key_password, previous_key_password,
                        token_settings(protection, pkcs11, key_password, previous_key_password))
        state = store.read(lambda conn: _key_state(conn, cluster, unlock))
        if state is None:
            raise store.missing(cluster, "provision it first")
        row, keys, reencrypt = state
        if reenroll and row.role != "licensing":
            raise RmsdError("reenroll is for licensing clusters: a root cluster certifies itself. Nothing was changed.")
        now = utcnow()
        plan = rotation.make_plan(keys, desired, reencrypt=reencrypt, now=now)
        if plan.reencrypt:  # the key password changes: the new one meets the policy
            passwords.check("key_password", key_password)
        warnings = [
            f"cluster key {k.id} is compromised and stays so: a compromised key is never used again"
            for k in keys if k.status == "compromised" and k.id not in desired.compromised_keys
        ]
        action = compromised_key_in_token
        token_plan = _token_plan(keys, plan, unlock, action)
        if not plan:
            result = Result(changed=False, facts=_key_facts(keys, now), warnings=warnings)
            return _settle_token(result, token_plan, action, check_mode)
        enrollment = None
        if row.role == "licensing" and (plan.replace or plan.reenroll):
            check_url("enrollment_url", enrollment_url, required=True)
            enrollment = Enrollment(enrollment_url, enrollment_ca_path, enrollment_credential)
        diff: dict[str, dict[str, Any]] = {
            "before": {"keys": {k.id: k.status for k in keys}, "key_password": "(set)"},
            "after": {"keys": plan.statuses_after(keys), "key_password": "(changed)" if plan.reencrypt else "(set)"},
        }
        if unlock.token is not None:  # the token PIN opens the keys; there is no key password
            for side in diff.values():
                del side["key_password"]
        if plan.reenroll:
            diff["after"]["slc"] = "(renewed by the root cluster)"
        if check_mode:
            result = Result(changed=True, diff=diff, facts=_key_facts(keys, now, plan.rotation(keys)),
                            warnings=warnings)
            return _settle_token(result, token_plan, action, check_mode)
        keys, plan, rotated = _rotate(store, row, desired, plan, unlock, key_size or row.key_size, enrollment)
        if not plan:  # another run did it meanwhile
            result = Result(changed=False, facts=_key_facts(keys, utcnow()), warnings=warnings)
        else:
            diff["after"]["keys"] = {k.id: k.status for k in keys}
            result = Result(changed=True, diff=diff,
                            facts=_key_facts(keys, utcnow(), rotated, plan.reencrypt, plan.reenroll), warnings=warnings)
        return _settle_token(result, _token_plan(keys, None, unlock, action), action, check_mode)


def _token_plan(keys, plan, unlock: Unlock, action):
    """[(provider, key row, state)] of the keys compromised (after `plan`) that their key store (a PKCS#11
    token) still holds other than `action` wants. RmsdError when there are any and no action is given."""
    compromised = set(plan.compromise) if plan else set()
    pending = []
    for key in keys:
        if key.status != "compromised" and key.id not in compromised:
            continue
        provider = unlock.provider(key.protection)
        state = provider.compromised_key_state(key)
        if state == "present" or (state == "disabled" and action == "destroy"):
            pending.append((provider, key, state))
    if pending and action is None:
        ids = ", ".join(k.id for _, k, _ in pending)
        raise RmsdError(
            f"compromised cluster key(s) {ids} can still sign and decrypt in PKCS#11 token "
            f"{unlock.token.token_label if unlock.token else ''!r}: set compromised_key_in_token to destroy (the key "
            "is gone from the token) or disable (kept, but it can neither sign nor decrypt). Nothing was changed."
        )
    return pending


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


def _key_state(conn, name, unlock: Unlock):
    """(cluster row, key rows, whether the password must change); RmsdError when neither password opens
    the active key."""
    row = clusters.get_cluster(conn, name)
    if row is None:
        return None
    if unlock.token is not None:
        Unlock(token=unlock.token).open_active_key(conn, row)
        return row, clusters.keys_of(conn, row.id), False
    try:
        Unlock(unlock.key_password).open_active_key(conn, row)
        return row, clusters.keys_of(conn, row.id), False
    except RmsdError:
        if not unlock.previous_key_password:
            raise
    try:
        Unlock(unlock.previous_key_password).open_active_key(conn, row)
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


def _rotate(store: Store, row, desired, plan, unlock: Unlock, key_size, enrollment: Enrollment | None):
    """Carry `plan` out: (keys after, the plan done, the rotation facts); the plan done is empty when
    another run did it meanwhile. The new key pair and a licensing cluster's enrollment come first,
    outside the lock (they are slow); then one transaction under the lock, planned again there."""
    new_provider = unlock.provider(row.key_protection)
    # What opens the stored keys until this run re-encrypts them.
    old_provider = unlock.provider(row.key_protection, previous=plan.reencrypt)
    new_key = new_provider.generate(key_size) if plan.replace else None
    failpoints.reach("rotation.generated")
    slcs = None
    statements: dict[str, str] = {}
    if row.role == "licensing":
        # Each key revoked signs its revocation statement now, while it still can (a token may destroy it once
        # the rotation is committed); kept with the key, the root cluster gets it at this and every enrollment.
        with store.engine.connect() as conn:
            revoking = [k for k in clusters.keys_of(conn, row.id)
                        if k.status == "compromised" or k.id in plan.compromise]
            statements, _unsigned = revocation.statements_for(revoking, old_provider.load, row.name, utcnow())
            if enrollment is not None:
                key = new_key.cluster_key() if new_key else old_provider.load(clusters.active_key_row(conn, row.id))
    if enrollment is not None:
        slcs = enrollment.enroll(row.name, row.intranet_url, row.extranet_url, key, revocations=statements)
        failpoints.reach("rotation.enrolled")
    with store.writing(row.name) as conn:
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
        clusters.save_revocations(conn, statements)
        keys = clusters.keys_of(conn, row.id)
    failpoints.reach("rotation.committed")
    return keys, plan, rotated
