"""Enrollment against an anonymous or hostile client: every request costs the same one KDF run whatever it
names (timing tells no one which scopes exist), the KDF work is bounded before authentication (so many
requests per client address, so many checks at once per worker: 429 with Retry-After beyond), a credential
enrolls once, a licensing cluster's keys are revoked at the root only with their own signed statements, and
neither the credential nor the configuration database travels unverified off the loopback interface.

Over real HTTP: nodes served in this process (uvicorn on a real socket, so the test can count KDF runs and
hold the clock of the per-address limit) and `rmsd serve` nodes where the serving path itself is tested."""

import base64
import json
import os
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from conftest import (
    KEY_PASSWORD,
    configure_node,
    eventually,
    make_issuer,
    postgres_database,
    provision,
    sqlite_database,
    start_node,
    stop_node,
)
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk, jws

from rmsd import admin, clusters, db, enrollment, pki, revocation, throttle
from rmsd.config import load_node_config
from rmsd.errors import RmsdError
from rmsd.keys import SoftwareKey
from rmsd.node import ENROLLMENT_BURST
from rmsd.schema import utcnow
from rmsd.service import create_app, uvicorn_limits, uvicorn_proxy

SETTINGS = settings(max_examples=20, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
SECRET = "Enroll-Abuse-5f0d2c9e7b1a4836"
SCOPE_NAME = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z", fullmatch=True).filter(lambda s: s != "c1")
REQUEST_ID_FIELDS = ("request_id", "instance")


# --- nodes served in this process ------------------------------------------------------------------------


@contextmanager
def serving(config_path: Path):
    """The node of `config_path` served by uvicorn on its address and port, in this process, as `rmsd serve`
    configures uvicorn: (its Node, its URL)."""
    config = load_node_config(config_path)
    app = create_app(config, heartbeat=False)
    server = uvicorn.Server(uvicorn.Config(app, host=config.listen_address, port=config.port, log_level="warning",
                                           **uvicorn_limits(config), **uvicorn_proxy(config)))
    thread = threading.Thread(target=server.run, name="enrollment-node", daemon=True)
    thread.start()
    try:
        eventually(lambda: _started(server, thread))
        yield app.state.node, config.url
    finally:
        server.should_exit = True
        thread.join(30)


def _started(server, thread) -> None:
    assert thread.is_alive() and server.started


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A root cluster (SQLite) and the configuration of one node of it."""
    base = tmp_path_factory.mktemp("enroll-root")
    database = sqlite_database(base)
    provision(database)
    _result, config_path, _secret = configure_node(database, base, make_issuer(base / "issuer"))
    return database, config_path


@pytest.fixture(params=["sqlite", "postgresql"])
def any_root(request, tmp_path):
    """A fresh root cluster on each database kind, with the configuration of one node."""
    database = sqlite_database(tmp_path) if request.param == "sqlite" else postgres_database(
        request.getfixturevalue("pg"))
    provision(database)
    _result, config_path, _secret = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    return database, config_path


@pytest.fixture
def kdf_runs(monkeypatch):
    """Counts every run of the enrollment credential KDF in this process (the served nodes' included)."""
    runs = Counter()
    original = clusters.hash_secret

    def counted(secret, salt):
        runs["kdf"] += 1
        return original(secret, salt)

    monkeypatch.setattr(clusters, "hash_secret", counted)
    return runs


def unlimited(node) -> None:
    """Lift the per-address limit of a served node (tests of other controls send many requests from here)."""
    node.enrollment_sources = throttle.SourceLimiter(10**9, 1.0, "enrollment requests")


def credential(database, scope, secret=SECRET, **kwargs):
    return admin.ensure_enrollment_credential(cluster="c1", scope=scope, secret=secret, **database.admin_args(),
                                              **kwargs)


def new_key() -> SoftwareKey:
    return SoftwareKey(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def request_body(cluster: str, key, secret: str = SECRET, **extra) -> dict:
    return {"cluster": cluster, "csr": pki.cluster_csr(key, cluster), "intranet_url": f"https://{cluster}.example",
            "credential": secret, **extra}


def without_request_id(problem: dict) -> dict:
    return {k: v for k, v in problem.items() if k not in REQUEST_ID_FIELDS}


def enroll(url: str, database, cluster: str, key, secret: str = SECRET, **kwargs):
    return enrollment.enroll(url, None, cluster=cluster, key=key, intranet_url=f"https://{cluster}.example",
                             extranet_url=None, credential=secret, expected_root=enrollment.fetch_root_slc(url, None),
                             **kwargs)


def set_expired(database, scope: str) -> None:
    engine = database.engine()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE enrollment_credentials SET expires_at = :t WHERE scope = :s"),
                         {"t": "2020-01-01 00:00:00", "s": scope})
    finally:
        engine.dispose()


# --- one KDF run per request, one answer for every refusal --------------------------------------------------


def test_every_refusal_costs_one_kdf_run_and_reads_the_same(root, kdf_runs, record_property):
    """Unknown, expired, used and valid-but-wrong scopes: one KDF run each, one 401 body (but for the request
    id), so neither the time nor the answer tells which scopes exist."""
    database, config_path = root
    key = new_key()
    with serving(config_path) as (node, url):
        unlimited(node)
        credential(database, "spent")
        enroll(url, database, "spent", key)
        credential(database, "expired")
        set_expired(database, "expired")
        credential(database, "fresh")
        http = httpx.Client(base_url=url, timeout=30)
        reference = without_request_id(http.post("/enrollment", json=request_body("nowhere", key, "x")).json())
        outcomes: Counter = Counter()

        @SETTINGS
        @given(scope=st.one_of(st.sampled_from(["spent", "expired", "fresh", "nowhere"]), SCOPE_NAME),
               secret=st.one_of(st.just(SECRET), st.text(st.characters(exclude_categories=("Cs",)), min_size=1,
                                                         max_size=512)))
        def refused(scope, secret):
            if scope == "fresh" and secret == SECRET:
                secret += "!"  # the one request that would enroll
            before = kdf_runs["kdf"]
            response = http.post("/enrollment", json=request_body(scope, key, secret))
            assert response.status_code == 401, response.text
            assert kdf_runs["kdf"] - before == 1, scope
            assert without_request_id(response.json()) == reference
            outcomes["known scope" if scope in ("spent", "expired", "fresh") else "unknown scope"] += 1

        refused()
    assert reference["detail"] == ("no valid enrollment credential for the cluster named (unknown, wrong, used or "
                                   "expired)")
    record_property("hypothesis_cases", f"enrollment refusals: {dict(outcomes)}, one KDF run and one 401 body each")


# --- the KDF work an anonymous client can cause is bounded -------------------------------------------------


@pytest.fixture
def frozen_clock(monkeypatch):
    """The per-address limit's clock, held still: what a flood gets depends on counts, not on time."""
    now = [1000.0]
    monkeypatch.setattr(throttle, "monotonic", lambda: now[0])
    return now


def test_a_flood_from_one_address_gets_429_and_runs_the_kdf_only_burst_times(root, kdf_runs, frozen_clock,
                                                                             record_property):
    database, config_path = root
    key = new_key()
    statuses: Counter = Counter()
    with serving(config_path) as (node, url):
        http = httpx.Client(base_url=url, timeout=30)

        @settings(max_examples=6, deadline=None, database=None, derandomize=True)
        @given(burst=st.integers(1, 3), every=st.floats(0.5, 30.0), flood=st.integers(1, 25))
        def flood_is_bounded(burst, every, flood):
            node.enrollment_sources = throttle.SourceLimiter(burst, every, "enrollment requests")
            before = kdf_runs["kdf"]
            answers = [http.post("/enrollment", json=request_body("dept", key, "wrong")) for _ in range(flood)]
            assert [a.status_code for a in answers] == [401] * min(burst, flood) + [429] * max(0, flood - burst)
            assert kdf_runs["kdf"] - before == min(burst, flood)
            for answer in answers[burst:]:
                problem = answer.json()
                assert answer.headers["content-type"] == "application/problem+json"
                assert problem["type"] == "urn:rmsd:problem:too-many-requests" and problem["status"] == 429
                assert 1 <= int(answer.headers["retry-after"]) <= int(every) + 1
                assert "try again in" in problem["detail"]
            statuses.update(a.status_code for a in answers)
            # Once the time it named has passed, the address may ask once more.
            frozen_clock[0] += every * 1.001
            assert http.post("/enrollment", json=request_body("dept", key, "wrong")).status_code == 401
            assert kdf_runs["kdf"] - before == min(burst, flood) + 1

        flood_is_bounded()
    record_property("hypothesis_cases", f"enrollment floods from one address: {dict(statuses)}; KDF runs = burst")


def test_credential_checks_at_once_are_bounded_and_the_rest_get_429_at_once(root, monkeypatch, frozen_clock):
    """With every slot held by a slow check, further requests are refused at once (no KDF run, no waiting
    thread, no memory held) with Retry-After, and cost their address nothing of its per-address allowance;
    the held ones finish normally."""
    database, config_path = root
    key = new_key()
    in_flight, release = Counter(), threading.Event()
    original = clusters.hash_secret

    def slow(secret, salt):
        in_flight["started"] += 1
        release.wait(60)
        return original(secret, salt)

    with serving(config_path) as (node, url):
        slots = node.credential_checks.size
        node.enrollment_sources = throttle.SourceLimiter(slots + 1, 60.0, "enrollment requests")
        monkeypatch.setattr(clusters, "hash_secret", slow)
        held: list = []
        threads = [threading.Thread(target=lambda: held.append(
            httpx.post(f"{url}/enrollment", json=request_body("dept", key, "wrong"), timeout=60)))
            for _ in range(slots)]
        for thread in threads:
            thread.start()
        eventually(lambda: _equal(in_flight["started"], slots))
        refused = [httpx.post(f"{url}/enrollment", json=request_body("dept", key, "wrong"), timeout=30)
                   for _ in range(5)]
        started_while_full = in_flight["started"]
        release.set()
        for thread in threads:
            thread.join(60)
        # The address spent one request of its allowance per check that ran: one is left.
        after = [httpx.post(f"{url}/enrollment", json=request_body("dept", key, "wrong"), timeout=30).status_code
                 for _ in range(2)]
    assert after == [401, 429]
    assert slots == 2 and started_while_full == slots
    assert [r.status_code for r in refused] == [429] * 5
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in refused)
    assert sorted(r.status_code for r in held) == [401] * slots


def _equal(a, b) -> None:
    assert a == b


def test_the_per_address_limit_counts_the_client_a_trusted_proxy_names(tmp_path, kdf_runs, frozen_clock):
    """X-Forwarded-For names the client only when the peer is a trusted proxy; anyone else is counted as
    itself, whatever it sends."""
    database = sqlite_database(tmp_path)
    provision(database)
    _result, config_path, _secret = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"),
                                                   trusted_proxies=["127.0.0.2"])
    key = new_key()
    with serving(config_path) as (node, url):
        node.enrollment_sources = throttle.SourceLimiter(1, 60.0, "enrollment requests")

        def statuses(peer: str, clients: list[str]) -> list[int]:
            with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=peer), timeout=30) as http:
                return [http.post("/enrollment", json=request_body("dept", key, "wrong"),
                                  headers={"X-Forwarded-For": client}).status_code for client in clients]

        clients = ["203.0.113.1", "203.0.113.2", "2001:db8::1", "203.0.113.1", "2001:db8::2"]
        # Behind the proxy: one request each, then the same client (an IPv6 client by its /64) is refused.
        assert statuses("127.0.0.2", clients) == [401, 401, 401, 429, 429]
        # Not the proxy: the peer is the client, whatever it claims.
        assert statuses("127.0.0.3", ["198.51.100.1", "198.51.100.2", "198.51.100.3"]) == [401, 429, 429]
    assert load_node_config(config_path).trusted_proxies == ["127.0.0.2"]


def test_rmsd_serve_believes_x_forwarded_for_from_its_trusted_proxies_only(tmp_path):
    """`rmsd serve` as configured: without trusted proxies no one's X-Forwarded-For counts (uvicorn's default
    would believe any loopback peer); with them, only theirs. Requests naming a new client each time are
    refused in the end (429) unless they come from the trusted proxy: then none is, beyond the burst too."""
    database = sqlite_database(tmp_path)
    provision(database)
    issuer = make_issuer(tmp_path / "issuer")
    key = new_key()
    sent = {}
    for name, proxies, peers in (("n1", None, ["127.0.0.1"]), ("n2", ["127.0.0.2"], ["127.0.0.2", "127.0.0.3"])):
        _result, config_path, _secret = configure_node(database, tmp_path / name, issuer, name=name,
                                                       trusted_proxies=proxies)
        url, process = start_node(config_path, tmp_path / f"{name}.log")
        try:
            for peer in peers:
                with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=peer),
                                  timeout=30) as http:
                    statuses: list[int] = []
                    # Until the address is refused: a request takes far less than the 2 s its bucket refills in,
                    # so that comes, after the burst and however slow this machine is. The trusted proxy's
                    # clients each have a bucket of their own: burst + 2 requests and no refusal.
                    while 429 not in statuses and len(statuses) < (ENROLLMENT_BURST + 2 if peer == "127.0.0.2"
                                                                    else 300):
                        statuses.append(http.post("/enrollment", json=request_body("dept", key, "wrong"), headers={
                            "X-Forwarded-For": f"198.51.{len(statuses) // 250}.{len(statuses) % 250 + 1}"}
                        ).status_code)
                    sent[name, peer] = Counter(statuses)
        finally:
            stop_node(process)
    assert sent["n1", "127.0.0.1"][429] == 1 and sent["n2", "127.0.0.3"][429] == 1, sent
    assert sent["n2", "127.0.0.2"] == {401: ENROLLMENT_BURST + 2}, sent


def test_the_limiter_remembers_a_bounded_number_of_addresses(frozen_clock):
    limiter = throttle.SourceLimiter(1, 60.0, "enrollment requests", max_sources=100)
    for i in range(5000):
        limiter.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter) == 100
    with pytest.raises(RmsdError):
        limiter.take("10.0.19.135")  # among the last 100 seen: still counted
    # IPv6 addresses count by their /64; IPv4-mapped ones as the IPv4 address.
    assert throttle.source_key("2001:db8:1:2:aaaa::1") == throttle.source_key("2001:db8:1:2:bbbb::2")
    assert throttle.source_key("::ffff:192.0.2.7") == "192.0.2.7"


# --- a credential enrolls once -------------------------------------------------------------------------------


def test_a_credential_enrolls_once(any_root):
    database, config_path = any_root
    with serving(config_path) as (node, url):
        credential(database, "dept")
        enroll(url, database, "dept", new_key())
        with pytest.raises(RmsdError, match="refused the enrollment credential"):
            enroll(url, database, "dept", new_key())
        # Spent, it is refused before anything of the request is looked at, as an unknown one.
        spent = httpx.post(f"{url}/enrollment", json=dict(request_body("dept", new_key()), csr="not a CSR"))
        assert spent.status_code == 401, spent.text
        listed = admin.cluster_info(name="c1", **database.admin_args())
        assert [e["licensing_cluster"] for e in listed["enrollments"]] == ["dept"]
        assert [c["last_used_at"] is not None for c in listed["enrollment_credentials"]] == [True]
        # Asking for the same secret again makes a fresh credential: the used one is no longer usable.
        again = credential(database, "dept")
        assert again.changed and again.facts["credential"]["used"] is False
        enroll(url, database, "dept", new_key())
        assert credential(database, "dept").changed is True


def test_concurrent_enrollments_with_one_credential_enroll_once(any_root):
    database, config_path = any_root
    threads_count = 6
    with serving(config_path) as (node, url):
        unlimited(node)
        node.credential_checks = throttle.Slots(threads_count, "enrollment credential checks")
        credential(database, "dept")
        bodies = [request_body("dept", new_key()) for _ in range(threads_count)]
        start = threading.Barrier(threads_count)
        answers: list = []

        def race(body):
            with httpx.Client(base_url=url, timeout=60) as http:
                start.wait(30)
                answers.append(http.post("/enrollment", json=body))

        threads = [threading.Thread(target=race, args=(body,)) for body in bodies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert sorted(a.status_code for a in answers) == [200] + [401] * (threads_count - 1), [a.text for a in answers]
    assert database.count("enrollments") == 1


# --- revocations only with the revoked key's own statement ---------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_statement(signer: SoftwareKey, named: SoftwareKey, revoked_key_id: str, cluster: str,
                     typ: str = revocation.TYPE) -> str:
    """A revocation statement made with another JOSE library (jwcrypto), from any parts."""
    public = json.loads(jwk.JWK.from_pyca(named.public_key).export_public())
    claims = {"cluster": cluster, "revoked_key_id": revoked_key_id, "iat": 0, "public_key": public}
    token = jws.JWS(json.dumps(claims).encode())
    token.add_signature(jwk.JWK.from_pyca(signer._private_key), None,
                        json.dumps({"alg": "RS256", "typ": typ, "kid": signer.key_id}))
    return token.serialize(compact=True)


def test_revoked_key_ids_need_the_revoked_keys_own_statement(root, record_property):
    """A claim that a licensing cluster's key is compromised, sent with its enrollment credential, is refused
    (400, nothing changes: not even the credential is spent) unless a statement signed by that very key, for
    that cluster, proves it; with the proof the root never certifies the key again."""
    database, config_path = root
    enrolled, attacker, new = new_key(), new_key(), new_key()
    outcomes: Counter = Counter()
    with serving(config_path) as (node, url):
        unlimited(node)
        credential(database, "victim")
        enroll(url, database, "victim", enrolled)
        http = httpx.Client(base_url=url, timeout=30)
        keys = {"enrolled": enrolled, "attacker": attacker}

        @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(signer=st.sampled_from(sorted(keys)), named=st.sampled_from(sorted(keys)),
               claimed=st.sampled_from(sorted(keys)), cluster=st.sampled_from(["victim", "other"]),
               typ=st.sampled_from([revocation.TYPE, "JWT"]), with_statement=st.booleans(),
               ids=st.sampled_from([["enrolled"], ["enrolled", "attacker"], []]))
        # The classes that matter, whatever else is drawn: a bare claim, a statement signed by another key than
        # the one it names, a statement of the signer about another key, one for another cluster, a genuine one.
        @example(signer="enrolled", named="enrolled", claimed="enrolled", cluster="victim", typ=revocation.TYPE,
                 with_statement=False, ids=["enrolled"])
        @example(signer="attacker", named="enrolled", claimed="enrolled", cluster="victim", typ=revocation.TYPE,
                 with_statement=True, ids=["enrolled"])
        @example(signer="attacker", named="attacker", claimed="enrolled", cluster="victim", typ=revocation.TYPE,
                 with_statement=True, ids=[])
        @example(signer="enrolled", named="enrolled", claimed="enrolled", cluster="other", typ=revocation.TYPE,
                 with_statement=True, ids=["enrolled"])
        @example(signer="enrolled", named="enrolled", claimed="enrolled", cluster="victim", typ=revocation.TYPE,
                 with_statement=True, ids=["enrolled"])
        def claim(signer, named, claimed, cluster, typ, with_statement, ids):
            statements = [forged_statement(keys[signer], keys[named], keys[claimed].key_id, cluster, typ)] \
                if with_statement else []
            genuine = signer == named == claimed and cluster == "victim" and typ == revocation.TYPE
            proven = {claimed} if with_statement and genuine else set()
            refused = (with_statement and not genuine) or not set(ids) <= proven
            credential(database, "victim")
            dump = database.dump()
            response = http.post("/enrollment", json=request_body(
                "victim", new, revoked_key_ids=[keys[k].key_id for k in ids], revocations=statements))
            if refused:
                assert response.status_code == 400, response.text
                assert "revocation statement" in response.json()["detail"]
                assert database.dump() == dump  # the credential not spent either
                outcomes["unproven: refused, nothing changed"] += 1
            else:
                assert response.status_code == 200, response.text
                if "enrolled" in proven:  # the key's own statement: the root never certifies it again
                    rows = {e["key_id"]: e["revoked_at"] for e in admin.cluster_info(
                        name="c1", **database.admin_args())["enrollments"]}
                    assert rows[enrolled.key_id] is not None
                outcomes["proven by the key itself: accepted" if proven else "no claim: enrolled"] += 1

        claim()
        # A claim proven the way rmsd proves it: the key is revoked at the root, for good.
        credential(database, "victim")
        enroll(url, database, "victim", new, revocations={enrolled.key_id: revocation.make(enrolled, "victim",
                                                                                           utcnow())})
        rows = {e["key_id"]: e for e in admin.cluster_info(name="c1", **database.admin_args())["enrollments"]}
        assert rows[enrolled.key_id]["revoked_at"] is not None and rows[new.key_id]["revoked_at"] is None
        credential(database, "victim")
        with pytest.raises(RmsdError, match="revoked as compromised"):
            enroll(url, database, "victim", enrolled)
    record_property("hypothesis_cases", f"revocation claims: {dict(outcomes)}")
    assert outcomes["unproven: refused, nothing changed"] > 0


LICENSING_PASSWORD = "Branch-Key-Pass-3c81e0f4a7d2"


def test_a_key_revoked_without_enrollment_is_declared_at_the_next_one(root, tmp_path):
    """A licensing cluster revokes an archived key (no new key, no enrollment): the key signs its revocation
    statement then, and the statement is kept; the next enrollment hands it to the root, even when the key
    can no longer sign (destroyed since, here: its private half removed)."""
    database, config_path = root
    branch = sqlite_database(tmp_path / "branch")
    args = {"cluster": "branch", "key_password": LICENSING_PASSWORD, **branch.admin_args()}
    with serving(config_path) as (node, url):
        unlimited(node)
        credential(database, "branch")
        admin.ensure_cluster(name="branch", role="licensing", key_password=LICENSING_PASSWORD,
                             intranet_url="https://branch.example", enrollment_url=url, enrollment_credential=SECRET,
                             **branch.admin_args())
        first = admin.cluster_info(name="branch", **branch.admin_args())["cluster"]["active_key_id"]
        engine = branch.engine()
        with engine.begin() as conn:  # a key old enough to be rolled over
            conn.execute(sa.text("UPDATE cluster_keys SET created_at = '2020-01-01 00:00:00'"))
        credential(database, "branch")
        admin.ensure_cluster_key(max_age=1, enrollment_url=url, enrollment_credential=SECRET, **args)
        done = admin.ensure_cluster_key(compromised_keys=[first], **args)  # archived: nothing to enroll
        assert done.changed and done.facts["rotation"] == {}
        with engine.begin() as conn:
            stored = conn.execute(sa.text("SELECT revocation FROM cluster_keys WHERE id = :k"), {"k": first}).scalar()
            assert revocation.verify(stored, "branch") == first
            conn.execute(sa.text("UPDATE cluster_keys SET encrypted_private_key = NULL WHERE id = :k"), {"k": first})
        engine.dispose()
        root_rows = {e["key_id"]: e for e in admin.cluster_info(name="c1", **database.admin_args())["enrollments"]}
        assert root_rows[first]["revoked_at"] is None  # the root was not told yet
        credential(database, "branch")
        admin.ensure_cluster_key(reenroll=True, enrollment_url=url, enrollment_credential=SECRET, **args)
    root_rows = {e["key_id"]: e for e in admin.cluster_info(name="c1", **database.admin_args())["enrollments"]}
    assert root_rows[first]["revoked_at"] is not None


# --- transport off the loopback interface ---------------------------------------------------------------------


OFF_LOOPBACK_HOSTS = st.one_of(
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_loopback).map(str),
    st.ip_addresses(v=6).filter(lambda ip: not ip.is_loopback and ip.ipv4_mapped is None).map(lambda ip: f"[{ip}]"),
    st.from_regex(r"\A[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}\Z", fullmatch=True).filter(
        lambda name: name != "localhost" and not name.endswith(".localhost") and not name.startswith("localhost.")
        and name not in ("ip6-localhost", "ip6-loopback")),
)
LOOPBACK_HOSTS = st.one_of(st.sampled_from(["localhost", "[::1]", "127.0.0.1"]),
                           st.ip_addresses(network="127.0.0.0/8").map(str))
WEAK_SSLMODES = st.sampled_from([None, "disable", "allow", "prefer", "require", "verify-ca"])


@SETTINGS
@given(host=OFF_LOOPBACK_HOSTS)
def test_a_plain_http_enrollment_url_off_loopback_is_refused(host):
    url = f"http://{host}:8080"
    with pytest.raises(RmsdError) as refused:
        enrollment.check_url(url)
    assert "enrollment_url" in str(refused.value) and "https" in str(refused.value)
    enrollment.check_url(f"https://{host}:8443")


@SETTINGS
@given(host=LOOPBACK_HOSTS)
def test_a_plain_http_enrollment_url_on_loopback_is_accepted(host):
    enrollment.check_url(f"http://{host}:8080")


def test_licensing_cluster_and_key_rotation_refuse_an_http_enrollment_url_and_change_nothing(tmp_path, root):
    database, config_path = root
    branch = sqlite_database(tmp_path)
    for check_mode in (True, False):
        with pytest.raises(RmsdError) as refused:
            admin.ensure_cluster(name="branch", role="licensing", key_password=LICENSING_PASSWORD,
                                 intranet_url="https://branch.example", enrollment_url="http://rms.example.com",
                                 enrollment_credential=SECRET, check_mode=check_mode, **branch.admin_args())
        assert "enrollment_url uses plain http to rms.example.com" in str(refused.value)
        assert "Nothing was changed" in str(refused.value)
        assert branch.dump() is None
    # An enrolled licensing cluster: its key rotation refuses it too, before anything happens.
    with serving(config_path) as (node, url):
        unlimited(node)
        credential(database, "branch2")
        branch2 = sqlite_database(tmp_path / "b2")
        admin.ensure_cluster(name="branch2", role="licensing", key_password=LICENSING_PASSWORD,
                             intranet_url="https://branch2.example", enrollment_url=url,
                             enrollment_credential=SECRET, **branch2.admin_args())
    dump = branch2.dump()
    with pytest.raises(RmsdError, match="enrollment_url uses plain http"):
        admin.ensure_cluster_key(cluster="branch2", key_password=LICENSING_PASSWORD, reenroll=True,
                                 enrollment_url="http://10.0.0.5:8080", enrollment_credential=SECRET,
                                 **branch2.admin_args())
    assert branch2.dump() == dump


@SETTINGS
@given(host=OFF_LOOPBACK_HOSTS, sslmode=WEAK_SSLMODES)
def test_postgresql_off_loopback_needs_verify_full(host, sslmode):
    query = f"?sslmode={sslmode}&sslrootcert=/etc/ssl/ca.pem" if sslmode else ""
    url = f"postgresql://rms@{host}:5432/drms_config_corp{query}"
    with pytest.raises(RmsdError) as refused:
        db.make_engine(url, "Canary-Database-Password")
    assert "sslmode=verify-full&sslrootcert=" in str(refused.value) and "database_url" in str(refused.value)
    assert "Canary" not in str(refused.value)
    # A second host off loopback in the query counts as much as the first.
    with pytest.raises(RmsdError):
        db.make_engine(f"postgresql://rms@127.0.0.1/d?host={host.strip('[]')}", None)
    db.make_engine(f"postgresql://rms@{host}:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/ca.pem",
                   None).dispose()


@SETTINGS
@given(host=LOOPBACK_HOSTS, sslmode=WEAK_SSLMODES)
def test_postgresql_on_loopback_or_a_unix_socket_takes_any_sslmode(host, sslmode):
    query = f"?sslmode={sslmode}" if sslmode else ""
    db.make_engine(f"postgresql://rms@{host}:5432/d{query}", None).dispose()
    separator = "&" if query else "?"
    db.make_engine(f"postgresql://rms@/d{query}{separator}host=/run/postgresql", None).dispose()


def test_an_unverified_postgresql_url_is_refused_by_the_admin_calls_and_the_node(tmp_path):
    url = "postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=require"
    with pytest.raises(RmsdError, match="add sslmode=verify-full|Add sslmode=verify-full"):
        admin.ensure_cluster(name="c1", key_password=KEY_PASSWORD, intranet_url="https://rms.example.com",
                             database_url=url)
    secret = tmp_path / "secret.toml"
    secret.write_text("")
    os.chmod(secret, 0o600)
    config = tmp_path / "rmsd.toml"
    config.write_text(f'[node]\nname = "n1"\ncluster = "c1"\ndatabase_url = "{url}"\nlisten_address = "127.0.0.1"\n'
                      f'port = 9\nsecret_path = "{secret}"\n')
    with pytest.raises(RmsdError, match="verify-full"):
        create_app(load_node_config(config))
