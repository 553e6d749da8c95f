"""Limits before work (request body size, uvicorn's header and keep-alive limits), one error model
(RFC 9457 problem documents for every error status) and configuration database outages (503 with
Retry-After, logged once when they start and once when they end)."""

import asyncio
import json
import logging
import select
import socket
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
from conftest import configure_node, make_issuer, provision, sqlite_database, start_node, stop_node
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from uvicorn.protocols.http.h11_impl import H11Protocol

from rmsd import limits
from rmsd.client import User
from rmsd.config import NodeConfig, load_node_config
from rmsd.errors import RmsdError
from rmsd.service import create_app, uvicorn_limits

PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance", "request_id"}
INTERNALS = ("starlette", "fastapi", "pydantic", "sqlalchemy", "uvicorn", "Traceback", "errors.pydantic.dev")
SAFETY_TIMEOUT = 20.0  # only so a broken server cannot hang the suite; every wait below ends on an event


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert PROBLEM_FIELDS <= set(body), body
    assert body["status"] == status
    assert body["type"] == "about:blank" or body["type"].startswith("urn:rmsd:problem:")
    assert body["title"] and body["detail"]
    assert body["instance"] == f"urn:uuid:{body['request_id']}"
    assert response.headers["x-request-id"] == body["request_id"]
    for word in INTERNALS:
        assert word not in response.text, (word, response.text)
    return body


# --- real HTTP against a served node ------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=SAFETY_TIMEOUT)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read one HTTP/1.1 response (the server closes the connection after it: Connection: close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
            headers = {k.lower(): v for k, v in headers.items()}
            if "content-length" in headers and len(rest) >= int(headers["content-length"]):
                break
    head, _sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return status, headers, body


def _as_httpx(status: int, headers: dict, body: bytes) -> httpx.Response:
    return httpx.Response(status, headers=headers, content=body)


def test_oversize_content_length_is_refused_before_the_body_is_sent(node):
    sock = _connect(node.url)
    with sock:
        # Headers only, no token: the 413 comes without a byte of the body and before authentication.
        sock.sendall(b"POST /certification HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\n\r\n")
        status, headers, body = _read_response(sock)
    problem = assert_problem(_as_httpx(status, headers, body), 413)
    assert problem["max_body_bytes"] == limits.MAX_BODY_BYTES
    assert headers["connection"] == "close"
    assert httpx.get(f"{node.url}/health", timeout=SAFETY_TIMEOUT).status_code == 200


def test_chunked_body_is_counted_and_refused_at_the_limit(node):
    sock = _connect(node.url)
    sent, total, piece = 0, 2 * 1024 * 1024, b"x" * 16384
    with sock:
        sock.sendall(b"POST /certification HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:  # the answer came: stop sending
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node closed the connection after its answer
        status, headers, body = _read_response(sock)
    assert_problem(_as_httpx(status, headers, body), 413)
    assert headers["connection"] == "close"
    # The node still serves, on a new connection.
    assert httpx.get(f"{node.url}/health", timeout=SAFETY_TIMEOUT).status_code == 200


def test_every_refusal_is_a_problem_document(node):
    http = httpx.Client(base_url=node.url, timeout=SAFETY_TIMEOUT)
    token = {"Authorization": f"Bearer {node.token('pat@example.com')}"}
    csr = User.new("pat@example.com", "").csr_pem()

    assert "is not a resource" in assert_problem(http.get("/no-such-thing"), 404)["detail"]
    wrong_method = http.get("/certification")
    assert "POST" in assert_problem(wrong_method, 405)["detail"] and wrong_method.headers["allow"] == "POST"
    malformed = http.post("/certification", content=b'{"csr": ', headers={"Content-Type": "application/json", **token})
    assert "not valid JSON" in assert_problem(malformed, 400)["detail"]
    # Wrong content type: refused before authentication (no token here).
    text = http.post("/certification", content=json.dumps({"csr": csr}), headers={"Content-Type": "text/plain"})
    assert "application/json" in assert_problem(text, 415)["detail"]
    invalid = assert_problem(http.post("/certification", json={}, headers=token), 422)
    assert invalid["errors"][0]["loc"] == ["body", "csr"] and "csr" in invalid["detail"]
    # The schema errors never echo the input (it may hold a credential).
    secret = "credential-never-echoed-9f1"
    echoed = http.post("/enrollment", json={"cluster": "x", "credential": secret}, headers=token)
    assert secret not in assert_problem(echoed, 422)["detail"] and secret not in echoed.text

    unauthenticated = http.post("/certification", json={"csr": csr})
    assert assert_problem(unauthenticated, 401)["error"] == "AuthenticationError"
    assert unauthenticated.headers["www-authenticate"] == "Bearer"
    forbidden = http.post("/enrollment", json={
        "cluster": "c1", "csr": csr, "intranet_url": "https://c1.example.com", "credential": "x",
    })
    assert "cannot enroll itself" in assert_problem(forbidden, 403)["detail"]
    no_template = http.post("/publishing", headers=token, json={
        "content_id": "d", "content_key": "A" * 43, "template": "no-such-template",
    })
    assert assert_problem(no_template, 404)["error"] == "NotFoundError"


# --- in process: what cannot be provoked from outside ------------------------------------------


@pytest.fixture
def app(tmp_path):
    database = sqlite_database(tmp_path)
    provision(database)
    _result, config_path, _secret_path = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    return create_app(load_node_config(config_path))


def test_unexpected_error_is_logged_with_its_id_and_answered_500(app, monkeypatch, caplog):
    def broken(_credentials):
        raise RuntimeError("internal state /var/lib/rmsd/secret-thing")

    monkeypatch.setattr(app.state.node, "authenticate", broken)
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="rmsd"):
        response = client.post("/certification", json={"csr": "x"})
    problem = assert_problem(response, 500)
    assert "secret-thing" not in response.text and "RuntimeError" not in response.text
    assert problem["request_id"] in problem["detail"]
    assert response.headers["connection"] == "close"
    [record] = [r for r in caplog.records if problem["request_id"] in r.getMessage()]
    assert record.exc_info and "secret-thing" in str(record.exc_info[1])


def test_database_outage_answers_503_with_retry_after_and_is_logged_once(app, tmp_path, monkeypatch, caplog):
    node = app.state.node
    node.snapshot_seconds = 0  # /health reads the cluster on every request here (else at most once a second)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/health").status_code == 200
    working = node.engine
    unreachable = sa.create_engine(f"sqlite:///{tmp_path}/gone/nothing-here/config.db")
    monkeypatch.setattr(node, "engine", unreachable)
    with caplog.at_level(logging.INFO, logger="rmsd"):
        for _ in range(5):
            response = client.get("/health")
            assert_problem(response, 503)
            assert int(response.headers["retry-after"]) == limits.RETRY_AFTER_SECONDS
        down = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(down) == 1 and down[0].levelno == logging.ERROR
        assert app.state.outage.refused == 5
        monkeypatch.setattr(node, "engine", working)
        assert client.get("/health").status_code == 200
        assert client.get("/health").status_code == 200
    back = [r for r in caplog.records if "available again" in r.getMessage()]
    assert len(back) == 1 and "5 requests were refused" in back[0].getMessage()
    assert not app.state.outage.down
    unreachable.dispose()


def test_outage_is_summed_up_not_logged_per_request(caplog):
    now = [0.0]
    outage = limits.OutageLog(summary_seconds=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="rmsd"):
        for second in range(0, 150):
            now[0] = float(second)
            outage.failed(sa.exc.OperationalError("x", None, Exception()))
        outage.succeeded()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 + 2 + 1, messages  # start, a count at 60 s and at 120 s, end
    assert "150 requests were refused" in messages[-1]


def test_configured_body_limit_applies(tmp_path):
    database = sqlite_database(tmp_path)
    provision(database)
    _result, config_path, _secret = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    config = load_node_config(config_path)
    small = NodeConfig(**{**config.__dict__, "max_body_bytes": 1000})
    client = TestClient(create_app(small), raise_server_exceptions=False)
    response = client.post("/certification", json={"csr": "x" * 2000})
    assert assert_problem(response, 413)["max_body_bytes"] == 1000
    assert client.post("/certification", json={"csr": "x" * 100}).status_code == 401  # under the limit: on to auth


async def _drive(guard, chunks):
    """Run `guard` over a streamed body; returns (how many chunks it pulled, the messages it sent)."""
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled <= len(chunks):
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        raise AssertionError("read past the end")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"transfer-encoding", b"chunked")]}
    await guard(scope, receive, send)
    return pulled, sent


def test_streamed_body_stops_being_read_at_the_limit():
    async def greedy_app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read %d" % len(body)})

    chunks = [b"x" * 1000] * 2000  # 2 MB
    pulled, sent = asyncio.run(_drive(limits.RequestGuard(greedy_app, max_body_bytes=10_000), chunks))
    assert pulled == 11  # 11 000 bytes: the first chunk over the limit, and not one more
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]


def test_uvicorn_is_given_header_and_keep_alive_limits(tmp_path):
    config = NodeConfig(name="n", cluster="c", database_url="sqlite:///x", listen_address="127.0.0.1", port=1,
                        secret_path="s")
    options = uvicorn_limits(config)
    assert issubclass(options["http"], H11Protocol)
    assert options["h11_max_incomplete_event_size"] == limits.MAX_HEADER_BYTES
    assert options["timeout_keep_alive"] == limits.KEEP_ALIVE_SECONDS
    tuned = NodeConfig(**{**config.__dict__, "max_header_bytes": 4096, "keep_alive_seconds": 2})
    assert uvicorn_limits(tuned)["h11_max_incomplete_event_size"] == 4096
    assert uvicorn_limits(tuned)["timeout_keep_alive"] == 2
    # Unset limits stay out of the rendered configuration file (existing files are unchanged).
    assert "max_body_bytes" not in config.render() and "max_header_bytes = 4096" in tuned.render()


def test_served_node_refuses_oversize_headers(node):
    sock = _connect(node.url)
    with sock:
        # Headers that never end: the node stops buffering them at the limit and answers.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\nX-Big: " + b"a" * (limits.MAX_HEADER_BYTES + 1024))
        status, _headers, _body = _read_response(sock)
    assert status == 400
    assert httpx.get(f"{node.url}/health", timeout=SAFETY_TIMEOUT).status_code == 200


# --- time limits: slow clients ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory):
    """A node whose clients get one second for their headers, then one for their body."""
    base = tmp_path_factory.mktemp("strict")
    database = sqlite_database(base)
    provision(database)
    _result, config_path, _secret = configure_node(database, base, make_issuer(base / "issuer"),
                                                   http_limits={"read_timeout_seconds": 1})
    assert load_node_config(config_path).read_timeout_seconds == 1
    url, process = start_node(config_path, base / "serve.log")
    try:
        yield url
    finally:
        stop_node(process)


def _closed_by_server(sock: socket.socket) -> bool:
    """Wait (on the socket, up to the safety timeout) until the server closes the connection."""
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_headers_that_never_end_are_disconnected(strict_node):
    sock = _connect(strict_node)
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\nX-Slow: ")  # and then nothing
        assert _closed_by_server(sock)
    assert httpx.get(f"{strict_node}/health", timeout=SAFETY_TIMEOUT).status_code == 200


def test_an_idle_keep_alive_connection_sending_half_a_request_is_disconnected(strict_node):
    sock = _connect(strict_node)
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\n\r\n")
        data = b""
        while b'"status":"ok"' not in data:
            data += sock.recv(65536)
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # the second request stalls after its request line
        assert _closed_by_server(sock)


def test_a_body_that_never_arrives_is_answered_408(strict_node):
    sock = _connect(strict_node)
    with sock:
        sock.sendall(b"POST /certification HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"csr\": ")  # 8 of 100 bytes
        status, headers, body = _read_response(sock)
    problem = assert_problem(_as_httpx(status, headers, body), 408)
    assert problem["type"] == "urn:rmsd:problem:body-too-slow" and problem["read_timeout_seconds"] == 1
    assert headers["connection"] == "close"
    assert httpx.get(f"{strict_node}/health", timeout=SAFETY_TIMEOUT).status_code == 200


def test_malformed_http_is_answered_with_a_problem_document(node):
    sock = _connect(node.url)
    with sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\nBad Header Without Colon\r\n\r\n")
        status, headers, body = _read_response(sock)
    assert status == 400 and headers["content-type"] == limits.PROBLEM_JSON
    assert json.loads(body)["type"] == "urn:rmsd:problem:malformed-http"
    assert headers["connection"] == "close"


@pytest.mark.parametrize("limits_given", [
    {"max_body_bytes": 10}, {"read_timeout_seconds": 0}, {"keep_alive_seconds": True}, {"max_header_bytes": "16k"},
    {"max_bodybytes": 1000},
])
def test_bad_limits_are_refused_before_anything_is_written(tmp_path, limits_given):
    database = sqlite_database(tmp_path)
    provision(database)
    with pytest.raises(RmsdError, match="HTTP limit"):
        configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"), http_limits=limits_given)
    assert not (tmp_path / "etc").exists() or not list((tmp_path / "etc").iterdir())


# --- generated: bodies of every size and chunking, slow bodies ------------------------------------------


async def reading_app(scope, receive, send):
    """An application that reads the whole body, then answers 200."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_generated_bodies_are_refused_exactly_over_the_limit(record_property):
    """Any body, in any chunks, with or without a declared length: read whole when it fits the limit, refused
    with 413 (and no chunk read past the first one over it) when it does not."""
    limit = 4096
    outcomes = {"read whole": 0, "refused 413": 0}

    @given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12), declared=st.booleans())
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(sizes, declared):
        chunks = [b"x" * n for n in sizes]
        total = sum(sizes)
        pulled, sent = 0, []

        async def receive():
            nonlocal pulled
            pulled += 1
            assert pulled <= len(chunks), "read past the end"
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

        async def send(message):
            sent.append(message)

        headers = [(b"content-length", str(total).encode())] if declared else [(b"transfer-encoding", b"chunked")]
        scope = {"type": "http", "method": "POST", "path": "/x", "headers": headers}
        asyncio.run(limits.RequestGuard(reading_app, max_body_bytes=limit)(scope, receive, send))
        status = sent[0]["status"]
        if total <= limit:
            assert status == 200 and pulled == len(chunks)
            outcomes["read whole"] += 1
            return
        assert status == 413
        over_at = next(i for i in range(len(sizes)) if sum(sizes[:i + 1]) > limit) + 1
        assert pulled == (0 if declared else over_at)  # a declared length is refused before any read
        outcomes["refused 413"] += 1

    check()
    line = f"body sizes and chunkings: {sum(outcomes.values())} cases ({outcomes}), 0 5xx"
    record_property("hypothesis_cases", line)
    assert all(outcomes.values())


def test_generated_slow_bodies_get_408_and_fast_ones_are_served(record_property):
    """A body whose chunks stall is answered 408 wherever it stalls; one that arrives is read whole."""
    outcomes = {"served": 0, "refused 408": 0}

    @given(count=st.integers(1, 6), stall_at=st.one_of(st.none(), st.integers(0, 5)))
    @settings(max_examples=20, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(count, stall_at):
        stall_at = None if stall_at is None or stall_at >= count else stall_at
        pulled, sent = 0, []
        never = asyncio.Event()

        async def receive():
            nonlocal pulled
            pulled += 1
            if pulled - 1 == stall_at:
                await never.wait()  # the client stops sending: only the guard's deadline ends this
            return {"type": "http.request", "body": b"x", "more_body": pulled < count}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"transfer-encoding", b"chunked")]}
        # Long enough that a body arriving at once is served on a busy machine too; each stall costs this much.
        guard = limits.RequestGuard(reading_app, read_timeout_seconds=0.5)
        asyncio.run(guard(scope, receive, send))
        if stall_at is None:
            assert sent[0]["status"] == 200
            outcomes["served"] += 1
        else:
            assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
            outcomes["refused 408"] += 1

    check()
    record_property("hypothesis_cases", f"slow bodies: {sum(outcomes.values())} cases ({outcomes}), 0 5xx")
    assert all(outcomes.values())
