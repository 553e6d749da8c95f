"""Key lifecycle: republishing, revoked root SLCs and enrollments, imported keys, owner notices.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from rmsd.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cluster_keys") as batch:
        batch.add_column(sa.Column("imported_from", sa.String(64)))
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("revoked_at", UTCDateTime))
    with op.batch_alter_table("content") as batch:
        batch.add_column(sa.Column("supersedes", sa.String(40)))
        batch.add_column(sa.Column("superseded_by", sa.String(40)))
        batch.add_column(sa.Column("superseded_at", UTCDateTime))
    with op.batch_alter_table("enrollments") as batch:
        batch.add_column(sa.Column("revoked_at", UTCDateTime))
    op.create_table(
        "owner_notices",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("sent_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("cluster_id", "owner", "key_id"),
    )


def downgrade() -> None:
    op.drop_table("owner_notices")
    with op.batch_alter_table("enrollments") as batch:
        batch.drop_column("revoked_at")
    with op.batch_alter_table("content") as batch:
        for column in ("superseded_at", "superseded_by", "supersedes"):
            batch.drop_column(column)
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("revoked_at")
    with op.batch_alter_table("cluster_keys") as batch:
        batch.drop_column("imported_from")
