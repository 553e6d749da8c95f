"""Fixtures: configuration databases (SQLite and a real PostgreSQL), provisioned clusters, a demo
identity issuer and a running `rmsd serve` node."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from rmsd import admin, clusters, db, demo_issuer
from rmsd.keys import provider_for

REPO = Path(__file__).resolve().parents[2]
RMSD = Path(sys.executable).with_name("rmsd")
KEY_PASSWORD = "Key-Pass-7f3c9e1d-never-stored"


def _load_pgserver():
    # The project's throwaway PostgreSQL helper lives in scripts/ (standard library only).
    spec = importlib.util.spec_from_file_location("pgserver", REPO / "scripts" / "pgserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pgserver = _load_pgserver()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Database:
    """A configuration database under test and how to look inside it."""

    kind: str  # sqlite | postgresql
    url: str
    password: str | None
    sqlite_file: Path | None = None

    def engine(self) -> sa.Engine:
        return db.make_engine(self.url, self.password)

    def dump(self) -> dict | None:
        """Every table's rows (sorted), or None when there is no database file / no table at all."""
        if self.sqlite_file is not None and not self.sqlite_file.exists():
            return None
        engine = self.engine()
        try:
            with engine.connect() as conn:
                names = sorted(sa.inspect(conn).get_table_names())
                if not names:
                    return None
                meta = sa.MetaData()
                meta.reflect(conn)
                return {
                    name: sorted(repr(tuple(row)) for row in conn.execute(sa.select(meta.tables[name])))
                    for name in names
                }
        finally:
            engine.dispose()

    def count(self, table: str, **where) -> int:
        dump_engine = self.engine()
        try:
            with dump_engine.connect() as conn:
                if not sa.inspect(conn).has_table(table):
                    return 0
                clause = " AND ".join(f"{k} = :{k}" for k in where) or "1 = 1"
                return conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {clause}"), where).scalar_one()
        finally:
            dump_engine.dispose()

    def admin_args(self) -> dict:
        return {"database_url": self.url, "database_password": self.password}


@pytest.fixture(scope="session")
def pg():
    with pgserver.PostgresServer() as server:
        yield server


def sqlite_database(directory: Path) -> Database:
    path = directory / "db" / "config.db"
    return Database("sqlite", f"sqlite:///{path}", None, path)


def postgres_database(server) -> Database:
    return Database("postgresql", server.create_database(f"t{uuid.uuid4().hex[:12]}"), server.password)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> Database:
    """A fresh, empty configuration database of each supported kind."""
    if request.param == "sqlite":
        return sqlite_database(tmp_path)
    return postgres_database(request.getfixturevalue("pg"))


def provision(database: Database, name: str = "c1", **overrides):
    args = {
        "name": name, "key_password": KEY_PASSWORD, "intranet_url": "https://rms.example.com",
        **database.admin_args(), **overrides,
    }
    return admin.ensure_cluster(**args)


def cluster_key(database: Database, name: str = "c1", password: str = KEY_PASSWORD):
    """(cluster row, active key row, opened ClusterKey, SLC PEM) read straight from the database."""
    engine = database.engine()
    try:
        with engine.connect() as conn:
            row = clusters.get_cluster(conn, name)
            key_row = clusters.active_key_row(conn, row.id)
            slc = clusters.current_slc_row(conn, row.id, key_row.id)
            return row, key_row, provider_for("password", key_password=password).load(key_row), slc.pem
    finally:
        engine.dispose()


@dataclass
class Node:
    """A running `rmsd serve` process and what it was made from."""

    url: str
    database: Database
    cluster: str
    config_path: Path
    secret_path: Path
    issuer_dir: Path
    process: subprocess.Popen

    def token(self, subject: str, groups=(), **kwargs) -> str:
        return demo_issuer.token(self.issuer_dir, subject, groups, **kwargs)


def make_issuer(directory: Path) -> Path:
    demo_issuer.init(directory)
    return directory


def configure_node(database: Database, directory: Path, issuer_dir: Path, cluster: str = "c1", name: str = "n1",
                   port: int | None = None, key_password: str | None = KEY_PASSWORD, pkcs11: dict | None = None,
                   **options):
    config_path, secret_path = directory / "etc" / f"{name}.toml", directory / "etc" / f"{name}.secret"
    result = admin.ensure_server(
        cluster=cluster, name=name, key_password=key_password, port=port or free_port(),
        config_path=str(config_path), secret_path=str(secret_path), identity_issuer=demo_issuer.ISSUER,
        identity_audience=demo_issuer.AUDIENCE, identity_jwks_uri=demo_issuer.jwks_uri(issuer_dir), pkcs11=pkcs11,
        **database.admin_args(), **options,
    )
    return result, config_path, secret_path


def start_node(config_path: Path, log_path: Path, timeout: float = 30.0, verify=True) -> tuple[str, subprocess.Popen]:
    """Start `rmsd serve` and wait until /health answers (over HTTPS, checked with `verify`, when the node
    has a certificate)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(RMSD), "serve", "--config", str(config_path)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    node = tomllib.loads(config_path.read_text())["node"]
    scheme = "https" if node.get("tls_certificate") else "http"
    url = f"{scheme}://{node['listen_address']}:{node['port']}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"rmsd serve exited {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", verify=verify, timeout=1.0).status_code == 200:
                return url, process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_node(process)
    raise RuntimeError(f"rmsd serve did not answer /health at {url} within {timeout}s:\n{log_path.read_text()}")


def eventually(check, timeout: float = 30.0):
    """Wait for an event: call `check` until it returns instead of failing an assertion, and return what it
    returns. A node takes up a change when it next reads its cluster; the timeout only keeps a broken node
    from hanging the suite."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop_node(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _running_node(base: Path, database: Database, issuer_dir: Path | None = None):
    provision(database)
    issuer_dir = issuer_dir or make_issuer(base / "issuer")
    _result, config_path, secret_path = configure_node(database, base, issuer_dir)
    url, process = start_node(config_path, base / "serve.log")
    try:
        yield Node(url, database, "c1", config_path, secret_path, issuer_dir, process)
    finally:
        stop_node(process)


@pytest.fixture(scope="session")
def node(tmp_path_factory) -> Node:
    """One provisioned root cluster (SQLite) with one running node, shared by the service tests."""
    base = tmp_path_factory.mktemp("node")
    yield from _running_node(base, sqlite_database(base))


@pytest.fixture(scope="session")
def pg_node(tmp_path_factory, pg) -> Node:
    """The same on PostgreSQL."""
    yield from _running_node(tmp_path_factory.mktemp("pg-node"), postgres_database(pg))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_node(request) -> Node:
    return request.getfixturevalue("node" if request.param == "sqlite" else "pg_node")


SUMMARIES = {
    "kill_point": "crash injection: a rotation killed at each step, then rerun",
    "hypothesis_cases": "hostile input: generated cases by class, and their outcomes",
}


def pytest_terminal_summary(terminalreporter):
    """What the crash tests and the generated-input tests found (recorded with record_property, which
    pytest-xdist carries back from its workers)."""
    for key, title in SUMMARIES.items():
        lines = [value for report in terminalreporter.stats.get("passed", [])
                 for name, value in getattr(report, "user_properties", []) if name == key]
        if lines:
            terminalreporter.section(title)
            for line in sorted(lines):
                terminalreporter.write_line(line)
