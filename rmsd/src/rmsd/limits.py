"""What a node does before a request reaches its handlers, and how it answers any error.

- One error model: every error is an RFC 9457 problem document (`application/problem+json`), made by
  `problem()` and nothing else.
- Every request gets an id (`X-Request-ID` on the answer, `instance` in a problem document, and in the
  log line of an unexpected error).
- A request body limit, enforced as pure ASGI before anything parses or authenticates: a Content-Length
  over the limit is refused at once, a body of unknown length is counted while it streams and refused at
  the limit, so a request never holds more than the limit in memory.
- A read time limit, for clients that send slowly (slowloris): a request's line and headers must arrive
  within it once the connection is ready for them (else the connection is closed), its body within it once
  the headers are in (else 408). Both before anything parses the body or authenticates. Every other state
  of a connection has its deadline too, and a worker holds a bounded number of connections (guarded_h11,
  guarded_loop).
- A configuration database outage is logged once when it starts, then as a count, and once when it ends.
"""

import asyncio
import errno
import json
import logging
import socket
import struct
import threading
import time
import uuid
from http import HTTPStatus

import h11
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("rmsd")

PROBLEM_JSON = "application/problem+json"
MAX_BODY_BYTES = 64 * 1024  # the largest request (a PL to license, a CSR) is well below this
MAX_HEADER_BYTES = 16 * 1024  # request line and headers (a bearer token is a few KiB)
KEEP_ALIVE_SECONDS = 5  # an idle keep-alive connection is closed after this
RETRY_AFTER_SECONDS = 5  # what a 503 asks the caller to wait
READ_TIMEOUT_SECONDS = 10  # for the request line and headers, then again for the body
OUTAGE_SUMMARY_SECONDS = 60.0  # while the database is down, how often the refusals are summed up in the log
MAX_CONNECTIONS = 1000  # per worker
EPISODE_QUIET_SECONDS = 5.0  # an episode of refused connections ends once none was refused for this long
# A stopping worker serves on until no request came for this long (its balancer took it out), at most the second.
STOP_QUIET_SECONDS = 1.0
STOP_DRAIN_SECONDS = 5.0
PROBLEM_BASE = "urn:rmsd:problem:"
# Methods whose request carries a JSON body in this service.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_id_of(scope) -> str | None:
    return scope.get("state", {}).get("request_id")


def problem(
    status: int, detail: str, *, kind: str | None = None, title: str | None = None, request=None,
    headers: dict | None = None, **extra,
) -> JSONResponse:
    """The one way this service answers an error: an RFC 9457 problem document. `kind` names the problem
    (its `type` is `urn:rmsd:problem:KIND`); without it the type is about:blank and the title is the
    HTTP status phrase. `request` (a Request or an ASGI scope) gives the `instance` (the request id)."""
    phrase = HTTPStatus(status).phrase
    body = {
        "type": f"{PROBLEM_BASE}{kind}" if kind else "about:blank",
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    scope = getattr(request, "scope", request)
    request_id = request_id_of(scope) if scope is not None else None
    if request_id:
        body["instance"] = f"urn:uuid:{request_id}"
        body["request_id"] = request_id
    body.update(extra)
    return JSONResponse(body, status, headers=headers, media_type=PROBLEM_JSON)


class BodyRefused(HTTPException):
    """A body this node will not read to its end: raised by the guarded `receive`, an HTTPException so the
    framework lets it through unchanged, and answered by `answer()`. The rest of the body is never read,
    so the connection cannot carry another request: the answer closes it."""

    status = 400
    kind = ""

    def __init__(self, detail: str, **limit):
        super().__init__(self.status, detail)
        self.limit = limit  # the limit's name and value, also a member of the problem document

    def answer(self, scope) -> JSONResponse:
        return problem(self.status, self.detail, kind=self.kind, request=scope, headers={"Connection": "close"},
                       **self.limit)


class BodyTooLarge(BodyRefused):
    status, kind = 413, "body-too-large"

    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than this node accepts ({limit} bytes)", max_body_bytes=limit)


class BodyTooSlow(BodyRefused):
    status, kind = 408, "body-too-slow"

    def __init__(self, seconds: float):
        super().__init__(f"the request body did not arrive within {seconds:g} seconds of its headers",
                         read_timeout_seconds=seconds)


class Stopping:
    """A worker's last seconds (uvicorn's shutdown waits for `drain()`): from then on GET /health answers 503,
    so that a balancer takes the node out, while every other request is served as before; `drain()` returns
    once no such request came for `quiet_seconds` (the balancer sends nothing any more), or after
    `most_seconds`. RequestGuard tells it of each request."""

    def __init__(self, quiet_seconds: float = STOP_QUIET_SECONDS, most_seconds: float = STOP_DRAIN_SECONDS,
                 clock=time.monotonic, sleep=asyncio.sleep):
        self.quiet_seconds, self.most_seconds, self._clock, self._sleep = quiet_seconds, most_seconds, clock, sleep
        self.since: float | None = None
        self.last_request = -quiet_seconds  # long ago

    def request(self, path: str) -> None:
        if path != "/health":  # a balancer's checks go on until it took the node out
            self.last_request = self._clock()

    async def drain(self) -> None:
        self.since = now = self._clock()
        while now - self.since < self.most_seconds and now - self.last_request < self.quiet_seconds:
            await self._sleep(0.05)
            now = self._clock()
        if now - self.last_request < self.quiet_seconds:
            log.warning("stopping while requests still come in, %.0f s after the node said so at GET /health; "
                        "take it out of its balancer first (drain)", now - self.since)


class RequestGuard:
    """Pure ASGI, outermost of the application's own middleware: gives each request an id, enforces the
    body size and time limits before anything reads the body, and turns an unexpected exception into a
    logged 500 problem document carrying the request id."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, read_timeout_seconds: float = READ_TIMEOUT_SECONDS,
                 stopping: Stopping | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_seconds = read_timeout_seconds
        self.stopping = stopping

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if self.stopping is not None:
            self.stopping.request(scope.get("path", ""))
        limit = self.max_body_bytes
        started = False
        body_done = False

        length = _content_length(scope)
        has_body = bool(length) or any(name == b"transfer-encoding" for name, _value in scope.get("headers", ()))

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if has_body and not body_done and (b"connection", b"close") not in headers:
                    # Answered before its body was read: the connection closes after this response (the rest
                    # of the body would read as another request), and says so.
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        if length is not None and length > limit:
            # Refused before a byte of the body is read: no 100 Continue, nothing parsed, no authentication.
            await BodyTooLarge(limit).answer(scope)(scope, receive, send_with_id)
            return

        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_seconds

        async def counting_receive():
            nonlocal received, body_done
            if body_done:  # e.g. a wait for the client to disconnect: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise BodyTooSlow(self.read_timeout_seconds) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, counting_receive, send_with_id)
        except BodyRefused as refused:
            if started:
                raise
            if isinstance(refused, BodyTooSlow):
                log.info("request %s: body not received within %g s; connection closed", request_id,
                         self.read_timeout_seconds)
            await refused.answer(scope)(scope, receive, send_with_id)
        except Exception:
            log.exception("unexpected error serving %s %s (request id %s)", scope.get("method"), scope.get("path"),
                          request_id)
            if started:
                raise  # uvicorn closes the connection of a response it cannot finish
            response = problem(
                500, f"an unexpected error occurred; it was logged with request id {request_id}",
                kind="internal-error", request=scope, headers={"Connection": "close"},
            )
            await response(scope, receive, send_with_id)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed Content-Length before the application
    return None


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def validation_problem(request, errors) -> JSONResponse:
    """A request the schema refuses: 400 when the body is not JSON at all, 422 otherwise; the errors
    without the input they were found in (it may hold a credential) and without library links."""
    if any(error.get("type") == "json_invalid" for error in errors):
        error = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (error.get("ctx") or {}).get("error", "JSON decode error")
        position = error.get("loc", ("body", None))[-1]
        where = f" at character {position}" if isinstance(position, int) else ""
        return problem(400, f"the request body is not valid JSON: {reason}{where}", kind="malformed-json",
                       request=request)
    cleaned = [
        {"loc": [part for part in error.get("loc", ())], "msg": error.get("msg", ""), "type": error.get("type", "")}
        for error in errors
    ]
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in cleaned[:5])
    return problem(422, f"the request does not match the schema: {summary}", kind="validation",
                   request=request, errors=cleaned)


def http_problem(request, exc: HTTPException) -> JSONResponse:
    """An HTTP-level refusal (no such path, method not allowed, ...), with a detail that helps."""
    status = exc.status_code
    headers = dict(exc.headers or {})
    if isinstance(exc, BodyRefused):
        return exc.answer(request.scope)
    if status == 404:
        detail = f"{request.url.path} is not a resource of this node"
    elif status == 405:
        allowed = headers.get("Allow") or headers.get("allow")
        detail = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    else:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return problem(status, detail, request=request, headers=headers or None)


class OutageLog:
    """Configuration database outages in the log: one line when the first request fails, a count at most
    every `summary_seconds` while it lasts, one line when a statement succeeds again."""

    def __init__(self, summary_seconds: float = OUTAGE_SUMMARY_SECONDS, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.summary_seconds = summary_seconds
        self.down_since: float | None = None
        self.refused = 0  # requests refused in this outage
        self._summed = 0
        self._summed_at = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, err: Exception) -> None:
        with self._lock:
            now = self._clock()
            if self.down_since is None:
                self.down_since, self.refused, self._summed, self._summed_at = now, 1, 0, now
                log.error("configuration database unavailable (%s): answering 503 until it is back",
                          type(err).__name__)
                return
            self.refused += 1
            if now - self._summed_at >= self.summary_seconds:
                log.warning("configuration database still unavailable after %.0f s: %d requests refused so far "
                            "(%d since the last report)", now - self.down_since, self.refused,
                            self.refused - self._summed)
                self._summed, self._summed_at = self.refused, now

    def succeeded(self, *_args) -> None:
        """A statement ran: the database is back (cheap when it never left)."""
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is None:
                return
            log.warning("configuration database available again after %.0f s; %d requests were refused",
                        self._clock() - self.down_since, self.refused)
            self.down_since = None


def require_json(request: Request) -> None:
    """A dependency of every operation: a request that carries a body carries JSON (415 otherwise). It
    runs before authentication and before the body is validated."""
    if request.method in BODY_METHODS and not is_json(request.headers.get("content-type")):
        given = request.headers.get("content-type") or "none"
        raise HTTPException(415, f"the request body must be application/json (Content-Type: {given[:100]})")


class EpisodeLog:
    """A condition that can hit every connection at once (no file descriptor left to accept one, every
    connection of a worker busy) in the log: one line when it starts, a count at most every
    `summary_seconds` while it lasts, one line once it has not happened for `quiet_seconds`; never a line
    per connection. Used from the event loop's thread only."""

    def __init__(self, started: str, lasting: str, ended: str, summary_seconds: float = OUTAGE_SUMMARY_SECONDS,
                 quiet_seconds: float = EPISODE_QUIET_SECONDS, clock=time.monotonic):
        self.started, self.lasting, self.ended = started, lasting, ended
        self.summary_seconds, self.quiet_seconds, self._clock = summary_seconds, quiet_seconds, clock
        self.since: float | None = None  # when the current episode started
        self.count = 0  # times it happened in the current episode
        self._last = self._summed_at = 0.0
        self._summed = 0
        self._timer: asyncio.TimerHandle | None = None

    def happened(self, reason: str = "") -> None:
        now = self._clock()
        self._last = now
        if self.since is None:
            self.since, self.count, self._summed, self._summed_at = now, 1, 0, now
            log.error(self.started, reason)
            self._timer = asyncio.get_running_loop().call_later(self.quiet_seconds, self._end_if_quiet)
            return
        self.count += 1
        if now - self._summed_at >= self.summary_seconds:
            log.warning(self.lasting, now - self.since, self.count, self.count - self._summed)
            self._summed, self._summed_at = self.count, now

    def _end_if_quiet(self) -> None:
        quiet_for = self._clock() - self._last
        if quiet_for < self.quiet_seconds:
            self._timer = asyncio.get_running_loop().call_later(self.quiet_seconds - quiet_for, self._end_if_quiet)
            return
        log.warning(self.ended, self._last - (self.since or self._last), self.count)
        self.since, self._timer = None, None


def accept_log() -> EpisodeLog:
    return EpisodeLog(
        "cannot accept connections (%s): they wait in the listen backlog until connections close. Raise the node's "
        "file descriptor limit (LimitNOFILE, the server role's server_limit_nofile) or lower max_connections. "
        "Logged once, then as a count",
        "still cannot accept every connection after %.0f s: %d accepts failed (%d since the last report)",
        "accepting connections again; for %.0f s, %d accepts failed for lack of file descriptors",
    )


ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def guarded_loop(io_timeout_seconds: float = READ_TIMEOUT_SECONDS, accepting: EpisodeLog | None = None):
    """A loop factory for uvicorn (its `loop` option): the asyncio loop, with two changes. A TLS handshake,
    and the TLS shutdown after a response, must end within `io_timeout_seconds` (asyncio's defaults are 60 and
    30 s). A failed accept() for lack of file descriptors or memory goes to `accepting`, an EpisodeLog: asyncio
    reports each one, with its traceback, up to the backlog's length per attempt and an attempt a second."""
    accepting = accepting or accept_log()

    class GuardedLoop(asyncio.SelectorEventLoop):
        async def create_server(self, *args, ssl=None, **kwargs):  # type: ignore[override]
            if ssl is not None:
                kwargs.setdefault("ssl_handshake_timeout", io_timeout_seconds)
                kwargs.setdefault("ssl_shutdown_timeout", io_timeout_seconds)
            return await super().create_server(*args, ssl=ssl, **kwargs)

    def on_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_EXHAUSTED and "accept" in context.get("message", ""):
            accepting.happened(f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}")
            return
        loop.default_exception_handler(context)

    def new_loop() -> asyncio.AbstractEventLoop:
        loop = GuardedLoop()
        loop.set_exception_handler(on_error)
        return loop

    return new_loop


def busy_response(max_connections: int) -> bytes:
    """What a connection beyond a worker's cap gets, before it sends anything: a 503 problem document."""
    body = json.dumps({
        "type": f"{PROBLEM_BASE}too-many-connections", "title": "Service Unavailable", "status": 503,
        "detail": f"this node holds as many connections as it serves ({max_connections} per worker), each busy "
                  f"with a request; try again in {RETRY_AFTER_SECONDS} seconds",
        "max_connections": max_connections,
    }).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: {PROBLEM_JSON}\r\n"
            f"retry-after: {RETRY_AFTER_SECONDS}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n")
    return head.encode() + body


def guarded_h11(read_timeout_seconds: float = READ_TIMEOUT_SECONDS, max_connections: int = MAX_CONNECTIONS):
    """uvicorn's h11 protocol, with a deadline in every state of a connection and a cap on connections.

    - Waiting for a request (a new connection, or one kept alive after a response): its line and headers
      must arrive within `read_timeout_seconds` (uvicorn's keep-alive time, shorter, ends an idle one first).
    - Reading a body: RequestGuard's deadline (408).
    - Answered before the request's body was read (an unknown path, a refusal): the connection closes after
      the response, which says so (RequestGuard adds `Connection: close`); its body is never read.
    - Writing a response the client does not take: as soon as a byte waits for the client, it has
      `read_timeout_seconds` to take it, else the connection is reset (also one closing with data left).
    - TLS handshake and TLS shutdown: guarded_loop; stopping: uvicorn's graceful shutdown time.
    - At most `max_connections` connections per worker: a new one beyond it takes the place of the oldest
      connection waiting for a request; when every connection is busy with a request, it is answered 503.
    - A request h11 cannot parse is answered with a problem document like every other error, not plain text."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: dict = {}  # this worker's connections waiting for a request, the one waiting longest first
    full = EpisodeLog(
        "this worker holds its %s connections (max_connections): the connections waiting longest for a request "
        "are closed to make room, and new ones are answered 503 while every connection is busy. Logged once, then "
        "as a count",
        "still at max_connections after %.0f s: %d connections closed or refused (%d since the last report)",
        "below max_connections again; for %.0f s, %d connections were closed to make room or refused",
    )
    busy = busy_response(max_connections)

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            # Any byte the kernel does not take at once starts the write deadline (pause_writing).
            transport.set_write_buffer_limits(high=1, low=0)
            if len(self.connections) > max_connections and not self._make_room():
                return
            self._wait_for_request()

        def _make_room(self) -> bool:
            full.happened(str(max_connections))
            if waiting:
                oldest = next(iter(waiting))
                oldest._stop_waiting()
                oldest.transport.close()
                return True
            self._stop_waiting()
            self.transport.write(busy)
            self.transport.close()
            return False

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the request's headers are in
                self._stop_waiting()

        def on_response_complete(self) -> None:
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                # Answered before its body was read: the rest of the body would read as the next request.
                self.transport.close()
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._wait_for_request()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            self._cancel_write_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(read_timeout_seconds, self._write_too_slow)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel_write_timer()

        def _wait_for_request(self) -> None:
            self._stop_waiting()
            waiting[self] = None
            self._header_timer = self.loop.call_later(read_timeout_seconds, self._headers_too_slow)

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _cancel_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            waiting.pop(self, None)
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                log.info("request headers not received within %g s; connection closed", read_timeout_seconds)
                self.transport.close()

        def _write_too_slow(self) -> None:
            self._write_timer = None
            log.info("the client did not take its response within %g s; connection reset", read_timeout_seconds)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # A reset, not a close: the kernel would otherwise keep what it could not send, and retry.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({
                "type": f"{PROBLEM_BASE}malformed-http", "title": "Bad Request", "status": 400,
                "detail": "the request is not valid HTTP/1.1 (request line or headers); the connection is closed",
            }).encode()
            headers = [(b"content-type", PROBLEM_JSON.encode()), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return GuardedH11Protocol
