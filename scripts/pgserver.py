"""A throwaway PostgreSQL server on 127.0.0.1 for tests and scenarios.

initdb + pg_ctl in a temporary directory, on a free port, with password
(scram-sha-256) authentication over TCP. As root the server runs as the
`postgres` user (PostgreSQL refuses to run as root).

From Python (standard library only, so any test suite can import it):

    from pgserver import PostgresServer
    with PostgresServer() as pg:
        pg.url        # postgresql+psycopg://rms@127.0.0.1:<port>/postgres (no password)
        pg.password   # pass separately, e.g. as database_password
        pg.create_database("cfg1")   # an empty database; returns its URL

As a pytest plugin (`-p pgserver` with this directory on sys.path, or
`from pgserver import postgres_server` in a conftest.py): the session fixture
`postgres_server`; give each test its own database with create_database().

From a shell:

    python scripts/pgserver.py start DIR   # prints {"url": ..., "password": ..., "port": ...}
    python scripts/pgserver.py stop DIR
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

USER = "rms"
RUN_AS = "postgres"


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl: $PG_BINDIR, PATH, or the newest Debian install."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise RuntimeError("PostgreSQL server binaries not found: install postgresql or set PG_BINDIR")
    return Path(candidates[-1]).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, base_dir: str | os.PathLike | None = None, port: int | None = None):
        self._owns_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="pgserver-"))
        self.data_dir = self.base_dir / "data"
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(16)
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database (as a client, over TCP) and return its URL."""
        env = dict(os.environ, PGPASSWORD=self.password)
        proc = subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", USER, name], check=False, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"createdb {name} failed:\n{proc.stdout}{proc.stderr}")
        return self.url_for(name)

    def _run(self, *args: str, env: dict | None = None) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              env=None if env is None else dict(os.environ, **env))
        if proc.returncode:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def start(self) -> PostgresServer:
        # mkdtemp makes a 0700 directory; as root, the server user must own it.
        self._prepare_base_dir()
        pwfile = self.base_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.as_root:
            pw = pwd.getpwnam(RUN_AS)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", USER, f"--pwfile={pwfile}",
                      "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                      "--no-sync", "--no-instructions")
        finally:
            pwfile.unlink()
        return self._start_server()

    def _prepare_base_dir(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            pw = pwd.getpwnam(RUN_AS)
            os.chown(self.base_dir, pw.pw_uid, pw.pw_gid)

    def _start_server(self) -> PostgresServer:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-c unix_socket_directories={self.base_dir} -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.base_dir / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")
        return self

    def start_standby(self) -> PostgresServer:
        """A streaming standby of this server (pg_basebackup -R: it replays this server's WAL and accepts only
        reads), started on a port of its own, with the same user and password. promote() makes it a primary."""
        standby = PostgresServer()
        standby.password = self.password
        standby._prepare_base_dir()
        self._run("pg_basebackup", "-D", str(standby.data_dir), "-R", "-X", "stream", "-c", "fast",
                  "-d", f"host=127.0.0.1 port={self.port} user={USER} application_name=standby",
                  env={"PGPASSWORD": self.password})
        return standby._start_server()

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "promote")

    def crash(self) -> None:
        """Stop at once, as a host that dies would (no checkpoint, clients cut off); the files stay."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def info(self) -> dict:
        return {"url": self.url, "password": self.password, "port": self.port,
                "base_dir": str(self.base_dir)}


try:
    import pytest
except ImportError:  # usable without pytest, as a module or a script
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def postgres_server():
        """A PostgreSQL server for the whole test session (tests create their own databases)."""
        with PostgresServer() as server:
            yield server


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    base = Path(argv[2]).resolve()
    state = base / "pgserver.json"
    if argv[1] == "start":
        server = PostgresServer(base).start()
        state.write_text(json.dumps(server.info()))
        state.chmod(0o600)
        print(json.dumps(server.info()))
    else:
        info = json.loads(state.read_text())
        PostgresServer(base, port=info["port"]).stop()
        state.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
