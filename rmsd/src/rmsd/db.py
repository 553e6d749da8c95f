"""Engines for the configuration database, migrations, and the lock that serializes writers."""

import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa

from rmsd import transport
from rmsd.errors import DatabaseUnavailableError, RmsdError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")


# The newest migration under migrations/versions. Every module run compares the database with it, so it
# is a constant rather than read through alembic (whose import and script scan cost a module run a good
# part of a second); rmsd/tests/test_admin.py checks it is alembic's head.
HEAD_REVISION = "0007"
POOL_SIZE, POOL_OVERFLOW = 16, 24  # per process (worker); PostgreSQL's default max_connections is 100
# A planned switchover leaves no primary for a second or two: a write waits that out (asking again every
# PRIMARY_POLL_SECONDS) instead of failing. After PRIMARY_WAIT_SECONDS it gets 503 with Retry-After, well within
# the request's deadline: an unplanned failover takes longer, and holding every request for it would not help.
PRIMARY_WAIT_SECONDS, PRIMARY_POLL_SECONDS = 5.0, 0.25


def alembic_head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        raise RmsdError(f"no database migrations in {MIGRATIONS}; the rmsd installation is incomplete")
    return head


def make_engine(database_url: str, password: str | None = None) -> sa.Engine:
    """An engine for `sqlite:///PATH` or `postgresql://USER@HOST:PORT/DB` (password given apart)."""
    try:
        url = sa.make_url(database_url)
    except sa.exc.ArgumentError as err:
        raise RmsdError(f"database_url {database_url!r} is not a database URL: {err}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise RmsdError("database_url for SQLite must name a file: sqlite:////var/lib/rmsd/config.db")
        engine = sa.create_engine(url, connect_args={"timeout": 30})
        _sqlite_write_transactions(engine)
        return engine
    if backend == "postgresql":
        refuse_unverified_postgresql(url)
        url = url.set(drivername="postgresql+psycopg")
        if password is not None:
            url = url.set(password=password)
        # Pool large enough for a worker's request threads at once: a connection opened and closed per
        # request (the default pool keeps 5) costs PostgreSQL a backend start each time.
        return sa.create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW,
                                connect_args={"connect_timeout": 10})
    raise RmsdError(f"database backend {backend!r} is not supported; use sqlite:/// or postgresql://")


def _query_values(url: sa.URL, name: str) -> list[str]:
    value = url.query.get(name)
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def refuse_unverified_postgresql(url: sa.URL) -> None:
    """RmsdError when a PostgreSQL URL reaches a host off the loopback interface without TLS that verifies the
    server's certificate and name (libpq's sslmode=verify-full): the password, the encrypted cluster keys
    and every row would otherwise cross the network to whoever answers. A Unix socket or a loopback host may
    use any sslmode."""
    hosts = _hosts(url)
    # A host may come with its port (SQLAlchemy's host=NAME:PORT); a path is a Unix socket's folder.
    remote = [host for host in hosts if host and not host.startswith("/") and not transport.is_loopback(
        host.partition("]")[0].lstrip("[") if host.startswith("[") else host.partition(":")[0]
        if host.count(":") == 1 else host)]
    if not remote:
        return
    modes = _query_values(url, "sslmode")
    if modes == ["verify-full"]:
        return
    given = f"sslmode={modes[-1]}" if modes else "no sslmode (libpq then tries TLS without verifying it)"
    raise RmsdError(
        f"database_url connects to PostgreSQL at {', '.join(remote)}, off the loopback interface, with {given}: "
        "the database password and every row (the encrypted cluster keys among them) would cross the network "
        "to whoever answers. Add sslmode=verify-full&sslrootcert=/path/to/ca.pem (the CA that issued the "
        "database server's certificate) to database_url. Nothing was changed."
    )


def make_reader(engine: sa.Engine) -> sa.Engine:
    """An engine for reads that need no transaction, one statement each: on PostgreSQL without BEGIN and
    ROLLBACK round trips; on SQLite without the write lock every transaction of `engine` takes (a read
    then holds the shared lock for its one statement), and refusing to write."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    reader = sa.create_engine(engine.url, connect_args={"timeout": 30})

    @sa.event.listens_for(reader, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver opens no transaction either
        dbapi_connection.execute("PRAGMA busy_timeout = 30000")
        dbapi_connection.execute("PRAGMA query_only = ON")

    return reader


def _sqlite_write_transactions(engine: sa.Engine) -> None:
    """SQLite: every transaction takes the write lock at BEGIN, so concurrent writers queue
    instead of failing on lock upgrade; foreign keys enforced."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute("PRAGMA busy_timeout = 30000")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_path(engine: sa.Engine) -> Path | None:
    if engine.url.get_backend_name() == "sqlite":
        if engine.url.database is None:
            raise RmsdError("database_url for SQLite must name a file: sqlite:////var/lib/rmsd/config.db")
        return Path(engine.url.database)
    return None


def prepare_sqlite_file(engine: sa.Engine) -> None:
    """Create the SQLite file's folder (0700) and the file itself (0600): it holds the encrypted key."""
    path = sqlite_path(engine)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def database_exists(engine: sa.Engine) -> bool:
    path = sqlite_path(engine)
    return path.exists() if path is not None else True


# A failover (the primary stopped, a standby promoted) breaks every connection to the old primary. The pool
# tests a connection before lending it (pool_pre_ping) and, on the first broken one, drops all it holds; the
# next connection goes to whichever host of a libpq multi-host URL accepts writes (target_session_attrs=
# read-write). A connection can still break between that test and a statement: read() and write() then run
# the work once more on a new connection, where that is safe.


def dropped(err: BaseException) -> bool:
    """The connection broke (the server went away or ended the session), as opposed to a statement's error."""
    return isinstance(err, sa.exc.DBAPIError) and err.connection_invalidated


def read(engine: sa.Engine, work: Callable[[sa.Connection], T]) -> T:
    """work(conn) on a connection of `engine`; once more on a new connection if the first one broke. For work
    that only reads: sending it again changes nothing."""
    try:
        with engine.connect() as conn:
            return work(conn)
    except sa.exc.DBAPIError as err:
        if not err.connection_invalidated:
            raise
    with engine.connect() as conn:
        return work(conn)


def _connect_for_writes(engine: sa.Engine) -> sa.Connection:
    if engine.dialect.name != "postgresql":
        return engine.connect()
    deadline = time.monotonic() + PRIMARY_WAIT_SECONDS
    while True:
        try:
            return engine.connect()
        except sa.exc.OperationalError:
            if time.monotonic() + PRIMARY_POLL_SECONDS > deadline:
                raise
            time.sleep(PRIMARY_POLL_SECONDS)


# Which server and which session a transaction ran in: the outcome of a COMMIT cut off is read only once that
# session is gone from that server, so that it cannot commit after the read.
SESSION = sa.text("SELECT inet_server_addr()::text, inet_server_port(), pg_postmaster_start_time(), pg_backend_pid()")
SESSION_ALIVE = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")


def _session(conn: sa.Connection) -> tuple | None:
    return tuple(conn.execute(SESSION).one()) if conn.dialect.name == "postgresql" else None


def _committed(engine: sa.Engine, session: tuple | None, committed: Callable[[sa.Connection, T], bool],
               result: T) -> bool | None:
    """Whether a transaction whose COMMIT was cut off took effect: True or False once known, None when it cannot
    be told within PRIMARY_WAIT_SECONDS. Read on the host that now accepts writes. On the same server, only once
    the session that sent the COMMIT has ended. On another one (a standby promoted), the old primary's sessions
    no longer count: what it committed without the new primary's having it is rewound when it rejoins."""
    if session is None:
        return None
    deadline = time.monotonic() + PRIMARY_WAIT_SECONDS
    try:
        with _connect_for_writes(engine) as conn:
            while True:
                server = tuple(conn.execute(SESSION).one())[:3]
                alive = conn.execute(SESSION_ALIVE, {"pid": session[3]}).scalar()
                if server != session[:3] or not alive:
                    found = bool(committed(conn, result))
                    conn.rollback()
                    return found
                conn.rollback()
                if time.monotonic() + PRIMARY_POLL_SECONDS > deadline:
                    return None
                time.sleep(PRIMARY_POLL_SECONDS)
    except sa.exc.DBAPIError:
        return None


def write(engine: sa.Engine, work: Callable[[sa.Connection], T],
          committed: Callable[[sa.Connection, T], bool] | None = None) -> T:
    """work(conn) in one transaction, committed. When the connection breaks before COMMIT is sent, the server
    has rolled the transaction back (nothing of it was written): it runs once more on a new connection. When
    it breaks during COMMIT, whether the transaction committed is unknown. Without `committed` the error goes
    to the caller (a request then gets 503, and its client decides whether to send it again). With it, the
    outcome is read on a new connection once the session that sent the COMMIT is gone (see _committed): the
    result is returned when `committed(conn, result)` finds what the work wrote, and the work runs once more
    when it does not. While no host accepts writes, a connection is asked for again for up to
    PRIMARY_WAIT_SECONDS (nothing has been sent yet)."""
    for attempt in (1, 2):
        with _connect_for_writes(engine) as conn:
            transaction = conn.begin()
            try:
                session = _session(conn) if committed is not None else None
                result = work(conn)
            except sa.exc.DBAPIError as err:
                if attempt == 1 and err.connection_invalidated:
                    continue
                raise
            try:
                transaction.commit()
            except sa.exc.DBAPIError as err:
                if committed is None or attempt == 2 or not err.connection_invalidated:
                    raise
                outcome = _committed(engine, session, committed, result)
                if outcome is None:
                    raise
                if outcome:
                    return result
                continue
            return result
    raise AssertionError("unreachable: the second attempt returns or raises")


def make_standby_reader(engine: sa.Engine) -> sa.Engine | None:
    """For reads while no host accepts writes: the same hosts, a standby preferred, one statement per
    connection use (autocommit). None unless `engine` is PostgreSQL at more than one host."""
    if engine.dialect.name != "postgresql" or len(_hosts(engine.url)) < 2:
        return None
    url = engine.url.update_query_dict({"target_session_attrs": "prefer-standby"})
    return sa.create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=8, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 10})


REPLAYED = sa.text(
    "SELECT NOT pg_is_in_recovery() OR coalesce(pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), false)"
)


def read_replayed(engine: sa.Engine, work: Callable[[sa.Connection], T]) -> T:
    """work(conn) on a primary, or on a standby that has replayed every change it received; otherwise
    DatabaseUnavailableError. With synchronous replication a commit is acknowledged only once the synchronous
    standby has it: such a standby, fully replayed, shows every key and RAC status change committed before the
    primary was lost, and a license read there is as honest as one read on the primary."""
    def checked(conn: sa.Connection) -> T:
        if not conn.execute(REPLAYED).scalar():
            raise DatabaseUnavailableError(
                "the configuration database has no primary, and its standby has not yet replayed every change it "
                "received; try again shortly")
        return work(conn)

    return read(engine, checked)


def _hosts(url: sa.URL) -> list[str]:
    """The hosts a PostgreSQL URL names: its host, and those of libpq's host= and hostaddr= lists."""
    named = [url.host or ""] + [host.strip() for name in ("host", "hostaddr")
                                for value in _query_values(url, name) for host in value.split(",")]
    return [host for host in named if host]


def lock(conn: sa.Connection, name: str) -> None:
    """Serialize writers for `name` until the transaction ends (SQLite: BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(f"rmsd:{name}".encode())})


def _alembic_config(conn: sa.Connection) -> "Config":
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def schema_revision(conn: sa.Connection) -> str | None:
    # What alembic's MigrationContext reads, without importing alembic.
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def read_schema_revision(conn: sa.Connection) -> str | None:
    """The revision of a provisioned database (it has alembic's table), in one statement."""
    return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def schema_current(conn: sa.Connection) -> bool:
    return schema_revision(conn) == HEAD_REVISION


# Expand, then contract: a release's migrations only add (tables, columns with defaults), so that the nodes of the
# release before keep working on the migrated schema while a fleet upgrades one node at a time; what they read
# is removed one release later. The schema records the oldest revision whose code still works on it
# (schema_compatibility, from revision 0007 on), which a migration that removes raises.


def _number(revision: str | None) -> int | None:
    return int(revision) if revision is not None and revision.isascii() and revision.isdigit() else None


def schema_compatibility(conn: sa.Connection) -> dict:
    """{oldest_reader, migrated_by} as the schema records them (revision 0007 on); {} before."""
    if not sa.inspect(conn).has_table("schema_compatibility"):
        return {}
    row = conn.execute(sa.text("SELECT oldest_reader, migrated_by FROM schema_compatibility")).one_or_none()
    return {} if row is None else {"oldest_reader": row.oldest_reader, "migrated_by": row.migrated_by}


def older_schema(revision: str | None) -> bool:
    """Whether a schema at `revision` is one this rmsd migrates (older than its own)."""
    number = _number(revision)
    return number is not None and number < int(HEAD_REVISION)


def check_schema(conn: sa.Connection, revision: str | None) -> None:
    """RmsdError, naming both sides, unless this rmsd can work on a schema at `revision`: its own, or a newer
    one whose migrations kept what this code reads. A schema older than this code's it cannot use: the
    database must be migrated first (which leaves it usable by the nodes of the release before)."""
    if revision == HEAD_REVISION:
        return
    from rmsd import __version__

    number = _number(revision)
    if number is None:
        raise RmsdError(f"the configuration database has schema revision {revision!r}, which no rmsd release "
                        f"writes; this rmsd {__version__} works on revision {HEAD_REVISION}")
    if number < int(HEAD_REVISION):
        raise RmsdError(
            f"the configuration database's schema is at revision {revision}, older than revision {HEAD_REVISION}, "
            f"which this rmsd {__version__} works on. Migrate it first with this rmsd (`rmsd migrate`, or any "
            "change it makes to a cluster), under a lock and once for all nodes; nodes of the release before "
            "keep working on the migrated schema.")
    recorded = schema_compatibility(conn)
    oldest = recorded.get("oldest_reader") or revision
    oldest_number = _number(oldest)
    if oldest_number is None or oldest_number > int(HEAD_REVISION):
        by = f"rmsd {recorded['migrated_by']}" if recorded.get("migrated_by") else "a newer rmsd"
        raise RmsdError(
            f"the configuration database's schema is at revision {revision} (migrated by {by}), which rmsd "
            f"older than revision {oldest} cannot work on; this rmsd {__version__} works on revision "
            f"{HEAD_REVISION}. Upgrade this node to {by}.")


def migrate(conn: sa.Connection) -> bool:
    """Bring the schema to this rmsd's revision inside the caller's transaction, under a lock that every
    migration takes (two processes upgrading at once: the second finds it done). A newer schema is left as it
    is when this rmsd can work on it (check_schema), and refused otherwise. True when this call migrated it."""
    if schema_current(conn):
        return False
    lock(conn, "schema")
    revision = schema_revision(conn)
    if revision == HEAD_REVISION:
        return False
    if revision is not None and not older_schema(revision):
        check_schema(conn, revision)
        return False
    from alembic.command import upgrade

    from rmsd import __version__

    upgrade(_alembic_config(conn), "head")
    conn.execute(sa.text("UPDATE schema_compatibility SET migrated_by = :version"), {"version": __version__})
    return True


def connect_error(err: Exception, database_url: str) -> RmsdError:
    return RmsdError(
        f"cannot reach the configuration database {database_url}: {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}. Check database_url, database_password and that "
        "the database server is running."
    )
