"""The HTTP layer of one node (FastAPI under uvicorn): the operations of rmsd.node as the contract in
rmsd.contract publishes them, every error as a problem document, the limits of rmsd.limits first."""

import contextlib
import errno
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmsd import __version__, contract, db, limits
from rmsd.config import NodeConfig, check_tls_paths, load_tls_files, worker_count
from rmsd.contract import (
    CertificationRequest,
    Enrollment,
    EnrollmentRequest,
    Health,
    LicensingRequest,
    Problem,
    PublishingLicense,
    PublishingRequest,
    Rac,
    Slc,
    UseLicense,
)
from rmsd.errors import (
    AuthenticationError,
    DatabaseUnavailableError,
    ForbiddenError,
    InvalidRequestError,
    KeyUnavailableError,
    NotFoundError,
    RevokedError,
    RmsdError,
    TooManyRequestsError,
)
from rmsd.identity import Principal
from rmsd.node import Node
from rmsd.schema import utcnow

log = logging.getLogger("rmsd")
# Seconds a stopping worker waits for the requests under way (each bounded by the limits) before it ends them.
GRACEFUL_SHUTDOWN_SECONDS = 10


ERRORS = {
    AuthenticationError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    InvalidRequestError: 400,
    RevokedError: 410,
    KeyUnavailableError: 503,
    DatabaseUnavailableError: 503,
}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 401, 403, 404, 408, 409, 410, 413, 415, 500, 503)
}
PROBLEM_KINDS = {
    AuthenticationError: "unauthenticated",
    ForbiddenError: "forbidden",
    NotFoundError: "not-found",
    InvalidRequestError: "invalid-request",
    RevokedError: "revoked",
    KeyUnavailableError: "unavailable",
    DatabaseUnavailableError: "unavailable",
}


def create_app(config: NodeConfig, heartbeat: bool = True) -> FastAPI:
    """The node's application; `heartbeat`: this process records the node's heartbeats (one worker of
    several does)."""
    node = Node(config)
    bearer = HTTPBearer(auto_error=False)

    @asynccontextmanager
    async def lifespan(_app):
        node.state()  # fail at start, not at the first request, when the key or database is unusable
        if heartbeat:
            node.beat()
            thread = threading.Thread(target=node.heartbeat_loop, name="heartbeat", daemon=True)
            thread.start()
        yield
        # What the verify-once caches answered over this process's life (uvicorn owns the logging set-up
        # by now: straight to stderr, as its own lines are).
        print(f"rmsd: pid {os.getpid()} caches: {'; '.join(node.cache_stats())}", file=sys.stderr, flush=True)
        node.stop()

    # No /docs or /redoc: their pages load scripts from a CDN, blank on an offline network. /openapi.json is
    # the contract; any OpenAPI viewer renders it.
    app = FastAPI(title="rmsd", version=__version__, lifespan=lifespan, responses=PROBLEMS,
                  dependencies=[Depends(limits.require_json)], docs_url=None, redoc_url=None)
    # FastAPI's documented way to customize the schema is to replace this method.
    app.openapi = lambda: app.openapi_schema or _documented(app)  # type: ignore[method-assign]
    app.state.node = node
    app.state.stopping = limits.Stopping()
    # Outermost of the app's own middleware: ids, the body limit and unexpected errors come first.
    app.add_middleware(limits.RequestGuard, max_body_bytes=config.max_body_bytes or limits.MAX_BODY_BYTES,
                       read_timeout_seconds=config.read_timeout_seconds or limits.READ_TIMEOUT_SECONDS,
                       stopping=app.state.stopping)
    outage = limits.OutageLog()
    app.state.outage = outage
    sa.event.listen(node.engine, "after_cursor_execute", outage.succeeded)  # a statement ran: it is back
    retry_after = str(config.retry_after_seconds or limits.RETRY_AFTER_SECONDS)

    @app.exception_handler(RmsdError)
    async def _rmsd_error(request: Request, err: RmsdError):
        status = next((code for cls, code in ERRORS.items() if isinstance(err, cls)), 409)
        kind = next((name for cls, name in PROBLEM_KINDS.items() if isinstance(err, cls)), "conflict")
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": retry_after} \
            if isinstance(err, DatabaseUnavailableError) else None
        return limits.problem(status, str(err), kind=kind, request=request, headers=headers,
                              error=type(err).__name__)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _db_error(request: Request, err: sa.exc.SQLAlchemyError):
        if isinstance(err, sa.exc.DataError):  # the request's fault, e.g. NUL in PostgreSQL text
            return limits.problem(400, "the request holds an unstorable value", kind="invalid-request",
                                  request=request, error="InvalidRequestError")
        outage.failed(err)
        return limits.problem(503, "configuration database unavailable; try again shortly", kind="unavailable",
                              request=request, headers={"Retry-After": retry_after}, error="Unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return limits.http_problem(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return limits.validation_problem(request, err.errors())

    def authenticated(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        bearer_token = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else None
        return node.authenticate(bearer_token)

    User = Annotated[Principal, Depends(authenticated)]

    # Not an operation of the contract: whoever opens the node's address learns where to go from there.
    @app.get("/", include_in_schema=False)
    def index():
        return {"service": "rmsd", "version": __version__, "cluster": config.cluster, "node": config.name,
                "links": {"health": "/health", "slc": "/slc", "status": "/status", "api": "/openapi.json"}}

    # The deployment's status page, as the fleet-state run last wrote it; the node only reads it.
    @app.get("/status", include_in_schema=False)
    def status(request: Request):
        return status_page_response(config.status_page, request.headers.get("if-none-match"))

    # /health and /slc answer anyone: from a snapshot of the cluster at most about a second old, read by one
    # request at a time and never under the lock issuing takes, so a flood of them costs the database one read
    # a second and stalls no licensing.
    @app.get("/health", response_model=Health, operation_id="health", **_docs("health"), tags=["node"])
    def health(request: Request):
        if app.state.stopping.since is not None:  # a balancer takes it out, and sends it nothing new
            return limits.problem(503, "this node is stopping: it serves what it holds and takes nothing new; ask "
                                  "another node", kind="stopping", request=request,
                                  headers={"Retry-After": retry_after})
        state = node.snapshot()
        return Health(
            status="ok", cluster=state.row.name, node=config.name, role=state.row.role, state=state.row.state,
            active_key_id=state.active.key_id, version=__version__, schema_revision=state.schema_revision,
            started_at=node.started_at.isoformat(),
            restart_advised=any(at >= node.started_at for at in state.revoked.values()),
            instance_id=config.instance_id,
        )

    @app.get("/slc", response_model=Slc, operation_id="slc", **_docs("slc"), tags=["node"])
    def slc():
        # Licensing clusters learn here, within that second, that the root key changed or was revoked.
        state = node.snapshot()
        return Slc(
            cluster=state.row.name, role=state.row.role, state=state.row.state, intranet_url=state.row.intranet_url,
            extranet_url=state.row.extranet_url, key_id=state.active.key_id, chain=state.chain,
            revoked_key_ids=state.revoked_key_ids,
        )

    @app.post("/certification", response_model=Rac, operation_id="certify", **_docs("certify"), tags=["certification"])
    def certification(body: CertificationRequest, principal: User):
        return node.certify(principal, body.csr)

    @app.post("/publishing", response_model=PublishingLicense, operation_id="publish", **_docs("publish"),
              tags=["publishing"])
    def publishing(body: PublishingRequest, principal: User):
        return node.publish(principal, body.content_id, body.content_key, body.rights, body.template, body.supersedes)

    @app.post("/licensing", response_model=UseLicense, operation_id="license", **_docs("license"), tags=["licensing"])
    def licensing(body: LicensingRequest, principal: User):
        return node.license(principal, body.pl, body.rac)

    @app.post("/enrollment", response_model=Enrollment, operation_id="enroll", **_docs("enroll"), tags=["enrollment"],
              responses={429: {"model": Problem, "description": "too many enrollment requests; see Retry-After"}})
    def enrollment(body: EnrollmentRequest, request: Request):
        urls = [u for u in (body.intranet_url, body.extranet_url) if u]
        # The client's address: the peer, or what a trusted proxy says it is (uvicorn_proxy).
        source = request.client.host if request.client else ""
        try:
            return node.enroll(body.cluster, body.credential, body.csr, urls, body.revoked_key_ids, body.revocations,
                               source=source)
        except TooManyRequestsError as err:
            return limits.problem(429, str(err), kind="too-many-requests", request=request,
                                  headers={"Retry-After": str(err.retry_after)}, error=type(err).__name__)

    return app


# The page is inert (no script, nothing fetched) and says so to the browser; a browser asks again every time
# (no-cache) and gets 304 while the page is the same.
STATUS_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}
NO_STATUS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>No status page yet</title></head>
<body><h1>No status page yet</h1>
<p>This node serves the deployment's status page once the fleet-state run has written it into the node's
folder:</p>
<pre>ansible-playbook -i INVENTORY playbooks/fleet_state.yml</pre>
<p>or, from a fleet-state JSON file: <code>rmsd status-page --state fleet-state.json --output PATH</code>
(PATH: status.html beside the node's rmsd.toml).</p></body></html>
"""


def status_page_response(path: str | None, if_none_match: str | None) -> Response:
    try:
        body = Path(path).read_bytes() if path else None
    except (FileNotFoundError, NotADirectoryError):
        body = None
    if body is None:
        return HTMLResponse(NO_STATUS_PAGE, status_code=404, headers=STATUS_HEADERS)
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {**STATUS_HEADERS, "ETag": etag}
    if if_none_match and etag in [tag.strip() for tag in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    return HTMLResponse(body, headers=headers)


def _docs(operation_id: str) -> dict:
    return {k: v for k, v in contract.OPERATIONS[operation_id].items() if k != "links"}


def _documented(app: FastAPI) -> dict:
    from fastapi.openapi.utils import get_openapi

    app.openapi_schema = contract.document(get_openapi(title=app.title, version=app.version, routes=app.routes))
    return app.openapi_schema


def check_tls(config: NodeConfig) -> dict:
    """uvicorn's TLS options for a node with a certificate; RmsdError, before anything starts, when the files
    are unreadable or the key does not belong to the certificate."""
    check_tls_paths(config.tls_certificate, config.tls_key)
    certificate, key = config.tls_certificate, config.tls_key
    if not (certificate and key):  # config.tls
        return {}
    files = load_tls_files(certificate, key)
    now = utcnow()
    if not files.not_before <= now <= files.not_after:
        # Started anyway: refusing would turn a renewal that is late into an outage of this node too.
        log.warning("the certificate in %s is not valid now (valid from %s until %s); renew it",
                    config.tls_certificate, files.not_before.isoformat(), files.not_after.isoformat())
    # No ssl_version/ssl_ciphers: Python's server context then keeps its defaults (TLS 1.2 or newer,
    # forward-secret ciphers only).
    return {"ssl_certfile": config.tls_certificate, "ssl_keyfile": config.tls_key}


def serve(config: NodeConfig) -> None:
    """Run the node: one worker process in the foreground, or (config.workers, default one per core)
    several forked from this one, each listening on the port (SO_REUSEPORT)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tls = check_tls(config)
    workers = worker_count(config)
    if workers == 1:
        # Bound before the node starts (a request waits in the backlog meanwhile), and alone on its port.
        _serve_worker(config, tls, [listening_socket(config.listen_address, config.port)])
    else:
        _supervise(config, tls, workers)


def _started_app(config: NodeConfig, heartbeat: bool = True) -> FastAPI:
    app = create_app(config, heartbeat)
    try:
        # Refuse to start, with the reason, when the key or the database is unusable.
        app.state.node.state()
    except sa.exc.SQLAlchemyError as err:
        raise db.connect_error(err, config.database_url) from None
    return app


def _serve_worker(config: NodeConfig, tls: dict, sockets: list[socket.socket], ready=None,
                  heartbeat: bool = True) -> None:
    import uvicorn

    app = _started_app(config, heartbeat)
    if ready is not None:
        ready()
    else:
        log.info("serving %s", config.url)
    server_config = uvicorn.Config(app, host=config.listen_address, port=config.port, log_level="info",
                                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, **uvicorn_limits(config),
                                   **uvicorn_proxy(config), **tls)
    server = stopping_server(server_config, app.state.stopping)
    server.run(sockets=sockets)
    if not server.started:  # the start-up failed, and uvicorn said why
        raise RmsdError("the worker did not start")


def stopping_server(config, stopping: limits.Stopping):
    """uvicorn's server for `config`, which first lets a balancer take the node out when it stops."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # Closing the listening sockets resets the connections the kernel holds for them, and a request
            # already sent on one fails: a balancer does not send a POST again. So first answer /health 503
            # and serve on until no request comes (the balancer took the node out), then stop.
            await stopping.drain()
            await super().shutdown(sockets)

    return Server(config)


def _supervise(config: NodeConfig, tls: dict, workers: int) -> None:
    """Fork `workers` processes that each build the whole node after the fork (their own listening socket,
    database pool, PKCS#11 session and caches: nothing of that may cross a fork), and keep them
    running: a worker that dies is replaced; one that cannot start stops the node with its reason.
    SIGTERM or SIGINT stop every worker gracefully."""
    # Each worker listens on a socket of its own on the same port (SO_REUSEPORT), so that the kernel spreads
    # new connections over the workers. On one shared socket the first worker to wake accepts every pending
    # connection, and a client's keep-alive connections, opened together, all end up in one worker.
    # The port is reserved here first, so that a port in use is said once, before any worker starts, and no
    # other process can take it meanwhile. Every worker serves the reserving socket too (the connections the
    # kernel gives it), besides its own.
    reserved = reserve_port(config.listen_address, config.port)
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def start(number: int) -> None:
        ready_r, ready_w = os.pipe()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            children.clear()  # its siblings are the supervisor's to stop, not its own
            _end_with_parent(supervisor)
            os.close(ready_r)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                def ready():
                    os.write(ready_w, b"1")
                    os.close(ready_w)
                sock = listening_socket(config.listen_address, config.port, reuse_port=True)
                _serve_worker(config, tls, [sock, reserved], ready, heartbeat=number == 1)
            except RmsdError as err:
                print(f"rmsd: worker {number}: {err}", file=sys.stderr)
                code = 2
            except BaseException:  # noqa: BLE001 (a worker never returns into the supervisor's code)
                log.exception("worker %d failed", number)
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as pipe:
            started = pipe.read(1) == b"1"  # empty: the worker exited before it was ready
        if not started:
            _, status = os.waitpid(pid, 0)
            stop_all()
            raise RmsdError(f"worker {number} could not start (exit status {os.waitstatus_to_exitcode(status)}); "
                            "its reason is above")
        children[pid] = number
        log.info("worker %d (pid %d) started", number, pid)
        if stopping:  # asked to stop while this worker started
            os.kill(pid, signal.SIGTERM)

    def stop_all() -> None:
        reserved.close()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            children.pop(pid, None)

    def on_signal(_signum, _frame):
        nonlocal stopping
        stopping = True
        # The workers serve the port until they stop; once they are gone, nothing may hold connections there.
        reserved.close()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for number in range(1, workers + 1):
            if not stopping:
                start(number)
        log.info("serving %s with %d workers", config.url, workers)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            number = children.pop(pid, 0)
            if not number or stopping:
                continue
            log.warning("worker %d (pid %d) exited (status %d); starting another", number, pid,
                        os.waitstatus_to_exitcode(status))
            start(number)
    finally:
        stop_all()


def listening_socket(address: str, port: int, reuse_port: bool = False,
                     backlog: int = limits.MAX_CONNECTIONS) -> socket.socket:
    """A worker's TCP listening socket, made with its protocol named: asyncio turns Nagle's algorithm off
    (TCP_NODELAY) only on connections whose socket says IPPROTO_TCP, and socket.create_server leaves it 0.
    Without it a response written in two parts (headers, body) waits for the client's delayed ACK: about
    40 ms per request. reuse_port: one of the node's workers' sockets on a port its supervisor reserved
    (reserve_port); without it, the port must be free of any other socket."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT only is free
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise RmsdError(
                f"cannot listen on {address} port {port}: another process holds this address and port (another rmsd "
                "instance, or another service); stop it, or give this node another port. Nothing was started"
            ) from None
        raise RmsdError(f"cannot listen on {address} port {port}: {err.strerror or err}") from None
    return sock


def reserve_port(address: str, port: int) -> socket.socket:
    """The node's port, held for its workers by their supervisor: bound and listening without SO_REUSEPORT,
    so that a port any other socket holds is refused (with SO_REUSEPORT, a second rmsd of the same user would
    share it, and the kernel would split the connections between two unrelated nodes), and so that no other
    socket can take the port before the workers listen (a socket only bound would not stop another one bound
    with SO_REUSEADDR). SO_REUSEPORT is set once it listens, so that the workers' own sockets can join it."""
    sock = listening_socket(address, port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _end_with_parent(supervisor: int) -> None:
    """Linux: this worker gets SIGTERM when the supervisor dies, however it dies (SIGKILL included), so no
    worker is left holding the port."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != supervisor:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)


def uvicorn_limits(config: NodeConfig) -> dict:
    """uvicorn's own limits, applied before the application sees a request: the h11 parser (where
    h11_max_incomplete_event_size bounds request line and headers, and the guarded protocol the time every
    state of a connection may take and how many connections a worker holds), the keep-alive time, the TLS
    handshake and shutdown times (the guarded loop), the listen backlog; no Server header."""
    io_timeout = config.read_timeout_seconds or limits.READ_TIMEOUT_SECONDS
    max_connections = config.max_connections or limits.MAX_CONNECTIONS
    return {
        "http": limits.guarded_h11(io_timeout, max_connections),
        "loop": limits.guarded_loop(io_timeout),
        "h11_max_incomplete_event_size": config.max_header_bytes or limits.MAX_HEADER_BYTES,
        "timeout_keep_alive": config.keep_alive_seconds or limits.KEEP_ALIVE_SECONDS,
        # Connections the kernel completes while the worker is busy wait here, as many as the worker may hold;
        # beyond it the kernel refuses them (a balancer tries another node).
        "backlog": max_connections,
        "server_header": False,
    }


def uvicorn_proxy(config: NodeConfig) -> dict:
    """Whom the node believes about a client's address: X-Forwarded-For (and -Proto) only from a peer among
    the node's trusted proxies (its load balancer), and from no one without them. uvicorn's own default
    would believe any loopback peer (or $FORWARDED_ALLOW_IPS): on a host that also runs other software, any
    local process could then pose as any client of the per-address limits."""
    if not config.trusted_proxies:
        return {"proxy_headers": False, "forwarded_allow_ips": []}
    return {"proxy_headers": True, "forwarded_allow_ips": list(config.trusted_proxies)}
