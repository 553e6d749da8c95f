"""The configuration database tables (SQLAlchemy Core). Changes go through an Alembic migration."""

from datetime import UTC, datetime

import sqlalchemy as sa

metadata = sa.MetaData()


class UTCDateTime(sa.types.TypeDecorator):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


clusters = sa.Table(
    "clusters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),  # root | licensing
    sa.Column("state", sa.String(16), nullable=False),  # provisioned | decommissioned
    sa.Column("intranet_url", sa.String(512), nullable=False),
    sa.Column("extranet_url", sa.String(512)),
    sa.Column("key_protection", sa.String(16), nullable=False),  # password | pkcs11
    sa.Column("key_size", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

cluster_keys = sa.Table(
    "cluster_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # derived from the public key
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # active | archived | compromised
    sa.Column("protection", sa.String(16), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("public_key_pem", sa.Text, nullable=False),
    # password protection: PKCS#8 EncryptedPrivateKeyInfo (scrypt + AES-256-CBC), DER. NULL for HSM keys.
    sa.Column("encrypted_private_key", sa.LargeBinary),
    sa.Column("token_label", sa.String(64)),
    sa.Column("key_label", sa.String(64)),
    # Recorded per key: an HSM may only offer RSA-OAEP with SHA-1.
    sa.Column("wrap_alg", sa.String(32), nullable=False),
    sa.Column("sign_alg", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("status_changed_at", UTCDateTime, nullable=False),
    # The cluster whose trusted publishing domain brought this key in; NULL: generated here.
    sa.Column("imported_from", sa.String(64)),
    # Revoked as compromised: the key's own signed statement of it, for the root cluster (rmsd.revocation).
    sa.Column("revocation", sa.Text),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", sa.String(48), primary_key=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    # slc: this cluster's own SLC; root: a licensing cluster's copy of the root SLC it chains to
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("key_id", sa.String(40), nullable=False),  # the subject key
    sa.Column("issuer_key_id", sa.String(40), nullable=False),
    sa.Column("pem", sa.Text, nullable=False),
    sa.Column("fingerprint_sha256", sa.String(64), nullable=False),
    sa.Column("not_before", UTCDateTime, nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # kind=root: set when the root cluster revoked this root key as compromised; no longer trusted.
    sa.Column("revoked_at", UTCDateTime),
)

servers = sa.Table(
    "servers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("listen_address", sa.String(64), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("joined_at", UTCDateTime, nullable=False),
    sa.Column("last_heartbeat", UTCDateTime),
    # Whether the node serves HTTPS (its URL's scheme); rows from before 0004 read as HTTP.
    sa.Column("tls", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("cluster_id", "name"),
)

content = sa.Table(
    "content",
    metadata,
    sa.Column("pl_id", sa.String(40), primary_key=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("content_id", sa.String(128), nullable=False),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("key_id", sa.String(40), nullable=False),
    sa.Column("rights", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Republishing: the new publishing license replaces the old one (same content, new key).
    sa.Column("supersedes", sa.String(40)),
    sa.Column("superseded_by", sa.String(40)),
    sa.Column("superseded_at", UTCDateTime),
    # Set by the database (migration 0005) on every insert and update, never by rmsd: a count and sum of the
    # revisions of the rows a report covers change whenever one of those rows does.
    sa.Column("revision", sa.BigInteger),
    sa.Index("ix_content_key", "key_id"),
    sa.Index("ix_content_owner", "owner"),
)

racs = sa.Table(
    "racs",
    metadata,
    sa.Column("serial", sa.String(48), primary_key=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("subject", sa.String(256), nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


rights_templates = sa.Table(
    "rights_templates",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("description", sa.String(512), nullable=False),
    sa.Column("rights", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("cluster_id", "name"),
)

# On the root cluster: who may enroll a licensing cluster. Only a salted scrypt hash of the
# secret is kept; the secret itself exists only in the operator's hands.
enrollment_credentials = sa.Table(
    "enrollment_credentials",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("scope", sa.String(64), nullable=False),  # the licensing cluster it may enroll
    sa.Column("secret_hash", sa.LargeBinary, nullable=False),
    sa.Column("salt", sa.LargeBinary, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # When it enrolled a licensing cluster: a credential is used once, then refused.
    sa.Column("last_used_at", UTCDateTime),
    sa.UniqueConstraint("cluster_id", "scope"),
)

# On the root cluster: the SLCs it issued to licensing clusters.
enrollments = sa.Table(
    "enrollments",
    metadata,
    sa.Column("serial", sa.String(48), primary_key=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("licensing_cluster", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(40), nullable=False),  # the licensing cluster's key
    sa.Column("issuer_key_id", sa.String(40), nullable=False),
    sa.Column("fingerprint_sha256", sa.String(64), nullable=False),
    sa.Column("not_after", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set when the licensing cluster revoked this key as compromised: it is never certified again.
    sa.Column("revoked_at", UTCDateTime),
)

# Content owners told that content of theirs is protected by a compromised key: once per owner
# and key, so a rerun sends nothing twice.
owner_notices = sa.Table(
    "owner_notices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.Integer, sa.ForeignKey("clusters.id", ondelete="CASCADE"), nullable=False),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("key_id", sa.String(40), nullable=False),
    sa.Column("items", sa.Integer, nullable=False),  # content items pending when the notice went out
    sa.Column("channel", sa.String(16), nullable=False),  # smtp | outbox
    sa.Column("sent_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("cluster_id", "owner", "key_id"),
)
