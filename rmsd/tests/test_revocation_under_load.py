"""A rotation or revocation reaches every worker of a node at once, while load runs: a real `rmsd serve`
with two worker processes on PostgreSQL, keep-alive clients each pinned to a worker (found through /proc),
and the rotation committed by the admin API in the middle of the load. Whatever each worker cached (verified
tokens, RACs and PLs, its cluster key) must not let a license out under the old key, or for a RAC whose root
key was revoked, once the change is committed."""

import http.client
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import (
    KEY_PASSWORD,
    configure_node,
    eventually,
    make_issuer,
    postgres_database,
    provision,
    start_node,
    stop_node,
)
from joserfc import jws

from rmsd import admin, demo_issuer, pki
from rmsd.client import RmsClient, User, encrypt_content, open_use_license
from rmsd.schema import cluster_keys, utcnow

WORKERS = 2
CONNECTIONS = 6  # at least; more are opened until every worker holds one
SUBJECTS = ("alice@example.com", "bob@example.com", "carol@example.com")


@dataclass
class Answer:
    started: float
    status: int
    worker: int | None
    kid: str | None = None
    ul: str | None = field(default=None, repr=False)
    user: str = ""


@dataclass
class Load:
    """Keep-alive clients posting licensing requests until stopped, each answer recorded with the worker
    that served it (a keep-alive connection stays with the worker that accepted it)."""

    host: str
    port: int
    requests: list  # (user, pl)
    workers: dict  # client local port -> worker pid
    answers: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, conn: http.client.HTTPConnection, offset: int):
        i = offset
        while not self.stop.is_set():
            user, pl = self.requests[i % len(self.requests)]
            i += 1
            started = time.monotonic()
            body = json.dumps({"pl": pl, "rac": user.rac_pem})
            conn.request("POST", "/licensing", body, {"Authorization": f"Bearer {user.token}",
                                                       "Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            answer = Answer(started, response.status, self.workers.get(conn.sock.getsockname()[1]), user=user.subject)
            if response.status == 200:
                answer.ul = json.loads(data)["ul"]
                answer.kid = jws.extract_compact(answer.ul.encode()).protected["kid"]
            with self.lock:
                self.answers.append(answer)

    def after(self, moment: float) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.started > moment]


def worker_pids(serve_pid: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()]


def socket_owner(pids: list[int], port: int, client_port: int) -> int | None:
    """The worker holding the server side of the established connection from `client_port` to `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
                inodes.add(f"socket:[{inode}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def pinned_connections(host: str, port: int, pids: list[int]) -> tuple[list, dict]:
    """Keep-alive connections until every worker holds at least one (the kernel hands each new connection
    to whichever worker accepts it first)."""
    connections, owners = [], {}
    while len(connections) < 64:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/health")
        conn.getresponse().read()
        client_port = conn.sock.getsockname()[1]
        owners[client_port] = eventually(lambda cp=client_port: _owned(pids, port, cp), timeout=10)
        connections.append(conn)
        if len(connections) >= CONNECTIONS and set(owners.values()) == set(pids):
            return connections, owners
    raise AssertionError(f"64 connections, and not every worker accepted one: {owners}")


def _owned(pids, port, client_port):
    owner = socket_owner(pids, port, client_port)
    assert owner is not None
    return owner


@pytest.fixture
def loaded(tmp_path, pg):
    """A root cluster on PostgreSQL, a node of two workers, three users with RACs and three documents each
    of them may open; the load runs until the test ends."""
    database = postgres_database(pg)
    provision(database)
    issuer = make_issuer(tmp_path / "issuer")
    _result, config_path, _secret = configure_node(database, tmp_path, issuer, workers=WORKERS)
    url, process = start_node(config_path, tmp_path / "serve.log")
    threads: list[threading.Thread] = []
    load = None
    try:
        pids = eventually(lambda: _all_workers(process.pid))
        client = RmsClient(url)
        users = [User.new(s, demo_issuer.token(issuer, s, ttl=3600)) for s in SUBJECTS]
        for user in users:
            client.certify(user)
        rights = {s: ["VIEW"] for s in SUBJECTS}
        blobs = {}
        pls = []
        for n in range(3):
            key, blob = encrypt_content(f"document {n}".encode())
            published = client.publish(users[0], f"doc-{n}", key, rights)
            pls.append(published["pl"])
            blobs[published["pl_id"]] = blob
        host, port = url.removeprefix("http://").rsplit(":", 1)
        connections, owners = pinned_connections(host, int(port), pids)
        load = Load(host, int(port), [(u, pl) for u in users for pl in pls], owners)
        threads = [threading.Thread(target=load.run, args=(conn, i), daemon=True) for i, conn in enumerate(connections)]
        for thread in threads:
            thread.start()
        yield {"database": database, "client": client, "users": users, "load": load, "pids": pids, "blobs": blobs,
               "issuer": issuer}
    finally:
        if load is not None:
            load.stop.set()
        for thread in threads:
            thread.join(30)
        stop_node(process)


def _all_workers(serve_pid):
    pids = worker_pids(serve_pid)
    assert len(pids) == WORKERS
    return pids


def served_by_every_worker(load: Load, pids: list[int], since: float, count: int) -> list[Answer]:
    """Wait until each worker has answered `count` requests started after `since`; those answers."""
    def check():
        answers = load.after(since)
        for pid in pids:
            assert sum(1 for a in answers if a.worker == pid) >= count
        return answers

    return eventually(check, timeout=60)


def active_key(database) -> str:
    return admin.cluster_info(name="c1", **database.admin_args())["cluster"]["active_key_id"]


def test_no_license_under_the_old_key_once_a_rotation_is_committed(loaded):
    database, load, pids = loaded["database"], loaded["load"], loaded["pids"]
    old = active_key(database)
    before = served_by_every_worker(load, pids, 0.0, 5)
    assert {a.status for a in before} == {200} and {a.kid for a in before} == {old}

    engine = database.engine()
    with engine.begin() as conn:  # the key is due: max_age replaces it (archived, its content still opens)
        conn.execute(cluster_keys.update().values(created_at=utcnow() - timedelta(days=40)))
    engine.dispose()
    done = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, max_age=30,
                                    **database.admin_args())
    committed = time.monotonic()
    new = done.facts["active_key_id"]
    assert done.changed and new != old

    after = served_by_every_worker(load, pids, committed, 20)
    wrong = [a for a in after if a.status != 200 or a.kid != new]
    assert not wrong, f"{len(wrong)} of {len(after)} answers after the rotation: {wrong[:3]}"
    # Each worker's license verifies against the new SLC and opens the content (PLs under the archived key).
    slc = loaded["client"].slc()["chain"][0]
    users = {u.subject: u for u in loaded["users"]}
    for pid in pids:
        sample = next(a for a in after if a.worker == pid)
        claims, content_key = open_use_license(sample.ul, slc, users[sample.user])
        assert pki.cert_key_id(pki.load_pem(slc)) == new
        assert claims["content_id"].startswith("doc-")
        assert content_key and loaded["blobs"][claims["pl_id"]]


def test_a_revoked_root_key_stops_its_racs_and_content_at_once_on_every_worker(loaded):
    database, load, pids, client = loaded["database"], loaded["load"], loaded["pids"], loaded["client"]
    old = active_key(database)
    served_by_every_worker(load, pids, 0.0, 5)  # every worker has verified and cached the RACs and PLs

    done = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old],
                                    **database.admin_args())
    committed = time.monotonic()
    assert done.changed and active_key(database) != old

    after = served_by_every_worker(load, pids, committed, 20)
    issued = [a for a in after if a.status == 200]
    assert not issued, f"{len(issued)} licenses issued after the key was revoked: {issued[:3]}"
    assert {a.status for a in after} == {410}  # content under the compromised key

    # Content republished under the new key: the old RACs (issued by the revoked key, cached by every worker)
    # are refused on every worker; a RAC of the new key gets a license.
    alice, bob = loaded["users"][0], loaded["users"][1]
    key, _blob = encrypt_content(b"republished")
    fresh = client.publish(alice, "doc-new", key, {bob.subject: ["VIEW"]})
    load.requests[:] = [(bob, fresh["pl"])]
    moment = time.monotonic()
    refused = served_by_every_worker(load, pids, moment, 5)
    assert {a.status for a in refused} == {403}
    client.certify(bob)  # a RAC of the new root key
    moment = time.monotonic()
    issued = served_by_every_worker(load, pids, moment, 5)
    assert {a.status for a in issued} == {200} and {a.kid for a in issued} == {done.facts["active_key_id"]}
