"""The issuer's JWKS as an anonymous client and a failing issuer see it, against real nodes reading a real JWKS
server on 127.0.0.1: a flood of tokens naming unknown keys causes at most one fetch per interval while cached
tokens keep working; the issuer's key rollover (a new key verifies at once, a dropped one stops verifying within
the JWKS lifetime); an issuer that is down or answers garbage (the last good key set stays, the outage is logged
once); the fetch's bounds (size, time, redirects, certificate); and the transport rule for identity_jwks_uri."""

import base64
import json
import statistics
import string
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import tomli_w
from conftest import KEY_PASSWORD, eventually, free_port, provision, sqlite_database, start_node, stop_node
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import RSAKey
from test_tls import make_ca, write_key

from rmsd import admin, demo_issuer, identity
from rmsd.client import User
from rmsd.errors import AuthenticationError, RmsdError

HYPOTHESIS = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
USER = User("jwks-user@example.com", "", rsa.generate_private_key(public_exponent=65537, key_size=2048))
CSR = USER.csr_pem()
ENDLESS_LIMIT = 64 * 1024 * 1024  # what the endless JWKS sends at most before it gives up


def new_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


def sign(key: RSAKey, subject: str, kid: str | None = None, ttl: int = 900) -> str:
    now = int(time.time())
    claims = {"iss": demo_issuer.ISSUER, "aud": demo_issuer.AUDIENCE, "sub": subject, "iat": now, "nbf": now,
              "exp": now + ttl}
    return jwt.encode({"alg": "RS256", "kid": kid or key.kid}, claims, key)


class JwksServer:
    """The issuer's JWKS over real HTTP(S) on 127.0.0.1, counting the requests it answers. `mode`: ok, error
    (503), garbage (200, not a key set), endless (a body that never ends, without a length), huge (a declared
    50 MB), drip (a byte every 0.2 s), redirect (to `redirect_to`)."""

    def __init__(self, keys=(), tls=None):
        self.keys = list(keys)
        self.mode, self.delay, self.redirect_to = "ok", 0.0, ""
        self.requests = self.failed = self.bytes_sent = 0
        self.release = threading.Event()  # cleared: requests are held until it is set again
        self.release.set()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's name)
                outer._answer(self)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def publish(self, *keys: RSAKey) -> None:
        self.keys = list(keys)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        with self._lock:
            self.requests += 1
            self.failed += mode != "ok"
        self.release.wait(60)
        time.sleep(self.delay)
        if mode == "ok":
            body = json.dumps({"keys": [key.as_dict(private=False) for key in self.keys]}).encode()
            self._send(handler, 200, body, {"Content-Type": "application/json"})
        elif mode == "error":
            self._send(handler, 503, b"issuer down", {})
        elif mode == "garbage":
            self._send(handler, 200, b"<html>login page</html>", {"Content-Type": "text/html"})
        elif mode == "redirect":
            self._send(handler, 302, b"", {"Location": self.redirect_to})
        else:
            self._stream(handler, mode)

    def _send(self, handler, status: int, body: bytes, headers: dict) -> None:
        handler.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _stream(self, handler, mode: str) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Connection", "close")
        if mode == "huge":
            handler.send_header("Content-Length", str(50_000_000))
        handler.end_headers()
        chunk = b" " if mode == "drip" else b"[" * 65536
        try:
            while self.bytes_sent < ENDLESS_LIMIT:
                handler.wfile.write(chunk)
                handler.wfile.flush()
                self.bytes_sent += len(chunk)
                if mode == "drip":
                    time.sleep(0.2)
        except OSError:
            pass  # the reader hung up

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RunningNode:
    def __init__(self, url, process, log_path: Path):
        self.url, self.process, self.log_path = url, process, log_path
        self.http = httpx.Client(base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=64))

    def certify(self, token: str) -> httpx.Response:
        return self.http.post("/certification", json={"csr": CSR}, headers={"Authorization": f"Bearer {token}"})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def configure(cluster: dict, name: str, jwks_uri: str, ttl: int | None = None) -> Path:
    base = cluster["base"]
    config_path = base / "etc" / f"{name}.toml"
    admin.ensure_server(
        cluster="c1", name=name, key_password=KEY_PASSWORD, port=free_port(), config_path=str(config_path),
        secret_path=str(base / "etc" / f"{name}.secret"), identity_issuer=demo_issuer.ISSUER,
        identity_audience=demo_issuer.AUDIENCE, identity_jwks_uri=jwks_uri, workers=1,
        **cluster["database"].admin_args(),
    )
    if ttl is not None:  # a hand-written setting: the server module does not set it
        config = tomllib.loads(config_path.read_text())
        config["node"]["identity_jwks_ttl_seconds"] = ttl
        config_path.write_text(tomli_w.dumps(config))
    return config_path


@contextmanager
def running(cluster: dict, name: str, jwks_uri: str, ttl: int | None = None):
    config_path = configure(cluster, name, jwks_uri, ttl)
    log_path = cluster["base"] / f"{name}.log"
    url, process = start_node(config_path, log_path)
    node = RunningNode(url, process, log_path)
    try:
        yield node
    finally:
        node.http.close()
        stop_node(process)


def allowed_fetches(elapsed: float, ttl: float) -> int:
    """The most fetches a node may make in `elapsed` seconds: one forced refresh per interval (the first at
    once) and the scheduled ones (the first possibly at once)."""
    return 2 + int(elapsed // identity.FORCED_REFRESH_INTERVAL) + int(elapsed // ttl)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 401 and problem["detail"].startswith("bearer token"), problem


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("jwks")
    database = sqlite_database(base)
    provision(database)
    return {"base": base, "database": database}


@pytest.fixture(scope="module")
def issuer_key():
    return new_key("issuer-2026-a")


@pytest.fixture(scope="module")
def flood_jwks(issuer_key):
    server = JwksServer([issuer_key])
    yield server
    server.close()


@pytest.fixture(scope="module")
def flood_node(cluster, flood_jwks):
    """A node with the default JWKS lifetime, reading flood_jwks over plain http on loopback."""
    with running(cluster, "flood", flood_jwks.url) as node:
        yield node


ROLLOVER_TTL = 2


@pytest.fixture(scope="module")
def rollover_jwks(issuer_key):
    server = JwksServer([issuer_key])
    yield server
    server.close()


@pytest.fixture(scope="module")
def rollover_node(cluster, rollover_jwks):
    """A node whose JWKS lifetime is ROLLOVER_TTL seconds (instead of 300), so key removal is seen at once."""
    with running(cluster, "rollover", rollover_jwks.url, ttl=ROLLOVER_TTL) as node:
        yield node


# --- an anonymous client naming keys the issuer does not have -------------------------------------------


def test_forged_kid_flood_fetches_once_and_cached_tokens_keep_working(flood_node, flood_jwks, issuer_key):
    valid = sign(issuer_key, "cached-user@example.com")
    assert flood_node.certify(valid).status_code == 200  # the key set is read and the token cached
    baseline = []
    for _ in range(20):
        started = time.perf_counter()
        assert flood_node.certify(valid).status_code == 200
        baseline.append(time.perf_counter() - started)
    attacker = new_key("attacker")
    forged = [sign(attacker, "victim@example.com", kid=f"forged-{i}") for i in range(200)]
    flood_jwks.delay = 0.5  # an issuer that answers slowly, as in the review's reproduction
    before = flood_jwks.requests
    flooding = threading.Event()
    flooding.set()
    latencies, statuses = [], []

    def cached_user():
        while True:  # at least once, however fast the flood
            started = time.perf_counter()
            statuses.append(flood_node.certify(valid).status_code)
            latencies.append(time.perf_counter() - started)
            if not flooding.is_set():
                return

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(1) as probe, ThreadPoolExecutor(16) as pool:
            prober = probe.submit(cached_user)
            answers = []
            for wave in range(0, len(forged), 50):  # waves: each starts after the one before has been answered
                answers += pool.map(flood_node.certify, forged[wave:wave + 50])
            flooding.clear()
            prober.result()
        elapsed = time.monotonic() - started
    finally:
        flood_jwks.delay = 0.0
    fetches = flood_jwks.requests - before
    print(f"\n[jwks flood] {len(forged)} forged-kid requests in {elapsed:.1f} s caused {fetches} JWKS fetch(es); "
          f"cached token: {len(latencies)} requests, p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms (before the flood: p50 {statistics.median(baseline) * 1000:.0f} ms)")
    for answer in answers:
        assert_refused(answer)
    assert statuses and set(statuses) == {200}
    assert fetches <= allowed_fetches(elapsed, identity.JWKS_TTL) - 1, fetches  # no scheduled one is due


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(header, payload, signature: bytes) -> str:
    def part(value):
        return _b64(value if isinstance(value, bytes) else json.dumps(value).encode())
    return f"{part(header)}.{part(payload)}.{_b64(signature)}"


KIDS = st.one_of(st.text(max_size=40), st.text(min_size=250, max_size=300), st.integers(), st.none(),
                 st.lists(st.text(max_size=5), max_size=3), st.sampled_from(["issuer-2026-a", "", " "]))
ALGS = st.one_of(st.sampled_from(["RS256", "PS256", "ES256", "none", "HS256", "RS512", "EdDSA", ""]),
                 st.text(max_size=8), st.integers())
CLAIMS = st.fixed_dictionaries({}, optional={
    "iss": st.sampled_from([demo_issuer.ISSUER, "https://attacker.example"]), "aud": st.just(demo_issuer.AUDIENCE),
    "sub": st.text(max_size=20), "exp": st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
})


def test_generated_token_garbage_gets_401_and_bounded_fetches(flood_node, flood_jwks, issuer_key, record_property):
    """Tokens with arbitrary kid, alg and header content (or no JWS shape at all) are refused with a 401
    problem document, and never make the node read more than the allowed fetches; URLs in the token's own
    header (jku, x5u) are never read."""
    token_host = JwksServer([new_key("token-host")])  # what a token's header points at
    attacker = new_key("attacker")
    headers = st.fixed_dictionaries({}, optional={
        "alg": ALGS, "kid": KIDS, "typ": st.sampled_from(["JWT", "at+jwt", ""]), "crit": st.lists(st.text(max_size=4)),
        "jku": st.just(token_host.url), "x5u": st.just(token_host.url),
        "jwk": st.just(attacker.as_dict(private=False)), "b64": st.booleans(),
    })
    tokens = st.one_of(
        st.builds(_compact, headers, CLAIMS, st.binary(max_size=300)),
        st.builds(_compact, st.binary(max_size=120), CLAIMS, st.binary(max_size=64)),
        st.builds(lambda kid, sub: sign(attacker, sub or "x", kid=kid), st.text(min_size=1, max_size=60),
                  st.text(max_size=10)),
        st.text(string.ascii_letters + string.digits + "-_.=+/", min_size=1, max_size=400),
    )
    assert flood_node.certify(sign(issuer_key, "warm@example.com")).status_code == 200
    before, started, cases = flood_jwks.requests, time.monotonic(), {"refused 401": 0}

    @given(token=tokens)
    @HYPOTHESIS
    def check(token):
        assert_refused(flood_node.certify(token))
        cases["refused 401"] += 1

    try:
        check()
        elapsed = time.monotonic() - started
        fetches = flood_jwks.requests - before
        line = f"JWKS token garbage: {cases['refused 401']} cases (refused 401: {cases['refused 401']}; " \
               f"JWKS fetches: {fetches} in {elapsed:.0f} s)"
        print(f"\n[hypothesis] {line}")
        record_property("hypothesis_cases", line)
        assert fetches <= allowed_fetches(elapsed, identity.JWKS_TTL), fetches
        assert token_host.requests == 0
    finally:
        token_host.close()


# --- the issuer's key rollover ---------------------------------------------------------------------------


def test_key_rollover_new_key_at_once_dropped_key_within_the_ttl(rollover_node, rollover_jwks, issuer_key):
    old_key, new = issuer_key, new_key("issuer-2026-b")
    rollover_jwks.publish(old_key)
    old_token = sign(old_key, "rolling@example.com")
    eventually(lambda: _succeeds(rollover_node, old_token))  # the node has read (or reread) this key set
    # The issuer adds its next key and signs with it: the first token naming it verifies.
    rollover_jwks.publish(old_key, new)
    before = rollover_jwks.requests
    assert rollover_node.certify(sign(new, "first-with-new-key@example.com")).status_code == 200
    assert rollover_jwks.requests > before
    # The issuer drops the old key: a token signed with it, verified and cached before, stops verifying once
    # the node reads the key set again.
    rollover_jwks.publish(new)
    before = rollover_jwks.requests
    eventually(lambda: assert_refused(rollover_node.certify(old_token)), timeout=60)
    assert rollover_jwks.requests > before
    assert_refused(rollover_node.certify(sign(old_key, "another@example.com")))
    assert rollover_node.certify(sign(new, "rolling@example.com")).status_code == 200


def _succeeds(node: RunningNode, token: str) -> None:
    response = node.certify(token)
    assert response.status_code == 200, response.text


# --- the issuer down, or answering garbage ---------------------------------------------------------------


OUTAGE_STARTED = "and tries again every"
OUTAGE_ENDED = "is readable again after"


def test_issuer_down_keeps_the_last_good_key_set_and_logs_once(rollover_node, rollover_jwks):
    key = new_key("issuer-2026-c")
    rollover_jwks.publish(key)
    cached = sign(key, "cached-in-outage@example.com")
    eventually(lambda: _succeeds(rollover_node, cached))
    log_start = len(rollover_node.log())
    rounds = 0

    def drive(until, timeout=60.0):
        """Cached and new tokens signed with the known key, until `until()`: every one verifies."""
        nonlocal rounds
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "the node made no JWKS fetch the test waited for"
            _succeeds(rollover_node, cached)
            _succeeds(rollover_node, sign(key, f"new-in-outage-{rounds}@example.com"))
            rounds += 1
            time.sleep(0.1)

    failed = rollover_jwks.failed
    rollover_jwks.mode = "error"
    drive(lambda: rollover_jwks.failed >= failed + 2)
    rollover_jwks.mode = "garbage"
    drive(lambda: rollover_jwks.failed >= failed + 4)
    # A token naming a key the node does not have is refused, not an error.
    assert_refused(rollover_node.certify(sign(new_key("unknown"), "u@example.com")))
    rollover_jwks.mode = "ok"
    drive(lambda: OUTAGE_ENDED in rollover_node.log()[log_start:])
    log = rollover_node.log()[log_start:]
    print(f"\n[jwks outage] {rollover_jwks.failed - failed} failed fetches over {rounds} rounds of requests; log:\n"
          + "\n".join(line for line in log.splitlines() if "JWKS" in line))
    assert log.count(OUTAGE_STARTED) == 1 and log.count(OUTAGE_ENDED) == 1
    assert "cannot be read: HTTP 503" in log


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10), st.floats())
JWKS_GARBAGE = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["keys", "kty", "n", "e", "crv", "x", "y", "kid", "k", "alg", "use"]), inner,
                    max_size=5)), max_leaves=15)


def test_generated_jwks_garbage_keeps_the_last_good_key_set(tmp_path, issuer_key, record_property, caplog):
    """Whatever the issuer answers instead of a key set (any JSON, or none) is refused with one log line and
    the key set read before stays in use."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [issuer_key.as_dict(private=False)]}))
    # forced_interval=0: every token naming an unknown key reads the JWKS again, one generated answer each.
    verifier = identity.TokenVerifier(demo_issuer.ISSUER, demo_issuer.AUDIENCE, path.as_uri(), forced_interval=0)
    verifier.verify(sign(issuer_key, "first@example.com"))
    attacker, cases = new_key("attacker"), {"kept": 0}

    @given(document=st.one_of(JWKS_GARBAGE.map(json.dumps), st.text(max_size=50)))
    @HYPOTHESIS
    def check(document):
        path.write_text(document)
        fetches = verifier.fetches
        with pytest.raises(AuthenticationError, match="not signed by a key of the issuer"):
            verifier.verify(sign(attacker, "victim@example.com", kid="next-key"))
        assert verifier.fetches == fetches + 1 and verifier.failures >= 1
        assert verifier.verify(sign(issuer_key, f"user-{cases['kept']}@example.com"))
        cases["kept"] += 1

    check()
    line = f"JWKS garbage from the issuer: {cases['kept']} cases (last good key set kept: {cases['kept']})"
    print(f"\n[hypothesis] {line}")
    record_property("hypothesis_cases", line)
    assert caplog.text.count("tries again every") == 1 and "failed:" not in caplog.text


# --- the fetch's bounds ----------------------------------------------------------------------------------


def _verifier(uri: str) -> identity.TokenVerifier:
    return identity.TokenVerifier(demo_issuer.ISSUER, demo_issuer.AUDIENCE, uri)


@pytest.mark.parametrize(("mode", "says"), [("endless", "larger than 1048576 bytes"),
                                            ("huge", "larger than 1048576 bytes"),
                                            ("drip", "took longer than")])
def test_a_jwks_too_large_or_too_slow_is_not_read_to_its_end(mode, says, issuer_key, caplog, monkeypatch):
    monkeypatch.setattr(identity, "FETCH_SECONDS", 1.0)  # so that the drip takes a second, not five
    server = JwksServer([issuer_key])
    server.mode = mode
    try:
        with pytest.raises(AuthenticationError, match="could not be read yet"):
            _verifier(server.url).verify(sign(issuer_key, "u@example.com"))
        assert says in caplog.text
        assert server.bytes_sent < ENDLESS_LIMIT
    finally:
        server.close()


def test_a_redirect_is_not_followed(issuer_key, caplog):
    elsewhere, server = JwksServer([issuer_key]), JwksServer([issuer_key])
    server.mode, server.redirect_to = "redirect", elsewhere.url
    try:
        with pytest.raises(AuthenticationError):
            _verifier(server.url).verify(sign(issuer_key, "u@example.com"))
        assert "answered a redirect" in caplog.text and elsewhere.requests == 0
    finally:
        server.close()
        elsewhere.close()


def test_requests_waiting_for_a_fetch_are_bounded_and_others_do_not_wait(issuer_key, monkeypatch):
    """While the issuer does not answer, at most MAX_WAITING forged-kid requests wait for the one fetch; the
    rest are refused at once, and tokens signed with a known key verify without waiting."""
    monkeypatch.setattr(identity, "FETCH_SECONDS", 30.0)  # the held fetch outlasts the test's checks
    server = JwksServer([issuer_key])
    verifier = _verifier(server.url)
    verifier.verify(sign(issuer_key, "cached@example.com"))
    attacker, answered = new_key("attacker"), []

    def forged(number: int) -> None:
        with pytest.raises(AuthenticationError):
            verifier.verify(sign(attacker, "victim@example.com", kid=f"forged-{number}"))
        answered.append(number)

    server.release.clear()
    flood = [threading.Thread(target=forged, args=(i,)) for i in range(30)]
    try:
        for thread in flood:
            thread.start()
        eventually(lambda: _at_least(answered, len(flood) - identity.MAX_WAITING))
        new_token = threading.Thread(target=verifier.verify, args=(sign(issuer_key, "new@example.com"),))
        new_token.start()
        new_token.join(30)
        assert not new_token.is_alive()  # it did not wait for the fetch
        eventually(lambda: _at_least([None] * server.requests, 2))  # the one forced fetch, held
        assert len(answered) == len(flood) - identity.MAX_WAITING and server.requests == 2
    finally:
        server.release.set()
        for thread in flood:
            thread.join()
        server.close()
    assert len(answered) == len(flood) and verifier.fetches == 2


def test_a_scheduled_refresh_does_not_hold_requests(issuer_key, monkeypatch):
    """When the key set is due to be read again, requests go on verifying with it while the fetch runs."""
    monkeypatch.setattr(identity, "FETCH_SECONDS", 60.0)  # the held fetch outlasts the test's checks
    server = JwksServer([issuer_key])
    verifier = identity.TokenVerifier(demo_issuer.ISSUER, demo_issuer.AUDIENCE, server.url, jwks_ttl=1)
    verifier.verify(sign(issuer_key, "first@example.com"))
    server.release.clear()
    try:
        time.sleep(1.1)  # the key set is now due
        request = threading.Thread(target=verifier.verify, args=(sign(issuer_key, "during@example.com"),))
        request.start()
        request.join(30)
        assert not request.is_alive()
        eventually(lambda: _at_least([None] * server.requests, 2))  # the scheduled fetch is under way, held
        assert verifier.fetches == 1
    finally:
        server.release.set()
        server.close()


def _at_least(items: list, count: int) -> None:
    assert len(items) >= count, len(items)


def test_a_refresh_keeps_tokens_verified_before(flood_jwks, issuer_key):
    verifier = _verifier(flood_jwks.url)
    valid = sign(issuer_key, "kept@example.com")
    verifier.verify(valid)
    fetches = verifier.fetches
    with pytest.raises(AuthenticationError, match="not signed by a key of the issuer"):
        verifier.verify(sign(new_key("unknown"), "u@example.com"))
    assert verifier.fetches == fetches + 1  # the unknown kid read the key set again
    hits = verifier.tokens.hits
    verifier.verify(valid)
    assert verifier.tokens.hits == hits + 1  # answered from the cache: the new key set did not clear it


def _https_jwks(directory: Path, issuer_key: RSAKey) -> tuple[JwksServer, Path]:
    import ssl

    ca = make_ca(directory / "ca", "jwks")
    key_path = directory / "server.key"
    leaf = ca.issue(write_key(key_path).public_key(), directory / "server.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key_path)
    return JwksServer([issuer_key], tls=context), ca.path


def test_https_jwks_certificate_is_verified(tmp_path, issuer_key, caplog, monkeypatch):
    server, ca_file = _https_jwks(tmp_path, issuer_key)
    token = sign(issuer_key, "tls@example.com")
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        with pytest.raises(AuthenticationError):
            _verifier(server.url).verify(token)
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the CA the node is told to trust
        assert _verifier(server.url).verify(token).subject == "tls@example.com"
    finally:
        server.close()


# --- the transport rule ----------------------------------------------------------------------------------


def test_http_jwks_off_loopback_is_refused_at_configuration(cluster):
    config_path = cluster["base"] / "etc" / "refused.toml"
    for uri in ("http://idp.example/jwks", "http://10.0.0.5:8080/jwks", "HTTP://idp.example/jwks"):
        with pytest.raises(RmsdError, match="identity_jwks_uri uses plain http") as refused:
            configure(cluster, "refused", uri)
        assert "https" in str(refused.value)
        assert not config_path.exists() and not config_path.with_suffix(".secret").exists()
        assert cluster["database"].count("servers", name="refused") == 0
    for uri in ("https://idp.example/.well-known/jwks.json", "file:///etc/rmsd/jwks.json",
                "http://127.0.0.1:9/jwks", "http://[::1]:9/jwks", "http://localhost/jwks"):
        result = admin.ensure_server(
            cluster="c1", name="accepted", key_password=KEY_PASSWORD, port=free_port(), check_mode=True,
            config_path=str(cluster["base"] / "etc" / "accepted.toml"), identity_issuer=demo_issuer.ISSUER,
            secret_path=str(cluster["base"] / "etc" / "accepted.secret"), identity_jwks_uri=uri,
            **cluster["database"].admin_args(),
        )
        assert result.changed


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.ip_addresses())
def test_http_jwks_is_refused_exactly_off_loopback(address):
    host = f"[{address}]" if address.version == 6 else str(address)
    identity.check_jwks_uri(f"https://{host}/jwks")
    if address.is_loopback:
        identity.check_jwks_uri(f"http://{host}/jwks")
    else:
        with pytest.raises(RmsdError, match="plain http"):
            identity.check_jwks_uri(f"http://{host}/jwks")


def test_http_jwks_off_loopback_in_a_hand_written_config_stops_the_node(cluster):
    config_path = configure(cluster, "handwritten", "file:///nonexistent/jwks.json")
    config = tomllib.loads(config_path.read_text())
    config["node"]["identity_jwks_uri"] = "http://idp.example/.well-known/jwks.json"
    config_path.write_text(tomli_w.dumps(config))
    log_path = cluster["base"] / "handwritten.log"
    try:
        _url, process = start_node(config_path, log_path)
    except RuntimeError as refused:
        assert "identity_jwks_uri uses plain http to idp.example" in str(refused)
    else:
        stop_node(process)
        pytest.fail(f"rmsd serve started with a plain http JWKS off loopback:\n{log_path.read_text()}")


def test_https_and_file_jwks_are_used_by_a_running_node(cluster, tmp_path, issuer_key, monkeypatch, node):
    server, ca_file = _https_jwks(tmp_path, issuer_key)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the node's environment names the issuer's CA
    try:
        with running(cluster, "https", server.url) as https_node:
            assert https_node.certify(sign(issuer_key, "https@example.com")).status_code == 200
            assert server.requests == 1
    finally:
        server.close()
    assert tomllib.loads(node.config_path.read_text())["node"]["identity_jwks_uri"].startswith("file://")
    response = httpx.post(f"{node.url}/certification", json={"csr": CSR},
                          headers={"Authorization": f"Bearer {node.token('file@example.com')}"})
    assert response.status_code == 200, response.text


def test_jwks_ttl_setting_is_checked_at_start():
    for ttl in (0, -1, 86_401, "300", True):
        with pytest.raises(RmsdError, match="identity_jwks_ttl_seconds must be"):
            identity.TokenVerifier(demo_issuer.ISSUER, demo_issuer.AUDIENCE, "file:///x", ttl)  # type: ignore[arg-type]
    assert identity.TokenVerifier(demo_issuer.ISSUER, demo_issuer.AUDIENCE, "file:///x", 1).jwks_ttl == 1
