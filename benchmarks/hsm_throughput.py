"""Use license (UL) issuance throughput of one rmsd node with a software cluster key (key_protection
password) and with a key in a SoftHSM2 token (key_protection pkcs11), beside the token's raw RSA-2048
sign and RSA-OAEP decrypt rates through python-pkcs11 and `openssl speed rsa2048`, all measured in one
run.

Sets everything up in a temporary directory and removes it afterwards: a SoftHSM2 token, two root
clusters on SQLite (one per protection), one `rmsd serve` per cluster on 127.0.3.11 and 127.0.3.12, a
demo identity issuer, a user with a RAC and one publishing license per cluster. Each UL is a sign and
an unwrap by the cluster key; a sample UL of each run is checked with jwcrypto. Prints figures.

    .venv/bin/python benchmarks/hsm_throughput.py [--duration 10] [--concurrency 8]
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
import uuid
from pathlib import Path

import ul_throughput as ul  # the UL benchmark's helpers, a script beside this one (its folder is on sys.path)
from rmsd.client import RmsClient, User, encrypt_content

from rmsd import admin, demo_issuer

HERE = Path(__file__).resolve().parent
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
ADDRESSES = {"password": "127.0.3.11", "pkcs11": "127.0.3.12"}
SUBJECT = "alice@example.com"




def make_token(directory: Path) -> dict:
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # for this process and the node it starts
    pin = secrets.token_hex(8)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--so-pin", secrets.token_hex(8),
                    "--pin", pin], check=True, capture_output=True)
    return {"module": MODULE, "token_label": "bench", "pin": pin}


def token_raw_rates(token: dict, seconds: float, processes: int) -> dict:
    """RSA-2048 sign (CKM_SHA256_RSA_PKCS) and RSA-OAEP decrypt per second by the token: `processes`
    runs of token_speed.py at once, one session each, summed."""
    argv = [sys.executable, str(HERE / "token_speed.py"), token["module"], token["token_label"], str(seconds)]
    runs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(processes)]
    outputs = [run.communicate(token["pin"] + "\n", timeout=seconds * 4 + 60)[0] for run in runs]
    if any(run.returncode for run in runs):
        raise RuntimeError(f"token_speed.py failed: {[run.returncode for run in runs]}")
    rates = [json.loads(out) for out in outputs]
    return {"processes": processes, "sign_per_s": sum(r["sign_per_s"] for r in rates),
            "decrypt_per_s": sum(r["decrypt_per_s"] for r in rates)}


def start_cluster(protection: str, directory: Path, processes, issuer_dir: Path, port: int, token: dict,
                  workers: int = 1) -> dict:
    base = directory / f"{protection}-{workers}"
    database_url = f"sqlite:///{base / 'config.db'}"
    address = ADDRESSES[protection]
    url = f"http://{address}:{port}"
    if protection == "password":
        unlock = {"key_password": secrets.token_urlsafe(24)}
    else:
        unlock = {"pkcs11": token}
    base.mkdir(parents=True, exist_ok=True)
    admin.ensure_cluster(name=f"bench-{protection}", database_url=database_url, key_protection=protection,
                         intranet_url=url, **unlock)
    result = admin.ensure_server(
        cluster=f"bench-{protection}", name="node1", database_url=database_url, listen_address=address, port=port,
        config_path=str(base / "node1.toml"), secret_path=str(base / "node1.secret"),
        identity_issuer=demo_issuer.ISSUER, identity_audience=demo_issuer.AUDIENCE,
        identity_jwks_uri=demo_issuer.jwks_uri(issuer_dir), workers=workers, **unlock,
    )
    config_path = result.facts["server"]["config_path"]
    node = tomllib.loads(Path(config_path).read_text())["node"]
    log = base / "node1.log"
    process = processes.start([*ul.rmsd_command(), "serve", "--config", config_path], log)
    ul.wait_for(f"http://{node['listen_address']}:{node['port']}/health", process, log)
    return {"url": url, "process": process}


def measure(args, directory: Path, processes) -> dict:
    for address in ADDRESSES.values():
        ul.refuse_if_taken(address, args.node_port)
    cores = os.cpu_count() or 1
    print(f"openssl speed rsa2048 ({args.openssl_seconds} s per operation) ...", file=sys.stderr)
    speed = ul.openssl_speed(args.openssl_seconds)
    token = make_token(directory / "softhsm")
    print(f"token raw rates (python-pkcs11, 1 and {cores} processes) ...", file=sys.stderr)
    raw = [token_raw_rates(token, args.raw_seconds, count) for count in sorted({1, cores})]
    issuer_dir = directory / "issuer"
    demo_issuer.init(issuer_dir)
    token_jwt = demo_issuer.token(issuer_dir, SUBJECT, ttl=3600)
    user = User.new(SUBJECT, token_jwt)
    runs = []
    for protection, workers in [(p, w) for w in args.workers for p in ("password", "pkcs11")]:
        print(f"{protection}, {workers} worker(s): {args.duration:g} s of UL requests ...", file=sys.stderr)
        node = start_cluster(protection, directory, processes, issuer_dir, args.node_port, token, workers)
        client = RmsClient(node["url"])
        client.certify(user)
        content_key, blob = encrypt_content(b"benchmark content " + os.urandom(64))
        published = client.publish(user, f"bench-{uuid.uuid4().hex[:8]}", content_key, {"group:readers": ["VIEW"]})
        slc_pem = client.slc()["chain"][0]
        client.license(user, published["pl"])
        body = json.dumps({"pl": published["pl"], "rac": user.rac_pem}).encode()
        run = ul.generate_load(ul.Run(workers, protection, node["url"], args.concurrency, args.duration), body,
                               token_jwt, args.warmup, [node["process"].pid])
        if run.sample_ul:
            ul.verify_ul(run.sample_ul, slc_pem, user, published["pl_id"], content_key, blob)
            run.verified_ul = True
        runs.append(run)
        processes.stop(node["process"])
    return {"cores": cores, "openssl_speed_rsa2048": speed, "token_raw": raw, "runs": runs}


def report(result: dict) -> str:
    speed = result["openssl_speed_rsa2048"]
    lines = [
        f"machine: {result['cores']} cores; SoftHSM2 token via python-pkcs11; one rmsd node per protection",
        f"openssl speed rsa2048 (1 process): {speed['sign_per_s']:.0f} sign/s, {speed['verify_per_s']:.0f} verify/s",
    ]
    for raw in result["token_raw"]:
        lines.append(f"token raw, {raw['processes']} process(es): {raw['sign_per_s']:.0f} sign/s "
                     f"(CKM_SHA256_RSA_PKCS), {raw['decrypt_per_s']:.0f} OAEP decrypt/s")
    lines.append("")
    one = result["token_raw"][0]
    ceiling = 1 / (1 / one["sign_per_s"] + 1 / one["decrypt_per_s"])
    lines.append(f"token ceiling, one process (one session): 1 / (1/sign + 1/decrypt) = {ceiling:.0f} UL/s")
    lines.append("")
    lines.append(f"{'key protection':<16}{'workers':>8}{'UL/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'node CPU ms/UL':>16}"
                 f"{'failed':>8}{'verified':>10}{'of token ceiling':>18}")
    for run in result["runs"]:
        share = f"{100 * run.ul_per_s / ceiling:.0f}%" if run.target == "pkcs11" else "-"
        lines.append(f"{run.target:<16}{run.nodes:>8}{run.ul_per_s:>8.1f}{run.p50_ms:>9.1f}{run.p95_ms:>9.1f}"
                     f"{run.node_cpu_ms_per_ul:>16.2f}{run.failed:>8}{'yes' if run.verified_ul else 'no':>10}"
                     f"{share:>18}")
        if run.first_error:
            lines.append(f"  first error: {run.first_error}")
    lines.append("")
    for workers in sorted({run.nodes for run in result["runs"]}):
        soft, hsm = (next(r for r in result["runs"] if r.nodes == workers and r.target == t)
                     for t in ("password", "pkcs11"))
        if soft.ul_per_s:
            lines.append(f"HSM / software UL throughput, {workers} worker(s): {hsm.ul_per_s / soft.ul_per_s:.2f}")
    lines.append("Each UL costs the cluster key one sign and one OAEP unwrap: one worker (one token session, its calls "
                 "taking turns) tops out near the token ceiling of one process; each worker has a session of its own.")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--node-port", type=int, default=18481)
    parser.add_argument("--openssl-seconds", type=int, default=3)
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per token raw-rate measurement")
    parser.add_argument("--workers", default="1", help="worker counts of the node to measure, e.g. 1,2 (default 1)")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes a comma-separated list such as 1,2")
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers must be 1 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (os.path.exists(MODULE) and shutil.which("softhsm2-util")):
        print("SoftHSM2 is not installed (Debian package softhsm2)", file=sys.stderr)
        return 2
    processes = ul.Processes()
    signal.signal(signal.SIGTERM, ul.interrupt)
    with tempfile.TemporaryDirectory(prefix="rmsd-hsm-bench-") as tmp:
        try:
            result = measure(args, Path(tmp), processes)
        finally:
            processes.stop_all()
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
