"""The deployment's status page: the republishing series cluster_info computes (SQLite and PostgreSQL), the
page rendered from a fleet-state document (every name escaped, only the shown fields read, its time of writing
left out of its digest), `rmsd status-page`, and GET /status on a running node."""

import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import httpx
import pytest
from conftest import KEY_PASSWORD, RMSD, cluster_key, provision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from markupsafe import escape

from rmsd import admin, clusters, status_page
from rmsd.errors import RmsdError
from rmsd.schema import cluster_keys

COMPROMISED_AT = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
# Hours after the compromise at which items 0, 1, ... were republished; items 6 to 9 never were.
REPUBLISHED_AFTER = [2, 5, 5, 30, 70, 96]


def _record(conn, cluster_id, key_id, at, supersedes=None) -> str:
    pl_id = uuid.uuid4().hex
    clusters.record_content(conn, cluster_id, {
        "pl_id": pl_id, "content_id": f"doc-{pl_id[:8]}", "owner": "alice@example.com", "key_id": key_id,
        "rights": {"bob@example.com": ["VIEW"]},
    }, at, supersedes=supersedes)
    return pl_id


def _seed_compromise(database):
    """Ten items under the first key, that key compromised at COMPROMISED_AT, six of them republished under
    the new key at REPUBLISHED_AFTER."""
    provision(database)
    row, old_key, _key, _slc = cluster_key(database)
    engine = database.engine()
    with engine.begin() as conn:
        pls = [_record(conn, row.id, old_key.id, COMPROMISED_AT - timedelta(days=30 - i)) for i in range(10)]
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_key.id],
                             **database.admin_args())
    new_key = cluster_key(database)[1].id
    with engine.begin() as conn:
        conn.execute(cluster_keys.update().where(cluster_keys.c.id == old_key.id)
                     .values(status_changed_at=COMPROMISED_AT))
        for pl_id, hours in zip(pls, REPUBLISHED_AFTER, strict=False):
            _record(conn, row.id, new_key, COMPROMISED_AT + timedelta(hours=hours), supersedes=pl_id)
    engine.dispose()
    return old_key.id, new_key


def test_republishing_series_from_the_compromise_to_the_latest_republishing(database):
    old_key, new_key = _seed_compromise(database)
    info = admin.cluster_info(name="c1", **database.admin_args())
    (progress,) = info["republishing"]
    assert (progress["key_id"], progress["published"], progress["republished"], progress["pending"]) == (
        old_key, 10, 6, 4)
    series = progress["series"]
    assert len(series) == clusters.SERIES_POINTS
    times = [datetime.fromisoformat(p["at"]) for p in series]
    assert times[0] == COMPROMISED_AT and times[-1] == COMPROMISED_AT + timedelta(hours=max(REPUBLISHED_AFTER))
    assert progress["compromised_at"] == COMPROMISED_AT.isoformat()
    # Each point: items not yet republished at its time, as counted here from the seeded times.
    for at, point in zip(times, series, strict=True):
        done = sum(1 for hours in REPUBLISHED_AFTER if COMPROMISED_AT + timedelta(hours=hours) <= at)
        assert point["pending"] == 10 - done, point
    assert series[0]["pending"] == 10 and series[-1]["pending"] == 4
    # No time from the clock: read again later, the same.
    assert admin.cluster_info(name="c1", **database.admin_args())["republishing"] == info["republishing"]
    # The new key publishes fine; it is not compromised and has no series.
    assert info["content_per_key"] == {old_key: 10, new_key: 6}


def test_a_compromised_key_nothing_was_republished_from_has_one_point(database):
    provision(database)
    row, key, _k, _slc = cluster_key(database)
    engine = database.engine()
    with engine.begin() as conn:
        for i in range(3):
            _record(conn, row.id, key.id, COMPROMISED_AT - timedelta(days=i + 1))
    engine.dispose()
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[key.id],
                             **database.admin_args())
    (progress,) = admin.cluster_info(name="c1", **database.admin_args())["republishing"]
    assert progress["pending"] == 3 and progress["republished"] == 0
    assert [p["pending"] for p in progress["series"]] == [3]
    assert progress["series"][0]["at"] == progress["compromised_at"]


def test_no_compromised_key_no_series(database):
    provision(database)
    assert admin.cluster_info(name="c1", **database.admin_args())["republishing"] == []
    assert admin.cluster_info(name="none", **database.admin_args())["republishing"] == []


# --- the page -----------------------------------------------------------------------------------------


def fleet_state(name="corp", key_id="k-active", node="corp-1", url="http://127.0.40.1:8080", health="ok",
                version="0.1.0", role="root", state="provisioned") -> dict:
    """A fleet-state document shaped as playbooks/fleet_state.yml writes it."""
    return {"clusters": [{
        "name": name, "exists": True, "role": role, "state": state, "active_key_id": key_id,
        "cluster_keys": [
            {"id": "k-old", "status": "archived", "protection": "password", "created_at": "2025-01-05T10:00:00+00:00",
             "age_days": 420, "status_changed_at": "2025-11-01T10:00:00+00:00", "size": 2048},
            {"id": "k-bad", "status": "compromised", "protection": "password",
             "created_at": "2025-11-01T10:00:00+00:00", "age_days": 120,
             "status_changed_at": "2026-03-01T09:00:00+00:00"},
            {"id": key_id, "status": "active", "protection": "password", "created_at": "2026-03-01T09:00:00+00:00",
             "age_days": 10, "status_changed_at": "2026-03-01T09:00:00+00:00"},
        ],
        "content_per_key": {"k-bad": 10, key_id: 6},
        "compromised_content": {
            "published": {"k-bad": 10}, "pending": 4, "republished": 6,
            "progress": [{"key_id": "k-bad", "compromised_at": "2026-03-01T09:00:00+00:00", "published": 10,
                          "republished": 6, "pending": 4,
                          "series": [{"at": "2026-03-01T09:00:00+00:00", "pending": 10},
                                     {"at": "2026-03-02T09:00:00+00:00", "pending": 7},
                                     {"at": "2026-03-05T09:00:00+00:00", "pending": 4}]}],
        },
        "nodes": [
            {"name": node, "url": url, "recorded_status": "up", "health": health, "active_key_id": key_id,
             "restart_advised": False, "version": version},
            {"name": "corp-2", "url": "http://127.0.40.2:8080", "recorded_status": "down", "health": "unreachable",
             "active_key_id": None, "restart_advised": None, "version": None},
        ],
        "nodes_outside_inventory": [],
    }]}


class Elements(HTMLParser):
    """The elements of a page and their attribute names: what an injected name would add to."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, tuple[str, ...]]] = set()

    def handle_starttag(self, tag, attrs):
        self.seen.add((tag, tuple(sorted(name for name, _ in attrs))))


def elements(page: str) -> set:
    parser = Elements()
    parser.feed(page)
    return parser.seen


def test_the_page_shows_clusters_keys_nodes_and_the_chart():
    page = status_page.render(fleet_state(), datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    assert "Report generated <time id=\"generated-at\">2026-03-10 12:00:00 UTC</time>" in page
    for text in ("corp", "root cluster, provisioned", "k-old", "k-bad", "k-active", "archived", "compromised",
                 "corp-1", "http://127.0.40.1:8080", "unreachable", "0.1.0", "420",
                 "<b>4</b> still to be republished, <b>6</b> republished"):
        assert text in page, text
    assert page.count("<svg") == 1 and page.count("<circle") == 3
    assert page.count("<script") == 0 and "http://" not in page.split("<body>")[0]  # nothing fetched
    assert '<b>1 / 2</b>nodes healthy' in page


HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "'; x='", "a&b", "</td></tr></table>",
           "<!--rmsd:digest-->", "<!--rmsd:generated-at-->", "{{ 7*7 }}", "]]></svg><svg onload=alert(1)>"]


def database(member="rms-pg-2", role="sync_standby", state="streaming", lag=0) -> dict:
    """The configuration database's part of a fleet-state document (Patroni's GET /cluster, as fleet_state.yml
    keeps it)."""
    return {"name": "rms-config", "members": [
        {"name": "rms-pg", "host": "127.0.6.10", "role": "leader", "state": "running", "timeline": 3},
        {"name": member, "host": "127.0.6.13", "role": role, "state": state, "timeline": 3, "lag": lag}]}


def test_the_page_shows_the_database_members_their_roles_and_lag():
    page = status_page.render({**fleet_state(), "database": database(lag=4096)})
    section = page.split('id="database"')[1].split("</section>")[0]
    for text in ("Configuration database rms-config", "A primary and every member running", "rms-pg", "leader",
                 "sync_standby", "streaming", "127.0.6.13", "<td>4096</td>"):
        assert text in section, text
    stopped = status_page.render({**fleet_state(), "database": database(state="stopped", lag="unknown")})
    assert "Not every member runs, or no primary" in stopped
    assert status_page.digest(stopped) != status_page.digest(page)
    assert 'id="database"' not in status_page.render(fleet_state())  # a fleet on SQLite or a PostgreSQL run elsewhere


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                                                     max_size=40)),
       st.sampled_from(["member", "role", "state", "lag"]))
def test_every_database_value_is_escaped(value, field):
    benign = elements(status_page.render({**fleet_state(), "database": database()}))
    page = status_page.render({**fleet_state(), "database": database(**{field: value})})
    assert elements(page) == benign
    assert str(escape(value)) in page


def test_a_cluster_whose_nodes_run_two_versions_is_shown_as_mixed():
    state = fleet_state(version="0.1.0")
    state["clusters"][0]["schema_revision"] = "0006"
    state["clusters"][0]["nodes"].append({"name": "corp-3", "url": "http://127.0.40.3:8080", "recorded_status": "up",
                                          "health": "ok", "active_key_id": "k-active", "restart_advised": False,
                                          "version": "0.2.0"})
    page = status_page.render(state)
    assert "Nodes run different rmsd versions: 0.1.0, 0.2.0" in page
    assert '<code class="schema">0006</code>' in page
    state["clusters"][0]["nodes"][-1]["version"] = "0.1.0"
    same = status_page.render(state)
    assert "different rmsd versions" not in same and status_page.digest(same) != status_page.digest(page)
    # A node that does not answer says nothing of its version.
    state["clusters"][0]["nodes"][-1].update(health="unreachable", version="0.3.0")
    assert "different rmsd versions" not in status_page.render(state)


def backup(label="20261207-010002F", kind="full", status="ok", repository="rms-lb", last=True) -> dict:
    """The repository's part of a fleet-state document (pgBackRest's info, as fleet_state.yml keeps it)."""
    return {"repository": repository, "status": status, "backups": 3,
            "last": {"label": label, "type": kind, "stopped_at": "2026-12-07T01:00:09Z"} if last else None}


def test_the_page_shows_the_last_backup_and_warns_when_there_is_none():
    page = status_page.render({**fleet_state(), "database": {**database(), "backup": backup()}})
    line = page.split('class="meta backup"')[1].split("</p>")[0]
    assert "Last backup: full 20261207-010002F, ended 2026-12-07 01:00 UTC" in line
    assert "3 in the repository on rms-lb" in line and "warn" not in line
    none = status_page.render({**fleet_state(), "database": {**database(), "backup": backup(last=False)}})
    assert "No backup yet" in none and status_page.digest(none) != status_page.digest(page)
    missing = backup(status="missing stanza path")
    broken = status_page.render({**fleet_state(), "database": {**database(), "backup": missing}})
    assert '<span class="warn">missing stanza path</span>' in broken
    assert 'class="meta backup"' not in status_page.render({**fleet_state(), "database": database()})
    with pytest.raises(RmsdError, match="stopped_at must be an ISO 8601 time"):
        status_page.render({**fleet_state(), "database": {**database(), "backup": {
            **backup(), "last": {"label": "x", "type": "full", "stopped_at": "yesterday"}}}})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.sampled_from(HOSTILE), st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                                                     max_size=40)),
       st.sampled_from(["label", "kind", "status", "repository"]))
def test_every_backup_value_is_escaped(value, field):
    assume(not (field == "status" and value == "ok"))  # "ok" drops the warning: another page, rightly
    benign = elements(status_page.render({**fleet_state(), "database": {**database(), "backup": backup(status="x")}}))
    page = status_page.render({**fleet_state(), "database": {**database(), "backup": backup(
        **({"status": "x"} if field != "status" else {}), **{field: value})}})
    assert elements(page) == benign
    assert str(escape(value)) in page


def test_only_the_fields_shown_are_read():
    state = fleet_state()
    state["clusters"][0]["database_password"] = "Db-Pass-5e1f-never-shown"
    state["clusters"][0]["nodes"][0]["secret"] = "Node-Secret-77c1-never-shown"
    state["vault"] = "Vault-Value-0a9d-never-shown"
    page = status_page.render(state)
    assert "never-shown" not in page



@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.sampled_from(HOSTILE),
                 st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)),
       st.sampled_from(["name", "key_id", "node", "url", "version", "role", "state"]))
def test_every_name_is_escaped(value, field):
    benign = elements(status_page.render(fleet_state()))
    page = status_page.render(fleet_state(**{field: value}))
    assert elements(page) == benign  # no element or attribute added
    assert str(escape(value)) in page
    assert page.count("<!--rmsd:") == 0 and status_page.digest(page) is not None


def test_the_time_of_writing_stays_out_of_the_digest():
    first = status_page.render(fleet_state(), datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    later = status_page.render(fleet_state(), datetime(2026, 3, 11, 8, 30, tzinfo=UTC))
    assert first != later and status_page.digest(first) == status_page.digest(later)
    assert status_page.digest(status_page.render(fleet_state(health="HTTP 503"))) != status_page.digest(first)
    assert status_page.digest("<html>not a page of ours</html>") is None


@pytest.mark.parametrize(("state", "message"), [
    ("clusters", "the fleet state must be a mapping"),
    ({"clusters": {"corp": {}}}, "clusters must be a list"),
    ({"clusters": [{"name": "c", "nodes": "n1"}]}, r"clusters\[0\].nodes must be a list"),
    ({"clusters": [{"name": "c", "compromised_content": {"pending": "many"}}]},
     r"clusters\[0\].compromised_content.pending must be a whole number"),
    ({"clusters": [{"name": "c", "compromised_content": {"progress": [{"series": [{"at": "soon", "pending": 1}]}]}}]},
     r"series\[0\].at must be an ISO 8601 time"),
    ({"clusters": [], "database": ["rms-pg"]}, "database must be a mapping"),
    ({"clusters": [], "database": {"members": "rms-pg"}}, "database.members must be a list"),
])
def test_a_document_that_is_no_fleet_state_is_refused_with_the_field(state, message):
    with pytest.raises(RmsdError, match=message):
        status_page.render(state)


def test_the_command_writes_once_per_state_and_refuses_bad_input(tmp_path):
    state_file, output = tmp_path / "fleet-state.json", tmp_path / "out" / "status.html"
    state_file.write_text(json.dumps(fleet_state()))
    (tmp_path / "out").mkdir()

    def run(*args):
        return subprocess.run([str(RMSD), "status-page", *args], capture_output=True, text=True, timeout=60)

    first = run("--state", str(state_file), "--output", str(output))
    assert first.returncode == 0 and "wrote" in first.stderr, first.stderr
    written = output.read_text()
    assert "k-bad" in written and oct(output.stat().st_mode)[-3:] == "644"
    again = run("--state", str(state_file), "--output", str(output))
    assert again.returncode == 0 and "unchanged" in again.stderr and output.read_text() == written

    state_file.write_text("{not json")
    bad = run("--state", str(state_file), "--output", str(tmp_path / "bad.html"))
    assert bad.returncode == 2 and "is not JSON" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad.html").exists()
    helped = run("--help")
    assert helped.returncode == 0 and "--state PATH" in helped.stdout and "--output PATH" in helped.stdout


# --- GET /status on a running node ----------------------------------------------------------------------

HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def test_get_status_serves_the_page_beside_the_configuration(node):
    page_path = node.config_path.parent / "status.html"
    page_path.unlink(missing_ok=True)
    try:
        missing = httpx.get(f"{node.url}/status")
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
        assert "playbooks/fleet_state.yml" in missing.text and "rmsd status-page" in missing.text
        assert {k: missing.headers[k] for k in HEADERS} == HEADERS
        assert httpx.get(f"{node.url}/").json()["links"]["status"] == "/status"

        info = admin.cluster_info(name="c1", **node.database.admin_args())
        state = fleet_state(name="c1", key_id=info["cluster"]["active_key_id"], node="n1", url=node.url)
        page_path.write_text(status_page.render(state))
        served = httpx.get(f"{node.url}/status")
        assert served.status_code == 200 and served.headers["content-type"] == "text/html; charset=utf-8"
        assert served.text == page_path.read_text()
        assert {k: served.headers[k] for k in HEADERS} == HEADERS
        assert info["cluster"]["active_key_id"] in served.text
        # Revalidation: the same page is not sent again; a new one is.
        etag = served.headers["etag"]
        assert httpx.get(f"{node.url}/status", headers={"If-None-Match": etag}).status_code == 304
        page_path.write_text(status_page.render(fleet_state(name="c1", node="n1", health="HTTP 503")))
        changed = httpx.get(f"{node.url}/status", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and "HTTP 503" in changed.text and changed.headers["etag"] != etag
        # Read-only: the node offers no way to change it.
        assert httpx.post(f"{node.url}/status", json={}).status_code == 405
        assert httpx.put(f"{node.url}/status", json={}).status_code == 405
    finally:
        page_path.unlink(missing_ok=True)


def test_status_page_path_from_the_configuration(tmp_path):
    from rmsd.config import NodeConfig
    from rmsd.service import status_page_response

    config = NodeConfig(name="n", cluster="c", database_url="sqlite://", listen_address="127.0.40.9", port=1,
                        secret_path="/x", status_page=str(tmp_path / "page.html"))
    assert "status_page" in config.render()
    assert status_page_response(config.status_page, None).status_code == 404
    (tmp_path / "page.html").write_text(status_page.render(fleet_state()))
    assert status_page_response(config.status_page, None).status_code == 200
    # Unset (a configuration the server role wrote): nothing rendered into rmsd.toml.
    assert "status_page" not in NodeConfig(name="n", cluster="c", database_url="sqlite://", listen_address="::1",
                                           port=1, secret_path="/x").render()
