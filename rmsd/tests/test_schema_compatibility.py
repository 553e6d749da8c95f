"""A schema that an older or a newer rmsd migrated: a node refuses one it cannot work on, naming both revisions
and versions, and works on a newer one whose migrations only added; `rmsd migrate` migrates once, under a lock.
The nodes of the last release on this release's schema: tests/test_upgrade_compatibility.py."""

import json
import os
import subprocess
import threading

import pytest
import sqlalchemy as sa
from alembic.command import downgrade
from conftest import RMSD, configure_node, make_issuer, provision, start_node, stop_node
from hypothesis import given, settings
from hypothesis import strategies as st

from rmsd import __version__, admin, db
from rmsd.errors import RmsdError

# The revision of release 0.1.0, the oldest this release keeps working beside.
LAST_RELEASE_REVISION = "0006"


def at_revision(database, revision: str) -> None:
    engine = database.engine()
    with engine.begin() as conn:
        downgrade(db._alembic_config(conn), revision)
    engine.dispose()


def as_if_migrated_by_a_newer_release(database, revision: str, oldest_reader: str, version: str) -> None:
    engine = database.engine()
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        conn.execute(sa.text("UPDATE schema_compatibility SET oldest_reader = :o, migrated_by = :v"),
                     {"o": oldest_reader, "v": version})
    engine.dispose()


def migrate(database, *args: str) -> dict:
    env = dict(os.environ, RMSD_DATABASE_PASSWORD=database.password or "")
    proc = subprocess.run([str(RMSD), "migrate", "--database-url", database.url, *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def serve_refused(config_path, tmp_path) -> str:
    with pytest.raises(RuntimeError, match="rmsd serve exited") as refused:
        start_node(config_path, tmp_path / "refused.log")
    return str(refused.value)


def test_a_new_database_records_what_can_work_on_it(database):
    provision(database)
    assert admin.cluster_info(name="c1", **database.admin_args())["schema_compatibility"] == {
        "oldest_reader": LAST_RELEASE_REVISION, "migrated_by": __version__}
    assert migrate(database) == {"changed": False, "revision_before": db.HEAD_REVISION,
                                 "revision": db.HEAD_REVISION, "oldest_reader": LAST_RELEASE_REVISION,
                                 "migrated_by": __version__}


def test_a_node_refuses_a_schema_older_than_its_own_until_it_is_migrated(database, tmp_path):
    provision(database)
    _, config_path, _ = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    at_revision(database, LAST_RELEASE_REVISION)
    message = serve_refused(config_path, tmp_path)
    assert (f"schema is at revision {LAST_RELEASE_REVISION}, older than revision {db.HEAD_REVISION}, which this "
            f"rmsd {__version__} works on") in message
    assert "rmsd migrate" in message and "Traceback" not in message
    assert migrate(database, "--check") == {"changed": True, "revision_before": LAST_RELEASE_REVISION,
                                            "revision": db.HEAD_REVISION, "oldest_reader": None, "migrated_by": None}
    assert database.count("alembic_version", version_num=LAST_RELEASE_REVISION) == 1  # --check changed nothing
    assert migrate(database)["changed"]
    url, process = start_node(config_path, tmp_path / "serve.log")
    stop_node(process)
    assert not migrate(database)["changed"]


def test_a_node_works_on_a_newer_schema_that_only_added(database, tmp_path):
    provision(database)
    _, config_path, _ = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    newer = f"{int(db.HEAD_REVISION) + 1:04d}"
    as_if_migrated_by_a_newer_release(database, newer, db.HEAD_REVISION, "9.8.0")
    import httpx

    url, process = start_node(config_path, tmp_path / "serve.log")
    try:
        assert httpx.get(f"{url}/health", timeout=10).json()["schema_revision"] == newer
    finally:
        stop_node(process)
    # Neither an admin run nor `rmsd migrate` takes a newer schema for one to migrate (nor back).
    assert not provision(database).changed
    info = admin.cluster_info(name="c1", **database.admin_args())
    assert info["schema_revision"] == newer
    assert info["schema_compatibility"] == {"oldest_reader": db.HEAD_REVISION, "migrated_by": "9.8.0"}
    assert migrate(database) == {"changed": False, "revision_before": newer, "revision": newer,
                                 "oldest_reader": db.HEAD_REVISION, "migrated_by": "9.8.0"}


def test_a_node_refuses_a_newer_schema_that_removed_what_it_reads(database, tmp_path):
    provision(database)
    _, config_path, _ = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    newer = f"{int(db.HEAD_REVISION) + 2:04d}"
    oldest = f"{int(db.HEAD_REVISION) + 1:04d}"
    as_if_migrated_by_a_newer_release(database, newer, oldest, "9.9.0")
    before = database.dump()
    message = serve_refused(config_path, tmp_path)
    assert (f"schema is at revision {newer} (migrated by rmsd 9.9.0), which rmsd older than revision {oldest} "
            f"cannot work on; this rmsd {__version__} works on revision {db.HEAD_REVISION}. Upgrade this node to "
            "rmsd 9.9.0") in message
    with pytest.raises(RmsdError, match="Upgrade this node to rmsd 9.9.0"):
        provision(database, intranet_url="https://other.example.com")
    env = dict(os.environ, RMSD_DATABASE_PASSWORD=database.password or "")
    proc = subprocess.run([str(RMSD), "migrate", "--database-url", database.url], capture_output=True, text=True,
                          timeout=60, env=env, check=False)
    assert proc.returncode != 0 and "Upgrade this node to rmsd 9.9.0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert database.dump() == before


def test_migrations_at_once_migrate_once(pg, tmp_path):
    """Nodes upgraded at the same time each migrate before they start: the lock lets the first one in, the
    others find the schema migrated."""
    from conftest import postgres_database

    database = postgres_database(pg)
    provision(database)
    at_revision(database, LAST_RELEASE_REVISION)
    results: list = []

    def run():
        results.append(admin.migrate_schema(**database.admin_args())["changed"])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [False, False, False, True]
    assert database.count("alembic_version", version_num=db.HEAD_REVISION) == 1


REVISIONS = st.one_of(st.text(max_size=12), st.integers(min_value=0, max_value=99999).map(lambda n: f"{n:04d}"),
                      st.sampled_from(["0007", "0006", "0008", "", "00a8", "٠٠٠٨", "-1", " 0007"]))


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(revision=REVISIONS, oldest=REVISIONS)
def test_any_recorded_revision_is_accepted_or_refused_with_a_message(revision, oldest):
    """Whatever a schema's records say, the check passes (its own revision, or a newer one that keeps what this
    rmsd reads) or raises RmsdError naming this rmsd's revision; never another error."""
    engine = sa.create_engine("sqlite://")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE schema_compatibility (oldest_reader TEXT, migrated_by TEXT)"))
        conn.execute(sa.text("INSERT INTO schema_compatibility VALUES (:o, 'x')"), {"o": oldest})
        try:
            db.check_schema(conn, revision)
        except RmsdError as err:
            assert db.HEAD_REVISION in str(err) and __version__ in str(err)
        else:
            assert revision == db.HEAD_REVISION or (
                revision.isascii() and revision.isdigit() and int(revision) > int(db.HEAD_REVISION)
                and oldest.isascii() and oldest.isdigit() and int(oldest) <= int(db.HEAD_REVISION))
    engine.dispose()
