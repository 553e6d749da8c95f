"""Servers record whether they serve HTTPS.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Not null with a server default: nodes registered before this revision serve HTTP.
    with op.batch_alter_table("servers") as batch:
        batch.add_column(sa.Column("tls", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("servers") as batch:
        batch.drop_column("tls")
