"""The schema says which rmsd can work on it: the oldest revision whose code still can (a migration that only
adds leaves it where it was; one that removes or changes what older code reads raises it), and the rmsd
version that migrated it. A node whose code is older than that refuses to start, naming both.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A new table, nothing older code reads: rmsd at revision 0006 (release 0.1.0) works on this schema.
    table = op.create_table(
        "schema_compatibility",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("oldest_reader", sa.String(32), nullable=False),
        sa.Column("migrated_by", sa.String(64)),
        sa.CheckConstraint("id = 1", name="schema_compatibility_one_row"),
    )
    op.bulk_insert(table, [{"id": 1, "oldest_reader": "0006", "migrated_by": None}])


def downgrade() -> None:
    op.drop_table("schema_compatibility")
