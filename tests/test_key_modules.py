"""The key lifecycle modules through ansible-playbook: cluster_key (rollover, compromise, password change),
trusted_publishing_domain (export, import) and compromise_report (report files, notices over a real SMTP
server on 127.0.0.1). Four runs each; a module killed mid-rotation converges on rerun; bad input changes
nothing; no password or key material in -vvv output or diffs."""

import email
import json
import os
import re
import secrets
import socket
import stat
from datetime import timedelta

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from rmsd.keys import provider_for
from rmsd.schema import cluster_keys, utcnow
from state import cluster_state, four_runs

from rmsd import admin, clusters, db, licenses

PEM = re.compile(r"-----BEGIN|PRIVATE KEY")


@pytest.fixture
def cluster(ansible, sqlite_cluster):
    ansible.run("rmsops.rms.cluster", sqlite_cluster).ok()
    return sqlite_cluster


def key_params(cluster, **extra):
    return {"cluster": cluster["name"], "database_url": cluster["database_url"],
            "key_password": cluster["key_password"], **extra}


def observe(cluster):
    return lambda: cluster_state(cluster["name"], cluster["database_url"])["cluster_keys"]


def age_active_key(cluster, days):
    engine = db.make_engine(cluster["database_url"])
    with engine.begin() as conn:
        conn.execute(cluster_keys.update().where(cluster_keys.c.status == "active")
                     .values(created_at=utcnow() - timedelta(days=days)))
    engine.dispose()


def publish(cluster, owner, content_id):
    """Record a publishing license as the service does (rmsd's own code), without running a node."""
    engine = db.make_engine(cluster["database_url"])
    with engine.begin() as conn:
        row = clusters.get_cluster(conn, cluster["name"])
        key = provider_for("password", key_password=cluster["key_password"]).load(clusters.active_key_row(conn, row.id))
        _pl, claims = licenses.issue_pl(key, row.name, content_id, owner, {owner: ["VIEW"]}, os.urandom(32), utcnow())
        clusters.record_content(conn, row.id, claims, utcnow())
    engine.dispose()


def active_key(cluster):
    return admin.cluster_info(name=cluster["name"], database_url=cluster["database_url"])["cluster"]["active_key_id"]


def test_rollover_four_runs(ansible, cluster):
    age_active_key(cluster, 40)
    old = active_key(cluster)
    keys = four_runs(ansible, "rmsops.rms.cluster_key", key_params(cluster, max_age=30), observe(cluster))["state"]
    assert [k["status"] for k in keys] == ["archived", "active"] and keys[0]["id"] == old


def test_compromise_four_runs_and_the_key_stays_revoked(ansible, cluster):
    old = active_key(cluster)
    outcome = four_runs(ansible, "rmsops.rms.cluster_key", key_params(cluster, compromised_keys=[old]),
                        observe(cluster))
    assert [(k["id"] == old, k["status"]) for k in outcome["state"]] == [(True, "compromised"), (False, "active")]
    real = outcome["runs"][1].result
    assert real["rotation"]["reason"] == "compromised" and real["rotation"]["retired_key_id"] == old
    dropped = ansible.run("rmsops.rms.cluster_key", key_params(cluster)).ok()
    assert not dropped.changed and "stays so" in dropped.output


def test_password_change_four_runs_without_secrets_in_the_output(ansible, cluster):
    new_password = "np-" + secrets.token_hex(12)
    params = key_params(cluster, key_password=new_password, previous_key_password=cluster["key_password"])
    runs = four_runs(ansible, "rmsops.rms.cluster_key", params,
                     lambda: _opens(cluster, new_password), diff=True, verbosity=3)["runs"]
    assert runs[1].result["password_changed"] is True
    for run in runs:
        for secret in (new_password, cluster["key_password"]):
            assert secret not in run.output
        assert not PEM.search(run.output)


def _opens(cluster, password):
    engine = db.make_engine(cluster["database_url"])
    try:
        with engine.connect() as conn:
            row = clusters.get_cluster(conn, cluster["name"])
            provider_for("password", key_password=password).load(clusters.active_key_row(conn, row.id))
        return True
    except Exception:  # noqa: BLE001 - any refusal means "does not open"
        return False
    finally:
        engine.dispose()


def test_module_killed_mid_rotation_fails_clearly_and_the_rerun_converges(ansible, cluster):
    old = active_key(cluster)
    params = key_params(cluster, compromised_keys=[old])
    killed = ansible.run("rmsops.rms.cluster_key", params, env={"RMSD_FAILPOINT": "rotation.stored"})
    assert killed.failed and killed.result["rc"] == 137 and "Killed" in killed.result["module_stderr"]
    assert [(k["id"], k["status"]) for k in observe(cluster)()] == [(old, "active")]
    rerun = ansible.run("rmsops.rms.cluster_key", params).ok()
    assert rerun.changed and [k["status"] for k in observe(cluster)()] == ["compromised", "active"]
    assert not ansible.run("rmsops.rms.cluster_key", params).ok().changed


@pytest.mark.parametrize(("extra", "message"), [
    ({"compromised_keys": ["0" * 40]}, "which this cluster does not have"),
    ({"max_age": 0}, "at least 1"),
    ({"reenroll": True}, "reenroll is for licensing clusters"),
    ({"key_password": "not-the-password-at-all"}, "does not decrypt"),
])
def test_bad_key_input_fails_and_changes_nothing(ansible, cluster, extra, message):
    before = observe(cluster)()
    failed = ansible.run("rmsops.rms.cluster_key", key_params(cluster, **extra))
    assert failed.failed and message in failed.msg
    assert observe(cluster)() == before


# --- trusted publishing domain -------------------------------------------------------------------


def test_tpd_export_and_import_four_runs(ansible, cluster, tmp_path):
    password = "tpd-" + secrets.token_hex(12)
    path = tmp_path / "backup" / "rms1.tpd"
    export = {**key_params(cluster), "path": str(path), "password": password}

    def exported():
        return (path.read_bytes(), oct(stat.S_IMODE(path.stat().st_mode))) if path.exists() else None

    runs = four_runs(ansible, "rmsops.rms.trusted_publishing_domain", export, exported, diff=True, verbosity=3)["runs"]
    assert oct(stat.S_IMODE(path.stat().st_mode)) == "0o600"
    assert runs[1].result["tpd"]["keys"][0]["exported"] is True
    for run in runs:
        assert password not in run.output and cluster["key_password"] not in run.output
        assert not PEM.search(run.output)

    target = {**cluster, "database_url": f"sqlite:///{tmp_path}/target/config.db"}
    ansible.run("rmsops.rms.cluster", target).ok()
    imported = four_runs(ansible, "rmsops.rms.trusted_publishing_domain",
                         {**key_params(target), "path": str(path), "password": password, "state": "imported"},
                         observe(target))["state"]
    assert sorted(k["status"] for k in imported) == ["active", "archived"]
    assert active_key(cluster) in {k["id"] for k in imported if k["status"] == "archived"}


def test_tpd_with_a_wrong_password_is_refused(ansible, cluster, tmp_path):
    path = tmp_path / "rms1.tpd"
    ansible.run("rmsops.rms.trusted_publishing_domain",
                {**key_params(cluster), "path": str(path), "password": "right-password-123"}).ok()
    before = path.read_bytes()
    refused = ansible.run("rmsops.rms.trusted_publishing_domain",
                          {**key_params(cluster), "path": str(path), "password": "wrong-password-456", "backup": False})
    assert refused.failed and "set backup=true" in refused.msg and path.read_bytes() == before


# --- compromise report ----------------------------------------------------------------------------


class Inbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, inbox
    controller.stop()


def test_compromise_report_four_runs_notifies_each_owner_once(ansible, cluster, tmp_path, smtp_server):
    port, inbox = smtp_server
    publish(cluster, "alice@example.com", "doc-1")
    publish(cluster, "alice@example.com", "doc-2")
    publish(cluster, "bob@example.com", "doc-3")
    ansible.run("rmsops.rms.cluster_key", key_params(cluster, compromised_keys=[active_key(cluster)])).ok()
    report = tmp_path / "reports" / "rms1.json"
    params = {"cluster": cluster["name"], "database_url": cluster["database_url"], "json_path": str(report),
              "csv_path": str(tmp_path / "reports" / "rms1.csv"), "notify": True, "sender": "rms@example.com",
              "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_username": None,
              "progress_path": str(tmp_path / "reports" / "rms1.progress.jsonl")}

    def observed():
        return (report.read_text() if report.exists() else None, len(inbox.messages))

    runs = four_runs(ansible, "rmsops.rms.compromise_report", params, observed, diff=True)["runs"]
    assert runs[1].result["notified"] == 2
    assert runs[1].result["notified_owners"] == ["alice@example.com", "bob@example.com"]
    assert runs[1].result["report"]["top_owners"] == [
        {"owner": "alice@example.com", "pending": 2, "republished": 0},
        {"owner": "bob@example.com", "pending": 1, "republished": 0},
    ]
    assert sorted(m["To"] for m in inbox.messages) == ["alice@example.com", "bob@example.com"]
    assert json.loads(report.read_text())["pending"] == 3
    # the last real run's progress: nothing to read (the rows' revision did not move), nothing to send
    steps = [json.loads(line) for line in (tmp_path / "reports" / "rms1.progress.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["started", "done"] and steps[-1]["notified"] == 0


def test_compromise_report_needs_a_sender_and_one_way_to_deliver(ansible, cluster, tmp_path):
    base = {"cluster": cluster["name"], "database_url": cluster["database_url"], "notify": True}
    no_sender = ansible.run("rmsops.rms.compromise_report", dict(base, smtp_host="127.0.0.1"))
    assert no_sender.failed and "sender" in no_sender.msg
    both = ansible.run("rmsops.rms.compromise_report", dict(base, sender="a@example.com", smtp_host="127.0.0.1",
                                                             outbox_dir=str(tmp_path / "outbox")))
    assert both.failed and "mutually exclusive" in both.msg
    assert not (tmp_path / "outbox").exists()


def test_no_key_material_in_results(ansible, cluster):
    done = ansible.run("rmsops.rms.cluster_key", key_params(cluster, compromised_keys=[active_key(cluster)]),
                       diff=True, verbosity=3).ok()
    assert not PEM.search(done.output) and not PEM.search(json.dumps(done.result))
    assert cluster["key_password"] not in done.output
    engine = db.make_engine(cluster["database_url"])
    with engine.connect() as conn:
        blobs = [r.encrypted_private_key for r in conn.execute(sa.select(cluster_keys))]
    engine.dispose()
    for blob in blobs:
        assert blob.hex()[:64] not in done.output
