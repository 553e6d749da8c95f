"""Every state of a connection has a deadline, and a worker holds a bounded number of connections: real
sockets against real `rmsd serve` nodes with short limits. Each test puts a connection into one state and
waits for the event (the server closing it), with a generous bound only so that a broken server cannot
hang the suite."""

import datetime
import ipaddress
import json
import os
import resource
import select
import signal
import socket
import ssl
import subprocess
import time
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import RMSD, configure_node, eventually, make_issuer, provision, sqlite_database, start_node, stop_node
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rmsd import limits

SAFETY_TIMEOUT = 30.0  # a bound against hanging, not a measure: every wait ends on an event
TCP_ESTABLISHED = 1  # tcpi_state of a connection neither side has closed


def make_node(base: Path, log_name: str = "serve.log", tls: bool = False, preexec=None, **limits_given):
    """A root cluster (SQLite) with one node of one worker and these HTTP limits, started; returns (url, process,
    CA file or None, log path)."""
    database = sqlite_database(base)
    provision(database)
    options = {}
    ca = None
    if tls:
        ca = self_signed(base / "tls")
        options = {"tls_certificate": str(base / "tls" / "node.crt"), "tls_key": str(base / "tls" / "node.key")}
    _result, config_path, _secret = configure_node(database, base, make_issuer(base / "issuer"), workers=1,
                                                   http_limits=limits_given, **options)
    log_path = base / log_name
    if preexec is None:
        url, process = start_node(config_path, log_path, verify=ssl.create_default_context(cafile=ca) if tls else True)
        return url, process, ca, log_path
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(RMSD), "serve", "--config", str(config_path)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
    node = tomllib.loads(config_path.read_text())["node"]
    url = f"http://{node['listen_address']}:{node['port']}"
    eventually(lambda: _assert_healthy(url, process, log_path), timeout=SAFETY_TIMEOUT)
    return url, process, ca, log_path


def _assert_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    assert process.poll() is None, log_path.read_text()
    try:
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError as err:
        raise AssertionError(repr(err)) from None


def self_signed(directory: Path) -> str:
    """A certificate for 127.0.0.1 signed by its own key (node.crt, node.key); returns its path, the CA to trust."""
    directory.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rmsd deadlines test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (directory / "node.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "node.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(directory / "node.crt")


@pytest.fixture(scope="module")
def strict_node(tmp_path_factory):
    """Clients get one second for each deadline."""
    url, process, _ca, _log = make_node(tmp_path_factory.mktemp("deadlines"), read_timeout_seconds=1)
    try:
        yield url
    finally:
        stop_node(process)


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    url, process, ca, _log = make_node(tmp_path_factory.mktemp("deadlines-tls"), tls=True, read_timeout_seconds=1)
    try:
        yield url, ca
    finally:
        stop_node(process)


def connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.socket()
    if rcvbuf:  # before connect, so the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(SAFETY_TIMEOUT)
    sock.connect((parts.hostname, parts.port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read (and drop) what the server sends until it closes the connection; False if it never does."""
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length, read without waiting for the connection to close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def wait_tcp_closed(sock: socket.socket) -> bool:
    """Wait, without reading a byte, until the server closed or reset the connection (its TCP state leaves
    ESTABLISHED); False if it never does."""
    for _ in range(int(SAFETY_TIMEOUT * 10)):
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != TCP_ESTABLISHED:
            return True
        time.sleep(0.1)
    return False


def served(url: str, **kwargs) -> int:
    return httpx.get(f"{url}/health", timeout=SAFETY_TIMEOUT, **kwargs).status_code


# --- one test per state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: rmsd\r\nX-Slow: "], ids=["nothing", "half"])
def test_waiting_for_the_request_line_and_headers(strict_node, sent):
    with connect(strict_node) as sock:
        sock.sendall(sent)
        assert closed_by_server(sock)
    assert served(strict_node) == 200


def test_tls_handshake(tls_node):
    """A client that opens a TCP connection to an HTTPS node and never completes the handshake (asyncio
    alone would wait 60 s for it)."""
    url, ca = tls_node
    with connect(url) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a TLS record, and then nothing
        assert closed_by_server(sock)
    assert served(url, verify=ssl.create_default_context(cafile=ca)) == 200


def test_reading_a_body(strict_node):
    with connect(strict_node) as sock:
        sock.sendall(b"POST /certification HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"csr\": ")
        status, headers, _body = read_response(sock)
        assert (status, headers["connection"]) == (408, "close")
        assert closed_by_server(sock)


@pytest.mark.parametrize("request_head", [
    b"POST /nowhere HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: rmsd\r\nContent-Length: 2\r\n\r\n",
    b"PUT /health HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
], ids=["404", "get-with-body", "405-chunked"])
def test_answered_before_the_body_was_read(strict_node, request_head):
    """The node answers without reading the body (no such path, a GET that has one, a method not allowed):
    the connection closes after the response and says so. The body sent after the answer does not keep the
    connection open with no deadline (it did: the connection then sat idle with no timer at all)."""
    with connect(strict_node) as sock:
        sock.sendall(request_head)
        status, headers, _body = read_response(sock)
        assert status in (200, 404, 405) and headers["connection"] == "close", (status, headers)
        try:
            sock.sendall(b"{}" if b"Content-Length" in request_head else b"2\r\n{}\r\n0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # already closed
        assert closed_by_server(sock)


def test_idle_keep_alive(strict_node):
    with connect(strict_node) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\n\r\n")
        status, headers, _body = read_response(sock)
        assert status == 200 and "connection" not in headers  # kept alive ...
        assert closed_by_server(sock)  # ... until its deadline


@pytest.mark.parametrize("secure", [False, True], ids=["http", "https"])
def test_writing_to_a_client_that_does_not_read(strict_node, tls_node, secure):
    """Pipelined requests for the contract (tens of KB each) from a client that never reads an answer: once
    the kernel's buffers are full, the node waits for the client for at most the deadline, then aborts."""
    url, ca = tls_node if secure else (strict_node, None)
    raw = connect(url, rcvbuf=4096)
    sock = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="127.0.0.1") if secure else raw
    with sock:
        requests = b"GET /openapi.json HTTP/1.1\r\nHost: rmsd\r\n\r\n" * 400
        sock.setblocking(False)
        sent = 0
        while sent < len(requests):  # as much as the node reads, until its answers back up
            _, writable, _ = select.select([], [sock], [], 2)
            if not writable:
                break
            try:
                sent += sock.send(requests[sent:sent + 16384])
            except (BlockingIOError, ssl.SSLWantWriteError):
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert wait_tcp_closed(sock), "the node still holds a connection whose client takes nothing"
    assert served(url, verify=ssl.create_default_context(cafile=ca) if secure else True) == 200


def test_stopping(tmp_path):
    """SIGTERM while clients hold connections in each state (one of them not reading its answers): the node
    closes every one of them and exits, waiting for none of them beyond its deadlines."""
    url, process, _ca, log_path = make_node(tmp_path, read_timeout_seconds=1)
    try:
        waiting = connect(url)
        half = connect(url)
        half.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\n")
        body = connect(url)
        body.sendall(b"POST /certification HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        idle = connect(url)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: rmsd\r\n\r\n")
        read_response(idle)
        unread = connect(url, rcvbuf=4096)
        unread.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: rmsd\r\n\r\n" * 50)
        os.killpg(process.pid, signal.SIGTERM)
        # uvicorn stops gracefully, then ends by the signal it was sent
        assert process.wait(SAFETY_TIMEOUT) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log_path.read_text()
        for sock in (waiting, half, body, idle):
            assert closed_by_server(sock)
        for sock in (waiting, half, body, idle, unread):  # the process that held `unread` is gone: nothing waits
            sock.close()
    finally:
        stop_node(process)


def test_a_stopping_node_lets_its_balancer_take_it_out_first(tmp_path):
    """SIGTERM while a client keeps sending requests: the node answers GET /health 503 (a balancer's check takes
    it out) and serves every other request until they stop coming, then exits. (It closed its port at once:
    a request already sent on a connection the kernel held for it failed, and a balancer never sends a POST
    twice.)"""
    url, process, _ca, log_path = make_node(tmp_path, read_timeout_seconds=1)
    answers: list[int] = []
    health: list[int] = []
    try:
        with httpx.Client(base_url=url, timeout=SAFETY_TIMEOUT) as http:
            answers.append(http.get("/slc").status_code)
            os.killpg(process.pid, signal.SIGTERM)
            while not health or health[-1] == 200:  # until the node says it stops
                answers.append(http.get("/slc").status_code)
                health.append(http.get("/health").status_code)
        assert process.wait(SAFETY_TIMEOUT) in (0, -signal.SIGTERM)
    finally:
        stop_node(process)
    print(f"{len(answers)} requests answered while it stopped; /health: {health}")
    assert set(answers) == {200} and health[-1] == 503
    assert "stopping while requests still come in" not in log_path.read_text()


@pytest.mark.parametrize("requests_until,stops_at", [(0, 0), (2, 3), (100, 5)],
                         ids=["none-recent", "until-2s", "never-ending"])
def test_a_stopping_worker_waits_for_quiet_at_most_its_time(requests_until, stops_at):
    """On a simulated clock: a worker stops a second after the last request that is not a health check, at once
    when none came lately, after 5 s however many still come."""
    import asyncio

    now = [0.0]

    async def sleep(seconds):
        now[0] += seconds
        if now[0] < requests_until:
            stopping.request("/licensing")
        stopping.request("/health")  # a balancer's checks go on: they do not keep the node

    stopping = limits.Stopping(quiet_seconds=1, most_seconds=5, clock=lambda: now[0], sleep=sleep)
    if requests_until:
        stopping.request("/licensing")  # requests came in until the signal
    asyncio.run(stopping.drain())
    assert abs(now[0] - stops_at) < 0.1


# --- the cap on connections --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped_node(tmp_path_factory):
    """At most 16 connections, and a minute for each deadline: only the cap closes a connection early."""
    url, process, _ca, log_path = make_node(tmp_path_factory.mktemp("capped"), read_timeout_seconds=60,
                                            max_connections=16)
    try:
        yield url, log_path
    finally:
        stop_node(process)


def closed_now(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_beyond_the_cap_give_way_and_health_is_answered(capped_node):
    """26 connections that send nothing, then a client's GET /health: the node holds 16 connections at most,
    closing those waiting longest, and answers the client (200) rather than the idle attackers."""
    url, _log = capped_node
    held = [connect(url) for _ in range(26)]
    try:
        assert served(url) == 200
        expected_closed = 26 - 16 + 1  # one for each connection beyond the cap, the client's included
        eventually(lambda: _assert_at_least_closed(held, expected_closed), timeout=SAFETY_TIMEOUT)
        closed = [closed_now(sock) for sock in held]
        assert sum(closed) == expected_closed, closed
        assert closed == [True] * expected_closed + [False] * (26 - expected_closed), "not the oldest first"
    finally:
        for sock in held:
            sock.close()


def _assert_at_least_closed(socks, count: int) -> None:
    assert sum(closed_now(sock) for sock in socks) >= count


def test_busy_connections_at_the_cap_get_a_503_problem_document(capped_node):
    """16 connections each in the middle of a request (headers in, body awaited): a new client gets a 503
    problem document with Retry-After at once; once they end, it is served again."""
    url, log_path = capped_node
    busy = [connect(url) for _ in range(16)]
    try:
        for sock in busy:
            sock.sendall(b"POST /certification HTTP/1.1\r\nHost: rmsd\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")
        # The event that each one is busy: the node has its headers and waits for its body ("100 Continue").
        # Without it, a connection whose headers the node has not read yet counts as waiting for a request, and
        # the client would take its place.
        for sock in busy:
            assert _read_until(sock, b"100 Continue\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
            sock.sendall(b"{")
        response = httpx.get(f"{url}/health", timeout=SAFETY_TIMEOUT)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == limits.PROBLEM_JSON
        assert int(response.headers["retry-after"]) > 0
        problem = response.json()
        assert problem["type"] == "urn:rmsd:problem:too-many-connections" and problem["max_connections"] == 16
    finally:
        for sock in busy:
            sock.close()
    eventually(lambda: _assert_served(url), timeout=SAFETY_TIMEOUT)
    text = log_path.read_text()
    assert text.count("connections (max_connections)") == 1, text[-3000:]


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(1)  # the socket's SAFETY_TIMEOUT bounds each read
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def _assert_served(url: str) -> None:
    assert served(url) == 200


# --- out of file descriptors --------------------------------------------------------------------------------

FD_LIMIT = 64  # the node's own files and sockets take about half


def _low_fd_limit():
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


def test_running_out_of_file_descriptors_is_logged_once(tmp_path):
    """A node under a low RLIMIT_NOFILE and 200 connections that send nothing: accept() fails again and again
    while they come in. The log says so once when it starts and once when it ends (asyncio alone logs every
    failed accept with its traceback: megabytes a minute), and the node answers again afterwards."""
    url, process, _ca, log_path = make_node(tmp_path, preexec=_low_fd_limit, read_timeout_seconds=1)
    try:
        held = [connect(url) for _ in range(200)]
        for sock in held:  # each is closed at its deadline, or once the node can accept it at all
            assert closed_by_server(sock)
            sock.close()
        eventually(lambda: _assert_served(url), timeout=SAFETY_TIMEOUT)
        eventually(lambda: _assert_logged(log_path, "accepting connections again", 1), timeout=SAFETY_TIMEOUT)
        text = log_path.read_text()
        print(f"log: {len(text)} bytes; {text.count('connection closed')} connections closed at their deadline")
        assert text.count("cannot accept connections") == 1, text[-3000:]
        assert text.count("accepting connections again") == 1
        assert "out of system resource" not in text and "Traceback" not in text
    finally:
        stop_node(process)


def _assert_logged(log_path: Path, line: str, count: int) -> None:
    assert log_path.read_text().count(line) == count


def test_configured_limits_reach_uvicorn():
    from rmsd.config import NodeConfig
    from rmsd.service import uvicorn_limits

    config = NodeConfig(name="n", cluster="c", database_url="sqlite:///x", listen_address="127.0.0.1", port=1,
                        secret_path="s", max_connections=50)
    options = uvicorn_limits(config)
    assert options["backlog"] == 50
    assert json.loads(limits.busy_response(50).partition(b"\r\n\r\n")[2])["max_connections"] == 50
