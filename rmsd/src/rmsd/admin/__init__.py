"""The admin API: idempotent `ensure_*` calls with check mode and a metadata-only diff, and `cluster_info`.
This is what the Ansible collection calls; it never returns key material or secrets.

One module per concern, each over one configuration database reached through `rmsd.admin.store`:
cluster, cluster_keys, servers, templates, credentials, publishing_domain (TPD), compromise_report, info,
schema (migrations on their own).
What they share (result, checks, what unlocks a cluster's keys, enrollment) is in `rmsd.admin.common`."""

from rmsd.admin.cluster import IMMUTABLE, ROLES, STATES, ensure_cluster
from rmsd.admin.cluster_keys import TOKEN_ACTIONS, ensure_cluster_key
from rmsd.admin.common import Result
from rmsd.admin.compromise_report import ensure_compromise_report
from rmsd.admin.credentials import CREDENTIAL_VALIDITY, MIN_SECRET_LENGTH, ensure_enrollment_credential
from rmsd.admin.info import HEARTBEAT_STALE_AFTER, cluster_info
from rmsd.admin.publishing_domain import TPD_STATES, ensure_trusted_publishing_domain
from rmsd.admin.schema import migrate_schema
from rmsd.admin.servers import ensure_server
from rmsd.admin.templates import ensure_rights_template

__all__ = [
    "CREDENTIAL_VALIDITY", "HEARTBEAT_STALE_AFTER", "IMMUTABLE", "MIN_SECRET_LENGTH", "ROLES", "STATES",
    "TOKEN_ACTIONS", "TPD_STATES", "Result", "cluster_info", "ensure_cluster", "ensure_cluster_key",
    "ensure_compromise_report", "ensure_enrollment_credential", "ensure_rights_template", "ensure_server",
    "ensure_trusted_publishing_domain", "migrate_schema",
]
