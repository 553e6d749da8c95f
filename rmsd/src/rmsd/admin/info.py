"""What a cluster is, read-only: its keys, SLCs, nodes and their health, templates, credentials (metadata
only), enrollments and the content per key."""

from rmsd import clusters, db, pki, rotation
from rmsd.admin.common import check_name, cluster_view
from rmsd.admin.store import opened
from rmsd.admin.templates import template_view
from rmsd.config import node_url
from rmsd.schema import utcnow

HEARTBEAT_STALE_AFTER = 3  # heartbeats missed before a node counts as down
EMPTY = {
    "exists": False, "cluster": {}, "nodes": [], "cluster_keys": [], "slc": {}, "root_slc": {},
    "untrusted_root_key_ids": [], "content_per_key": {}, "rights_templates": [], "enrollment_credentials": [],
    "enrollments": [], "republishing": [], "schema_revision": None, "schema_compatibility": {},
}


def cluster_info(*, name, database_url, database_password=None) -> dict:
    check_name("cluster name", name)
    with opened(database_url, database_password) as store:
        info = store.read(lambda conn: _info(conn, name))
    return info or dict(EMPTY)


def _info(conn, name) -> dict | None:
    row = clusters.get_cluster(conn, name)
    if row is None:
        return None
    now = utcnow()
    view = cluster_view(conn, row)
    slc_row = clusters.current_slc_row(conn, row.id, view["active_key_id"])
    slc = pki.load_pem(slc_row.pem)
    nodes = []
    for server in clusters.servers_of(conn, row.id):
        beat = server.last_heartbeat
        # A node that beats every 10 s and has missed a few counts as down.
        up = beat is not None and (now - beat).total_seconds() < 10 * HEARTBEAT_STALE_AFTER
        nodes.append({
            "name": server.name, "listen_address": server.listen_address, "port": server.port,
            "tls": server.tls, "url": node_url(server.listen_address, server.port, server.tls),
            "joined_at": server.joined_at.isoformat(),
            "last_heartbeat": beat.isoformat() if beat else None, "status": "up" if up else "down",
        })
    keys = [rotation.key_view(k, now) for k in clusters.keys_of(conn, row.id)]
    root_slc, untrusted = {}, []
    if row.role == "licensing":
        root_row = clusters.root_slc_row(conn, row.id, slc_row.issuer_key_id)
        root_slc = _cert_view(pki.load_pem(root_row.pem), root_row)
        untrusted = clusters.untrusted_root_key_ids(conn, row.id)
    return {
        "exists": True,
        "schema_revision": db.read_schema_revision(conn),
        "schema_compatibility": db.schema_compatibility(conn),
        "cluster": view,
        "nodes": nodes,
        "cluster_keys": keys,
        "slc": dict(_cert_view(slc, slc_row), issuer_key_id=slc_row.issuer_key_id),
        "root_slc": root_slc,
        # licensing: root keys revoked as compromised, whose SLCs and RACs it no longer trusts
        "untrusted_root_key_ids": untrusted,
        "content_per_key": clusters.content_counts(conn, row.id),
        # per compromised key: its content still pending and republished, and the progress over time
        "republishing": clusters.republishing_progress(conn, row.id),
        "rights_templates": [template_view(t) for t in clusters.templates_of(conn, row.id)],
        # Metadata only: the secret's hash never leaves the database.
        "enrollment_credentials": [
            {
                "scope": c.scope, "expires_at": c.expires_at.isoformat(), "expired": c.expires_at <= now,
                "last_used_at": c.last_used_at.isoformat() if c.last_used_at else None,
            }
            for c in clusters.credentials_of(conn, row.id)
        ],
        "enrollments": [
            {
                "licensing_cluster": e.licensing_cluster, "key_id": e.key_id, "issuer_key_id": e.issuer_key_id,
                "slc_fingerprint_sha256": e.fingerprint_sha256, "not_after": e.not_after.isoformat(),
                "created_at": e.created_at.isoformat(),
                "revoked_at": e.revoked_at.isoformat() if e.revoked_at else None,
            }
            for e in clusters.enrollments_of(conn, row.id)
        ],
    }


def _cert_view(cert, cert_row) -> dict:
    return {
        "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
        "serial": cert_row.serial, "fingerprint_sha256": cert_row.fingerprint_sha256, "key_id": cert_row.key_id,
        "not_before": cert_row.not_before.isoformat(), "not_after": cert_row.not_after.isoformat(),
    }
