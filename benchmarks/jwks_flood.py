"""A flood of bearer tokens naming keys the issuer does not have (forged `kid`s) against one rmsd node, while
one user with a verified (cached) token goes on working: how many times the node reads the issuer's JWKS, and
the cached user's latency before and during the flood.

Sets up, in a temporary directory removed afterwards, a root cluster on SQLite, a JWKS server on 127.0.0.1
that answers after --delay seconds (a slow issuer) and counts the requests it answers, and `rmsd serve` with
one worker. Sends --forged requests from --threads threads, in waves of 50; asserts nothing.

    .venv/bin/python benchmarks/jwks_flood.py [--forged 200] [--threads 16] [--delay 0.5]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt
from joserfc.jwk import RSAKey
from rmsd.client import User

from rmsd import admin, demo_issuer

KEY_PASSWORD = "Bench-Key-Pass-4d1e8a9c-flood"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sign(key: RSAKey, subject: str, kid: str) -> str:
    now = int(time.time())
    claims = {"iss": demo_issuer.ISSUER, "aud": demo_issuer.AUDIENCE, "sub": subject, "iat": now, "exp": now + 900}
    return jwt.encode({"alg": "RS256", "kid": kid}, claims, key)


def jwks_server(key: RSAKey, delay: float) -> tuple[ThreadingHTTPServer, list[int]]:
    body = json.dumps({"keys": [key.as_dict(private=False)]}).encode()
    served = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            served[0] += 1
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, served


def start_node(directory: Path, jwks_uri: str) -> tuple[str, subprocess.Popen]:
    database = {"database_url": f"sqlite:///{directory / 'config.db'}"}
    admin.ensure_cluster(name="flood", key_password=KEY_PASSWORD, intranet_url="https://rms.example.com", **database)
    port = free_port()
    config = directory / "n1.toml"
    admin.ensure_server(cluster="flood", name="n1", key_password=KEY_PASSWORD, port=port, config_path=str(config),
                        secret_path=str(directory / "n1.secret"), identity_issuer=demo_issuer.ISSUER,
                        identity_audience=demo_issuer.AUDIENCE, identity_jwks_uri=jwks_uri, workers=1, **database)
    rmsd = Path(sys.executable).with_name("rmsd")
    log = open(directory / "serve.log", "wb")  # noqa: SIM115 (the node writes to it until it stops)
    process = subprocess.Popen([str(rmsd), "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return url, process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError((directory / "serve.log").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forged", type=int, default=200)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the JWKS server takes to answer")
    args = parser.parse_args(argv)
    issuer, attacker = (RSAKey.generate_key(2048, parameters={"kid": kid}) for kid in ("issuer", "attacker"))
    csr = User("bench", "", rsa.generate_private_key(public_exponent=65537, key_size=2048)).csr_pem()
    with tempfile.TemporaryDirectory(prefix="jwks-flood-") as folder:
        server, served = jwks_server(issuer, args.delay)
        url, process = start_node(Path(folder), f"http://127.0.0.1:{server.server_address[1]}/jwks.json")
        try:
            with httpx.Client(base_url=url, timeout=60.0, limits=httpx.Limits(max_connections=64)) as http:
                def certify(token: str) -> tuple[int, float]:
                    started = time.perf_counter()
                    status = http.post("/certification", json={"csr": csr},
                                       headers={"Authorization": f"Bearer {token}"}).status_code
                    return status, time.perf_counter() - started

                valid = sign(issuer, "cached@example.com", "issuer")
                certify(valid)
                before = [certify(valid)[1] for _ in range(20)]
                forged = [sign(attacker, "victim@example.com", f"forged-{i}") for i in range(args.forged)]
                fetches, flooding, during = served[0], threading.Event(), []
                flooding.set()

                def cached_user():
                    while flooding.is_set():
                        during.append(certify(valid))

                started = time.monotonic()
                with ThreadPoolExecutor(1) as probe, ThreadPoolExecutor(args.threads) as pool:
                    prober = probe.submit(cached_user)
                    answers = []
                    for wave in range(0, len(forged), 50):
                        answers += pool.map(certify, forged[wave:wave + 50])
                    flooding.clear()
                    prober.result()
                elapsed = time.monotonic() - started
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
            server.shutdown()
    latencies = [seconds for _status, seconds in during]
    refused = sum(status == 401 for status, _seconds in answers)
    print(f"forged-kid requests: {len(forged)} in {elapsed:.1f} s ({refused} answered 401), {args.threads} threads, "
          f"JWKS answering in {args.delay} s")
    print(f"JWKS fetches during the flood: {served[0] - fetches}")
    print(f"cached token before the flood: p50 {statistics.median(before) * 1000:.0f} ms, "
          f"max {max(before) * 1000:.0f} ms")
    print(f"cached token during the flood: {len(during)} requests ({sum(s == 200 for s, _ in during)} answered 200), "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
