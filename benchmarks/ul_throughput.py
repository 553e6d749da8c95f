"""Use license (UL) issuance throughput of rmsd: `POST /licensing` straight at one node and through an
HAProxy balancer in front of 1, 2 and 3 nodes of one root cluster, beside `openssl speed rsa2048`
measured in the same run.

Sets everything up in a temporary directory and tears it down, also on Ctrl-C or failure: a throwaway
PostgreSQL (scripts/pgserver.py), a root cluster and its nodes (rmsd.admin), one `rmsd serve` process
per node on 127.0.3.1..3, a demo identity issuer, one user with a RAC and one publishing license, and
HAProxy on 127.0.3.100. Prints figures; asserts nothing beyond "the licenses it got are valid".

    .venv/bin/python benchmarks/ul_throughput.py [--duration 10] [--concurrency 8] [--nodes 1,2,3]
"""

import argparse
import contextlib
import csv
import importlib.util
import io
import ipaddress
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from jwcrypto import jwe, jwk, jws
from processes import stop_group
from rmsd.client import RmsClient, User, encrypt_content

from rmsd import admin, demo_issuer

REPO = Path(__file__).resolve().parents[1]
NODE_ADDRESSES = ("127.0.3.1", "127.0.3.2", "127.0.3.3")
BALANCER_ADDRESS = "127.0.3.100"
CLUSTER = "bench"
SUBJECT = "alice@example.com"
COST_NOTE = (
    "Each UL costs the node one RSA-2048 sign (RS256 over the UL), one RSA-OAEP unwrap of the PL's content\n"
    "key (a private-key operation like a sign) and one RSA-OAEP wrap to the user's RAC key (public-key, cheap),\n"
    "plus three signature verifications (bearer token, RAC, PL). RSA ceiling = openssl sign/s / 2 per UL."
)


def load_pgserver():
    # The project's throwaway PostgreSQL helper lives in scripts/ (standard library only).
    spec = importlib.util.spec_from_file_location("pgserver", REPO / "scripts" / "pgserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- processes --------------------------------------------------------------------------------------


class Processes:
    """Every child process started here, each in its own session, so all of it can be stopped."""

    def __init__(self):
        self.running: list[subprocess.Popen] = []

    def start(self, argv: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.running.append(process)
        return process

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        stop_group(process)

    def stop_all(self) -> None:
        for process in reversed(self.running):
            self.stop(process)
        self.running.clear()


def rmsd_command() -> list[str]:
    script = Path(sys.executable).with_name("rmsd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rmsd.cli"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process and its live children, a node's worker processes (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    workers = [int(p) for p in children.read_text().split()] if children.exists() else []
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(cpu_seconds(w) for w in workers)


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def refuse_if_taken(address: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError as err:
            raise SystemExit(f"{address}:{port} is in use ({err.strerror}); stop what listens there or pick "
                             "another port with --node-port / --balancer-port") from None


def wait_for(url: str, process: subprocess.Popen, log_path: Path, verify=True, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")


# --- openssl speed ----------------------------------------------------------------------------------


def openssl_speed(seconds: int, processes: int = 1) -> dict:
    argv = ["openssl", "speed", "-seconds", str(seconds)]
    if processes > 1:
        argv += ["-multi", str(processes)]
    out = subprocess.run([*argv, "rsa2048"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"^rsa\s+2048 bits\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)\s*$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"cannot read `{' '.join(argv)} rsa2048` output:\n{out}")
    return {"processes": processes, "sign_per_s": float(match[1]), "verify_per_s": float(match[2])}


# --- HAProxy ----------------------------------------------------------------------------------------


def self_signed_pem(directory: Path) -> tuple[Path, Path]:
    """A certificate for the balancer address: (PEM with chain + key for HAProxy, CA file for clients)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rmsd benchmark balancer")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(BALANCER_ADDRESS))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    combined, ca = directory / "balancer.pem", directory / "balancer-ca.pem"
    fd = os.open(combined, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert_pem + key_pem)
    ca.write_bytes(cert_pem)
    return combined, ca


def haproxy_config(nodes: list[tuple[str, str, int]], port: int, socket_path: Path, tls_pem: Path | None) -> str:
    bind = f"bind {BALANCER_ADDRESS}:{port}" + (f" ssl crt {tls_pem}" if tls_pem else "")
    servers = "\n".join(f"    server {name} {address}:{node_port} check inter 1s fall 2 rise 1"
                        for name, address, node_port in nodes)
    return f"""global
    maxconn 4096
    nbthread 1
    stats socket {socket_path} mode 600 level admin

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend rms
    {bind}
    default_backend rms_nodes

backend rms_nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
{servers}
"""


def haproxy_stats(socket_path: Path) -> dict[str, dict]:
    """Per-server rows of `show stat` (status, hrsp_2xx, ...), keyed by server name."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(socket_path))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
    return {row["svname"]: row for row in rows if row["pxname"] == "rms_nodes" and row["svname"] != "BACKEND"}


class Balancer:
    def __init__(self, processes: Processes, directory: Path, port: int, tls: bool):
        self.processes, self.directory, self.port = processes, directory, port
        self.socket_path = directory / "haproxy.sock"
        self.tls_pem, self.ca_file = self_signed_pem(directory) if tls else (None, None)
        self.process: subprocess.Popen | None = None
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://{BALANCER_ADDRESS}:{port}"

    def verify(self):
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    def start(self, nodes: list[tuple[str, str, int]]) -> None:
        self.stop()
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxy_config(nodes, self.port, self.socket_path, self.tls_pem))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=False, capture_output=True,
                               text=True)
        if check.returncode:
            raise RuntimeError(f"haproxy rejects {config}:\n{check.stdout}{check.stderr}")
        log = self.directory / "haproxy.log"
        self.process = self.processes.start(["haproxy", "-db", "-f", str(config)], log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # every member must pass its health check before the load starts
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited {self.process.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                stats = haproxy_stats(self.socket_path)
                if len(stats) == len(nodes) and all(row["status"] == "UP" for row in stats.values()):
                    wait_for(f"{self.url}/health", self.process, log, verify=self.verify())
                    return
            time.sleep(0.2)
        raise RuntimeError(f"not every node became UP in haproxy within 20s:\n{log.read_text()[-4000:]}")

    def answered(self) -> dict[str, int]:
        return {name: int(row["hrsp_2xx"] or 0) for name, row in haproxy_stats(self.socket_path).items()}

    def stop(self) -> None:
        if self.process is not None:
            Processes.stop(self.process)
            self.process = None


# --- load ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    nodes: int
    target: str
    url: str
    concurrency: int
    duration_s: float
    ok: int = 0
    failed: int = 0
    ul_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    node_cpu_ms_per_ul: float = 0.0
    client_cpu_ms_per_ul: float = 0.0
    machine_busy_pct: float = 0.0
    answered_by: dict = field(default_factory=dict)
    first_error: str | None = None
    verified_ul: bool = False
    sample_ul: str | None = field(default=None, repr=False)


def generate_load(run: Run, body: bytes, token: str, warmup: float, node_pids: list[int], verify=True) -> Run:
    """`concurrency` keep-alive clients post the same licensing request back to back; requests started
    and finished inside the measuring window count, those of the warm-up do not."""
    stop = threading.Event()
    window: list[float] = []  # [start, end] once known
    results: list[list[tuple[float, float, bool]]] = [[] for _client in range(run.concurrency)]
    errors: list[str] = []
    samples: list[str] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def client(slot: list):
        with httpx.Client(base_url=run.url, timeout=30.0, verify=verify) as http:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = http.post("/licensing", content=body, headers=headers)
                    ok = response.status_code == 200
                    if ok and not samples:
                        samples.append(response.json()["ul"])
                    elif not ok and len(errors) < 3:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as err:
                    ok = False
                    if len(errors) < 3:
                        errors.append(f"{type(err).__name__}: {err}")
                slot.append((started, time.perf_counter(), ok))

    threads = [threading.Thread(target=client, args=(slot,), daemon=True) for slot in results]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warmup)
        cpu_before = sum(cpu_seconds(pid) for pid in node_pids), time.process_time(), machine_busy()
        window.append(time.perf_counter())
        time.sleep(run.duration_s)
        window.append(time.perf_counter())
        cpu_after = sum(cpu_seconds(pid) for pid in node_pids), time.process_time(), machine_busy()
    finally:
        stop.set()
        for thread in threads:
            thread.join(35)

    inside = [(end - start, ok) for slot in results for start, end, ok in slot
              if window[0] <= start and end <= window[1]]
    latencies = sorted(latency * 1000 for latency, ok in inside if ok)
    run.ok = len(latencies)
    run.failed = sum(1 for _latency, ok in inside if not ok)
    elapsed = window[1] - window[0]
    run.ul_per_s = run.ok / elapsed
    if len(latencies) >= 2:
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        run.p50_ms, run.p95_ms = cuts[49], cuts[94]
    completed = max(len(inside), 1)
    run.node_cpu_ms_per_ul = (cpu_after[0] - cpu_before[0]) * 1000 / completed
    run.client_cpu_ms_per_ul = (cpu_after[1] - cpu_before[1]) * 1000 / completed
    busy = cpu_after[2][0] - cpu_before[2][0], cpu_after[2][1] - cpu_before[2][1]
    run.machine_busy_pct = 100 * busy[0] / max(busy[1], 1)
    run.first_error = errors[0] if errors else None
    run.sample_ul = samples[0] if samples else None
    return run


# --- verification with another JOSE library than the issuer's ------------------------------------------


def verify_ul(ul: str, slc_pem: str, user: User, pl_id: str, content_key: bytes, blob: bytes) -> None:
    """Check a UL with jwcrypto: signature by the cluster's SLC key, claims, and that the content key
    it wraps to the user's RAC key opens the content."""
    slc_public = x509.load_pem_x509_certificate(slc_pem.encode()).public_key()
    token = jws.JWS()
    token.deserialize(ul)
    token.verify(jwk.JWK.from_pem(slc_public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)), alg="RS256")
    if token.jose_header.get("typ") != "rmsd-ul+jws":
        raise AssertionError(f"UL typ is {token.jose_header.get('typ')!r}")
    claims = json.loads(token.payload)
    if claims["sub"] != user.subject or claims["pl_id"] != pl_id or claims["exp"] <= time.time():
        raise AssertionError(f"UL claims do not match the request: {claims['sub']}, {claims['pl_id']}")
    user_key = jwk.JWK.from_pem(user.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    wrapped = jwe.JWE()
    wrapped.allowed_algs = ["RSA-OAEP-256", "A256GCM"]
    wrapped.deserialize(claims["wrapped_key"], key=user_key)
    if wrapped.payload != content_key:
        raise AssertionError("the UL's wrapped content key is not the published one")
    AESGCM(wrapped.payload).decrypt(blob[:12], blob[12:], None)


# --- the benchmark -------------------------------------------------------------------------------------


@dataclass
class Deployment:
    directory: Path
    processes: Processes
    database_url: str
    database_password: str
    key_password: str
    issuer_dir: Path
    node_port: int
    workers: int = 1
    nodes: list = field(default_factory=list)  # (name, address, port, process)

    def start_node(self) -> tuple[str, str, int, subprocess.Popen]:
        index = len(self.nodes) + 1
        name, address = f"node{index}", NODE_ADDRESSES[index - 1]
        etc = self.directory / "etc"
        result = admin.ensure_server(
            cluster=CLUSTER, name=name, database_url=self.database_url, database_password=self.database_password,
            key_password=self.key_password, listen_address=address, port=self.node_port,
            config_path=str(etc / f"{name}.toml"), secret_path=str(etc / f"{name}.secret"),
            identity_issuer=demo_issuer.ISSUER, identity_audience=demo_issuer.AUDIENCE,
            identity_jwks_uri=demo_issuer.jwks_uri(self.issuer_dir), workers=self.workers,
        )
        config_path = result.facts["server"]["config_path"]
        node = tomllib.loads(Path(config_path).read_text())["node"]
        log = self.directory / f"{name}.log"
        process = self.processes.start([*rmsd_command(), "serve", "--config", config_path], log)
        wait_for(f"http://{node['listen_address']}:{node['port']}/health", process, log)
        self.nodes.append((name, node["listen_address"], node["port"], process))
        return self.nodes[-1]


def benchmark(args, directory: Path, processes: Processes, pgserver) -> dict:
    for address in NODE_ADDRESSES[: max(args.nodes)]:
        refuse_if_taken(address, args.node_port)
    refuse_if_taken(BALANCER_ADDRESS, args.balancer_port)
    cores = os.cpu_count()
    busy_before = busy_percent(2.0)
    print(f"openssl speed rsa2048 ({args.openssl_seconds} s per operation) ...", file=sys.stderr)
    speed = [openssl_speed(args.openssl_seconds)]
    if cores and cores > 1:
        speed.append(openssl_speed(args.openssl_seconds, cores))

    print("setting up PostgreSQL, the cluster, the issuer and the user ...", file=sys.stderr)
    pg = pgserver.PostgresServer()  # its own temporary directory, which the postgres user may enter
    try:
        pg.start()
        result = _measure(args, directory, processes, pg, speed, cores)
        result["machine"]["busy_before_pct"] = busy_before
        return result
    finally:
        processes.stop_all()  # nodes first: they hold connections to the database
        pg.stop()


def _measure(args, directory, processes, pg, speed, cores) -> dict:
    key_password = secrets.token_urlsafe(24)
    database_url = pg.create_database("rms_bench")
    balancer_url = f"{'https' if args.tls else 'http'}://{BALANCER_ADDRESS}:{args.balancer_port}"
    admin.ensure_cluster(name=CLUSTER, database_url=database_url, database_password=pg.password, role="root",
                         key_password=key_password, intranet_url=balancer_url)
    issuer_dir = directory / "issuer"
    demo_issuer.init(issuer_dir)
    deployment = Deployment(directory, processes, database_url, pg.password, key_password, issuer_dir,
                            args.node_port, args.workers)
    balancer = Balancer(processes, directory, args.balancer_port, args.tls)

    first = deployment.start_node()
    token = demo_issuer.token(issuer_dir, SUBJECT, ttl=3600)
    user = User.new(SUBJECT, token)
    client = RmsClient(f"http://{first[1]}:{first[2]}")
    client.certify(user)
    content_key, blob = encrypt_content(b"benchmark content " + os.urandom(64))
    published = client.publish(user, f"bench-{uuid.uuid4().hex[:8]}", content_key, {"group:readers": ["VIEW"]})
    slc_pem = client.slc()["chain"][0]
    rmsd_version = client.health().get("version", "?")
    client.license(user, published["pl"])  # one UL before the load: the request is right
    body = json.dumps({"pl": published["pl"], "rac": user.rac_pem}).encode()

    runs: list[Run] = []
    for count in sorted(set(args.nodes)):
        while len(deployment.nodes) < count:
            deployment.start_node()
        members = deployment.nodes[:count]
        name, address, port, process = members[-1]
        print(f"{count} node(s): {args.duration:g} s straight at {name} ...", file=sys.stderr)
        runs.append(generate_load(Run(count, f"direct {name}", f"http://{address}:{port}", args.concurrency,
                                      args.duration), body, token, args.warmup, [process.pid]))
        balancer.start([(n, a, p) for n, a, p, _proc in members])
        print(f"{count} node(s): {args.duration:g} s through HAProxy ...", file=sys.stderr)
        before = balancer.answered()
        run = generate_load(Run(count, f"haproxy x{count}", balancer.url, args.concurrency, args.duration),
                            body, token, args.warmup, [proc.pid for _n, _a, _p, proc in members],
                            verify=balancer.verify())
        run.answered_by = {n: c - before.get(n, 0) for n, c in balancer.answered().items()}
        runs.append(run)
        balancer.stop()

    for run in runs:
        if run.sample_ul:
            verify_ul(run.sample_ul, slc_pem, user, published["pl_id"], content_key, blob)
            run.verified_ul = True
    return {
        "machine": {"cores": cores, "rmsd": rmsd_version, "python": platform.python_version(),
                    "openssl": tool_version("openssl", "version"), "haproxy": tool_version("haproxy", "-v")},
        "openssl_speed_rsa2048": speed,
        "balancer_tls": args.tls,
        "workers": args.workers,
        "warmup_s": args.warmup,
        "runs": [{k: v for k, v in asdict(run).items() if k != "sample_ul"} for run in runs],
    }


def tool_version(*argv: str) -> str:
    """`OpenSSL 3.0.22 ...` -> `OpenSSL 3.0.22`; `HAProxy version 2.6.12-1 ...` -> `HAProxy 2.6.12-1`."""
    words = [w for w in subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()
             if w != "version"]
    return f"{words[0]} {words[1]}"


def busy_percent(seconds: float) -> float:
    """How busy all cores are over `seconds` (other work on the machine skews every figure)."""
    before = machine_busy()
    time.sleep(seconds)
    after = machine_busy()
    return 100 * (after[0] - before[0]) / max(after[1] - before[1], 1)


def report(result: dict) -> str:
    machine, speed = result["machine"], result["openssl_speed_rsa2048"]
    single = speed[0]["sign_per_s"]
    everything = speed[-1]["sign_per_s"]
    scaling = everything / single
    lines = [
        "rmsd use license (UL) issuance throughput: POST /licensing",
        (f"machine: {machine['cores']} cores, rmsd {machine['rmsd']}, Python {machine['python']}, "
         f"{machine['openssl']}, {machine['haproxy']}"),
        f"machine busy before the run: {machine['busy_before_pct']:.0f}% of all cores"
        + (" -- other work is running; it skews every figure below" if machine["busy_before_pct"] > 10 else ""),
        "",
        "openssl speed rsa2048 (same run):",
    ]
    for entry in speed:
        lines.append(f"  {entry['processes']} process(es): {entry['sign_per_s']:10.1f} sign/s "
                     f"{entry['verify_per_s']:11.1f} verify/s")
    lines += [
        "",
        COST_NOTE,
        (f"RSA ceiling: {single / 2:.0f} UL/s on one core, {everything / 2:.0f} UL/s on all {machine['cores']} cores "
         f"(RSA scales x{scaling:.2f} from 1 to {speed[-1]['processes']} processes here)."),
        "",
        f"Caveat: the load generator (Python threads, keep-alive) runs on the same {machine['cores']} cores as the",
        (f"nodes, PostgreSQL and HAProxy; each node runs {result.get('workers', 1)} worker process(es). More nodes "
        "than cores cannot add"),
        "throughput here; the figures show the per-UL cost, not what a fleet of separate hosts would reach.",
        f"Balancer: HAProxy {'TLS' if result['balancer_tls'] else 'plain HTTP'}, roundrobin, health check GET /health.",
        "",
    ]
    header = (f"{'nodes':>5}  {'target':<12} {'conc':>4} {'UL/s':>8} {'per node':>8} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'ok':>6} {'failed':>6} {'node CPU':>8} {'client':>7} {'busy':>5} {'of RSA':>6}  answered by")
    units = (f"{'':>5}  {'':<12} {'':>4} {'':>8} {'UL/s':>8} {'':>7} {'':>7} {'':>6} {'':>6} "
             f"{'ms/UL':>8} {'ms/UL':>7} {'%':>5} {'1 core':>6}")
    lines += [header, units, "-" * len(header)]
    for run in result["runs"]:
        answered = " ".join(f"{n}={c}" for n, c in run["answered_by"].items()) or "-"
        lines.append(
            f"{run['nodes']:>5}  {run['target']:<12} {run['concurrency']:>4} {run['ul_per_s']:>8.1f} "
            f"{run['ul_per_s'] / run['nodes'] if run['target'].startswith('haproxy') else run['ul_per_s']:>8.1f} "
            f"{run['p50_ms']:>7.1f} {run['p95_ms']:>7.1f} {run['ok']:>6} {run['failed']:>6} "
            f"{run['node_cpu_ms_per_ul']:>8.2f} {run['client_cpu_ms_per_ul']:>7.2f} {run['machine_busy_pct']:>5.0f} "
            f"{100 * run['ul_per_s'] / (single / 2):>5.1f}%  {answered}"
        )
    lines += [
        "",
        "per node UL/s: direct = the node's own rate; haproxy = UL/s divided by the number of nodes.",
        f"node CPU ms/UL: CPU time of the rmsd processes per completed request ({2000 / single:.2f} ms of it is RSA);",
        "client ms/UL: the load generator's CPU per request; busy %: all cores, whole machine;",
        "answered by: 2xx responses per node in HAProxy's counters (warm-up included).",
    ]
    failures = [run for run in result["runs"] if run["failed"]]
    for run in failures:
        lines.append(f"failures in {run['target']} ({run['nodes']} nodes): {run['first_error']}")
    verified = sum(run["verified_ul"] for run in result["runs"])
    lines.append(f"ULs verified with jwcrypto (signature, claims, wrapped key opens the content): "
                 f"one from each of {verified}/{len(result['runs'])} runs.")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent keep-alive clients (default 8)")
    p.add_argument("--nodes", default="1,2,3", help="node counts to measure, from 1 to 3 (default 1,2,3)")
    p.add_argument("--tls", action="store_true", help="terminate TLS at HAProxy (self-signed certificate)")
    p.add_argument("--node-port", type=int, default=18080, help="port of every node on 127.0.3.x (default 18080)")
    p.add_argument("--balancer-port", type=int, default=18000, help="HAProxy port on 127.0.3.100 (default 18000)")
    p.add_argument("--openssl-seconds", type=int, default=3, help="seconds per openssl speed operation (default 3)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of every node (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs, configuration)")
    args = p.parse_args(argv)
    try:
        args.nodes = [int(n) for n in args.nodes.split(",")]
    except ValueError:
        p.error("--nodes takes a comma-separated list such as 1,2,3")
    if not args.nodes or not all(1 <= n <= len(NODE_ADDRESSES) for n in args.nodes):
        p.error(f"--nodes must be between 1 and {len(NODE_ADDRESSES)}")
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0 or args.workers < 1:
        p.error("--concurrency must be at least 1, --duration positive, --warmup not negative")
    return args


def interrupt(_signum, _frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("openssl", "haproxy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install {tool})")
    pgserver = load_pgserver()
    # SIGTERM (and SIGINT even when started with it ignored) take the way out of Ctrl-C: everything
    # started here is stopped.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    directory = Path(tempfile.mkdtemp(prefix="rmsd-bench-"))
    processes = Processes()
    try:
        result = benchmark(args, directory, processes, pgserver)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()
        if args.keep:
            print(f"working directory kept: {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
