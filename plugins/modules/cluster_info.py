#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: cluster_info
short_description: Read the state of an RMS cluster
version_added: 0.1.0
description:
  - Reads a cluster from its configuration database, with its member servers and their heartbeats, its keys, its
    current server licensor certificate (SLC) and how much content each key protects, its rights policy templates
    and, on a root cluster, its enrollment credentials and the licensing clusters it enrolled.
  - Never changes anything. Key material is never returned.
  - The module is a thin layer over C(rmsd.admin.cluster_info); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
attributes:
  check_mode:
    details: The module only reads.
  diff_mode:
    support: none
options:
  name:
    description:
      - Name of the cluster.
    type: str
    required: true
seealso:
  - module: rmsops.rms.cluster
  - module: rmsops.rms.server
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Read the root cluster
  rmsops.rms.cluster_info:
    name: corp
    database_url: sqlite:////var/lib/rmsd/corp/config.db
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  register: corp

- name: Show the keys and how much content each protects
  ansible.builtin.debug:
    msg: "{{ corp.cluster_keys | map(attribute='status') }} {{ corp.content_per_key }}"

- name: Name the configuration database once for every rmsops.rms module of a block
  module_defaults:
    group/rmsops.rms.rmsd:
      database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_finance?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
      database_password: "{{ vault_rms_database_password }}"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  block:
    - name: Read the licensing cluster
      rmsops.rms.cluster_info:
        name: finance
      register: finance

    - name: Keep its rights policy template
      rmsops.rms.rights_template:
        cluster: finance
        name: finance-confidential
        rights:
          "group:finance": [VIEW, PRINT]
"""

RETURN = r"""
exists:
  description: Whether the cluster exists in the configuration database.
  returned: always
  type: bool
schema_revision:
  description:
    - The configuration database's schema revision (alembic), compared with what each node reports in C(/health)
      during a rolling upgrade. Null when the cluster does not exist.
  returned: always
  type: str
  sample: "0006"
  version_added: 0.2.0
schema_compatibility:
  description:
    - Which rmsd can work on the configuration database's schema, as the schema records it (from schema revision 0007
      on; empty before, and when the cluster does not exist). Migrations only add, so rmsd of an older revision
      keeps working until a release removes what it reads.
  returned: always
  type: dict
  contains:
    oldest_reader:
      description: The oldest schema revision whose rmsd still works on this schema.
      type: str
      sample: "0006"
    migrated_by:
      description: The rmsd version that last migrated the schema.
      type: str
      sample: 0.2.0
  version_added: 0.2.0
cluster:
  description: The cluster (empty if it does not exist).
  returned: always
  type: dict
  sample:
    name: corp
    role: root
    state: provisioned
    intranet_url: https://rms.corp.example.com
    extranet_url: null
    key_protection: password
    key_size: 2048
    active_key_id: 7f3c0e2a
    slc_fingerprint_sha256: 4b1d...
    slc_not_after: "2046-01-01T00:00:00+00:00"
nodes:
  description: The cluster's member servers.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Name of the server.
      type: str
    listen_address:
      description: Address the service listens on.
      type: str
    port:
      description: Port the service listens on.
      type: int
    url:
      description: URL of the server's service, C(https://) when it serves HTTPS.
      type: str
      sample: https://127.0.0.1:8080
    tls:
      description: Whether the server serves HTTPS (it joined with a TLS certificate and key).
      type: bool
    joined_at:
      description: When the server joined (ISO 8601).
      type: str
    last_heartbeat:
      description: Last heartbeat of the running service (ISO 8601), or null if it never ran.
      type: str
    status:
      description: V(up) if the service sent heartbeats recently, else V(down).
      type: str
cluster_keys:
  description: The cluster's keys, oldest first; metadata only.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Key identifier.
      type: str
    status:
      description: V(active), V(archived) or V(compromised).
      type: str
    protection:
      description: How the private key is protected.
      type: str
    size:
      description: Key size in bits.
      type: int
    created_at:
      description: Creation time (ISO 8601).
      type: str
    age_days:
      description: Age of the key in days.
      type: int
    status_changed_at:
      description: When the key got its status (ISO 8601); for a compromised key, when it was revoked.
      type: str
    imported_from:
      description: The cluster whose trusted publishing domain brought the key in, or null.
      type: str
    wrap_alg:
      description: Algorithm content keys are wrapped to this key with.
      type: str
    sign_alg:
      description: Algorithm licenses are signed with by this key.
      type: str
slc:
  description: The cluster's current server licensor certificate (empty if the cluster does not exist).
  returned: always
  type: dict
  contains:
    subject:
      description: Subject (RFC 4514).
      type: str
    issuer:
      description: Issuer (RFC 4514).
      type: str
    key_id:
      description: Identifier of the certified key.
      type: str
    issuer_key_id:
      description: Identifier of the key that issued it (for a licensing cluster, the root cluster key).
      type: str
    serial:
      description: Serial number.
      type: str
    fingerprint_sha256:
      description: SHA-256 fingerprint of the certificate.
      type: str
    not_before:
      description: Start of validity (ISO 8601).
      type: str
    not_after:
      description: End of validity (ISO 8601).
      type: str
content_per_key:
  description: Number of content items published under each key, by key identifier.
  returned: always
  type: dict
republishing:
  description:
    - Per key revoked as compromised (in the order they were), its content and how far its republishing got. Computed
      in the configuration database in two aggregate queries, whatever the number of content items.
  returned: always
  type: list
  elements: dict
  contains:
    key_id:
      description: The compromised key.
      type: str
    compromised_at:
      description: When it was revoked as compromised (ISO 8601).
      type: str
    published:
      description: Publishing licenses issued under the key (as in RV(content_per_key)).
      type: int
    republished:
      description: Of those, how many their owners republished under another key.
      type: int
    pending:
      description: Of those, how many are still to be republished.
      type: int
    series:
      description:
        - Still to be republished over time, at most 25 points evenly spaced from RV(republishing[].compromised_at)
          to the latest republishing (one point when nothing was republished since). The times come from the
          data, none from the clock, so the series changes only when the content does.
      type: list
      elements: dict
      contains:
        at:
          description: The time of the point (ISO 8601).
          type: str
        pending:
          description: Content items published by then and not yet republished.
          type: int
root_slc:
  description:
    - For a licensing cluster, the root cluster's SLC its own SLC chains to (same fields as RV(slc) but
      RV(slc.issuer_key_id)); empty for a root cluster.
  returned: always
  type: dict
untrusted_root_key_ids:
  description:
    - For a licensing cluster, the root cluster keys it no longer trusts because the root cluster revoked them as
      compromised (their SLCs and the RACs they issued are refused); empty for a root cluster.
  returned: always
  type: list
  elements: str
rights_templates:
  description: The cluster's rights policy templates.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Name of the template.
      type: str
    description:
      description: What the template is for.
      type: str
    rights:
      description: Principal (user or C(group:NAME)) to rights.
      type: dict
enrollment_credentials:
  description: On a root cluster, the enrollment credentials it holds; metadata only, never the secret or its hash.
  returned: always
  type: list
  elements: dict
  contains:
    scope:
      description: The licensing cluster the credential may enroll.
      type: str
    expires_at:
      description: End of validity (ISO 8601).
      type: str
    expired:
      description: Whether it has expired.
      type: bool
    last_used_at:
      description: Last successful enrollment with it (ISO 8601), or null.
      type: str
enrollments:
  description: On a root cluster, the SLCs it issued to licensing clusters, oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    licensing_cluster:
      description: Name of the licensing cluster.
      type: str
    key_id:
      description: The licensing cluster's key.
      type: str
    issuer_key_id:
      description: The root cluster key that issued the SLC.
      type: str
    slc_fingerprint_sha256:
      description: SHA-256 fingerprint of the issued SLC.
      type: str
    not_after:
      description: End of validity (ISO 8601).
      type: str
    created_at:
      description: When it was issued (ISO 8601).
      type: str
    revoked_at:
      description:
        - When the licensing cluster revoked this key as compromised (ISO 8601), or null. The root cluster never
          enrolls a revoked key again.
      type: str
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import call_admin, rmsd_module


def main():
    module = rmsd_module(dict(name=dict(type="str", required=True)))
    info = call_admin(module, "cluster_info", **module.params)
    module.exit_json(changed=False, **info)


if __name__ == "__main__":
    main()
