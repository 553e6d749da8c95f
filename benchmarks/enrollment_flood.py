"""What an anonymous client gets out of `POST /enrollment`: the time a refusal takes for a scope that has a
credential and for one that has none (they should not differ), and what a flood from many threads costs the
node: answers by status, the node's CPU seconds and its peak resident memory.

Starts one `rmsd serve` node (SQLite, one worker) of a throwaway root cluster on 127.0.14.1, with one enrollment
credential (scope "known"). Prints figures; asserts nothing about speed.

    .venv/bin/python benchmarks/enrollment_flood.py [--samples 40] [--threads 40] [--requests 400] [--json FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from rmsd.keys import SoftwareKey

from rmsd import admin, pki

KEY_PASSWORD = "Bench-Key-Pass-8e2a41c7d95f"
SECRET = "Bench-Enroll-Secret-2b7f9c41e0a8"
ADDRESS, PORT = "127.0.14.1", 18140


def node_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, peak RSS in KiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu, peak


def node_rss(pid: int) -> int:
    """Resident memory of a process now, in KiB."""
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


def body(cluster: str, csr: str, secret: str) -> dict:
    return {"cluster": cluster, "csr": csr, "intranet_url": "https://x.example", "credential": secret}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40, help="refusals timed per kind of scope")
    parser.add_argument("--threads", type=int, default=40, help="concurrent clients of the flood")
    parser.add_argument("--requests", type=int, default=400, help="requests of the flood, in all")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        database = f"sqlite:///{base}/config.db"
        admin.ensure_cluster(name="corp", key_password=KEY_PASSWORD, intranet_url="https://rms.example.com",
                             database_url=database)
        admin.ensure_enrollment_credential(cluster="corp", scope="known", secret=SECRET, database_url=database)
        admin.ensure_server(cluster="corp", name="n1", key_password=KEY_PASSWORD, listen_address=ADDRESS, port=PORT,
                            config_path=str(base / "n1.toml"), secret_path=str(base / "n1.secret"), workers=1,
                            database_url=database)
        log = open(base / "serve.log", "wb")  # noqa: SIM115 (lives as long as the process)
        node = subprocess.Popen([str(Path(sys.executable).with_name("rmsd")), "serve", "--config", str(base / "n1.toml")],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://{ADDRESS}:{PORT}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            csr = pki.cluster_csr(SoftwareKey(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "x")
            # Each timed request from an address of its own (127.0.15.N), so the per-address limit stays out of it.
            timings: dict[str, list[float]] = {"known": [], "unknown": []}
            for i in range(args.samples):
                for scope in ("known", "unknown"):
                    local = f"127.0.15.{(2 * i + (scope == 'known')) % 250 + 1}"
                    with httpx.Client(transport=httpx.HTTPTransport(local_address=local), timeout=30) as http:
                        started = time.perf_counter()
                        status = http.post(f"{url}/enrollment", json=body(scope, csr, "wrong")).status_code
                        timings[scope].append(time.perf_counter() - started)
                    assert status in (401, 429), status
            cpu_before, _ = node_usage(node.pid)
            rss_before = node_rss(node.pid)
            statuses: Counter = Counter()
            lock = threading.Lock()
            started = time.perf_counter()

            def flood(count: int) -> None:
                with httpx.Client(timeout=60) as http:
                    for _ in range(count):
                        status = http.post(f"{url}/enrollment", json=body("known", csr, "wrong")).status_code
                        with lock:
                            statuses[status] += 1

            threads = [threading.Thread(target=flood, args=(args.requests // args.threads,))
                       for _ in range(args.threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            cpu_after, peak_kib = node_usage(node.pid)
        finally:
            node.terminate()
            node.wait(30)
            log.close()
    figures = {
        "refusal_ms_p50": {k: round(statistics.median(v) * 1000, 1) for k, v in timings.items()},
        "refusal_ms_max": {k: round(max(v) * 1000, 1) for k, v in timings.items()},
        "flood": {"threads": args.threads, "requests": sum(statuses.values()), "seconds": round(elapsed, 2),
                  "statuses": dict(sorted(statuses.items())), "node_cpu_seconds": round(cpu_after - cpu_before, 2),
                  "node_rss_mib_before": round(rss_before / 1024, 1), "node_peak_rss_mib": round(peak_kib / 1024, 1)},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
