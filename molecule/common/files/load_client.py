"""A client that keeps asking a cluster, through its balancer, for use licenses (POST /licensing)
and for its health (GET /health, which names the node that answered) until a stop file appears,
and writes how many requests failed.

Every request goes over a new TLS connection and is never retried: a connection refused or
reset by the balancer, a timeout or any answer but 200 counts as a failed request. (A client
keeping connections alive would have to retry a request whose reused connection the balancer
closed before answering; new connections leave no such case to excuse.)

With --rotation the client does what users do while the cluster key is rotated: get a RAC from the
root cluster, publish a new document, get a use license for it, over and over. A request refused
because what it relied on (the RAC's or the document's cluster key) was just revoked as compromised is
the rotation working, not a failure: it is counted apart (refused_revoked) after the cluster's GET /slc
confirms the key is revoked, and the client gets a new RAC or publishes anew. Any other refusal fails.

With --failover the client does what users do while the configuration database fails over: get a RAC
now and then, publish a new document, get a use license for a document published before the load began and
for the new one. Each operation is counted apart (ok, unavailable: 503 with Retry-After, failed: anything
else); every write's start time and outcome, and the content ids of the acknowledged publications, are in
the result written at the end ("ops", "writes", "published").

usage: load_client.py --url URL --ca CA --issuer-dir DIR --out FILE --stop-file FILE [--pid-file FILE]
                      [--rotation | --failover]
Run with the python of rmsd's virtualenv. The result (JSON) is written to --out every second and
at the end: {"requests", "failed", "errors", "nodes": {node: answers}, "seconds", "refused_revoked", "ops"}.
"""

import argparse
import json
import os
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from rmsd.client import RmsClient, User, b64url, encrypt_content
from rmsd.demo_issuer import token

from rmsd import pki

POLICY = "a new TLS connection per request, no retries"
REQUEST_TIMEOUT = 60.0  # seconds
# A node answers GET /slc from its view of the cluster, read at most once a second: how long the answer may lag a
# revocation another node already acts on (with room for a busy machine).
SLC_LAG_SECONDS = 5.0


class Load:
    def __init__(self, url: str, ca: str):
        self.url, self.tls = url, ssl.create_default_context(cafile=ca)
        self.lock = threading.Lock()
        self.requests, self.failed = 0, 0
        self.errors: list[str] = []
        self.nodes: Counter = Counter()
        self.refused_revoked = 0
        self.started = time.monotonic()
        self.ops: dict[str, Counter] = {}
        self.writes: list[tuple[float, bool]] = []
        self.published: list[str] = []

    def http(self) -> httpx.Client:
        # No idle connection is kept: each request opens its own. The timeout is for a request that hangs;
        # a slow answer on a busy machine is still an answer.
        return httpx.Client(base_url=self.url, verify=self.tls, timeout=REQUEST_TIMEOUT,
                            limits=httpx.Limits(max_keepalive_connections=0))

    def count(self, error: str | None, node: str | None = None) -> None:
        with self.lock:
            self.requests += 1
            if error:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(f"{time.monotonic() - self.started:.1f}s {error}")
            if node:
                self.nodes[node] += 1

    def request(self, http: httpx.Client, method: str, path: str, revoked_if=None, **kwargs) -> dict | None:
        """One request; None when it failed or was refused. `revoked_if`: HTTP status -> the cluster key
        whose revocation makes that refusal expected (410: the document's key, 403: the RAC's)."""
        try:
            response = http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            self.count(f"{method} {path}: {type(err).__name__}: {err}")
            return None
        relied_on = (revoked_if or {}).get(response.status_code)
        if relied_on and self.revoked(http, relied_on):
            with self.lock:
                self.requests += 1
                self.refused_revoked += 1
            return None
        if response.status_code != 200:
            self.count(f"{method} {path}: HTTP {response.status_code} {response.text[:200]}")
            return None
        body = response.json()
        self.count(None, body.get("node"))
        return body

    def work(self, stop: threading.Event, user: User, pl: str) -> None:
        headers = {"Authorization": f"Bearer {user.token}"}
        with self.http() as http:
            while not stop.is_set():
                self.request(http, "POST", "/licensing", json={"pl": pl, "rac": user.rac_pem}, headers=headers)
                self.request(http, "GET", "/health")

    def revoked(self, http: httpx.Client, key_id: str) -> bool:
        """Whether the cluster says `key_id` is revoked. GET /slc may lag the revocation a node just acted on
        by up to about a second (a node serves it from its view of the cluster, read at most once a second):
        asked again until it says so, for up to SLC_LAG_SECONDS."""
        deadline = time.monotonic() + SLC_LAG_SECONDS
        while True:
            if key_id in self.revoked_key_ids(http):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    @staticmethod
    def revoked_key_ids(http: httpx.Client) -> list[str]:
        """The cluster's keys revoked as compromised (not counted: it only explains a refusal)."""
        try:
            return http.get("/slc").json().get("revoked_key_ids", [])
        except (httpx.HTTPError, ValueError):
            return []

    def operation(self, http: httpx.Client, op: str, path: str, **kwargs) -> dict | None:
        """One request of the failover mode, counted under `op`; writes are also put on the timeline."""
        started = time.time()
        try:
            response = http.post(path, **kwargs)
            outcome = ("ok" if response.status_code == 200
                       else "unavailable" if response.status_code == 503 and response.headers.get("Retry-After")
                       else "failed")
            error = None if outcome == "ok" else f"{op}: HTTP {response.status_code} {response.text[:200]}"
        except httpx.HTTPError as err:
            outcome, error, response = "failed", f"{op}: {type(err).__name__}: {err}", None
        with self.lock:
            self.ops.setdefault(op, Counter())[outcome] += 1
            if op in ("certify", "publish"):
                self.writes.append((round(started, 3), outcome == "ok"))
            if outcome == "failed" and len(self.errors) < 20:
                self.errors.append(f"{time.monotonic() - self.started:.1f}s {error}")
        return response.json() if outcome == "ok" else None

    def failover_work(self, stop: threading.Event, issuer: Path, ttl: int, before_pl: str) -> None:
        number = 0
        user = None
        with self.http() as http:
            while not stop.is_set():
                number += 1
                if user is None or number % 10 == 0:
                    fresh = User.new("load@example.com", token(issuer, "load@example.com", ["load"], ttl=ttl))
                    answer = self.operation(http, "certify", "/certification", json={"csr": fresh.csr_pem()},
                                            headers={"Authorization": f"Bearer {fresh.token}"})
                    if answer is not None:
                        fresh.rac_pem = answer["rac"]
                        user = fresh
                    if user is None:
                        time.sleep(0.2)
                        continue
                headers = {"Authorization": f"Bearer {user.token}"}
                content_id = f"doc-failover-{threading.get_ident()}-{number}"
                body = {"content_id": content_id, "rights": {"group:load": ["VIEW"]},
                        "content_key": b64url(encrypt_content(b"load test document")[0])}
                published = self.operation(http, "publish", "/publishing", json=body, headers=headers)
                if published is not None:
                    with self.lock:
                        self.published.append(content_id)
                self.operation(http, "license_published_before", "/licensing", json={"pl": before_pl, "rac": user.rac_pem},
                               headers=headers)
                if published is not None:
                    self.operation(http, "license_new", "/licensing", json={"pl": published["pl"], "rac": user.rac_pem},
                                   headers=headers)

    def rotation_work(self, stop: threading.Event, issuer: Path, ttl: int) -> None:
        rac = None  # (user, id of the root key that issued the RAC)
        number = 0
        with self.http() as http:
            while not stop.is_set():
                number += 1
                if rac is None:
                    user = User.new("load@example.com", token(issuer, "load@example.com", ["load"], ttl=ttl))
                    answer = self.request(http, "POST", "/certification", json={"csr": user.csr_pem()},
                                          headers={"Authorization": f"Bearer {user.token}"})
                    if answer is None:
                        continue
                    user.rac_pem = answer["rac"]
                    rac = (user, pki.cert_key_id(pki.load_pem(answer["chain"][0])))
                user, rac_key = rac
                headers = {"Authorization": f"Bearer {user.token}"}
                body = {"content_id": f"doc-load-{threading.get_ident()}-{number}", "rights": {"group:load": ["VIEW"]},
                        "content_key": b64url(encrypt_content(b"load test document")[0])}
                published = self.request(http, "POST", "/publishing", json=body, headers=headers)
                if published is not None:
                    licensed = self.request(http, "POST", "/licensing", json={"pl": published["pl"], "rac": user.rac_pem},
                                            headers=headers, revoked_if={410: published["key_id"], 403: rac_key})
                    if licensed is None and self.revoked(http, rac_key):
                        rac = None  # the RAC's root key was revoked: get a new RAC
                self.request(http, "GET", "/health")

    def result(self, final: bool = False) -> dict:
        with self.lock:
            requests = self.requests + sum(sum(counts.values()) for counts in self.ops.values())
            failed = self.failed + sum(counts["failed"] for counts in self.ops.values())
            timeline = {"writes": list(self.writes), "published": list(self.published)} if final else {}
            return {**timeline, "ops": {op: dict(counts) for op, counts in sorted(self.ops.items())},
                    "requests": requests, "failed": failed, "url": self.url, "policy": POLICY,
                    "refused_revoked": self.refused_revoked, "errors": list(self.errors),
                    "nodes": dict(sorted(self.nodes.items())), "seconds": round(time.monotonic() - self.started, 1)}


def write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def certified_and_published(args, ttl: int, prefix: str) -> tuple[User, str]:
    """What the load's requests need, made before the load runs: a user with a RAC and a document published for
    that user (its PL)."""
    rms = RmsClient(args.url)
    rms.http = httpx.Client(base_url=args.url, verify=ssl.create_default_context(cafile=args.ca), timeout=REQUEST_TIMEOUT)
    user = User.new("load@example.com", token(args.issuer_dir, "load@example.com", ["load"], ttl=ttl))
    rms.certify(user)
    key = encrypt_content(b"load test document")[0]
    pl = rms.publish(user, f"{prefix}-{os.getpid()}-{int(time.time())}", key, {"group:load": ["VIEW"]})["pl"]
    return user, pl


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--issuer-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--stop-file", required=True, type=Path)
    parser.add_argument("--pid-file", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=1800,
                        help="a safety net for a client nobody stops; the tests stop it with --stop-file")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rotation", action="store_true", help="RAC, publish and license anew, over and over")
    mode.add_argument("--failover", action="store_true", help="publish, license old and new content, RAC now and then")
    args = parser.parse_args()
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")

    load, stop = Load(args.url, args.ca), threading.Event()
    ttl = int(args.max_seconds) + 120
    if args.rotation:
        work, work_args = load.rotation_work, (stop, args.issuer_dir, ttl)
    elif args.failover:
        _user, pl = certified_and_published(args, ttl, "doc-before")
        work, work_args = load.failover_work, (stop, args.issuer_dir, ttl, pl)
    else:
        user, pl = certified_and_published(args, ttl, "doc-load")
        work, work_args = load.work, (stop, user, pl)
    workers = [threading.Thread(target=work, args=work_args, daemon=True) for _thread in range(args.threads)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + args.max_seconds
    while not args.stop_file.exists() and time.monotonic() < deadline:
        write(args.out, load.result())
        time.sleep(1)
    stop.set()
    for worker in workers:
        worker.join(timeout=REQUEST_TIMEOUT + 15)  # its last request may take up to its timeout
    write(args.out, load.result(final=True))
    if args.pid_file:
        args.pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
