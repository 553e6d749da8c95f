"""Use license (UL) throughput of one rmsd node under a realistic mix, measured with wrk: many users, each
with a RAC of their own, asking for licenses to many documents picked by a Zipf law, so that the node's
verify-once caches see what they would in production. Beside it the single-request case (the same user and
document every time: every cache answers), labelled best case, with 1 and 2 worker processes.

Sets everything up in a temporary directory and tears it down, also on Ctrl-C or failure: a throwaway
PostgreSQL (scripts/pgserver.py), a root cluster, a demo identity issuer, the users' RACs and the documents'
PLs (their issuance rates are figures too), then for each worker count a real `rmsd serve` on 127.0.40.1.
wrk (Debian package wrk) runs benchmarks/ul_mix.lua; the Python client checks sample licenses with jwcrypto.

    .venv/bin/python benchmarks/ul_mix.py [--users 1000] [--documents 10000] [--workers 1,2] [--duration 10]
"""

import argparse
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from pathlib import Path

import ul_throughput as ul  # the UL benchmark's helpers, a script beside this one (its folder is on sys.path)
from rmsd.client import RmsClient, User, encrypt_content

from rmsd import admin, demo_issuer

HERE = Path(__file__).resolve().parent
ADDRESS = "127.0.40.1"
CLUSTER = "mix"
CACHES = ("token", "rac", "pl")




def load_average() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"load average {one}, {five}, {fifteen}"


def in_parallel(items: list, work, concurrency: int) -> float:
    """Run `work(item)` for every item on `concurrency` threads; the seconds it took."""
    queue = list(reversed(items))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker():
        while True:
            with lock:
                if not queue or errors:
                    return
                item = queue.pop()
            try:
                work(item)
            except BaseException as err:  # noqa: BLE001 (reported below)
                errors.append(err)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


class Node:
    """One `rmsd serve` of the cluster with a given number of workers, restarted for each measurement so that
    its cache figures are those of that measurement alone (warm-up included)."""

    def __init__(self, args, directory: Path, processes, database_url: str, database_password: str,
                 key_password: str, issuer_dir: Path):
        self.args, self.directory, self.processes = args, directory, processes
        self.admin_args = {"database_url": database_url, "database_password": database_password,
                           "key_password": key_password}
        self.issuer_dir = issuer_dir
        self.url = f"http://{ADDRESS}:{args.node_port}"
        self.process = None
        self.log: Path | None = None

    def start(self, workers: int, label: str) -> None:
        etc = self.directory / "etc"
        result = admin.ensure_server(
            cluster=CLUSTER, name="node1", listen_address=ADDRESS, port=self.args.node_port,
            config_path=str(etc / "node1.toml"), secret_path=str(etc / "node1.secret"),
            identity_issuer=demo_issuer.ISSUER, identity_audience=demo_issuer.AUDIENCE,
            identity_jwks_uri=demo_issuer.jwks_uri(self.issuer_dir), workers=workers, **self.admin_args,
        )
        config_path = result.facts["server"]["config_path"]
        assert tomllib.loads(Path(config_path).read_text())["node"]["workers"] == workers
        self.log = self.directory / f"node-{workers}w-{label}.log"
        self.process = self.processes.start([*ul.rmsd_command(), "serve", "--config", config_path], self.log)
        ul.wait_for(f"{self.url}/health", self.process, self.log)
        # Every worker up: the supervisor logs the count once all of them are ready.
        deadline = time.monotonic() + 60
        while f"with {workers} workers" not in self.log.read_text() and workers > 1:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"not every worker started:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> dict[str, tuple[int, int]]:
        """Stop the node; each cache's hits and misses, summed over its workers (from their last log line)."""
        ul.Processes.stop(self.process)
        totals = {name: [0, 0] for name in CACHES}
        for line in self.log.read_text().splitlines():
            if " caches: " not in line:
                continue
            for name, hits, misses in re.findall(r"(\w+) hits=(\d+) misses=(\d+)", line):
                totals[name][0] += int(hits)
                totals[name][1] += int(misses)
        return {name: (hits, misses) for name, (hits, misses) in totals.items()}


def write_load_files(directory: Path, users: list[User], pls: list[str]) -> Path:
    folder = directory / "load"
    folder.mkdir(exist_ok=True)
    with open(folder / "users.tsv", "w") as f:
        f.writelines(f"{user.token}\t{json.dumps(user.rac_pem)[1:-1]}\n" for user in users)
    (folder / "documents.txt").write_text("".join(f"{pl}\n" for pl in pls))
    return folder


def run_wrk(args, url: str, folder: Path, mode: str, seconds: float, node_pid: int) -> dict:
    argv = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{seconds:g}s", "--timeout", "30s",
            "-s", str(HERE / "ul_mix.lua"), url, "--", str(folder), mode, str(args.zipf)]
    cpu_before = ul.cpu_seconds(node_pid), resource.getrusage(resource.RUSAGE_CHILDREN), ul.machine_busy()
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    cpu_after = ul.cpu_seconds(node_pid), resource.getrusage(resource.RUSAGE_CHILDREN), ul.machine_busy()
    match = re.search(r"^WRK_RESULT (.*)$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    requests, duration_us, status_errors, socket_errors, timeouts, p50, p95, p99 = match[1].split()
    requests, failed = int(requests), int(status_errors) + int(socket_errors) + int(timeouts)
    ok = requests - int(status_errors)
    elapsed = int(duration_us) / 1e6
    client = (cpu_after[1].ru_utime + cpu_after[1].ru_stime) - (cpu_before[1].ru_utime + cpu_before[1].ru_stime)
    busy = cpu_after[2][0] - cpu_before[2][0], cpu_after[2][1] - cpu_before[2][1]
    return {
        "requests": requests, "ok": ok, "failed": failed, "ul_per_s": ok / elapsed, "p50_ms": float(p50),
        "p95_ms": float(p95), "p99_ms": float(p99),
        "node_cpu_ms_per_ul": (cpu_after[0] - cpu_before[0]) * 1000 / max(requests, 1),
        "client_cpu_ms_per_ul": client * 1000 / max(requests, 1),
        "machine_busy_pct": 100 * busy[0] / max(busy[1], 1),
    }


def measure(args, directory: Path, processes, pg) -> dict:
    ul.refuse_if_taken(ADDRESS, args.node_port)
    result: dict = {"load_before": load_average(), "busy_before_pct": ul.busy_percent(2.0), "cores": os.cpu_count()}
    print(f"openssl speed rsa2048 ({args.openssl_seconds} s) ...", file=sys.stderr)
    result["openssl"] = ul.openssl_speed(args.openssl_seconds)
    pg.start()
    key_password = secrets.token_urlsafe(24)
    database_url = pg.create_database("rms_mix")
    node_url = f"http://{ADDRESS}:{args.node_port}"
    admin.ensure_cluster(name=CLUSTER, database_url=database_url, database_password=pg.password, role="root",
                         key_password=key_password, intranet_url=node_url)
    issuer_dir = directory / "issuer"
    demo_issuer.init(issuer_dir)
    node = Node(args, directory, processes, database_url, pg.password, key_password, issuer_dir)

    # Users and documents, made through the first worker count's node: RAC and PL issuance rates.
    workers = args.workers[0]
    node.start(workers, "setup")
    client = RmsClient(node_url, timeout=60)
    print(f"{args.users} users get a RAC, {args.documents} documents are published ...", file=sys.stderr)
    users = [User.new(f"user{i:05d}@example.com",
                      demo_issuer.token(issuer_dir, f"user{i:05d}@example.com", groups=["staff"], ttl=7200))
             for i in range(args.users)]
    rac_seconds = in_parallel(users, client.certify, args.concurrency)
    content = {}  # pl_id -> (content key, blob)

    def publish(n: int):
        key, blob = encrypt_content(f"document {n} ".encode() + os.urandom(32))
        owner = users[n % len(users)]
        published = client.publish(owner, f"doc-{n:06d}-{uuid.uuid4().hex[:6]}", key, {"group:staff": ["VIEW"]})
        content[published["pl_id"]] = (key, blob, published["pl"])

    pl_seconds = in_parallel(list(range(args.documents)), publish, args.concurrency)
    node.stop()
    result["issuance"] = {"workers": workers, "concurrency": args.concurrency,
                          "racs": args.users, "rac_per_s": args.users / rac_seconds,
                          "pls": args.documents, "pl_per_s": args.documents / pl_seconds}
    pls = [pl for _key, _blob, pl in content.values()]
    random.shuffle(pls)  # the Zipf ranks fall on documents of any owner
    folder = write_load_files(directory, users, pls)

    runs = []
    for workers in args.workers:
        for mode in ("single", "mix"):
            print(f"{workers} worker(s), {mode}: {args.warmup:g} s warm-up, {args.duration:g} s measured ...",
                  file=sys.stderr)
            node.start(workers, mode)
            run_wrk(args, node_url, folder, mode, args.warmup, node.process.pid)
            run = run_wrk(args, node_url, folder, mode, args.duration, node.process.pid)
            run.update(workers=workers, mode=mode, load=load_average())
            run["verified"] = check_sample(node_url, users, content, args.samples)
            run["caches"] = node.stop()
            runs.append(run)
    result["runs"] = runs
    result["load_after"] = load_average()
    return result


def check_sample(url: str, users: list[User], content: dict, count: int) -> int:
    """Licenses for random (user, document) pairs through the Python client, each checked with jwcrypto
    (signature against the SLC, claims, the wrapped content key opens the document)."""
    client = RmsClient(url, timeout=60)
    slc_pem = client.slc()["chain"][0]
    items = list(content.items())
    for _ in range(count):
        user = random.choice(users)
        pl_id, (key, blob, pl) = random.choice(items)
        answer = client.license(user, pl)
        ul.verify_ul(answer["ul"], slc_pem, user, pl_id, key, blob)
    return count


def report(args, result: dict) -> str:
    sign = result["openssl"]["sign_per_s"]
    ceiling = sign / 2
    issuance = result["issuance"]
    lines = [
        "rmsd use licenses under a realistic mix (wrk), one node on PostgreSQL",
        f"machine: {result['cores']} cores; before the run: {result['load_before']}, "
        f"{result['busy_before_pct']:.0f}% busy"
        + (" -- other work is running; it skews every figure below" if result["busy_before_pct"] > 10 else ""),
        (f"openssl speed rsa2048, 1 process: {sign:.0f} sign/s -> RSA ceiling of one core: {ceiling:.0f} UL/s "
        "(two private-key operations per UL)"),
        (f"load: {args.users} users (each a RAC of its own), {args.documents} documents (PLs), documents picked by "
        f"Zipf s={args.zipf:g}, users uniformly; wrk {args.wrk_threads} thread(s), {args.connections} connections"),
        "",
        (f"issuance through {issuance['workers']} worker(s), Python client, {issuance['concurrency']} threads: "
        f"{issuance['rac_per_s']:.1f} RAC/s ({issuance['racs']} RACs), {issuance['pl_per_s']:.1f} PL/s "
        f"({issuance['pls']} PLs)"),
        "",
    ]
    header = (f"{'workers':>7}  {'load':<17} {'UL/s':>7} {'of RSA':>6} {'p50 ms':>7} {'p95 ms':>7} {'failed':>6} "
              f"{'node CPU':>8} {'wrk CPU':>7} {'busy':>4}  {'token hit':>9} {'RAC hit':>8} {'PL hit':>8}")
    units = (f"{'':>7}  {'':<17} {'':>7} {'1 core':>6} {'':>7} {'':>7} {'':>6} {'ms/UL':>8} {'ms/UL':>7} {'%':>4}")
    lines += [header, units, "-" * len(header)]
    for run in result["runs"]:
        rates = []
        for name in CACHES:
            hits, misses = run["caches"][name]
            rates.append(f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-")
        label = "single (best case)" if run["mode"] == "single" else "mix"
        lines.append(
            f"{run['workers']:>7}  {label:<17} {run['ul_per_s']:>7.1f} {100 * run['ul_per_s'] / ceiling:>5.0f}% "
            f"{run['p50_ms']:>7.1f} {run['p95_ms']:>7.1f} {run['failed']:>6} {run['node_cpu_ms_per_ul']:>8.2f} "
            f"{run['client_cpu_ms_per_ul']:>7.2f} {run['machine_busy_pct']:>4.0f}  {rates[0]:>9} {rates[1]:>8} "
            f"{rates[2]:>8}"
        )
    by = {(r["workers"], r["mode"]): r["ul_per_s"] for r in result["runs"]}
    lines.append("")
    for mode in ("single", "mix"):
        one, two = by.get((1, mode)), by.get((2, mode))
        if one and two:
            lines.append(f"{mode}: 2 workers / 1 worker = {two / one:.2f}")
    lines += [
        "",
        "single (best case): one user, one document, every request alike: every cache answers after the first.",
        "p50/p95: wrk's latency at the measured rate (closed loop, all connections busy); failed: non-2xx, socket",
        "errors and timeouts. node CPU: all of the node's processes per request; wrk CPU: the load generator's.",
        "hit: each verify-once cache of the node summed over its workers, over the node's life (warm-up and",
        "the Python check included). The database is read once per request whatever the caches hold.",
        (f"ULs checked with jwcrypto through the Python client: {sum(r['verified'] for r in result['runs'])} "
        f"(random user and document, {args.samples} per run), all valid."),
        f"after the run: {result['load_after']}",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1000, help="users, each with a RAC of its own (default 1000)")
    p.add_argument("--documents", type=int, default=10000, help="documents, each with a PL (default 10000)")
    p.add_argument("--zipf", type=float, default=1.0, help="exponent of the Zipf law documents are picked by")
    p.add_argument("--workers", default="1,2", help="worker counts of the node to measure (default 1,2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measurement (default 3)")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--concurrency", type=int, default=8, help="Python client threads for the set-up (default 8)")
    p.add_argument("--samples", type=int, default=5, help="licenses checked with jwcrypto per run (default 5)")
    p.add_argument("--node-port", type=int, default=18090, help=f"port of the node on {ADDRESS} (default 18090)")
    p.add_argument("--openssl-seconds", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error("--workers takes a comma-separated list such as 1,2")
    if min(args.workers) < 1 or args.users < 1 or args.documents < 1 or args.duration <= 0:
        p.error("--workers, --users and --documents must be at least 1, --duration positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install {tool})")
    signal.signal(signal.SIGTERM, ul.interrupt)
    signal.signal(signal.SIGINT, ul.interrupt)
    directory = Path(tempfile.mkdtemp(prefix="rmsd-mix-bench-"))
    processes = ul.Processes()
    pg = ul.load_pgserver().PostgresServer()
    try:
        result = measure(args, directory, processes, pg)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)
    print(report(args, result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
