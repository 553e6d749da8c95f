"""The per-owner report of content under compromised keys (JSON, CSV) and the notices to owners,
delivered to a real SMTP server on 127.0.0.1 (aiosmtpd) or kept in an outbox folder: each owner is told
once per compromised key, reruns change nothing, and the report follows republishing."""

import csv
import email
import email.policy
import io
import json
import os
import stat
import threading

import pytest
from aiosmtpd.controller import Controller
from conftest import KEY_PASSWORD, _running_node, free_port, sqlite_database

from rmsd import admin
from rmsd.client import RmsClient, User, encrypt_content
from rmsd.errors import RmsdError

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
    client.publish(people["dave"], "fresh", encrypt_content(b"y")[0], {"dave@example.com": ["VIEW"]})
    try:
        yield {"node": node, "client": client, "people": people, "pls": pls, "old_key": old_key}
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
