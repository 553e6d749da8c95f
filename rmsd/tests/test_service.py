"""The HTTP service as a real `rmsd serve` process: the RAC -> PL -> UL round trip and every refusal."""

import base64
import importlib.metadata
import json
import os
import subprocess
import threading
import time
import tomllib

import httpx
import pytest
import tomli_w
from conftest import (
    KEY_PASSWORD,
    RMSD,
    cluster_key,
    configure_node,
    free_port,
    make_issuer,
    provision,
    sqlite_database,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import CertificateSigningRequestBuilder, Name, NameAttribute
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import RSAKey

from rmsd import __version__, admin, db, demo_issuer, pki
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.schema import utcnow

DOCUMENT = b"Board minutes: for the finance group only."


@pytest.fixture(scope="module")
def client(node):
    return RmsClient(node.url)


@pytest.fixture(scope="module")
def users(node, client):
    """alice (owner), bob (group finance), mallory (no rights), each with a RAC."""
    made = {
        "alice": User.new("alice@example.com", node.token("alice@example.com")),
        "bob": User.new("bob@example.com", node.token("bob@example.com", ["finance"])),
        "mallory": User.new("mallory@example.com", node.token("mallory@example.com", ["sales"])),
    }
    for user in made.values():
        client.certify(user)
    return made


@pytest.fixture(scope="module")
def published(client, users):
    content_key, blob = encrypt_content(DOCUMENT)
    pl = client.publish(users["alice"], "doc-board-minutes", content_key, {"group:finance": ["VIEW", "PRINT"]})
    return pl, content_key, blob


def test_health_and_slc(node, client):
    health = client.health()
    assert (health["status"], health["cluster"], health["node"], health["role"]) == ("ok", "c1", "n1", "root")
    slc = client.slc()
    info = admin.cluster_info(name="c1", **node.database.admin_args())
    assert health["active_key_id"] == info["cluster"]["active_key_id"]
    # The versions an operator compares across a rolling upgrade: the code's and the schema's.
    assert health["version"] == importlib.metadata.version("rmsd")
    assert health["schema_revision"] == info["schema_revision"] == db.HEAD_REVISION
    assert pki.fingerprint(pki.load_pem(slc["chain"][0])) == info["slc"]["fingerprint_sha256"]


def test_round_trip_opens_the_content_for_a_granted_group(client, users, published):
    pl, content_key, blob = published
    granted = client.license(users["bob"], pl["pl"])
    assert granted["rights"] == ["PRINT", "VIEW"]
    claims, opened_key = open_use_license(granted["ul"], client.slc()["chain"][0], users["bob"])
    assert claims["sub"] == "bob@example.com" and claims["content_id"] == "doc-board-minutes"
    assert opened_key == content_key
    assert decrypt_content(opened_key, blob) == DOCUMENT


def test_owner_holds_every_right(client, users, published):
    granted = client.license(users["alice"], published[0]["pl"])
    assert "OWNER" in granted["rights"] and "VIEW" in granted["rights"]


def test_user_without_rights_is_refused_and_told_which_content(client, users, published):
    with pytest.raises(ServiceError) as err:
        client.license(users["mallory"], published[0]["pl"])
    assert err.value.status == 403
    assert "doc-board-minutes" in err.value.detail and "mallory@example.com" in err.value.detail


def test_rac_of_another_user_is_refused(client, users, published):
    bob_with_alices_rac = User("bob@example.com", users["bob"].token, users["bob"].private_key, users["alice"].rac_pem)
    with pytest.raises(ServiceError) as err:
        client.license(bob_with_alices_rac, published[0]["pl"])
    assert err.value.status == 403
    assert "another user" in err.value.detail


def test_rac_from_another_deployment_is_refused(tmp_path, client, users, published):
    # Another deployment's root cluster, even under the same name (so the issuer DN matches).
    other = sqlite_database(tmp_path)
    provision(other)
    _row, _key_row, other_key, other_slc = cluster_key(other)
    bob = users["bob"]
    csr = pki.load_csr(bob.csr_pem())
    foreign_rac = pki.issue_rac(other_key, pki.load_pem(other_slc), bob.subject, csr, utcnow())
    assert foreign_rac.issuer == pki.load_pem(client.slc()["chain"][0]).subject
    bob_foreign = User(bob.subject, bob.token, bob.private_key, pki.to_pem(foreign_rac))
    with pytest.raises(ServiceError) as err:
        client.license(bob_foreign, published[0]["pl"])
    assert err.value.status == 403
    assert "root cluster" in err.value.detail


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_tampered_publishing_license_is_refused(client, users, published):
    header, payload, signature = published[0]["pl"].split(".")
    claims = json.loads(_unb64(payload))
    claims["rights"]["group:sales"] = ["VIEW"]  # mallory tries to grant herself access
    forged = ".".join([header, _b64(json.dumps(claims).encode()), signature])
    with pytest.raises(ServiceError) as err:
        client.license(users["mallory"], forged)
    assert err.value.status == 400
    assert "signature" in err.value.detail


def test_garbage_publishing_license_is_refused(client, users):
    with pytest.raises(ServiceError) as err:
        client.license(users["bob"], "not-a-jws")
    assert err.value.status == 400


def test_bad_csr_is_refused(node, client):
    token = node.token("carol@example.com")
    for csr in ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "hello"):
        response = client.http.post("/certification", json={"csr": csr}, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 400, response.text
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_csr = (CertificateSigningRequestBuilder().subject_name(Name([NameAttribute(NameOID.COMMON_NAME, "carol")]))
                .sign(weak, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    response = client.http.post("/certification", json={"csr": weak_csr}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400 and "2048" in response.json()["detail"]
    response = client.http.post("/certification", json={}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 422


def test_rac_names_the_token_subject_not_the_csr_subject(node, client):
    # The CSR asks for "alice"; the RAC is for whoever the token says.
    carol = User.new("carol@example.com", node.token("carol@example.com"))
    carol.subject = "alice@example.com"
    rac = pki.load_pem(client.certify(carol))
    assert pki.rac_subject(rac) == "carol@example.com"


def _forged_token(node, subject: str, same_kid: bool) -> str:
    kid = json.loads((node.issuer_dir / "jwks.json").read_text())["keys"][0]["kid"]
    key = RSAKey.generate_key(2048, parameters={"kid": kid if same_kid else "another-key"})
    now = int(time.time())
    claims = {"iss": demo_issuer.ISSUER, "aud": demo_issuer.AUDIENCE, "sub": subject, "iat": now, "exp": now + 300}
    return jwt.encode({"alg": "RS256", "kid": key.kid}, claims, key)


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda node: None, id="no-token"),
        pytest.param(lambda node: "not.a.jwt", id="malformed"),
        pytest.param(lambda node: node.token("eve@example.com", ttl=60, now=time.time() - 600), id="expired"),
        pytest.param(lambda node: node.token("eve@example.com", issuer="https://evil.invalid"), id="wrong-issuer"),
        pytest.param(lambda node: node.token("eve@example.com", audience="other"), id="wrong-audience"),
        pytest.param(lambda node: _forged_token(node, "eve@example.com", same_kid=True), id="other-key-same-kid"),
        pytest.param(lambda node: _forged_token(node, "eve@example.com", same_kid=False), id="unknown-key"),
    ],
)
def test_unacceptable_bearer_tokens_get_401(node, client, make_token):
    token = make_token(node)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    csr = User.new("eve@example.com", "").csr_pem()
    for path, body in (("/certification", {"csr": csr}), ("/publishing", {
        "content_id": "x", "content_key": _b64(os.urandom(32)), "rights": {"eve@example.com": ["VIEW"]},
    })):
        response = client.http.post(path, json=body, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_valid_token_is_accepted(node, client):
    # The control for the 401 cases above: the same request with a good token succeeds.
    user = User.new("eve@example.com", node.token("eve@example.com"))
    assert "BEGIN CERTIFICATE" in client.certify(user)


def test_publishing_validates_the_content_key(node, client):
    headers = {"Authorization": f"Bearer {node.token('alice@example.com')}"}
    # The schema says what a content key and a right are: anything else is refused with 422 and where.
    for key in (_b64(os.urandom(16)), "!!!", _b64(os.urandom(33))):
        body = {"content_id": "x", "content_key": key, "rights": {"bob@example.com": ["VIEW"]}}
        response = client.http.post("/publishing", json=body, headers=headers)
        assert response.status_code == 422 and "content_key" in response.json()["detail"], response.text
    body = {"content_id": "x", "content_key": _b64(os.urandom(32)), "rights": {"bob@example.com": ["FLY"]}}
    response = client.http.post("/publishing", json=body, headers=headers)
    assert response.status_code == 422 and "'OWNER'" in response.json()["detail"], response.text


def test_round_trip_on_every_backend(any_node):
    client = RmsClient(any_node.url)
    owner = User.new("olga@example.com", any_node.token("olga@example.com"))
    reader = User.new("rita@example.com", any_node.token("rita@example.com"))
    for user in (owner, reader):
        client.certify(user)
    content_key, blob = encrypt_content(DOCUMENT)
    pl = client.publish(owner, "doc-backend", content_key, {"rita@example.com": ["VIEW"]})
    granted = client.license(reader, pl["pl"])
    _claims, opened_key = open_use_license(granted["ul"], client.slc()["chain"][0], reader)
    assert decrypt_content(opened_key, blob) == DOCUMENT
    info = admin.cluster_info(name="c1", **any_node.database.admin_args())
    assert info["content_per_key"][pl["key_id"]] >= 1


def test_nul_characters_are_a_client_error(any_node):
    # PostgreSQL cannot store NUL in text: that is the request's fault, not an unavailable database.
    client = RmsClient(any_node.url)
    headers = {"Authorization": f"Bearer {any_node.token('alice@example.com')}"}
    body = {"content_id": "doc\x00", "content_key": _b64(os.urandom(32)), "rights": {"bob@example.com": ["VIEW"]}}
    response = client.http.post("/publishing", json=body, headers=headers)
    assert response.status_code in (200, 400, 422), response.text
    nul_subject = "nul\x00@example.com"
    headers = {"Authorization": f"Bearer {any_node.token(nul_subject)}"}
    response = client.http.post("/certification", json={"csr": User.new("x", "").csr_pem()}, headers=headers)
    assert response.status_code in (200, 400, 401, 422), response.text


def test_heartbeat_marks_the_node_up(node):
    info = admin.cluster_info(name="c1", **node.database.admin_args())
    [n1] = info["nodes"]
    assert n1["name"] == "n1" and n1["status"] == "up" and n1["last_heartbeat"] is not None


def test_serve_with_wrong_key_password_exits_with_a_clear_message(node, tmp_path):
    wrong = "Wrong-Pass-5b2e"
    secret_path = tmp_path / "wrong.secret"
    fd = os.open(secret_path, os.O_CREAT | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tomli_w.dumps({"key_password": wrong}))
    config = tomllib.loads(node.config_path.read_text())
    config["node"].update(secret_path=str(secret_path), name="n9", port=1)
    config_path = tmp_path / "n9.toml"
    config_path.write_text(tomli_w.dumps(config))
    proc = subprocess.run([str(RMSD), "serve", "--config", str(config_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "password" in proc.stderr and "cluster key" in proc.stderr
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    assert wrong not in output and KEY_PASSWORD not in output


def test_serve_refuses_a_readable_secret_file(node, tmp_path):
    secret_path = tmp_path / "open.secret"
    secret_path.write_text(tomli_w.dumps({"key_password": KEY_PASSWORD}))
    secret_path.chmod(0o644)
    config = tomllib.loads(node.config_path.read_text())
    config["node"].update(secret_path=str(secret_path), name="n8", port=1)
    config_path = tmp_path / "n8.toml"
    config_path.write_text(tomli_w.dumps(config))
    proc = subprocess.run([str(RMSD), "serve", "--config", str(config_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "0600" in proc.stderr and "Traceback" not in proc.stderr
    assert KEY_PASSWORD not in proc.stdout + proc.stderr


def test_status_command_reports_the_cluster(node):
    proc = subprocess.run([str(RMSD), "status", "--config", str(node.config_path)], capture_output=True, text=True,
                          check=True, timeout=60)
    status = json.loads(proc.stdout)
    assert status["exists"] is True and status["node"] == "n1" and status["cluster"]["name"] == "c1"
    assert KEY_PASSWORD not in proc.stdout and "PRIVATE" not in proc.stdout


def test_demo_roundtrip_command(node):
    proc = subprocess.run([str(RMSD), "demo-roundtrip", "--url", node.url, "--issuer-dir", str(node.issuer_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round trip OK" in proc.stdout


def check_roundtrip(url: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RMSD_BEARER_TOKEN"}
    if token is not None:
        env["RMSD_BEARER_TOKEN"] = token
    return subprocess.run([str(RMSD), "check-roundtrip", "--url", url], capture_output=True, text=True, timeout=120,
                          env=env)


def test_check_roundtrip_command_goes_through_one_node_with_a_users_token(node, tmp_path):
    """What a rollout asks of a restarted node before it takes traffic again: a user's RAC, a document it
    publishes, a use license that opens it, through that node; the token never shows."""
    token = node.token("carol@example.com")
    proc = check_roundtrip(node.url, token)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["node"] == "n1" and result["cluster"] == "c1" and result["version"] == __version__
    assert result["content_id"].startswith("rmsd-roundtrip-check-")
    assert node.database.count("content", content_id=result["content_id"], owner="carol@example.com") == 1
    stranger = demo_issuer.token(make_issuer(tmp_path / "other-issuer"), "carol@example.com")
    for given, message in ((None, "set RMSD_BEARER_TOKEN"), ("not-a-jwt", "not a JWT with a subject"),
                           (stranger, "the round trip through " + node.url + " failed: HTTP 401")):
        proc = check_roundtrip(node.url, given)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and (given is None or given not in proc.stdout + proc.stderr)
    proc = check_roundtrip(f"http://127.0.0.1:{free_port()}", token)
    assert proc.returncode == 2 and "ConnectError" in proc.stderr and token not in proc.stderr, proc.stderr


def test_health_answers_without_a_token(node):
    assert httpx.get(f"{node.url}/health", timeout=5).status_code == 200


def test_worker_connections_turn_nagle_off():
    """Workers share a socket the supervisor made: the connections asyncio accepts on it must have
    TCP_NODELAY, or every response written in two parts waits for the client's delayed ACK (about 40 ms)."""
    import asyncio
    import socket

    from rmsd.service import listening_socket

    async def accepted_nodelay() -> int:
        found: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                found.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listening_socket("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(found, 30)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_workers_sockets_share_the_port_and_its_connections():
    """Each worker listens on a socket of its own on the node's port; the kernel spreads connections over them
    (on one shared socket, the first worker to wake took every connection a client opened at once)."""
    import select
    import socket

    from rmsd.errors import RmsdError
    from rmsd.service import listening_socket

    first = listening_socket("127.0.0.1", 0, reuse_port=True)
    port = first.getsockname()[1]
    second = listening_socket("127.0.0.1", port, reuse_port=True)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
    try:
        accepted = {first: 0, second: 0}
        while sum(accepted.values()) < len(clients):
            ready, _, _ = select.select([first, second], [], [], 30)
            assert ready, "a connection was never accepted"
            for sock in ready:
                sock.accept()[0].close()
                accepted[sock] += 1
        assert all(accepted.values()), f"one socket got every connection: {list(accepted.values())}"
        # A port some other socket holds without SO_REUSEPORT is refused with the reason.
        with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(RmsdError, match="cannot listen"):
            listening_socket("127.0.0.1", taken.getsockname()[1], reuse_port=True)
    finally:
        for sock in [first, second, *clients]:
            sock.close()


def test_a_reserved_port_takes_the_workers_and_nothing_else():
    """The supervisor reserves the port: its workers' sockets join it; a socket without SO_REUSEPORT (another
    rmsd of the same user reserves its port that way) is refused with the address, the port and what to do."""
    import select
    import socket

    from rmsd.errors import RmsdError
    from rmsd.service import listening_socket, reserve_port

    reserved = reserve_port("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    worker = listening_socket("127.0.0.1", port, reuse_port=True)
    try:
        with pytest.raises(RmsdError, match=f"cannot listen on 127.0.0.1 port {port}: another process holds"):
            reserve_port("127.0.0.1", port)
        with pytest.raises(RmsdError, match="another process holds this address and port"):
            listening_socket("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port)):  # served by the worker or on the reserving socket
            assert select.select([reserved, worker], [], [], 30)[0]
    finally:
        worker.close()
        reserved.close()


def test_a_second_node_on_the_port_of_a_running_one_refuses_to_start(node, tmp_path):
    """Another deployment's node (same user, same address and port: a second demo in another checkout) does not
    start; the first node answers every request its clients send meanwhile, each from its own instance id."""
    own_id = httpx.get(f"{node.url}/health", timeout=10).json()["instance_id"]
    assert own_id == tomllib.loads(node.config_path.read_text())["node"]["instance_id"]
    other = sqlite_database(tmp_path)
    provision(other)
    port = int(node.url.rsplit(":", 1)[1])
    _result, config_path, _secret = configure_node(other, tmp_path, make_issuer(tmp_path / "issuer"), port=port,
                                                   workers=2)
    assert tomllib.loads(config_path.read_text())["node"]["instance_id"] != own_id
    answered, failures = [], []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not stop.is_set():
                try:
                    answered.append(http.get(f"{node.url}/health").json()["instance_id"])
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    failures.append(repr(err))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        proc = subprocess.run([str(RMSD), "serve", "--config", str(config_path)], capture_output=True, text=True,
                              timeout=60)
    finally:
        stop.set()
        thread.join(30)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1 port {port}: another process holds this address and port" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    print(f"{len(answered)} requests during the attempt, {len(failures)} failed")
    assert failures == [] and answered and set(answered) == {own_id}


# --- /health and /slc: what anyone may ask costs the database one read a second ---------------------------


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """A node served in this process by uvicorn (over a real socket), with every SQL statement it runs counted."""
    import sqlalchemy as sa
    import uvicorn

    from rmsd.config import load_node_config
    from rmsd.service import create_app, listening_socket, uvicorn_limits

    base = tmp_path_factory.mktemp("served-app")
    database = sqlite_database(base)
    provision(database)
    _result, config_path, _secret = configure_node(database, base, make_issuer(base / "issuer"))
    config = load_node_config(config_path)
    app = create_app(config, heartbeat=False)
    statements: list[str] = []
    for engine in (app.state.node.engine, app.state.node.reader):
        sa.event.listen(engine, "after_cursor_execute", lambda *args: statements.append(args[2]))
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_limits(config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.node, statements
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_flood_of_health_and_slc_reads_the_cluster_once_a_second(served_app):
    """400 anonymous requests from 8 clients: the SQL statements they cost are bounded by the seconds they took
    (one read of the cluster per second, plus the first), not by their number."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    url, node, statements = served_app
    statements.clear()
    node._read_state()
    per_read = len(statements)
    statements.clear()
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda path: http.get(path).status_code, ["/health", "/slc"] * 200))
    seconds = time.monotonic() - started
    counted = len(statements)
    reads_allowed = math.ceil(seconds / node.snapshot_seconds) + 1
    print(f"{len(statuses)} requests in {seconds:.2f} s: {counted} SQL statements ({per_read} per read of the "
          f"cluster; at most {reads_allowed} reads allowed)")
    assert statuses == [200] * 400
    assert counted <= per_read * reads_allowed
    assert per_read * reads_allowed < len(statuses), "the bound says nothing: the flood was too slow"


def test_health_and_slc_answer_while_issuing_holds_the_cluster_lock(served_app):
    """Certification, publishing and licensing read the cluster under the node's lock; /health and /slc never
    wait for it, even when they read the cluster afresh."""
    url, node, _statements = served_app
    node._lock.acquire()
    node.snapshot_seconds = 0  # every request reads the cluster again
    try:
        with httpx.Client(base_url=url, timeout=20) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/slc").status_code == 200
    finally:
        node.snapshot_seconds = 1.0
        node._lock.release()


def test_the_instance_id_is_made_once_and_kept_by_every_rewrite(tmp_path):
    database = sqlite_database(tmp_path)
    provision(database)
    issuer = make_issuer(tmp_path / "issuer")
    check, config_path, _secret = configure_node(database, tmp_path, issuer, port=18089, check_mode=True)
    assert not config_path.exists() and len(check.facts["server"]["instance_id"]) == 32
    first, _config, _secret = configure_node(database, tmp_path, issuer, port=18089)
    made = first.facts["server"]["instance_id"]
    assert tomllib.loads(config_path.read_text())["node"]["instance_id"] == made
    again, _config, _secret = configure_node(database, tmp_path, issuer, port=18089)
    assert not again.changed and again.facts["server"]["instance_id"] == made
    moved, _config, _secret = configure_node(database, tmp_path, issuer, port=18090, workers=2)
    assert moved.changed and moved.facts["server"]["instance_id"] == made
    # A configuration written before nodes had one gets one: a change (the node restarts to serve it).
    config_path.write_text(config_path.read_text().replace(f'instance_id = "{made}"\n', ""))
    upgraded, _config, _secret = configure_node(database, tmp_path, issuer, port=18090, workers=2)
    assert upgraded.changed and upgraded.facts["config_changed"]
    new_id = upgraded.facts["server"]["instance_id"]
    assert len(new_id) == 32 and new_id != made


def test_slc_shows_the_key_the_node_signs_with_as_soon_as_the_node_has_read_it(tmp_path):
    """A rotation this node has read for issuing is what /slc and /health answer too, at once: a client that
    got a PL under the new key and fetches /slc to verify it must not get the old key for `snapshot_seconds`."""
    from rmsd.config import load_node_config
    from rmsd.node import Node

    database = sqlite_database(tmp_path)
    provision(database)
    _result, config_path, _secret = configure_node(database, tmp_path, make_issuer(tmp_path / "issuer"))
    node = Node(load_node_config(config_path))
    try:
        node.snapshot_seconds = 3600.0  # only a newer read by the node itself can change what /slc shows
        old_key = node.snapshot().active.key_id
        rotated = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, **database.admin_args(),
                                           compromised_keys=[old_key])
        new_key = rotated.facts["active_key_id"]
        assert new_key != old_key and node.snapshot().active.key_id == old_key
        assert node.state(refresh=True).active.key_id == new_key
        assert node.snapshot().active.key_id == new_key
        assert node.snapshot().revoked_key_ids == [old_key]
    finally:
        node.stop()
