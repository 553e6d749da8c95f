"""The admin API on SQLite and on a real PostgreSQL: idempotence, check mode, refusals that change
nothing, secrets kept out of files and facts, crash safety and concurrent provisioning."""

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import tomllib
import uuid

import pytest
from alembic.command import downgrade
from conftest import KEY_PASSWORD, RMSD, cluster_key, provision

from rmsd import admin, clusters, db
from rmsd.errors import RmsdError
from rmsd.schema import utcnow


def server_args(database, tmp_path, **overrides):
    return {
        "cluster": "c1", "name": "n1", "key_password": KEY_PASSWORD, "port": 18080,
        "config_path": str(tmp_path / "etc" / "n1.toml"), "secret_path": str(tmp_path / "etc" / "n1.secret"),
        **database.admin_args(), **overrides,
    }


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# --- ensure_cluster -------------------------------------------------------------------------------


def test_cluster_check_real_check_real(database):
    first = provision(database, check_mode=True)
    assert first.changed is True
    assert database.dump() is None, "a check run must leave no file, table or row behind"
    if database.sqlite_file:
        assert not database.sqlite_file.parent.exists()

    second = provision(database)
    assert second.changed is True
    key_id = second.facts["cluster"]["active_key_id"]
    assert (database.count("clusters"), database.count("cluster_keys"), database.count("certificates")) == (1, 1, 1)
    dump = database.dump()

    third = provision(database, check_mode=True)
    fourth = provision(database)
    assert (third.changed, fourth.changed) == (False, False)
    assert third.facts["cluster"]["active_key_id"] == fourth.facts["cluster"]["active_key_id"] == key_id
    assert database.dump() == dump


def test_cluster_url_change_is_reported_then_applied(database):
    provision(database)
    dump = database.dump()
    checked = provision(database, extranet_url="https://rms.example.org", check_mode=True)
    assert checked.changed is True
    assert checked.diff == {"before": {"extranet_url": None}, "after": {"extranet_url": "https://rms.example.org"}}
    assert database.dump() == dump
    assert provision(database, extranet_url="https://rms.example.org").changed is True
    assert provision(database, extranet_url="https://rms.example.org").changed is False
    info = admin.cluster_info(name="c1", **database.admin_args())
    assert info["cluster"]["extranet_url"] == "https://rms.example.org"


def test_wrong_key_password_changes_nothing(database, tmp_path):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError, match="password") as err:
        provision(database, key_password="not-the-password", extranet_url="https://rms.example.org")
    assert "not-the-password" not in str(err.value)
    with pytest.raises(RmsdError, match="password"):
        admin.ensure_server(**server_args(database, tmp_path, key_password="not-the-password"))
    assert database.dump() == dump
    assert files_under(tmp_path / "etc") == []


def test_key_size_change_is_refused_with_the_way_forward(database):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError) as err:
        provision(database, key_size=3072)
    message = str(err.value)
    assert "key_size" in message and "rollover" in message and "2048" in message
    assert database.dump() == dump


@pytest.mark.parametrize(("option", "value"), [("role", "primary"), ("key_protection", "tpm")])
def test_unsupported_role_or_protection_is_refused(database, option, value):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError, match=f"{option} '{value}' is not supported; use one of"):
        provision(database, **{option: value})
    assert database.dump() == dump


def test_role_cannot_change(database):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError, match="role cannot change"):
        provision(database, role="licensing", enrollment_url="http://127.0.0.1:9")
    assert database.dump() == dump


def test_second_cluster_in_the_same_database_is_refused(database):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError, match="already holds cluster 'c1'.*another database_url"):
        provision(database, name="c2")
    with pytest.raises(RmsdError, match="already holds cluster 'c1'"):
        provision(database, name="c2", check_mode=True)
    assert database.dump() == dump


def _add_content(database, count=1):
    row, key_row, _key, _slc = cluster_key(database)
    engine = database.engine()
    with engine.begin() as conn:
        for _ in range(count):
            pl_id = uuid.uuid4().hex
            clusters.record_content(conn, row.id, {
                "pl_id": pl_id, "content_id": f"doc-{pl_id[:6]}", "owner": "alice@example.com",
                "key_id": key_row.id, "rights": {"bob@example.com": ["VIEW"]},
            }, utcnow())
    engine.dispose()
    return key_row.id


def test_absent_refuses_while_content_exists_unless_forced(database):
    provision(database)
    key_id = _add_content(database, 2)
    assert admin.cluster_info(name="c1", **database.admin_args())["content_per_key"] == {key_id: 2}
    dump = database.dump()
    with pytest.raises(RmsdError, match="2 content item.*force"):
        admin.ensure_cluster(name="c1", state="absent", **database.admin_args())
    checked = admin.ensure_cluster(name="c1", state="absent", force=True, check_mode=True, **database.admin_args())
    assert checked.changed is True
    assert database.dump() == dump

    assert admin.ensure_cluster(name="c1", state="absent", force=True, **database.admin_args()).changed is True
    assert admin.cluster_info(name="c1", **database.admin_args())["exists"] is False
    for table in ("clusters", "cluster_keys", "certificates", "content"):
        assert database.count(table) == 0, table
    assert admin.ensure_cluster(name="c1", state="absent", **database.admin_args()).changed is False


def test_absent_without_content_needs_no_force(database):
    provision(database)
    assert admin.ensure_cluster(name="c1", state="absent", **database.admin_args()).changed is True
    assert database.count("clusters") == 0


def test_cluster_info_holds_no_key_material(database):
    provision(database)
    _row, key_row, _key, _slc = cluster_key(database)
    info = admin.cluster_info(name="c1", **database.admin_args())
    assert info["exists"] is True and len(info["cluster_keys"]) == 1 and info["slc"]["fingerprint_sha256"]
    text = json.dumps(info)
    blob = key_row.encrypted_private_key
    for secret in ("PRIVATE", KEY_PASSWORD, blob.hex(), base64.b64encode(blob).decode(),
                   base64.urlsafe_b64encode(blob).decode().rstrip("="), blob.hex()[100:140]):
        assert secret not in text


def test_results_hold_no_key_material(database, tmp_path):
    results = [provision(database), admin.ensure_server(**server_args(database, tmp_path))]
    text = json.dumps([(r.diff, r.facts) for r in results])
    _row, key_row, _key, _slc = cluster_key(database)
    for secret in ("PRIVATE", KEY_PASSWORD, key_row.encrypted_private_key.hex()[:64]):
        assert secret not in text


# --- ensure_server --------------------------------------------------------------------------------


def test_server_check_real_check_real(database, tmp_path):
    provision(database)
    args = server_args(database, tmp_path)
    first = admin.ensure_server(**args, check_mode=True)
    assert first.changed is True and first.facts["config_changed"] is True
    assert files_under(tmp_path / "etc") == []
    assert database.count("servers") == 0

    second = admin.ensure_server(**args)
    assert second.changed is True and second.facts["config_changed"] is True
    assert files_under(tmp_path / "etc") == ["n1.secret", "n1.toml"]
    assert database.count("servers", name="n1") == 1
    dump, config = database.dump(), (tmp_path / "etc" / "n1.toml").read_bytes()

    third = admin.ensure_server(**args, check_mode=True)
    fourth = admin.ensure_server(**args)
    assert (third.changed, fourth.changed) == (False, False)
    assert (third.facts["config_changed"], fourth.facts["config_changed"]) == (False, False)
    assert database.dump() == dump
    assert (tmp_path / "etc" / "n1.toml").read_bytes() == config
    assert fourth.facts["server"]["url"] == "http://127.0.0.1:18080"


@pytest.mark.parametrize("drift, restart", [
    ("config mode", False), ("secret mode", False), ("secret deleted", True), ("config edited", True),
])
def test_server_repairs_file_drift_and_says_whether_the_node_must_restart(database, tmp_path, drift, restart):
    """A wrong mode is repaired without a restart; content the node reads at start asks for one."""
    provision(database)
    args = server_args(database, tmp_path)
    admin.ensure_server(**args)
    config, secret = tmp_path / "etc" / "n1.toml", tmp_path / "etc" / "n1.secret"
    wanted = {config: config.read_bytes(), secret: secret.read_bytes()}
    if drift == "config mode":
        config.chmod(0o666)
    elif drift == "secret mode":
        secret.chmod(0o644)
    elif drift == "secret deleted":
        secret.unlink()
    else:
        config.write_text(config.read_text() + "# edited by hand\n")
    predicted = admin.ensure_server(**args, check_mode=True)
    repaired = admin.ensure_server(**args)
    assert (predicted.changed, repaired.changed) == (True, True)
    assert predicted.facts["config_changed"] == repaired.facts["config_changed"] == restart
    assert {path: path.read_bytes() for path in wanted} == wanted
    assert (config.stat().st_mode & 0o777, secret.stat().st_mode & 0o777) == (0o640, 0o600)
    assert admin.ensure_server(**args).changed is False


def test_server_port_change_rewrites_config_and_registration(database, tmp_path):
    provision(database)
    admin.ensure_server(**server_args(database, tmp_path))
    changed = admin.ensure_server(**server_args(database, tmp_path, port=18081))
    assert changed.changed is True and changed.facts["config_changed"] is True
    assert tomllib.loads((tmp_path / "etc" / "n1.toml").read_text())["node"]["port"] == 18081
    nodes = admin.cluster_info(name="c1", **database.admin_args())["nodes"]
    assert [(n["name"], n["port"]) for n in nodes] == [("n1", 18081)]


def test_server_files_keep_secrets_apart(database, tmp_path):
    provision(database)
    db_password = database.password
    admin.ensure_server(**server_args(database, tmp_path))
    config_path, secret_path = tmp_path / "etc" / "n1.toml", tmp_path / "etc" / "n1.secret"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640
    config = config_path.read_text()
    assert KEY_PASSWORD not in config
    if db_password:
        assert db_password not in config
    secrets = tomllib.loads(secret_path.read_text())
    assert secrets["key_password"] == KEY_PASSWORD
    assert secrets.get("database_password") == db_password
    assert tomllib.loads(config)["node"]["secret_path"] == str(secret_path)

    # A loosened secret file is put back to 0600 (and reported as a change).
    secret_path.chmod(0o644)
    assert admin.ensure_server(**server_args(database, tmp_path)).changed is True
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600


def test_server_of_unknown_cluster_is_refused(database, tmp_path):
    provision(database)
    dump = database.dump()
    with pytest.raises(RmsdError, match="cluster 'nope' does not exist.*provision it first"):
        admin.ensure_server(**server_args(database, tmp_path, cluster="nope"))
    assert database.dump() == dump
    assert files_under(tmp_path / "etc") == []


def test_server_in_empty_database_is_refused(database, tmp_path):
    with pytest.raises(RmsdError, match="does not exist"):
        admin.ensure_server(**server_args(database, tmp_path))
    assert database.dump() is None
    if database.sqlite_file:
        assert not database.sqlite_file.exists()
    assert files_under(tmp_path / "etc") == []


def test_server_absent_removes_registration_and_files(database, tmp_path):
    provision(database)
    admin.ensure_server(**server_args(database, tmp_path))
    dump = database.dump()
    checked = admin.ensure_server(**server_args(database, tmp_path), state="absent", check_mode=True)
    assert checked.changed is True
    assert database.dump() == dump and files_under(tmp_path / "etc") == ["n1.secret", "n1.toml"]
    assert admin.ensure_server(**server_args(database, tmp_path), state="absent").changed is True
    assert files_under(tmp_path / "etc") == [] and database.count("servers") == 0
    assert admin.ensure_server(**server_args(database, tmp_path), state="absent").changed is False


def test_two_servers_may_not_share_an_address(database, tmp_path):
    provision(database)
    admin.ensure_server(**server_args(database, tmp_path))
    with pytest.raises(RmsdError, match="already used by server 'n1'"):
        admin.ensure_server(**server_args(database, tmp_path, name="n2", config_path=str(tmp_path / "n2.toml"),
                                          secret_path=str(tmp_path / "n2.secret")))
    assert not (tmp_path / "n2.toml").exists()


# --- crash safety and concurrency -----------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import json, os, signal, sys, time
    from rmsd import admin, clusters

    mode, url, password, start_at = sys.argv[1], sys.argv[2], sys.argv[3] or None, float(sys.argv[4])
    if mode == "crash":
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        clusters.insert_slc = die  # the last write of the provisioning transaction
    time.sleep(max(0.0, start_at - time.time()))
    result = admin.ensure_cluster(name="c1", database_url=url, database_password=password,
                                  key_password=os.environ["KEY_PASSWORD"], intranet_url="https://rms.example.com")
    print(json.dumps({"changed": result.changed, "key": result.facts["cluster"]["active_key_id"]}))
""")


def run_driver(tmp_path, database, mode, start_at=0.0):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(script), mode, database.url, database.password or "", str(start_at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, KEY_PASSWORD=KEY_PASSWORD),
    )


def assert_one_cluster(database):
    assert database.count("clusters") == 1
    assert database.count("cluster_keys") == 1
    assert database.count("cluster_keys", status="active") == 1
    assert database.count("certificates", kind="slc") == 1


def test_killed_provisioning_leaves_nothing_and_rerun_converges(database, tmp_path):
    process = run_driver(tmp_path, database, "crash")
    out, err = process.communicate(timeout=60)
    assert process.returncode == -9, err
    assert out == ""
    assert admin.cluster_info(name="c1", **database.admin_args())["exists"] is False
    for table in ("clusters", "cluster_keys", "certificates"):
        assert database.count(table) == 0, table

    assert provision(database).changed is True
    assert_one_cluster(database)
    assert provision(database).changed is False


def test_concurrent_provisioning_makes_one_cluster(database, tmp_path):
    start_at = time.time() + 2.0  # both processes imported and waiting before either starts
    processes = [run_driver(tmp_path, database, "run", start_at) for _ in range(2)]
    outputs = [p.communicate(timeout=90) for p in processes]
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    results = [json.loads(out) for out, _err in outputs]
    assert sorted(r["changed"] for r in results) == [False, True]
    assert results[0]["key"] == results[1]["key"]
    assert_one_cluster(database)
    _row, key_row, _key, _slc = cluster_key(database)
    assert key_row.id == results[0]["key"]


def test_cluster_info_command_takes_the_password_from_the_environment(database):
    provision(database)
    env = dict(os.environ, RMSD_DATABASE_PASSWORD=database.password or "")
    proc = subprocess.run([str(RMSD), "cluster-info", "--database-url", database.url, "--name", "c1"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["exists"] is True and info["cluster"]["name"] == "c1"
    for secret in (KEY_PASSWORD, "PRIVATE", database.password or KEY_PASSWORD):
        assert secret not in proc.stdout + proc.stderr


def test_cluster_on_an_older_schema_is_read_and_upgraded(database):
    provision(database)
    engine = database.engine()
    with engine.begin() as conn:
        downgrade(db._alembic_config(conn), "0001")
    engine.dispose()
    assert database.count("rights_templates") == 0 and "enrollments" not in database.dump()
    info = admin.cluster_info(name="c1", **database.admin_args())
    assert info["exists"] and info["rights_templates"] == [] and info["enrollments"] == []
    check = admin.ensure_enrollment_credential(cluster="c1", scope="dept", secret="enroll-5e0f2b8c91d4a7e3a6",
                                               check_mode=True, **database.admin_args())
    assert check.changed and "enrollments" not in database.dump()
    upgraded = provision(database)
    assert upgraded.changed and upgraded.diff["after"] == {"schema_revision": db.HEAD_REVISION}
    assert "enrollments" in database.dump()
    assert not provision(database).changed


def test_head_revision_is_alembics_head():
    """db.HEAD_REVISION is a constant (no alembic import per module run): it must name the newest migration."""
    assert db.HEAD_REVISION == db.alembic_head_revision()


def test_a_nodes_sqlite_reads_leave_writers_free_and_never_write(tmp_path):
    """The per-request reads of a node hold no transaction on SQLite: a writer commits while a reader's
    connection is open and has read, and the reader refuses to write."""
    import sqlite3

    import sqlalchemy as sa

    engine = db.make_engine(f"sqlite:///{tmp_path / 'config.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
    reader = db.make_reader(engine)
    try:
        with reader.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 0
            writer = sqlite3.connect(tmp_path / "config.db", timeout=2, isolation_level=None)
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("INSERT INTO t VALUES (1)")
            writer.execute("COMMIT")
            writer.close()
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
            with pytest.raises(sa.exc.OperationalError, match="readonly"):
                conn.execute(sa.text("INSERT INTO t VALUES (2)"))
    finally:
        reader.dispose()
        engine.dispose()
