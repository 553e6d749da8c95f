"""A cluster key revoked as compromised keeps its revocation statement: a compact JWS it signed itself, which
a licensing cluster hands to the root cluster at enrollment (rmsd.revocation).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (no table rebuild on SQLite); keys revoked before this revision have none yet.
    op.add_column("cluster_keys", sa.Column("revocation", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("cluster_keys") as batch:
        batch.drop_column("revocation")
