"""The summaries that end playbooks/rotate_compromised_key.yml and playbooks/backup_key.yml, read as a
person reads them: a root cluster of one node (SQLite, rmsd of this virtualenv under supervisord on
127.0.40.1) made by playbooks/site.yml, its active key declared compromised and rotated (check run, real
run, rerun), then backed up (check run, real run, rerun)."""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from state import cluster_state

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
ADDRESS = "127.0.40.1"
HOST = "rms-sum-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        return s.getsockname()[1]


class Site:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.key_password = "kp-" + secrets.token_hex(12)
        self.backup_password = "tpd-" + secrets.token_hex(12)
        self.reports = root / "reports"
        self.backups = root / "backups"
        self.runs = 0

    def inventory(self, extra: dict) -> Path:
        inventory = {"all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                     # rmsd and supervisor of this test virtualenv; no install.
                     "server_base_dir": str(self.root / "nodes"), "server_venv_dir": str(VENV),
                     "server_install_done": True, "server_rmsd_python": sys.executable, "server_rmsd_ready": True,
                     "server_service_manager": "supervisord", "server_user": getpass.getuser(), "server_workers": 1},
            "children": {
                "rms_root": {
                    "hosts": {HOST: {"server_listen_address": ADDRESS, "server_port": self.port}},
                    "vars": {"root_cluster_name": "corp",
                             "root_cluster_database_url": f"sqlite:///{self.root}/db/config.db",
                             "root_cluster_key_password": self.key_password,
                             "root_cluster_intranet_url": f"http://{ADDRESS}:{self.port}",
                             "key_rotation_report_dir": str(self.reports),
                             "backup_key_dir": str(self.backups),
                             "backup_key_password": self.backup_password, **extra}},
                "rms_licensing": {"hosts": {}},
                "rms_balancers": {"hosts": {}},
            }}}
        path = self.root / "inventory.yml"
        path.write_text(json.dumps(inventory, indent=1))
        return path

    def play(self, playbook: str, *args: str, extra: dict | None = None) -> tuple[str, dict]:
        self.runs += 1
        env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
                   ANSIBLE_RETRY_FILES_ENABLED="false")
        proc = subprocess.run([str(VENV / "bin" / "ansible-playbook"), "-i", str(self.inventory(extra or {})),
                               str(REPO / "playbooks" / playbook), *args], cwd=self.root, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{playbook} {args} exited {proc.returncode}:\n{output}"
        for secret in (self.key_password, self.backup_password):
            assert secret not in output
        assert "FAILED - RETRYING" not in output, output
        return output, recap(output)

    def stop(self) -> None:
        pidfile = self.root / "nodes" / HOST / "supervisord.pid"
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return
        deadline = time.monotonic() + 30  # supervisord stops rmsd first
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)


def recap(output: str) -> dict[str, int]:
    found = re.search(rf"^{HOST}\s+:\s+(ok=.*)$", output, re.MULTILINE)
    assert found, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", found.group(1))}


def summary(output: str, task: str) -> list[str]:
    """The lines the summary task printed."""
    found = re.search(rf"TASK \[{re.escape(task)}\] \*+\nok: \[[^\]]+\] => (\{{.*?\n\}})\n", output, re.DOTALL)
    assert found, output
    lines = json.loads(found.group(1))["msg"]
    print("\n".join([f"--- {task}", *lines]))
    return lines


ROTATION = "Show each cluster's URL, active key, compromised keys, restarts and compromise report"
BACKUP = "Show where each cluster's backup file is, its size and its keys"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not (VENV / "bin" / "supervisord").exists():
        pytest.fail(f"supervisor is not installed in {VENV} (the node runs under supervisord)")
    site = Site(tmp_path_factory.mktemp("summaries"))
    try:
        site.play("site.yml")
        yield site
    finally:
        site.stop()


def cluster_keys(site: Site) -> list[dict]:
    return cluster_state("corp", f"sqlite:///{site.root}/db/config.db", None)["cluster_keys"]


def test_rotation_summary_in_check_mode_real_run_and_rerun(site):
    first = next(k["id"] for k in cluster_keys(site) if k["status"] == "active")
    compromised = {"rms_compromised_keys": [first]}
    url = f"corp (root cluster) at http://{ADDRESS}:{site.port}"
    report = f"{site.reports}/corp-compromised-content.json (its summary), .owners.jsonl and .csv on {HOST}"

    output, counts = site.play("rotate_compromised_key.yml", "--check", extra=compromised)
    lines = summary(output, ROTATION)
    assert lines == [
        url,
        f"  active key: {first} (0 days old); a real run replaces it (compromised) by a new key",
        f"  compromised keys: {first}",
        f"  would restart: {HOST}",
        f"  compromise report (a real run writes it): {report}",
        "  content still to be republished: 0 item(s) (0 republished); owner notices a real run sends: 0",
    ], output
    assert not site.reports.exists()

    output, counts = site.play("rotate_compromised_key.yml", extra=compromised)
    keys = cluster_keys(site)
    second = next(k["id"] for k in keys if k["status"] == "active")
    assert second != first and {k["id"]: k["status"] for k in keys}[first] == "compromised"
    assert summary(output, ROTATION) == [
        url,
        f"  active key: {second} (new; replaces {first}, compromised)",
        f"  compromised keys: {first}",
        f"  restarted: {HOST}",
        f"  compromise report: {report}",
        "  content still to be republished: 0 item(s) (0 republished); owner notices sent by this run: 0",
    ], output
    assert (site.reports / "corp-compromised-content.json").exists()
    assert (site.reports / "corp-compromised-content.csv").exists()

    # Nothing left to do: the summary still says where things stand.
    output, counts = site.play("rotate_compromised_key.yml", extra=compromised)
    assert counts["changed"] == 0, output
    lines = summary(output, ROTATION)
    assert lines[1] == f"  active key: {second} (0 days old), kept"
    assert lines[2:4] == [f"  compromised keys: {first}", "  restarted: no host"], lines


def test_backup_summary_in_check_mode_real_run_and_rerun(site):
    tpd = site.backups / "corp.tpd"
    output, _ = site.play("backup_key.yml", "--check")
    lines = summary(output, BACKUP)
    assert lines[0] == f"corp: {tpd} on {HOST}, not known in check mode (no file yet), a real run writes it", output
    assert not tpd.exists()

    output, counts = site.play("backup_key.yml")
    size = tpd.stat().st_size
    lines = summary(output, BACKUP)
    assert lines[0].startswith(f"corp: {tpd} on {HOST}, {size} bytes ("), lines
    assert lines[0].endswith(", written by this run"), lines
    statuses = {k["id"]: k["status"] for k in cluster_keys(site)}
    listed = dict(item.split(" ") for item in lines[1].removeprefix("  keys ").split(";")[0].split(", "))
    assert listed == statuses, lines

    output, counts = site.play("backup_key.yml")
    assert counts["changed"] == 0, output
    lines = summary(output, BACKUP)
    assert lines[0].startswith(f"corp: {tpd} on {HOST}, {size} bytes (") and lines[0].endswith("), unchanged"), lines
