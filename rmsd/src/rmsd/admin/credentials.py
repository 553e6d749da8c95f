"""Enrollment credentials on the root cluster: the secret a licensing cluster enrolls with, once, for a while."""

from datetime import timedelta

from rmsd import clusters, passwords
from rmsd.admin.common import Result, check_name, check_state
from rmsd.admin.store import opened
from rmsd.errors import RmsdError
from rmsd.schema import utcnow

MIN_SECRET_LENGTH = 24
CREDENTIAL_VALIDITY = (60, 7 * 24 * 3600)  # seconds


def ensure_enrollment_credential(
    *, cluster, scope, database_url, database_password=None, secret=None, valid_for=900, state="present",
    check_mode=False,
) -> Result:
    """On the root cluster: let licensing cluster `scope` enroll once with `secret` within `valid_for` seconds.
    Only a salted scrypt hash of the secret is stored. present: unchanged while a credential for `scope`
    with this secret is still usable (not expired, not yet used to enroll); otherwise a fresh one replaces it."""
    check_name("cluster", cluster)
    check_name("scope", scope)
    check_state(state, ("present", "absent"))
    if state == "present":
        passwords.check("secret", secret, min_length=MIN_SECRET_LENGTH)
        low, high = CREDENTIAL_VALIDITY
        if not low <= int(valid_for) <= high:
            raise RmsdError(f"valid_for must be between {low} and {high} seconds, not {valid_for}")
    with opened(database_url, database_password) as store:
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
                "scope": scope, "expires_at": cred.expires_at, "used": cred.last_used_at is not None,
                "matches": bool(secret) and clusters.secret_matches(cred, secret),
            }

        found = store.read(current)
        if found is None:
            raise store.missing(cluster, "provision it first", kind="root cluster")
        now = utcnow()
        before = {"scope": scope, "expires_at": found["expires_at"].isoformat(), "used": found["used"]} if found else {}
        if state == "absent":
            if not found:
                return Result(changed=False, facts={"credential": {}})
            if not check_mode:
                with store.writing(cluster) as conn:
                    clusters.delete_credential(conn, clusters.get_cluster(conn, cluster).id, scope)
            return Result(changed=True, diff={"before": before, "after": {}}, facts={"credential": {}})
        if found and found["matches"] and found["expires_at"] > now and not found["used"]:
            return Result(changed=False, facts={"credential": before})
        expires_at = now + timedelta(seconds=int(valid_for))
        after = {"scope": scope, "expires_at": expires_at.isoformat(), "used": False}
        if not check_mode:
            with store.writing(cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.save_credential(conn, row.id, scope, secret, expires_at, now)
        # The secret is never part of the diff, only that it is (re)set.
        return Result(changed=True, diff={"before": before, "after": dict(after, secret="(set)")},
                      facts={"credential": after})
