"""How an admin call reaches one configuration database: a read that sees what the next write would
(nothing yet, or the schema migrated in a transaction rolled back), a write under the cluster's lock with
the schema brought up to date, and one error for a cluster that is not there."""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar

import sqlalchemy as sa

from rmsd import db
from rmsd.errors import RmsdError

T = TypeVar("T")


class Store:
    def __init__(self, database_url: str, database_password: str | None = None):
        self.url = database_url
        self.engine = db.make_engine(database_url, database_password)

    def read(self, fn: Callable[[sa.Connection], T]) -> T | None:
        """Run `fn(conn)` read-only; None when the database does not exist yet or has no schema. A database
        on an older schema is read as the next write will find it: migrated, in a transaction rolled back."""
        if not db.database_exists(self.engine):
            return None
        try:
            with self.engine.connect() as conn:
                if not sa.inspect(conn).has_table("clusters"):
                    return None
                revision = db.schema_revision(conn)
                if revision == db.HEAD_REVISION:
                    return fn(conn)
            with self.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    db.migrate(conn)
                    conn.info["schema_revision_read"] = revision
                    return fn(conn)
                finally:
                    transaction.rollback()
        except sa.exc.OperationalError as err:
            raise db.connect_error(err, self.url) from None

    @contextmanager
    def writing(self, cluster: str) -> Iterator[sa.Connection]:
        """A write transaction on `cluster`: locked against concurrent runs, schema up to date."""
        try:
            with self.engine.begin() as conn:
                db.lock(conn, cluster)
                db.migrate(conn)
                yield conn
        except sa.exc.OperationalError as err:
            raise db.connect_error(err, self.url) from None

    @contextmanager
    def short_writes(
        self, cluster: str, lock: bool = True,
    ) -> Iterator[Callable[[], AbstractContextManager[sa.Connection]]]:
        """One connection for many short write transactions on `cluster`, each locked against concurrent
        runs unless `lock` is false (the caller's rows serialize them; SQLite's BEGIN IMMEDIATE always does),
        the schema brought up to date once: yields a function that opens the next one.

        On SQLite the database is switched to write-ahead logging (it stays so) and this connection commits
        without waiting for the disk (synchronous=NORMAL): a commit is then a write into the log, which a
        process killed right after keeps; a power cut may lose the last commits, never the database. In the
        default rollback journal each commit waits for several disk syncs."""
        with self.writing(cluster):
            pass
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "sqlite":  # outside a transaction: on the driver's connection
                    driver = conn.connection.dbapi_connection
                    assert driver is not None
                    driver.execute("PRAGMA journal_mode = WAL").fetchall()
                    driver.execute("PRAGMA synchronous = NORMAL")
                @contextmanager
                def transaction() -> Iterator[sa.Connection]:
                    with conn.begin():
                        if lock:
                            db.lock(conn, cluster)
                        yield conn

                yield transaction
        except sa.exc.OperationalError as err:
            raise db.connect_error(err, self.url) from None

    def missing(self, cluster: str, what_next: str = "", kind: str = "cluster") -> RmsdError:
        """The error for a cluster this database does not hold; `what_next` says what to do about it."""
        return RmsdError(f"{kind} {cluster!r} does not exist in {self.url}" + (f"; {what_next}" if what_next else ""))

    def close(self) -> None:
        self.engine.dispose()


@contextmanager
def opened(database_url: str, database_password: str | None = None) -> Iterator[Store]:
    store = Store(database_url, database_password)
    try:
        yield store
    finally:
        store.close()
