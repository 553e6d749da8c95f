"""Compromise response at the scale of a company: the report of content under a compromised key and the
notices to its owners, with N publishing licenses from M owners, on SQLite and PostgreSQL.

For each database: provisions a root cluster (rmsd.admin), seeds publishing licenses straight into rmsd's
`content` table (rmsd.schema), declares the key they were published under compromised, then measures in a
child process (so that its peak RSS is the report's own):
  - the report (summary JSON, per-owner JSON Lines, CSV) at each size, its time, peak RSS and file sizes;
  - a rerun that changes nothing;
  - the notices, one per owner, sent to a real SMTP server (aiosmtpd, in its own process on a loopback
    address) over one connection, each recorded as it is accepted; and their dry run (rendered, not sent).
Prints figures; asserts nothing about speed. A throwaway PostgreSQL comes from scripts/pgserver.py.

    .venv/bin/python benchmarks/compromise_scale.py [--sizes 100000,1000000] [--owners 50000]
        [--backends sqlite,postgresql] [--smtp-address 127.0.13.1] [--json FILE]
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from rmsd.schema import cluster_keys, clusters, content

from rmsd import admin, db

REPO = Path(__file__).resolve().parents[1]
KEY_PASSWORD = "Bench-Key-Pass-5d1c0e2a"
CLUSTER = "corp"
SENDER = "rms-admins@example.com"


def _pgserver():
    spec = importlib.util.spec_from_file_location("pgserver", REPO / "scripts" / "pgserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- seeding --------------------------------------------------------------------------------------


def seed(url: str, password: str | None, start: int, stop: int, owners: int, batch: int = 20000) -> float:
    """Publishing licenses start..stop-1, owner i % owners, under the cluster's active key; seconds taken."""
    began = time.perf_counter()
    engine = db.make_engine(url, password)
    try:
        with engine.begin() as conn:
            cluster_id = conn.execute(sa.select(clusters.c.id).where(clusters.c.name == CLUSTER)).scalar_one()
            key_id = conn.execute(sa.select(cluster_keys.c.id).where(
                cluster_keys.c.cluster_id == cluster_id, cluster_keys.c.status == "active")).scalar_one()
        base = datetime(2026, 1, 1, tzinfo=UTC)
        for low in range(start, stop, batch):
            rows = [{
                "pl_id": f"{i:040x}", "cluster_id": cluster_id, "content_id": f"doc-{i:07d}",
                "owner": f"owner{i % owners:05d}@example.com", "key_id": key_id,
                "rights": {f"owner{i % owners:05d}@example.com": ["OWNER"]},
                "created_at": base + timedelta(seconds=i),
            } for i in range(low, min(stop, low + batch))]
            with engine.begin() as conn:
                conn.execute(content.insert(), rows)
    finally:
        engine.dispose()
    return time.perf_counter() - began


# --- a child process measures one call ------------------------------------------------------------


def child(task: dict) -> None:
    """Run one ensure_compromise_report call; print its time, peak RSS and facts as JSON."""
    args = task["args"]
    began, cpu = time.perf_counter(), time.process_time()
    done = admin.ensure_compromise_report(**args)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    peak_kb = peak_rss_kb()
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_kb / 1024, "changed": done.changed,
                      "notified": done.facts["notified"], "pending": done.facts["report"]["pending"],
                      "owner_count": done.facts["report"]["owner_count"]}))


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM: since its exec, unlike ru_maxrss, which Linux carries over
    from the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(args: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"args": args})], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    """Peak RSS of a child that only imports rmsd.admin: what the interpreter and libraries take."""
    code = ("import rmsd.admin, pathlib; print(next(l.split()[1] for l in "
            "pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')))")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout) / 1024


# --- a real SMTP server on a loopback address, in its own process ---------------------------------


def smtp_server(address: str, port: int) -> None:
    from aiosmtpd.controller import Controller

    class Count:
        def __init__(self):
            self.count = 0

        async def handle_DATA(self, server, session, envelope):
            self.count += 1
            return "250 Message accepted for delivery"

    handler = Count()
    controller = Controller(handler, hostname=address, port=port)
    controller.start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "count":  # messages accepted, and the CPU seconds this server has used
                print(handler.count, time.process_time(), flush=True)
    finally:
        controller.stop()


@contextlib.contextmanager
def running_smtp(address: str):
    with socket.socket() as s:
        s.bind((address, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--smtp", address, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"

        def count() -> tuple[int, float]:
            proc.stdin.write("count\n")
            proc.stdin.flush()
            messages, cpu = proc.stdout.readline().split()
            return int(messages), float(cpu)

        yield port, count
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


# --- the run --------------------------------------------------------------------------------------


def prepare(url: str, password: str | None, size: int, owners: int) -> dict:
    """A root cluster with `size` publishing licenses from `owners` owners under a key declared compromised."""
    admin.ensure_cluster(name=CLUSTER, database_url=url, database_password=password, key_password=KEY_PASSWORD,
                         intranet_url="https://rms.corp.example.com")
    seed_seconds = seed(url, password, 0, size, owners)
    info = admin.cluster_info(name=CLUSTER, database_url=url, database_password=password)
    began = time.perf_counter()
    admin.ensure_cluster_key(cluster=CLUSTER, database_url=url, database_password=password,
                             key_password=KEY_PASSWORD, compromised_keys=[info["cluster"]["active_key_id"]])
    return {"seed_seconds": seed_seconds, "compromise_seconds": time.perf_counter() - began}


def run_size(kind: str, url: str, password: str | None, size: int, owners: int, work: Path, smtp_address: str,
             notices: bool, rate: float) -> dict:
    row: dict = {"backend": kind, "pls": size, "owners": owners, **prepare(url, password, size, owners)}
    report_dir = work / f"{kind}-{size}"
    base = {"cluster": CLUSTER, "database_url": url, "database_password": password,
            "json_path": str(report_dir / "corp-compromised-content.json"),
            "csv_path": str(report_dir / "corp-compromised-content.csv")}
    first = measure(base)
    assert first["changed"] and first["pending"] == size, first
    row.update(report_seconds=first["seconds"], report_cpu_seconds=first["cpu_seconds"],
               report_peak_rss_mb=first["peak_rss_mb"])
    row["files_mb"] = {p.name: p.stat().st_size / 2**20 for p in sorted(report_dir.iterdir())}
    again = measure(base)
    assert not again["changed"], again
    row.update(rerun_seconds=again["seconds"], rerun_cpu_seconds=again["cpu_seconds"],
               rerun_peak_rss_mb=again["peak_rss_mb"])
    if notices:
        # with the report's files, as the key_rotation role runs it: the report part is the no-op rerun's check
        notify = {**base, "notify": True, "sender": SENDER, "smtp_host": smtp_address, "notify_rate": rate}
        dry = measure({**notify, "smtp_port": 25, "notify_dry_run": True})
        row.update(dry_run_notices=dry["notified"], dry_run_seconds=dry["seconds"])
        with running_smtp(smtp_address) as (port, count):
            _, server_cpu_before = count()
            sent = measure({**notify, "smtp_port": port})
            received, server_cpu = count()
            rerun = measure({**notify, "smtp_port": port})
            assert count()[0] == received and rerun["notified"] == 0 and not rerun["changed"], rerun
        assert sent["notified"] == received == owners, (sent, received)
        row.update(notices=sent["notified"], notices_seconds=sent["seconds"],
                   notices_per_second=sent["notified"] / sent["seconds"], notices_peak_rss_mb=sent["peak_rss_mb"],
                   notices_cpu_seconds=sent["cpu_seconds"], smtp_server_cpu_seconds=server_cpu - server_cpu_before,
                   notices_rerun_seconds=rerun["seconds"])
    return row


def show(row: dict) -> None:
    files = ", ".join(f"{name} {mb:.1f} MB" for name, mb in row["files_mb"].items())
    print(f"{row['backend']:10} {row['pls']:>9,} PLs / {row['owners']:,} owners  (seeded in {row['seed_seconds']:.1f} s,"
          f" key declared compromised in {row['compromise_seconds']:.1f} s)")
    print(f"  report        {row['report_seconds']:6.2f} s (CPU {row['report_cpu_seconds']:5.2f} s)   "
          f"peak RSS {row['report_peak_rss_mb']:6.1f} MB   {files}")
    print(f"  no-op rerun   {row['rerun_seconds']:6.2f} s (CPU {row['rerun_cpu_seconds']:5.2f} s)   "
          f"peak RSS {row['rerun_peak_rss_mb']:6.1f} MB")
    if "notices" in row:
        print(f"  notices dry run: {row['dry_run_notices']:,} rendered in {row['dry_run_seconds']:.1f} s")
        print(f"  notices       {row['notices']:,} sent over SMTP in {row['notices_seconds']:.1f} s "
              f"({row['notices_per_second']:.0f}/s, peak RSS {row['notices_peak_rss_mb']:.1f} MB); "
              f"rerun sends none in {row['notices_rerun_seconds']:.2f} s")
        print(f"                CPU: {row['notices_cpu_seconds']:.1f} s in the notifying process, "
              f"{row['smtp_server_cpu_seconds']:.1f} s in the SMTP server's")
    print("  load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
        *row["load_before"], *row["load_after"]))
    sys.stdout.flush()


def run(opts) -> int:
    sizes = [int(s) for s in opts.sizes.split(",")]
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, SQLAlchemy "
          f"{sa.__version__}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; an interpreter with rmsd.admin imported "
          f"peaks at {baseline_rss():.1f} MB RSS")
    results = []
    with tempfile.TemporaryDirectory(prefix="rms-compromise-bench-") as tmp:
        work = Path(tmp)
        pg = None
        try:
            for kind in opts.backends.split(","):
                for size in sizes:
                    if kind == "sqlite":
                        url, password = f"sqlite:///{work}/{size}/config.db", None
                    else:
                        if pg is None:
                            pg = _pgserver().PostgresServer()
                            pg.__enter__()
                        url, password = pg.create_database(f"bench_{size}"), pg.password
                    load_before = os.getloadavg()
                    row = run_size(kind, url, password, size, opts.owners, work, opts.smtp_address,
                                   size == sizes[-1] and not opts.no_notices, opts.notify_rate)
                    row.update(load_before=load_before, load_after=os.getloadavg())
                    show(row)
                    results.append(row)
        finally:
            if pg is not None:
                pg.__exit__(None, None, None)
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--owners", type=int, default=50000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--smtp-address", default="127.0.13.1")
    parser.add_argument("--notify-rate", type=float, default=0)
    parser.add_argument("--no-notices", action="store_true", help="measure the report only")
    parser.add_argument("--json")
    parser.add_argument("--child")
    parser.add_argument("--smtp", nargs=2)
    opts = parser.parse_args()
    if opts.child:
        return child(json.loads(opts.child))
    if opts.smtp:
        return smtp_server(opts.smtp[0], int(opts.smtp[1]))
    raise SystemExit(run(opts))


if __name__ == "__main__":
    main()
