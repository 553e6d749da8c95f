"""The rmsops.rms.load_balancer role in front of a real root cluster.

A PostgreSQL configuration database, three rmsd nodes under supervisord (rmsops.rms.root_cluster
role, with rmsd from this test virtualenv) on 127.0.2.1-3, and HAProxy instances made by the role
on 127.0.2.100 and .101 with a certificate made here. Clients loop over new TLS connections while
members stop, restart, drain or join, and count the requests that failed.
"""

from __future__ import annotations

import csv
import datetime
import http.server
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from collections import Counter
from pathlib import Path
from typing import ClassVar, Self

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HAPROXY = "/usr/sbin/haproxy"
VENV = Path(sys.prefix)
NODES = {"node1": "127.0.2.1", "node2": "127.0.2.2", "node3": "127.0.2.3"}
BALANCERS = {"lb1": "127.0.2.100", "lb2": "127.0.2.101"}
OPERATOR = "127.0.0.1"  # the address this machine's connections to 127.0.2.x come from
OUTSIDER = "127.0.3.1"  # a client address outside the operator sources

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed (Debian package haproxy)")


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def make_certificate(path: Path) -> Path:
    """A self-signed certificate for the balancers' addresses; returns the PEM of the certificate alone."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rms load balancer test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(a))
                                                        for a in BALANCERS.values()]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    path.write_bytes(cert_pem + key_pem)
    path.chmod(0o600)
    ca = path.with_name("ca.pem")
    ca.write_bytes(cert_pem)
    return ca


def ask(sock: Path, command: str) -> str:
    """One command on an HAProxy CLI socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def tls_handshake(address: str, port: int, version: ssl.TLSVersion) -> str:
    """Handshake with exactly this TLS version, which the client side allows whatever its defaults."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        context.minimum_version = context.maximum_version = version
    with socket.create_connection((address, port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        return tls.version()


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
            for m in re.finditer(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE)}


class Deployment:
    def __init__(self, root: Path, database_url: str, database_password: str):
        self.root = root
        self.node_ports = {name: free_port(address) for name, address in NODES.items()}
        self.lb_ports = {name: free_port(address) for name, address in BALANCERS.items()}
        self.tls_pem = root / "tls" / "lb.pem"
        self.tls_pem.parent.mkdir()
        self.ca = make_certificate(self.tls_pem)
        self.database_url = database_url
        self.database_password = database_password
        self.key_password = "kp-" + secrets.token_hex(12)
        # Members of each balancer's group; tests change them and rewrite the inventory.
        self.groups = {"lb1_members": ["node1", "node2"], "lb2_members": ["node1"]}
        self.plays = 0

    # --- paths -----------------------------------------------------------------------------
    def lb_dir(self, lb: str) -> Path:
        return self.root / "lb" / lb

    def node_dir(self, node: str) -> Path:
        return self.root / "nodes" / node

    def url(self, lb: str) -> str:
        return f"https://{BALANCERS[lb]}:{self.lb_ports[lb]}/health"

    # --- Ansible ---------------------------------------------------------------------------
    def write_inventory(self) -> Path:
        nodes = {name: {"server_listen_address": address, "server_port": self.node_ports[name]}
                 for name, address in NODES.items()}
        for name in self.groups["lb1_members"]:
            nodes[name]["server_load_balancer_host"] = "lb1"
        balancers = {name: {"load_balancer_bind_address": address, "load_balancer_port": self.lb_ports[name],
                            "load_balancer_member_group": f"{name}_members"} for name, address in BALANCERS.items()}
        inventory = {"all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "rms_nodes": {"hosts": nodes, "vars": {
                    "server_base_dir": str(self.root / "nodes"),
                    # rmsd and supervisor of this test virtualenv; no install.
                    "server_venv_dir": str(VENV), "server_install_done": True,
                    "server_rmsd_python": sys.executable, "server_rmsd_ready": True,
                    "server_service_manager": "supervisord", "server_user": "root",
                }},
                "balancers": {"hosts": balancers, "vars": {
                    "load_balancer_base_dir": str(self.root / "lb"),
                    # The tests' clients connect from 127.0.0.1: operators, who also reach /health.
                    "load_balancer_operator_sources": [f"{OPERATOR}/32"],
                    "load_balancer_tls_certificate": str(self.tls_pem),
                    "load_balancer_service_manager": "daemon",
                }},
                **{group: {"hosts": {h: {} for h in hosts}} for group, hosts in self.groups.items()},
            }}}
        path = self.root / "inventory.yml"
        path.write_text(json.dumps(inventory, indent=1))
        return path

    def play(self, plays: list, *args: str, expect_rc: int = 0) -> tuple[str, dict]:
        self.plays += 1
        playbook = self.root / f"play-{self.plays}.yml"
        playbook.write_text(json.dumps(plays, indent=1))
        env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
                   ANSIBLE_RETRY_FILES_ENABLED="false")
        proc = subprocess.run([str(VENV / "bin" / "ansible-playbook"), "-i", str(self.write_inventory()),
                               str(playbook), *args], cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode != expect_rc:
            pytest.fail(f"ansible-playbook {playbook.name} {' '.join(args)} exited {proc.returncode}:\n{output}")
        assert self.key_password not in output
        # Waits for a node (started, restarted) print no line that reads like a failure.
        assert "FAILED - RETRYING" not in output, output
        return output, recap(output)

    def balance(self, *args: str, hosts: str = "balancers", extra: dict | None = None) -> tuple[str, dict]:
        return self.play([{"name": "Balancers", "hosts": hosts, "gather_facts": False, "vars": extra or {},
                           "roles": ["rmsops.rms.load_balancer"]}], *args)

    def cluster_vars(self) -> dict:
        return {"root_cluster_name": "rmslb", "root_cluster_database_url": self.database_url,
                "root_cluster_database_password": self.database_password,
                "root_cluster_key_password": self.key_password,
                "root_cluster_intranet_url": self.url("lb1").removesuffix("/health")}

    def cluster(self, *args: str) -> tuple[str, dict]:
        return self.play([{"name": "Root cluster", "hosts": "rms_nodes", "gather_facts": False, "roles": [{
            "role": "rmsops.rms.root_cluster", "vars": self.cluster_vars()}]}], *args)

    def member_state(self, member: str, states: list[str], *args: str, lb: str = "lb1", expect_rc: int = 0,
                     extra: dict | None = None) -> tuple[str, dict]:
        """member_state, once per state, run from node2's play and delegated to the balancer."""
        return self.play([{"name": "Member state", "hosts": "node2", "gather_facts": False, "tasks": [{
            "name": f"Set the state to {state}", "ansible.builtin.include_role": {
                "name": "rmsops.rms.load_balancer", "tasks_from": "member_state"},
            "vars": {"load_balancer_host": lb, "load_balancer_member": member, "load_balancer_member_state": state,
                     **(extra or {})}} for state in states]}], *args, expect_rc=expect_rc)

    # --- HAProxy and nodes -----------------------------------------------------------------
    def servers(self, lb: str) -> dict[str, dict]:
        """Status, current sessions and forced admin state of each member."""
        sock = self.lb_dir(lb) / "admin.sock"
        rows = csv.DictReader(ask(sock, "show stat").lstrip("# ").splitlines())
        found = {r["svname"]: {"status": r["status"], "sessions": int(r["scur"])}
                 for r in rows if r["pxname"] == "rmsd_nodes" and r["svname"] not in ("BACKEND", "FRONTEND")}
        state_lines = ask(sock, "show servers state rmsd_nodes").splitlines()
        fields = next(line for line in state_lines if line.startswith("# be_id"))[2:].split()
        for values in map(str.split, state_lines[1:]):
            if len(values) == len(fields):  # a server's line (the header starts with "#")
                row = dict(zip(fields, values))
                found[row["srv_name"]]["admin"] = int(row["srv_admin_state"])
        return found

    def master(self, lb: str) -> tuple[int, int]:
        """(pid, reloads) of the instance's master process."""
        m = re.search(r"^(\d+)\s+master\s+(\d+)", ask(self.lb_dir(lb) / "master.sock", "show proc"), re.MULTILINE)
        assert m, "no master process in show proc"
        return int(m.group(1)), int(m.group(2))

    def events(self, lb: str) -> str:
        """The last state changes of the members (the in-memory log holds requests too)."""
        lines = ask(self.lb_dir(lb) / "admin.sock", "show events log").splitlines()
        return "\n".join(line for line in lines if " Server " in line)

    def wait_status(self, lb: str, member: str, status: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while (now := self.servers(lb).get(member, {}).get("status")) != status:
            assert time.monotonic() < deadline, f"{lb}: {member} is {now}, not {status}\n{self.events(lb)}"
            time.sleep(0.2)

    def supervisorctl(self, node: str, *args: str) -> str:
        conf = self.node_dir(node) / "supervisord.conf"
        proc = subprocess.run([str(VENV / "bin" / "supervisorctl"), "-c", str(conf), *args],
                              capture_output=True, text=True, check=False, timeout=60)
        return proc.stdout

    def stop_everything(self) -> None:
        pidfiles = [self.lb_dir(lb) / "haproxy.pid" for lb in BALANCERS]
        pidfiles += [self.node_dir(node) / "supervisord.pid" for node in NODES]
        for pidfile in pidfiles:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        for pidfile in pidfiles:  # supervisord stops rmsd first; wait for both to be gone
            try:
                pid = int(pidfile.read_text())
            except (FileNotFoundError, ValueError):
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)


class Traffic:
    """Clients sending GET /health through a balancer, each request on a new TLS connection; with `posts`, each
    followed by a POST /certification without a token, which a node answers 401 (a POST that fails is never
    retried by the balancer: its failures show here)."""

    def __init__(self, url: str, ca: Path, clients: int = 2, posts: bool = False):
        self.url = url
        self.posts = posts
        self.context = ssl.create_default_context(cafile=str(ca))
        self.clients = clients
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.answered_by: Counter = Counter()
        self.posted = 0  # POSTs a node answered
        self.failures: list[str] = []

    def _loop(self) -> None:
        with httpx.Client(verify=self.context, timeout=15,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not self.stopping.is_set():
                try:
                    response = client.get(self.url)
                    outcome = response.json()["node"] if response.status_code == 200 else None
                    failure = None if outcome else f"{response.status_code} {response.text[:200]}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome, failure = None, repr(exc)
                with self.lock:
                    if failure:
                        self.failures.append(failure)
                    else:
                        self.answered_by[outcome] += 1
                if self.posts:
                    try:
                        response = client.post(self.url.replace("/health", "/certification"), json={"csr": "x"})
                        answered = response.status_code == 401
                        failure = None if answered else f"POST {response.status_code} {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        failure = f"POST {exc!r}"
                    with self.lock:
                        if failure:
                            self.failures.append(failure)
                        else:
                            self.posted += 1
                # Steady traffic that leaves the two CPUs to Ansible and the nodes.
                self.stopping.wait(0.01)

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.answered_by)

    def wait_answers(self, count: int = 20, timeout: float = 20) -> None:
        """Until `count` more requests succeeded, so the traffic really covers what happens next."""
        target = sum(self.snapshot().values()) + count
        deadline = time.monotonic() + timeout
        while sum(self.snapshot().values()) < target:
            assert time.monotonic() < deadline, f"traffic stalled: {self.failures[:5]}"
            time.sleep(0.05)

    def assert_no_failure(self) -> None:
        total = sum(self.answered_by.values())
        print(f"{total} requests through {self.url}, answered by {dict(self.answered_by)}, "
              f"{self.posted} POSTs answered, {len(self.failures)} failed")
        assert self.failures == [], f"{len(self.failures)} of {total + len(self.failures)} requests failed: " \
                                    f"{self.failures[:5]}"
        assert total >= 20, f"only {total} requests were sent"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, postgres_server):
    if not (VENV / "bin" / "supervisord").exists():
        pytest.fail(f"supervisor is not installed in {VENV} (the nodes run under supervisord)")
    root = tmp_path_factory.mktemp("lb")
    dep = Deployment(root, postgres_server.create_database("drms_config_lb"), postgres_server.password)
    try:
        dep.cluster()
        dep.balance("--limit", "lb1")
        yield dep
    finally:
        dep.stop_everything()


def test_https_round_trip_to_both_members(deployment):
    dep = deployment
    dep.wait_status("lb1", "node1", "UP")
    dep.wait_status("lb1", "node2", "UP")
    context = ssl.create_default_context(cafile=str(dep.ca))  # verifies chain and address
    nodes = set()
    with httpx.Client(verify=context) as client:
        for _ in range(6):
            response = client.get(dep.url("lb1"))
            assert response.status_code == 200
            assert response.json()["cluster"] == "rmslb"
            nodes.add(response.json()["node"])
    assert nodes == {"node1", "node2"}
    # The frontend speaks only TLS, 1.2 or newer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(dep.url("lb1").replace("https://", "http://"), timeout=5)
    assert tls_handshake(BALANCERS["lb1"], dep.lb_ports["lb1"], ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        tls_handshake(BALANCERS["lb1"], dep.lb_ports["lb1"], ssl.TLSVersion.TLSv1_1)

    lb_dir = dep.lb_dir("lb1")
    assert oct(lb_dir.stat().st_mode & 0o777) == "0o750"
    assert oct((lb_dir / "tls.pem").stat().st_mode & 0o777) == "0o600"
    assert oct((lb_dir / "haproxy.cfg").stat().st_mode & 0o777) == "0o640"
    assert (lb_dir / "tls.pem").read_bytes() == dep.tls_pem.read_bytes()


def test_rerun_and_check_change_nothing(deployment):
    dep = deployment
    before = dep.master("lb1")
    config = (dep.lb_dir("lb1") / "haproxy.cfg").read_text()
    for args in ((), ("--check", "--diff")):
        output, counts = dep.balance("--limit", "lb1", *args)
        assert counts["lb1"]["changed"] == 0, output
    assert dep.master("lb1") == before, "HAProxy was restarted or reloaded"

    # A check run with --diff shows a new member, and the reload a real run makes for it, and changes nothing.
    extra = {"load_balancer_members": [
        {"name": n, "address": NODES[n], "port": dep.node_ports[n]} for n in ("node1", "node2", "node3")]}
    output, counts = dep.balance("--limit", "lb1", "--check", "--diff", extra=extra)
    assert counts["lb1"]["changed"] == 2, output
    assert re.search(r"Reload the HAProxy master-worker daemon\][^\n]*\nchanged: \[lb1\]", output), output
    assert f"+    server node3 127.0.2.3:{dep.node_ports['node3']}" in output
    assert (dep.lb_dir("lb1") / "haproxy.cfg").read_text() == config
    assert dep.master("lb1") == before


def test_stopped_member_fails_no_request(deployment):
    dep = deployment
    dep.wait_status("lb1", "node2", "UP")
    try:
        with Traffic(dep.url("lb1"), dep.ca, posts=True) as traffic:
            traffic.wait_answers()
            dep.supervisorctl("node2", "stop", "rmsd")
            dep.wait_status("lb1", "node2", "DOWN")
            after_down = traffic.snapshot()
            traffic.wait_answers()
        traffic.assert_no_failure()
        assert traffic.snapshot()["node2"] == after_down["node2"], "a stopped node answered"
    finally:
        dep.supervisorctl("node2", "start", "rmsd")
    dep.wait_status("lb1", "node2", "UP")


def test_added_member_reloads_without_failed_request(deployment):
    """A second instance on the same machine: it starts beside lb1, then a member joins its group."""
    dep = deployment
    lb1_before = dep.master("lb1")
    output, counts = dep.balance("--limit", "lb2", "--check")
    assert counts["lb2"]["changed"] > 0, output
    assert not dep.lb_dir("lb2").exists(), "check mode created the instance"
    output, counts = dep.balance("--limit", "lb2")
    assert counts["lb2"]["changed"] > 0, output
    dep.wait_status("lb2", "node1", "UP")
    assert set(dep.servers("lb2")) == {"node1"}
    pid, reloads = dep.master("lb2")

    dep.groups["lb2_members"] = ["node1", "node3"]
    with Traffic(dep.url("lb2"), dep.ca, posts=True) as traffic:
        traffic.wait_answers()
        output, counts = dep.balance("--limit", "lb2", "--diff")
        dep.wait_status("lb2", "node3", "UP")
        traffic.wait_answers(40)
    traffic.assert_no_failure()
    assert counts["lb2"]["changed"] > 0, output
    assert f"+    server node3 127.0.2.3:{dep.node_ports['node3']}" in output
    assert dep.master("lb2") == (pid, reloads + 1), "not reloaded by the same master"
    assert traffic.answered_by["node3"] > 0
    assert dep.master("lb1") == lb1_before, "the other instance on the machine was touched"


class SlowMember(http.server.BaseHTTPRequestHandler):
    """A member whose GET /slc (a path the balancer passes to anyone) is held until the test releases it, so a
    drain has a session to wait for."""

    arrived = threading.Event()  # a /slc request reached the member
    release = threading.Event()  # the test lets it answer

    def do_GET(self):
        if self.path == "/slc":
            self.arrived.set()
            # Bounded only so that a failed test does not leave the request hanging.
            self.release.wait(EVENT_TIMEOUT)
        body = json.dumps({"status": "ok", "node": "slow"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except ConnectionError:
            pass  # HAProxy's health check hangs up once it has read the status

    def log_message(self, *args):
        pass


# How long an event may take before the test gives up: a bound against hanging, not a measure.
EVENT_TIMEOUT = 300


def test_drain_waits_for_the_last_session(deployment):
    """lb2 in front of a member holding a request: drain gives up after its timeout, and waits for the request
    to end when given the time. Each step waits on the event itself (the request reaching the member, the
    drain setting its state), so a busy machine only makes it slower."""
    dep = deployment
    SlowMember.arrived.clear()
    SlowMember.release.clear()
    server = http.server.ThreadingHTTPServer(("127.0.2.9", 0), SlowMember)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answers = []
    try:
        # HAProxy's timeouts must outlast the held request, however long the playbooks take.
        dep.balance("--limit", "lb2", extra={
            "load_balancer_timeout_server": "10m", "load_balancer_timeout_client": "10m",
            "load_balancer_members": [{"name": "slow", "address": "127.0.2.9", "port": server.server_address[1]}]})
        dep.wait_status("lb2", "slow", "UP")
        context = ssl.create_default_context(cafile=str(dep.ca))

        def slow_request():
            try:
                url = dep.url("lb2").replace("/health", "/slc")
                answers.append(httpx.get(url, verify=context, timeout=EVENT_TIMEOUT).status_code)
            except httpx.HTTPError as exc:
                answers.append(repr(exc))

        request = threading.Thread(target=slow_request)
        request.start()
        assert SlowMember.arrived.wait(EVENT_TIMEOUT), "the slow request never reached the member"
        assert dep.servers("lb2")["slow"]["sessions"] == 1

        # The request is held: a drain with a short timeout gives up, whatever the time the playbook takes.
        output, _ = dep.member_state("slow", ["drain"], lb="lb2", expect_rc=2,
                                     extra={"load_balancer_drain_timeout": 1})
        assert "rmsd_nodes/slow still has 1 sessions after 1s" in output, output
        assert answers == [], "the request ended while it was held"

        # Ready again (the request still held), so that the next drain's first step shows: it sets the state.
        assert ask(dep.lb_dir("lb2") / "admin.sock", "set server rmsd_nodes/slow state ready").strip() == ""
        drained: list = []
        drain = threading.Thread(target=lambda: drained.append(dep.member_state("slow", ["drain"], lb="lb2")))
        drain.start()
        deadline = time.monotonic() + EVENT_TIMEOUT
        while not dep.servers("lb2")["slow"]["admin"] & 0x08:  # forced drain: the drain is under way
            assert drain.is_alive(), "the drain ended without draining"
            assert time.monotonic() < deadline, "the drain never set the member's state"
            time.sleep(0.1)
        # The drain is waiting for the held request: it must not end before the request does.
        assert drain.is_alive() and answers == []
        SlowMember.release.set()
        drain.join(EVENT_TIMEOUT)
        request.join(EVENT_TIMEOUT)
        assert drained, "the drain failed"
        assert answers == [200]
        assert dep.servers("lb2")["slow"]["sessions"] == 0
    finally:
        SlowMember.release.set()
        server.shutdown()


def test_drain_from_the_members_play(deployment):
    dep = deployment
    dep.wait_status("lb1", "node2", "UP")
    with Traffic(dep.url("lb1"), dep.ca, posts=True) as traffic:
        traffic.wait_answers()
        # Twice: the second one finds the member drained and changes nothing.
        output, counts = dep.member_state("node2", ["drain", "drain"])
        assert re.findall(r"drain on lb1\] \*+\n(\w+): \[node2 -> lb1\]", output) == ["changed", "ok"], output
        assert counts["node2"]["changed"] == 1, output
        drained = dep.servers("lb1")["node2"]
        assert drained["status"] == "DRAIN" and drained["admin"] & 0x08 and drained["sessions"] == 0, drained
        at_drain = traffic.snapshot()
        traffic.wait_answers(40)
        assert traffic.snapshot()["node2"] == at_drain["node2"], "a drained node got new requests"

        output, counts = dep.member_state("node2", ["ready"], "--check")
        assert counts["node2"]["changed"] == 1, output
        assert dep.servers("lb1")["node2"]["status"] == "DRAIN", "check mode changed the state"

        output, counts = dep.member_state("node2", ["ready"])
        assert counts["node2"]["changed"] == 1, output
        assert dep.servers("lb1")["node2"]["admin"] == 0
        dep.wait_status("lb1", "node2", "UP")
        at_ready = traffic.snapshot()
        traffic.wait_answers(20)
        assert traffic.snapshot()["node2"] > at_ready["node2"], "the node takes no traffic after ready"
    traffic.assert_no_failure()

    output, _ = dep.member_state("node-unknown", ["drain"], expect_rc=2)
    assert "has no member named node-unknown" in output


def test_restart_drains_the_node_first(deployment):
    """A changed node configuration restarts rmsd; the server role drains it on lb1 first. node3 has no
    server_load_balancer_host and restarts without draining."""
    dep = deployment
    dep.wait_status("lb1", "node2", "UP")
    rmsd_pids = {node: dep.supervisorctl(node, "pid", "rmsd").strip() for node in ("node2", "node3")}
    statuses = []  # node2's status on lb1, each change
    done = threading.Event()

    def watch():
        while not done.is_set():
            status = dep.servers("lb1")["node2"]["status"]
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with Traffic(dep.url("lb1"), dep.ca, posts=True) as traffic:
        traffic.wait_answers()
        output, _ = dep.cluster("--limit", "node2,node3", "-e", "root_cluster_identity_audience=rms-lb-test")
        dep.wait_status("lb1", "node2", "UP")
        traffic.wait_answers()
    done.set()
    watcher.join()
    print("node2 on lb1:", " -> ".join(statuses))
    traffic.assert_no_failure()
    for node, pid in rmsd_pids.items():
        assert dep.supervisorctl(node, "pid", "rmsd").strip() != pid, f"rmsd of {node} was not restarted"
    assert re.search(r"TASK \[Drain the node on its load balancer: node3\] \*+\nskipping: \[node2\]", output), output
    drained = re.search(r"TASK \[rmsops\.rms\.load_balancer : Set the member's state on the balancer: "
                        r"node2 drain on lb1\] \*+\nchanged: \[node2 -> lb1\]", output)
    ready = re.search(r"node2 ready on lb1\] \*+\nchanged: \[node2 -> lb1\]", output)
    # node2 runs the restarts (run_once), each on the node's host: its own shows as [node2], node3's as delegated.
    restarts = [(m.group(1) or "node2", m.start()) for m in re.finditer(
        r"TASK \[rmsops\.rms\.server : Restart rmsd under supervisord\] \*+\nchanged: \[node2(?: -> (node\d))?\]",
        output)]
    # One node at a time: node2 drained, restarted, back in service, and only then node3 restarted.
    assert drained and ready and [node for node, _ in restarts] == ["node2", "node3"], output
    assert drained.start() < restarts[0][1] < ready.start() < restarts[1][1], output
    # The node was drained before it went down (the restart comes after the drain, above), and back in service
    # after. Whether HAProxy's checks saw it down depends on how fast it came back: not asserted.
    assert statuses[:2] == ["UP", "DRAIN"] and statuses[-1] == "UP", statuses
    assert dep.servers("lb1")["node2"]["admin"] == 0


def test_only_the_public_api_is_served_to_other_addresses(deployment):
    """A client outside load_balancer_operator_sources reaches the public API and nothing else: the nodes' own
    pages (the fleet's layout, versions) get a 404 problem document from the balancer; an operator gets them."""
    dep = deployment
    dep.wait_status("lb1", "node1", "UP")
    base = dep.url("lb1").removesuffix("/health")
    context = ssl.create_default_context(cafile=str(dep.ca))
    outsider = httpx.Client(base_url=base, verify=context, timeout=15,
                            transport=httpx.HTTPTransport(verify=context, local_address=OUTSIDER))
    operator = httpx.Client(base_url=base, verify=context, timeout=15)
    with outsider, operator:
        for path in ("/status", "/health", "/", "/openapi.json", "/docs", "/slc/", "/certification"):
            response = outsider.get(path)
            assert response.status_code == 404, (path, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert problem["status"] == 404 and "POST /certification" in problem["detail"], problem
            assert "version" not in response.text and "node" not in response.text
        assert outsider.get("/slc").json()["cluster"] == "rmslb"
        refused = outsider.post("/certification", json={"csr": "x"})  # reached a node: no token
        assert refused.status_code == 401 and refused.json()["error"] == "AuthenticationError"
        assert outsider.post("/health").status_code == 404

        assert operator.get("/health").json()["cluster"] == "rmslb"
        assert operator.get("/").json()["service"] == "rmsd"
        assert operator.get("/openapi.json").json()["info"]["title"] == "rmsd"
        assert operator.get("/status").headers["content-type"].startswith("text/html")  # the node's own page


class BrokenMember(socketserver.BaseRequestHandler):
    """A member that passes its health checks and closes every other connection without an answer, counting
    the requests it got by method."""

    received: ClassVar[Counter] = Counter()

    def handle(self):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        method, path = data.split(b" ", 2)[:2]
        if path == b"/health":
            body = b'{"status": "ok"}'
            self.request.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body)
            return
        self.received[method.decode()] += 1  # and no answer: the connection closes


def test_a_post_is_never_sent_twice_and_a_get_is_retried(deployment):
    """lb2 in front of a broken member and node1, taking turns: a POST that meets the broken member's empty
    answer fails (502) and is not sent to node1 as well (it might have certified or published already); a GET
    that meets it is answered by node1."""
    dep = deployment
    BrokenMember.received.clear()
    server = socketserver.ThreadingTCPServer(("127.0.2.8", 0), BrokenMember)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dep.balance("--limit", "lb2", extra={"load_balancer_members": [
            {"name": "broken", "address": "127.0.2.8", "port": server.server_address[1]},
            {"name": "node1", "address": NODES["node1"], "port": dep.node_ports["node1"]}]})
        dep.wait_status("lb2", "broken", "UP")
        dep.wait_status("lb2", "node1", "UP")
        context = ssl.create_default_context(cafile=str(dep.ca))
        base = dep.url("lb2").removesuffix("/health")
        # A new connection per request: on a kept-alive one, HAProxy closes the client's connection without an
        # answer instead of a 502 (the client's cue to retry, as after any keep-alive race).
        with httpx.Client(base_url=base, verify=context, timeout=30,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            posts = Counter(client.post("/certification", json={"csr": "x"}).status_code for _ in range(8))
            gets = Counter(client.get("/slc").status_code for _ in range(8))
        print(f"POST answers {dict(posts)}, GET answers {dict(gets)}, the broken member got {dict(BrokenMember.received)}")
        assert BrokenMember.received["POST"] > 0, "no POST met the broken member"
        # Each POST went to one member only: the broken one's were answered 502, node1's 401 (no token).
        assert posts == Counter({502: BrokenMember.received["POST"], 401: 8 - BrokenMember.received["POST"]})
        assert BrokenMember.received["GET"] > 0 and gets == Counter({200: 8})
    finally:
        server.shutdown()
        server.server_close()


def test_the_role_fails_when_another_process_answers_on_the_nodes_port(deployment):
    """node3's port answers GET /health with another instance id than node3's configuration holds (here: rmsd
    started from another configuration, whose file is then put back): the server role's health check fails and
    says that another process holds the port. Once node3 itself answers, the role passes again."""
    dep = deployment
    # node3's configuration as the inventory has it now (earlier tests change its balancer, and with it the
    # proxies the node trusts): the run below then has nothing to rewrite, and nothing restarts node3.
    dep.cluster("--limit", "node3")
    config_path = dep.node_dir("node3") / "rmsd.toml"
    own = config_path.read_text()
    own_id = tomllib.loads(own)["node"]["instance_id"]
    other_id = secrets.token_hex(16)
    try:
        config_path.write_text(own.replace(own_id, other_id))
        dep.supervisorctl("node3", "restart", "rmsd")
        url = f"http://{NODES['node3']}:{dep.node_ports['node3']}/health"
        assert wait_for_instance(url, other_id)
        config_path.write_text(own)  # what the role wrote, but not what the process on the port serves
        output, _ = dep.play([{"name": "Root cluster", "hosts": "node3", "gather_facts": False, "roles": [{
            "role": "rmsops.rms.root_cluster", "vars": dep.cluster_vars()}]}], expect_rc=2)
        assert re.search(rf"did not answer GET http://{re.escape(NODES['node3'])}:\d+/health with 200 from this node, "
                         rf"instance id {own_id} \(answer: 200 .*{other_id}", output), output
        assert "another process holds its port" in output
    finally:
        config_path.write_text(own)
        dep.supervisorctl("node3", "restart", "rmsd")
    url = f"http://{NODES['node3']}:{dep.node_ports['node3']}/health"
    assert wait_for_instance(url, own_id)
    output, counts = dep.cluster("--limit", "node3")
    assert counts["node3"]["failed"] == 0, output


def wait_for_instance(url: str, instance_id: str) -> bool:
    """Until the node at `url` answers with this instance id (a restart under supervisord takes a moment)."""
    deadline = time.monotonic() + EVENT_TIMEOUT  # a bound against hanging only
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).json().get("instance_id") == instance_id:
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    return False
