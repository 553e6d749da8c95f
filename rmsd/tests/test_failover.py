"""A configuration database that fails over, without Patroni: a real PostgreSQL primary and a streaming standby
(pg_basebackup, synchronous: a commit the primary acknowledged is on both), the primary crashed, the standby
promoted. The node's database URL names both hosts (libpq multi-host, target_session_attrs=read-write): it
finds the new primary by itself, with no restart. db.read and db.write send work once more on a new
connection when the one they had broke, where that is safe."""

import collections
import subprocess
import threading
import uuid
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from conftest import (
    KEY_PASSWORD,
    Database,
    configure_node,
    eventually,
    make_issuer,
    pgserver,
    provision,
    start_node,
    stop_node,
)

from rmsd import admin, db, demo_issuer, failpoints
from rmsd.client import RmsClient, ServiceError, User, b64url, decrypt_content, encrypt_content, open_use_license
from rmsd.errors import RmsdError

DOCUMENT = b"Quarterly figures, before the failover."


def _sql(server, statement: str, database: str = "postgres"):
    with psycopg.connect(host="127.0.0.1", port=server.port, user=pgserver.USER, password=server.password,
                         dbname=database, autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description is not None else None


@pytest.fixture
def pair():
    """A primary and its synchronous standby; the database `config` made on the primary, replicated."""
    primary = pgserver.PostgresServer().start()
    standby = None
    try:
        standby = primary.start_standby()
        _sql(primary, "ALTER SYSTEM SET synchronous_standby_names = 'standby'")
        _sql(primary, "SELECT pg_reload_conf()")

        def synchronous():
            assert _sql(primary, "SELECT sync_state FROM pg_stat_replication") == [("sync",)]

        eventually(synchronous)
        primary.create_database("config")
        yield primary, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def both_hosts(primary, standby) -> Database:
    url = (f"postgresql://{pgserver.USER}@/config?host=127.0.0.1:{primary.port}&host=127.0.0.1:{standby.port}"
           "&target_session_attrs=read-write")
    return Database("postgresql", url, primary.password)


# --- db.read and db.write, each against a real PostgreSQL ------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    with pgserver.PostgresServer() as server:
        url = server.create_database("retries").replace("postgresql+psycopg://", "postgresql://")
        engine = db.make_engine(url, server.password)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE written (id text PRIMARY KEY)"))
            # Ends its own session when a row 'cut at commit' is committed: the connection breaks during COMMIT.
            conn.execute(sa.text("""
                CREATE FUNCTION cut() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF NEW.id LIKE 'cut at commit%' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
                    RETURN NEW;
                END $$"""))
            conn.execute(sa.text("CREATE CONSTRAINT TRIGGER cut AFTER INSERT ON written DEFERRABLE INITIALLY DEFERRED"
                                 " FOR EACH ROW EXECUTE FUNCTION cut()"))
        yield engine
        engine.dispose()


def _cut_own_connection(conn: sa.Connection) -> None:
    conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))


def _rows(engine, row_id: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM written WHERE id = :id"), {"id": row_id}).scalar()


def test_a_read_whose_connection_breaks_is_sent_once_more(engine):
    calls = []

    def work(conn):
        calls.append(1)
        if len(calls) == 1:
            _cut_own_connection(conn)
        return conn.execute(sa.text("SELECT 42")).scalar()

    assert db.read(engine, work) == 42
    assert len(calls) == 2


def test_a_read_is_sent_once_more_only(engine):
    calls = []

    def work(conn):
        calls.append(1)
        _cut_own_connection(conn)

    with pytest.raises(sa.exc.DBAPIError) as raised:
        db.read(engine, work)
    assert db.dropped(raised.value) and len(calls) == 2


def test_a_write_broken_before_commit_runs_once_more_and_is_written_once(engine):
    row_id, calls = f"before commit {uuid.uuid4()}", []

    def work(conn):
        calls.append(1)
        conn.execute(sa.text("INSERT INTO written (id) VALUES (:id)"), {"id": row_id})
        if len(calls) == 1:
            _cut_own_connection(conn)  # the server rolls the first try back
        return "done"

    assert db.write(engine, work) == "done"
    assert len(calls) == 2
    assert _rows(engine, row_id) == 1


def test_a_write_broken_during_commit_is_not_sent_again(engine):
    row_id, calls = f"cut at commit {uuid.uuid4()}", []

    def work(conn):
        calls.append(1)
        conn.execute(sa.text("INSERT INTO written (id) VALUES (:id)"), {"id": row_id})

    with pytest.raises(sa.exc.DBAPIError) as raised:
        db.write(engine, work)
    assert db.dropped(raised.value)
    assert len(calls) == 1  # whether a COMMIT that broke took effect is unknown: never sent twice
    assert _rows(engine, row_id) == 0  # here it did not (the trigger ran before the commit record)


def test_a_write_cut_during_commit_that_did_not_commit_runs_once_more(engine):
    """With a way to read the outcome: the session that sent the COMMIT is gone, the row is not there, so the
    work runs again (here with a row the trigger lets through) and is written once."""
    first, second, calls = f"cut at commit {uuid.uuid4()}", f"after the cut {uuid.uuid4()}", []

    def work(conn):
        calls.append(1)
        row_id = first if len(calls) == 1 else second
        conn.execute(sa.text("INSERT INTO written (id) VALUES (:id)"), {"id": row_id})
        return row_id

    assert db.write(engine, work, committed=lambda conn, row_id: _rows_on(conn, row_id) == 1) == second
    assert len(calls) == 2
    assert (_rows(engine, first), _rows(engine, second)) == (0, 1)


def test_a_write_cut_during_commit_that_did_commit_is_answered_and_not_sent_again(engine):
    """The outcome read says the transaction took effect: its result is the answer, nothing is sent twice."""
    row_id, calls, asked = f"cut at commit {uuid.uuid4()}", [], []

    def work(conn):
        calls.append(1)
        conn.execute(sa.text("INSERT INTO written (id) VALUES (:id)"), {"id": row_id})
        return "answer"

    def committed(conn, result):
        asked.append(result)
        return True  # as if the COMMIT had taken effect before the connection broke

    assert db.write(engine, work, committed=committed) == "answer"
    assert calls == [1] and asked == ["answer"]


def test_the_outcome_is_read_only_once_the_session_that_sent_the_commit_is_gone(engine, monkeypatch):
    """A session that still runs on the same server could commit after the read: _committed waits for it to end,
    and gives up (None: the caller keeps the error) when it does not end in time."""
    monkeypatch.setattr(db, "PRIMARY_WAIT_SECONDS", 0.6)
    with engine.connect() as other:
        still_running = tuple(other.execute(db.SESSION).one())
        assert db._committed(engine, still_running, lambda conn, result: True, "r") is None
        other.invalidate()  # the session ends (closed, not kept in the pool)
    monkeypatch.setattr(db, "PRIMARY_WAIT_SECONDS", 30.0)  # its end, not a clock, ends the wait below
    assert db._committed(engine, still_running, lambda conn, result: True, "r") is True
    assert db._committed(engine, still_running, lambda conn, result: False, "r") is False


def _rows_on(conn, row_id: str) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM written WHERE id = :id"), {"id": row_id}).scalar()


def test_an_error_of_the_statement_is_not_sent_again(engine):
    row_id, calls = f"twice {uuid.uuid4()}", []

    def work(conn):
        calls.append(1)
        conn.execute(sa.text("INSERT INTO written (id) VALUES (:id), (:id)"), {"id": row_id})

    with pytest.raises(sa.exc.IntegrityError) as raised:
        db.write(engine, work)
    assert not db.dropped(raised.value) and len(calls) == 1
    assert _rows(engine, row_id) == 0


def test_a_write_waits_for_a_standby_promoted_meanwhile(pair, monkeypatch):
    primary, standby = pair
    database = both_hosts(primary, standby)
    engine = db.make_engine(database.url, database.password)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE written (id text PRIMARY KEY)"))
    waiting = threading.Event()
    real_sleep = db.time.sleep

    def sleep(seconds):
        waiting.set()  # a connection was refused: the write waits for a primary
        real_sleep(seconds)

    monkeypatch.setattr(db.time, "sleep", sleep)
    monkeypatch.setattr(db, "PRIMARY_WAIT_SECONDS", 120.0)  # the promotion below, not a clock, ends the wait
    primary.crash()
    outcome = {}

    def write():
        try:
            outcome["result"] = db.write(engine, lambda conn: conn.execute(
                sa.text("INSERT INTO written (id) VALUES ('during the switchover') RETURNING id")).scalar())
        except Exception as err:  # noqa: BLE001 - shown by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=write)
    thread.start()
    assert waiting.wait(60)
    standby.promote()
    thread.join(120)
    assert outcome == {"result": "during the switchover"}
    engine.dispose()


def test_a_write_gives_up_when_no_primary_comes(pair, monkeypatch):
    primary, standby = pair
    database = both_hosts(primary, standby)
    engine = db.make_engine(database.url, database.password)
    monkeypatch.setattr(db, "PRIMARY_WAIT_SECONDS", 1.0)
    primary.crash()
    with pytest.raises(sa.exc.OperationalError):
        db.write(engine, lambda conn: conn.execute(sa.text("SELECT 1")).scalar())
    engine.dispose()


def _keys(server, name: str = "c1") -> list[tuple[str, str]]:
    return sorted(_sql(server, "SELECT k.id, k.status FROM cluster_keys k JOIN clusters c ON c.id = k.cluster_id"
                               f" WHERE c.name = '{name}'", database="config"))


def test_a_rotation_cut_by_the_primary_dying_left_nothing_and_a_rerun_converges(pair, monkeypatch):
    """A rotation is one transaction under the cluster's advisory lock. The primary dies after the rotation
    wrote everything and before its COMMIT: the lock goes with the session, and so does every row the rotation
    wrote (a commit is acknowledged only once the synchronous standby has it, and this one never was). The
    promoted standby holds the cluster as before, and a rerun on it rotates once."""
    primary, standby = pair
    database = both_hosts(primary, standby)
    provision(database)
    before = _keys(primary)
    [(old_key, status)] = before
    assert status == "active"
    reach = failpoints.reach

    def primary_dies(name):
        if name == "rotation.stored":
            primary.crash()
        reach(name)

    monkeypatch.setattr(failpoints, "reach", primary_dies)
    with pytest.raises(RmsdError, match="cannot reach the configuration database"):
        admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_key],
                                 **database.admin_args())
    monkeypatch.setattr(failpoints, "reach", reach)
    standby.promote()
    eventually(lambda: _sql(standby, "SELECT NOT pg_is_in_recovery()") == [(True,)])
    assert _keys(standby) == before  # nothing of the cut rotation: no half-written state

    done = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_key],
                                    **database.admin_args())
    after = dict(_keys(standby))
    assert done.changed and after.pop(old_key) == "compromised"
    assert list(after.values()) == ["active"]  # one new key, active
    again = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_key],
                                     **database.admin_args())
    assert not again.changed and dict(_keys(standby)) == {old_key: "compromised", **after}


# --- a running node through a failover -------------------------------------------------------------------------


@dataclass
class Running:
    """A node on both hosts of `pair`, olga (owner) and rita (reader) certified."""

    primary: pgserver.PostgresServer
    standby: pgserver.PostgresServer
    database: Database
    url: str
    process: subprocess.Popen
    client: RmsClient
    owner: User
    reader: User


@pytest.fixture
def running(pair, tmp_path):
    primary, standby = pair
    database = both_hosts(primary, standby)
    provision(database)
    issuer = make_issuer(tmp_path / "issuer")
    _result, config_path, _secret = configure_node(database, tmp_path, issuer)
    url, process = start_node(config_path, tmp_path / "serve.log")
    try:
        client = RmsClient(url)
        owner = User.new("olga@example.com", demo_issuer.token(issuer, "olga@example.com", ()))
        reader = User.new("rita@example.com", demo_issuer.token(issuer, "rita@example.com", ()))
        for user in (owner, reader):
            client.certify(user)
        yield Running(primary, standby, database, url, process, client, owner, reader)
    finally:
        stop_node(process)


def test_a_node_finds_the_promoted_standby_without_a_restart(running):
    client, owner, reader = running.client, running.owner, running.reader
    content_key, blob = encrypt_content(DOCUMENT)
    published = [client.publish(owner, f"doc-{n}", content_key, {"rita@example.com": ["VIEW"]}) for n in range(5)]
    client.license(reader, published[0]["pl"])

    running.primary.crash()
    # No primary: writes are refused with 503 and Retry-After, never 500, each answered (the request's timeout is
    # the bound); content already published is licensed from the standby.
    answers = _answers_without_a_primary(running.url, owner, reader, published[0]["pl"], content_key)
    assert sorted(set(answers)) == [("license", 200, None), ("publish", 503, "5")], answers

    running.standby.promote()

    def writes_again():
        try:
            return client.publish(owner, "doc-after", content_key, {"rita@example.com": ["VIEW"]})
        except ServiceError as err:
            assert err.status == 503, err  # only "unavailable" until the node reaches the new primary
            raise AssertionError(err) from None

    eventually(writes_again)
    assert running.process.poll() is None  # the same node process throughout
    # Every publication acknowledged before the crash is on the new primary (synchronous replication), and its
    # content opens for the reader with a license from the new primary.
    for pl in published:
        granted = client.license(reader, pl["pl"])
        _claims, opened = open_use_license(granted["ul"], client.slc()["chain"][0], reader)
        assert decrypt_content(opened, blob) == DOCUMENT
    ids = ", ".join(f"'{pl['pl_id']}'" for pl in published)
    assert _sql(running.standby, f"SELECT count(*) FROM content WHERE pl_id IN ({ids})", "config") == [(5,)]


def test_requests_in_flight_when_the_primary_crashes_get_an_answer_and_never_a_500(running):
    content_key, _blob = encrypt_content(DOCUMENT)
    pl = running.client.publish(running.owner, "doc-load", content_key, {"rita@example.com": ["VIEW"]})["pl"]

    def fail_over():
        running.primary.crash()
        running.standby.promote()

    answers = _answers_through(fail_over, running.url, running.owner, running.reader, pl, content_key)
    refused = [(op, status) for op, status, retry_after in answers if status != 200]
    print(f"through the failover: {len(answers)} answers, refused: {collections.Counter(refused)}")
    assert {status for _op, status in refused} <= {503}, refused
    assert not [op for op, _status in refused if op == "license"], refused  # licensing never stopped
    assert all(retry_after for _op, status, retry_after in answers if status == 503), answers
    assert running.process.poll() is None


def _send(http: httpx.Client, operation: str, owner, reader, pl, content_key) -> tuple[str, int, str | None]:
    if operation == "publish":
        token, path = owner.token, "/publishing"
        body = {"content_id": f"doc-{uuid.uuid4()}", "content_key": b64url(content_key),
                "rights": {"rita@example.com": ["VIEW"]}}
    else:
        token, path, body = reader.token, "/licensing", {"pl": pl, "rac": reader.rac_pem}
    response = http.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    return operation, response.status_code, response.headers.get("Retry-After")


def _answers_without_a_primary(url, owner, reader, pl, content_key) -> list[tuple[str, int, str | None]]:
    with httpx.Client(base_url=url, timeout=60.0) as http:
        return [_send(http, operation, owner, reader, pl, content_key) for operation in ("publish", "license") * 2]


def _answers_through(fail_over, url, owner, reader, pl, content_key) -> list[tuple[str, int, str | None]]:
    """Publish and license from two threads without pause while `fail_over()` runs, until each has had five
    answers 200 after it: every answer as (operation, status, Retry-After)."""
    answers: list[tuple[str, int, str | None]] = []
    stop = threading.Event()

    def send(operation: str):
        with httpx.Client(base_url=url, timeout=60.0) as http:
            while not stop.is_set():
                answers.append(_send(http, operation, owner, reader, pl, content_key))

    threads = [threading.Thread(target=send, args=(operation,)) for operation in ("publish", "license")]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: _assert_answered(answers, 0, 5))  # the load runs before the failover
        mark = len(answers)
        fail_over()
        eventually(lambda: _assert_answered(answers, mark, 5), timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return answers


def _assert_answered(answers, since: int, count: int) -> None:
    for operation in ("publish", "license"):
        assert sum(1 for op, status, _ in answers[since:] if op == operation and status == 200) >= count


# --- licensing from a standby while no host accepts writes ------------------------------------------------------


def _publish(client, owner, content_id: str):
    content_key, blob = encrypt_content(DOCUMENT)
    return client.publish(owner, content_id, content_key, {"rita@example.com": ["VIEW"]}), blob


def _compromise(database, key_id: str) -> None:
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[key_id],
                             **database.admin_args())


def _status(client, reader, pl: str) -> int:
    try:
        client.license(reader, pl)
        return 200
    except ServiceError as err:
        return err.status


def test_published_content_is_licensed_from_the_standby_while_no_primary_exists(running):
    primary, database, url = running.primary, running.database, running.url
    client, owner, reader = running.client, running.owner, running.reader
    old, _ = _publish(client, owner, "doc-old")
    _compromise(database, old["key_id"])
    eventually(lambda: _assert_status(client, reader, old["pl"], 410))  # the node has read the rotation
    for user in (owner, reader):  # RACs under the compromised root key are refused too: new ones
        client.certify(user)
    new, blob = _publish(client, owner, "doc-new")
    assert new["key_id"] != old["key_id"]

    primary.crash()
    statuses = collections.Counter(_status(client, reader, new["pl"]) for _ in range(20))
    print(f"licenses for published content with no primary: {dict(statuses)}")
    assert statuses == {200: 20}
    granted = client.license(reader, new["pl"])
    _claims, opened = open_use_license(granted["ul"], client.slc()["chain"][0], reader)
    assert decrypt_content(opened, blob) == DOCUMENT
    assert _status(client, reader, old["pl"]) == 410  # revoked before the failover: still refused
    assert client.health()["status"] == "ok"
    with httpx.Client(base_url=url, timeout=60.0) as http:
        publish = _send(http, "publish", owner, reader, new["pl"], encrypt_content(DOCUMENT)[0])
    assert publish[1:] == (503, "5")  # a write waits for a primary


def test_a_standby_that_has_not_replayed_all_it_received_licenses_nothing(running):
    primary, standby, database = running.primary, running.standby, running.database
    client, owner, reader = running.client, running.owner, running.reader
    old, _ = _publish(client, owner, "doc-old")
    assert _status(client, reader, old["pl"]) == 200
    _sql(standby, "SELECT pg_wal_replay_pause()")
    _compromise(database, old["key_id"])  # acknowledged: the synchronous standby has it, not yet replayed
    primary.crash()
    # Replayed, the standby would refuse (410); not replayed, it would license content under a revoked key.
    assert _status(client, reader, old["pl"]) == 503
    _sql(standby, "SELECT pg_wal_replay_resume()")
    eventually(lambda: _assert_status(client, reader, old["pl"], 410))


def _assert_status(client, reader, pl: str, expected: int) -> None:
    assert _status(client, reader, pl) == expected
