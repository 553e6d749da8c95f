"""Initial configuration database: clusters, keys, SLCs, servers, content registry, RACs.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from rmsd.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("intranet_url", sa.String(512), nullable=False),
        sa.Column("extranet_url", sa.String(512)),
        sa.Column("key_protection", sa.String(16), nullable=False),
        sa.Column("key_size", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "cluster_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("protection", sa.String(16), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("public_key_pem", sa.Text, nullable=False),
        sa.Column("encrypted_private_key", sa.LargeBinary),
        sa.Column("token_label", sa.String(64)),
        sa.Column("key_label", sa.String(64)),
        sa.Column("wrap_alg", sa.String(32), nullable=False),
        sa.Column("sign_alg", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("status_changed_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(48), primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("issuer_key_id", sa.String(40), nullable=False),
        sa.Column("pem", sa.Text, nullable=False),
        sa.Column("fingerprint_sha256", sa.String(64), nullable=False),
        sa.Column("not_before", UTCDateTime, nullable=False),
        sa.Column("not_after", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "servers",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("listen_address", sa.String(64), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("joined_at", UTCDateTime, nullable=False),
        sa.Column("last_heartbeat", UTCDateTime),
        sa.UniqueConstraint("cluster_id", "name"),
    )
    op.create_table(
        "content",
        sa.Column("pl_id", sa.String(40), primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("content_id", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("rights", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_content_key", "content", ["key_id"])
    op.create_index("ix_content_owner", "content", ["owner"])
    op.create_table(
        "racs",
        sa.Column("serial", sa.String(48), primary_key=True),
        sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("not_after", UTCDateTime, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in ("racs", "content", "servers", "certificates", "cluster_keys", "clusters"):
        op.drop_table(table)
