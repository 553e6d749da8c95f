"""Cluster key lifecycle through the admin API, on SQLite and PostgreSQL: a compromised key is replaced
by a brand-new key pair (never re-enrolled), scheduled rollover archives, the key password changes for
every key, reruns change nothing, a run killed at any step converges on rerun and loses no key, and two
rotations started at once perform one."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from conftest import KEY_PASSWORD, cluster_key, provision

from rmsd import admin, pki, rotation
from rmsd.errors import RmsdError
from rmsd.keys import PasswordKeyProvider
from rmsd.schema import cluster_keys, utcnow

NEW_PASSWORD = "New-Key-Pass-41d2a7c9e5"


def rotate(database, **kwargs):
    args = {"cluster": "c1", "key_password": KEY_PASSWORD, **database.admin_args(), **kwargs}
    return admin.ensure_cluster_key(**args)


def keys(database) -> dict[str, str]:
    engine = database.engine()
    with engine.connect() as conn:
        rows = conn.execute(sa.select(cluster_keys.c.id, cluster_keys.c.status).order_by(cluster_keys.c.created_at))
        out = dict(rows.all())
    engine.dispose()
    return out


def age_active_key(database, days: int) -> None:
    engine = database.engine()
    with engine.begin() as conn:
        conn.execute(cluster_keys.update().where(cluster_keys.c.status == "active")
                     .values(created_at=utcnow() - timedelta(days=days)))
    engine.dispose()


def assert_no_key_lost(database, before: dict[str, str], password: str = KEY_PASSWORD) -> None:
    """Every key that existed still exists, its private half still opens, and exactly one is active."""
    engine = database.engine()
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(cluster_keys))}
    engine.dispose()
    assert set(before) <= set(rows)
    assert [r.status for r in rows.values()].count("active") == 1
    provider = PasswordKeyProvider(password)
    for key_id in before:
        assert provider.load(rows[key_id]).key_id == key_id


def test_rollover_after_max_age_archives_the_old_key(database):
    provision(database)
    old = cluster_key(database)[1].id
    assert rotate(database, max_age=30).changed is False
    age_active_key(database, 31)
    dump = database.dump()
    check = rotate(database, max_age=30, check_mode=True)
    assert check.changed and check.facts["rotation"]["reason"] == "max_age"
    assert check.diff["after"]["keys"] == {old: "archived", "(new key)": "active"}
    assert database.dump() == dump

    done = rotate(database, max_age=30)
    new = done.facts["active_key_id"]
    assert done.changed and new != old and done.facts["rotation"] == {
        "reason": "max_age", "retired_key_id": old, "new_key_id": new,
    }
    assert keys(database) == {old: "archived", new: "active"}
    assert done.diff["after"]["keys"] == {old: "archived", new: "active"}
    # The new key has its own self-issued SLC.
    _row, key_row, key, slc_pem = cluster_key(database)
    slc = pki.load_pem(slc_pem)
    assert key_row.id == new and pki.cert_key_id(slc) == new and pki.verify_issued_by(slc, slc, utcnow())
    assert rotate(database, max_age=30, check_mode=True).changed is False
    assert rotate(database, max_age=30).changed is False


def test_compromised_active_key_is_replaced_by_a_new_key_pair(database):
    provision(database)
    _row, old_row, old_key, _slc = cluster_key(database)
    done = rotate(database, compromised_keys=[old_row.id])
    assert done.changed and done.facts["rotation"]["reason"] == "compromised"
    new = done.facts["active_key_id"]
    assert keys(database) == {old_row.id: "compromised", new: "active"}
    _row, new_row, new_key, slc_pem = cluster_key(database)
    # A new key pair: another modulus, not the old key certified again.
    assert new_key.public_key.public_numbers().n != old_key.public_key.public_numbers().n
    assert pki.cert_key_id(pki.load_pem(slc_pem)) == new
    assert rotate(database, compromised_keys=[old_row.id]).changed is False
    # Dropping the key from the list undoes nothing; the result says so.
    again = rotate(database)
    assert again.changed is False and any("stays so" in w for w in again.warnings)
    assert keys(database)[old_row.id] == "compromised"


def test_an_archived_key_listed_as_compromised_is_revoked_without_a_new_key(database):
    provision(database)
    first = cluster_key(database)[1].id
    age_active_key(database, 100)
    second = rotate(database, max_age=90).facts["active_key_id"]
    done = rotate(database, compromised_keys=[first])
    assert done.changed and done.facts["rotation"] == {}
    assert keys(database) == {first: "compromised", second: "active"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"compromised_keys": ["0" * 40]}, "which this cluster does not have"),
    ({"compromised_keys": ["not-a-key-id"]}, "is not a cluster key id"),
    ({"max_age": 0}, "at least 1"),
    ({"key_size": 1024}, "key_size must be one of"),
    ({"key_password": "wrong-password-entirely"}, "does not decrypt"),
    ({"key_password": NEW_PASSWORD, "previous_key_password": "also-wrong-password"}, "neither key_password nor"),
    ({"reenroll": True}, "reenroll is for licensing clusters"),
])
def test_bad_key_input_is_refused_and_changes_nothing(database, kwargs, message):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError, match=message):
        rotate(database, **kwargs)
    assert database.dump() == dump


def test_password_change_reencrypts_every_key(database, tmp_path):
    provision(database)
    age_active_key(database, 40)
    rotate(database, max_age=30)
    before = keys(database)
    check = rotate(database, key_password=NEW_PASSWORD, previous_key_password=KEY_PASSWORD, check_mode=True)
    assert check.changed and check.diff["after"]["key_password"] == "(changed)"
    done = rotate(database, key_password=NEW_PASSWORD, previous_key_password=KEY_PASSWORD)
    assert done.changed and done.facts["password_changed"] and keys(database) == before
    assert_no_key_lost(database, before, NEW_PASSWORD)
    # openssl opens each stored key with the new password, and not with the old one.
    engine = database.engine()
    with engine.connect() as conn:
        blobs = [r.encrypted_private_key for r in conn.execute(sa.select(cluster_keys))]
    engine.dispose()
    for blob in blobs:
        der = tmp_path / "key.der"
        der.write_bytes(blob)
        opened = subprocess.run(["openssl", "pkey", "-inform", "DER", "-in", str(der), "-passin", "env:P", "-noout"],
                                env={"P": NEW_PASSWORD, "PATH": os.environ["PATH"]}, capture_output=True)
        assert opened.returncode == 0, opened.stderr
        refused = subprocess.run(["openssl", "pkey", "-inform", "DER", "-in", str(der), "-passin", "env:P", "-noout"],
                                 env={"P": KEY_PASSWORD, "PATH": os.environ["PATH"]}, capture_output=True)
        assert refused.returncode != 0
    assert rotate(database, key_password=NEW_PASSWORD, previous_key_password=KEY_PASSWORD).changed is False
    assert KEY_PASSWORD not in repr(done) and NEW_PASSWORD not in repr(done)


def test_two_rotations_started_at_once_perform_one(database, monkeypatch):
    provision(database)
    old = cluster_key(database)[1].id
    both_generated = threading.Barrier(2, timeout=60)
    generate = PasswordKeyProvider.generate

    def generate_then_wait(self, size):
        new = generate(self, size)
        both_generated.wait()  # both runs hold a new key before either takes the lock
        return new

    monkeypatch.setattr(PasswordKeyProvider, "generate", generate_then_wait)
    results, errors = [], []

    def run():
        try:
            results.append(rotate(database, compromised_keys=[old]))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(r.changed for r in results) == [False, True]
    statuses = keys(database)
    assert sorted(statuses.values()) == ["active", "compromised"] and statuses[old] == "compromised"


KILLER = textwrap.dedent("""
    import json, os, sys
    from rmsd import admin
    url, password = sys.argv[1], sys.argv[2] or None
    result = admin.ensure_cluster_key(cluster="c1", database_url=url, database_password=password,
                                      key_password=os.environ["KEY_PASSWORD"],
                                      compromised_keys=json.loads(sys.argv[3]))
    print(json.dumps({"changed": result.changed, "active": result.facts["active_key_id"]}))
""")


@pytest.mark.parametrize("step", [s for s in rotation.STEPS if s != "rotation.enrolled"])
def test_rotation_killed_at_each_step_converges_on_rerun(database, tmp_path, step, record_property):
    """A compromise rotation killed (SIGKILL) at `step`: the old key is never lost, the cluster always
    has exactly one active key, and the rerun converges."""
    provision(database)
    before = keys(database)
    (old,) = before
    script = tmp_path / "rotate.py"
    script.write_text(KILLER)

    def run(failpoint=None):
        env = dict(os.environ, KEY_PASSWORD=KEY_PASSWORD)
        env.pop("RMSD_FAILPOINT", None)
        if failpoint:
            env["RMSD_FAILPOINT"] = failpoint
        return subprocess.run([sys.executable, str(script), database.url, database.password or "", json.dumps([old])],
                              env=env, capture_output=True, text=True, timeout=120)

    killed = run(step)
    assert killed.returncode == -9, killed.stderr
    assert_no_key_lost(database, before)
    after_kill = keys(database)
    # Before the commit nothing happened; from the commit on, the rotation is complete.
    assert after_kill == before if step != "rotation.committed" else after_kill[old] == "compromised"
    rerun = run()
    assert rerun.returncode == 0, rerun.stderr
    assert_no_key_lost(database, before)
    final = keys(database)
    assert final[old] == "compromised" and len(final) == 2
    assert json.loads(run().stdout)["changed"] is False
    # Printed at the end of the run (conftest.py), also from pytest-xdist workers.
    record_property("kill_point", (
        f"{database.kind:<10} {step:<19} process killed (SIGKILL); keys after the kill: "
        f"{'unchanged' if after_kill == before else 'rotated (the commit was done)'}; rerun changed: "
        f"{json.loads(rerun.stdout)['changed']}; converged to {sorted(final.values())}; no key lost"
    ))
