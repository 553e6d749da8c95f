"""The deployment's status page end to end: playbooks/fleet_state.yml run against a root cluster (three key
generations, one compromised with content still being republished) and a licensing cluster, with real
`rmsd serve` nodes (one of them down). The run writes the page into every node's folder and on the controller;
a rerun and a check run change nothing, and a check run writes nothing on a node. A running node serves the
page at GET /status; headless Chromium (Debian's `chromium`) opens it there, the rendered DOM shows what the
clusters hold, and its screenshot is what docs/docsite/images/status-report.png is a copy of.

The screenshot goes to build/status-report.png, or to $RMS_STATUS_SCREENSHOT."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from rmsd.schema import cluster_keys, utcnow

from rmsd import admin, clusters, db, demo_issuer

REPO = Path(__file__).resolve().parent.parent
RMSD = Path(sys.executable).with_name("rmsd")
KEY_PASSWORD = "Status-Page-Key-Pass-4c1e9a"
LICENSING_PASSWORD = "Status-Page-Dept-Pass-7b30d2"
CREDENTIAL = "enroll-status-page-5f0b8e21c93d"
SCREENSHOT = Path(os.environ.get("RMS_STATUS_SCREENSHOT") or REPO / "build" / "status-report.png")
# Loopback addresses of this test's nodes.
ADDRESSES = {"corp-1": "127.0.40.11", "corp-2": "127.0.40.12", "dept-1": "127.0.40.13"}


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def backdate(url: str, key_id: str, **values) -> None:
    engine = db.make_engine(url, None)
    with engine.begin() as conn:
        conn.execute(cluster_keys.update().where(cluster_keys.c.id == key_id).values(**values))
    engine.dispose()


def active_key(url: str, name: str) -> str:
    return admin.cluster_info(name=name, database_url=url)["cluster"]["active_key_id"]


def publish(url: str, cluster: str, key_id: str, times, supersedes=()) -> list[str]:
    """Publishing licenses recorded the way a node records them, at the given times."""
    engine = db.make_engine(url, None)
    made = []
    with engine.begin() as conn:
        cluster_id = clusters.get_cluster(conn, cluster).id
        for i, at in enumerate(times):
            pl_id = uuid.uuid4().hex
            owner = f"user{i % 17}@corp.example.com"
            clusters.record_content(conn, cluster_id, {
                "pl_id": pl_id, "content_id": f"doc-{pl_id[:10]}", "owner": owner, "key_id": key_id,
                "rights": {owner: ["VIEW", "EDIT"]},
            }, at, supersedes=supersedes[i] if supersedes else None)
            made.append(pl_id)
    engine.dispose()
    return made


def start(config_path: Path, url: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen([str(RMSD), "serve", "--config", str(config_path)], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60  # only a safety net: it waits for /health to answer
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop(process)
    pytest.fail(f"rmsd serve did not answer at {url}:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """corp (root): a key archived by age, one compromised 12 days ago with 240 items of which 170 were
    republished since, the active one; nodes corp-1 (running) and corp-2 (joined, never started). dept
    (licensing), enrolled with corp: node dept-1 (running)."""
    base = tmp_path_factory.mktemp("status-page")
    issuer = base / "issuer"
    demo_issuer.init(issuer)
    corp_db, dept_db = f"sqlite:///{base}/db/corp.db", f"sqlite:///{base}/db/dept.db"
    now = utcnow()
    rng = random.Random(20260301)

    admin.ensure_cluster(name="corp", key_password=KEY_PASSWORD, intranet_url="https://rms.corp.example.com",
                         database_url=corp_db)
    first = active_key(corp_db, "corp")
    publish(corp_db, "corp", first, sorted(now - timedelta(days=rng.uniform(160, 400)) for _ in range(80)))
    backdate(corp_db, first, created_at=now - timedelta(days=420))
    admin.ensure_cluster_key(cluster="corp", key_password=KEY_PASSWORD, max_age=365, database_url=corp_db)
    second = active_key(corp_db, "corp")
    backdate(corp_db, first, status_changed_at=now - timedelta(days=160))
    backdate(corp_db, second, created_at=now - timedelta(days=160), status_changed_at=now - timedelta(days=160))
    compromised_at = now - timedelta(days=12)
    old = publish(corp_db, "corp", second,
                  sorted(now - timedelta(days=rng.uniform(13, 159)) for _ in range(240)))
    admin.ensure_cluster_key(cluster="corp", key_password=KEY_PASSWORD, compromised_keys=[second],
                             database_url=corp_db)
    third = active_key(corp_db, "corp")
    backdate(corp_db, second, status_changed_at=compromised_at)
    backdate(corp_db, third, created_at=compromised_at, status_changed_at=compromised_at)
    # Owners republish quickly at first, then fewer each day.
    republished = sorted(compromised_at + timedelta(days=min(rng.expovariate(1 / 2.5), 11.5)) for _ in range(170))
    publish(corp_db, "corp", third, republished, supersedes=rng.sample(old, 170))

    nodes = {}
    for name, cluster, url in (("corp-1", "corp", corp_db), ("corp-2", "corp", corp_db)):
        nodes[name] = join(base, issuer, name, cluster, url, KEY_PASSWORD)
    processes = [start(nodes["corp-1"]["config"], nodes["corp-1"]["url"], base / "corp-1.log")]
    try:
        admin.ensure_enrollment_credential(cluster="corp", scope="dept", secret=CREDENTIAL, database_url=corp_db)
        admin.ensure_cluster(name="dept", role="licensing", key_password=LICENSING_PASSWORD,
                             intranet_url="https://rms.dept.corp.example.com", enrollment_url=nodes["corp-1"]["url"],
                             enrollment_credential=CREDENTIAL, database_url=dept_db)
        dept_key = active_key(dept_db, "dept")
        backdate(dept_db, dept_key, created_at=now - timedelta(days=11), status_changed_at=now - timedelta(days=11))
        publish(dept_db, "dept", dept_key, sorted(now - timedelta(days=rng.uniform(0.5, 11)) for _ in range(57)))
        nodes["dept-1"] = join(base, issuer, "dept-1", "dept", dept_db, LICENSING_PASSWORD)
        processes.append(start(nodes["dept-1"]["config"], nodes["dept-1"]["url"], base / "dept-1.log"))
        yield {"base": base, "nodes": nodes, "corp_db": corp_db, "dept_db": dept_db,
               "keys": {"archived": first, "compromised": second, "active": third, "dept": dept_key}}
    finally:
        for process in processes:
            stop(process)


def join(base: Path, issuer: Path, name: str, cluster: str, url: str, password: str) -> dict:
    folder = base / "nodes" / name
    address = ADDRESSES[name]
    port = free_port(address)
    admin.ensure_server(cluster=cluster, name=name, key_password=password, listen_address=address, port=port,
                        config_path=str(folder / "rmsd.toml"), secret_path=str(folder / "secret.toml"),
                        identity_issuer=demo_issuer.ISSUER, identity_audience=demo_issuer.AUDIENCE,
                        identity_jwks_uri=demo_issuer.jwks_uri(issuer), database_url=url)
    return {"config": folder / "rmsd.toml", "page": folder / "status.html", "url": f"http://{address}:{port}"}


def inventory(deployment) -> Path:
    nodes = deployment["nodes"]
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "server_rmsd_python": sys.executable}
    data = {"all": {"children": {
        "rms_root": {
            "vars": {"root_cluster_name": "corp", "root_cluster_database_url": deployment["corp_db"]},
            "hosts": {n: {**host, "server_config_path": str(nodes[n]["config"])} for n in ("corp-1", "corp-2")},
        },
        "rms_licensing": {
            "vars": {"licensing_cluster_name": "dept", "licensing_cluster_database_url": deployment["dept_db"]},
            "hosts": {"dept-1": {**host, "server_config_path": str(nodes["dept-1"]["config"])}},
        },
    }}}
    path = deployment["base"] / "inventory.yml"
    path.write_text(json.dumps(data))
    return path


def fleet_state(deployment, *args: str) -> dict:
    """Run playbooks/fleet_state.yml; per host of the recap, its changed count."""
    out = deployment["base"] / "out"
    cmd = [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(inventory(deployment)),
           str(REPO / "playbooks" / "fleet_state.yml"), "-e", f"rms_fleet_state_path={out}/fleet-state.json",
           "-e", f"rms_fleet_status_page_path={out}/status.html", *args]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false")
    proc = subprocess.run(cmd, cwd=deployment["base"], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    recap = dict(re.findall(r"^(\S+)\s+:\s+ok=\d+\s+changed=(\d+)", proc.stdout, re.MULTILINE))
    assert set(recap) == {"corp-1", "corp-2", "dept-1"}, output
    return {host: int(changed) for host, changed in recap.items()}


@pytest.fixture(scope="module")
def written(deployment):
    """The first run, then a rerun and a check run, and a check run with one node's page gone."""
    out = deployment["base"] / "out"
    out.mkdir()
    first = fleet_state(deployment)
    pages = {name: node["page"].read_text() for name, node in deployment["nodes"].items()}
    rerun = fleet_state(deployment)
    check = fleet_state(deployment, "--check")
    return {"first": first, "rerun": rerun, "check": check, "pages": pages, "out": out}


def test_the_run_writes_every_node_page_once_and_then_changes_nothing(deployment, written):
    # corp-1 also writes the controller's files (run_once); each node host its own page.
    assert written["first"] == {"corp-1": 3, "corp-2": 1, "dept-1": 1}
    assert written["rerun"] == {"corp-1": 0, "corp-2": 0, "dept-1": 0}
    assert written["check"] == {"corp-1": 0, "corp-2": 0, "dept-1": 0}
    pages = written["pages"]
    for name, node in deployment["nodes"].items():
        assert node["page"].read_text() == pages[name]  # the reruns left it as it was
        assert oct(node["page"].stat().st_mode)[-3:] == "644"
    controller = written["out"] / "status.html"
    assert controller.read_text() == pages["corp-1"] and oct(controller.stat().st_mode)[-3:] == "600"
    state = json.loads((written["out"] / "fleet-state.json").read_text())
    (progress,) = state["clusters"][0]["compromised_content"]["progress"]
    assert (progress["key_id"], progress["published"], progress["republished"], progress["pending"]) == (
        deployment["keys"]["compromised"], 240, 170, 70)
    assert len(progress["series"]) == clusters.SERIES_POINTS


def test_a_check_run_writes_nothing_on_a_node(deployment, written):
    page = deployment["nodes"]["dept-1"]["page"]
    kept = page.read_text()
    page.unlink()
    try:
        assert fleet_state(deployment, "--check") == {"corp-1": 0, "corp-2": 0, "dept-1": 1}
        assert not page.exists()
    finally:
        page.write_text(kept)


def test_the_node_serves_the_page(deployment, written):
    corp = deployment["nodes"]["corp-1"]
    served = httpx.get(f"{corp['url']}/status")
    assert served.status_code == 200 and served.text == corp["page"].read_text()
    assert served.headers["content-security-policy"] == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    assert served.headers["x-content-type-options"] == "nosniff"


def chromium(*args: str) -> subprocess.CompletedProcess:
    # No sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    return subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--hide-scrollbars", *args], capture_output=True, text=True,
                          timeout=120, check=False)


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="Debian's chromium is not installed (apt-get install chromium)")


@needs_chromium
def test_chromium_shows_the_clusters_keys_nodes_and_the_chart(deployment, written):
    keys = deployment["keys"]
    url = f"{deployment['nodes']['corp-1']['url']}/status"
    dumped = chromium("--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr
    dom = dumped.stdout
    names = re.findall(r'<h2 class="cluster-name">([^<]*)</h2>', dom)
    assert names == ["corp", "dept"]
    rows = re.findall(r'<tr class="key"><td><code>([^<]*)</code></td><td><span class="badge (\w+)">(\w+)</span>', dom)
    assert [(key, status) for key, _cls, status in rows] == [
        (keys["archived"], "archived"), (keys["compromised"], "compromised"), (keys["active"], "active"),
        (keys["dept"], "active"),
    ]
    health = re.findall(r'<tr class="node"><td>([^<]*)</td>.*?<span class="badge health \w+">([^<]*)</span>', dom,
                        re.DOTALL)
    assert health == [("corp-1", "ok"), ("corp-2", "unreachable"), ("dept-1", "ok")]
    assert "<b>70</b> still to be republished, <b>170</b> republished" in dom
    charts = re.findall(r'<svg class="chart" data-key="([^"]*)".*?</svg>', dom, re.DOTALL)
    assert charts == [keys["compromised"]]
    chart = re.search(r'<svg class="chart".*?</svg>', dom, re.DOTALL).group(0)
    assert chart.count("<circle") == clusters.SERIES_POINTS
    assert re.findall(r"<title>[^<]*: (\d+) pending</title>", chart)[0] == "240"
    assert re.findall(r"<title>[^<]*: (\d+) pending</title>", chart)[-1] == "70"
    assert "Report generated" in dom


@needs_chromium
def test_chromium_screenshot_of_the_page(deployment, written):
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    url = f"{deployment['nodes']['corp-1']['url']}/status"
    shot = chromium(f"--screenshot={SCREENSHOT}", "--window-size=1280,1000", url)
    assert shot.returncode == 0, shot.stderr
    data = SCREENSHOT.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1280, 1000)
