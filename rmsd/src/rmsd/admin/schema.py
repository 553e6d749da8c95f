"""The configuration database's schema on its own: migrated to this rmsd's revision, once, under a lock, before
the first node of a new release starts (the nodes of the release before keep working on it)."""

import sqlalchemy as sa

from rmsd import db
from rmsd.admin.store import opened
from rmsd.errors import RmsdError


def migrate_schema(*, database_url, database_password=None, check_mode=False) -> dict:
    """{changed, revision_before, revision, oldest_reader, migrated_by}: the schema's revision before and
    after, the oldest revision whose rmsd can work on it, and the rmsd version that last migrated it."""
    with opened(database_url, database_password) as store:
        if not db.database_exists(store.engine):
            raise RmsdError(f"{database_url} does not exist: provision a cluster in it first. Nothing was changed.")
        try:
            with store.engine.begin() as conn:
                before = db.schema_revision(conn)
                if before is None:
                    raise RmsdError(f"{database_url} holds no rmsd schema: provision a cluster in it first. "
                                    "Nothing was changed.")
                changed = db.older_schema(before)
                if check_mode:
                    if not changed:
                        db.check_schema(conn, before)  # a newer schema this rmsd cannot work on: say so
                    return {"changed": changed, "revision_before": before,
                            "revision": db.HEAD_REVISION if changed else before, **_compatibility(conn)}
                changed = db.migrate(conn)
                return {"changed": changed, "revision_before": before, "revision": db.schema_revision(conn),
                        **_compatibility(conn)}
        except sa.exc.OperationalError as err:
            raise db.connect_error(err, database_url) from None


def _compatibility(conn: sa.Connection) -> dict:
    return {"oldest_reader": None, "migrated_by": None, **db.schema_compatibility(conn)}
