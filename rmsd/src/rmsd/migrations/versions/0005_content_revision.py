"""Content rows carry a revision, set by the database on every insert and update: the report of content
under compromised keys tells from a count and a sum of revisions whether any of its rows changed, without
reading them all.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Every column but the revision itself: an update of any of them gives the row a new revision.
COLUMNS = "pl_id, cluster_id, content_id, owner, key_id, rights, created_at, supersedes, superseded_by, superseded_at"


def upgrade() -> None:
    with op.batch_alter_table("content") as batch:
        batch.add_column(sa.Column("revision", sa.BigInteger))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE content_revision_seq")
        op.execute("CREATE FUNCTION content_revision() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN NEW.revision := nextval('content_revision_seq'); RETURN NEW; END $$")
        op.execute("CREATE TRIGGER content_revision BEFORE INSERT OR UPDATE ON content "
                   "FOR EACH ROW EXECUTE FUNCTION content_revision()")
        return
    # SQLite has no sequence: a one-row counter, counted up by triggers (writers are serialized anyway).
    # A later migration that rebuilds the content table (batch mode) must create these triggers again.
    op.create_table("content_revision", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("n", sa.BigInteger, nullable=False))
    op.execute("INSERT INTO content_revision (id, n) VALUES (1, 0)")
    for name, event in (("content_revision_insert", "INSERT"), ("content_revision_update", f"UPDATE OF {COLUMNS}")):
        op.execute(f"CREATE TRIGGER {name} AFTER {event} ON content BEGIN "
                   "UPDATE content_revision SET n = n + 1 WHERE id = 1; "
                   "UPDATE content SET revision = (SELECT n FROM content_revision WHERE id = 1) "
                   "WHERE rowid = NEW.rowid; END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER content_revision ON content")
        op.execute("DROP FUNCTION content_revision()")
        op.execute("DROP SEQUENCE content_revision_seq")
    else:
        op.execute("DROP TRIGGER content_revision_insert")
        op.execute("DROP TRIGGER content_revision_update")
        op.drop_table("content_revision")
    with op.batch_alter_table("content") as batch:
        batch.drop_column("revision")
