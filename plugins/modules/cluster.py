#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: cluster
short_description: Provision, decommission or remove an RMS root or licensing cluster
version_added: 0.1.0
description:
  - Makes sure an RMS cluster exists in its configuration database, or does not.
  - Provisioning a root cluster creates the configuration database schema, the first active cluster key and the
    server licensor certificate (SLC) in one transaction; a failed or interrupted run leaves nothing half-made and
    a rerun converges.
  - Provisioning a licensing cluster generates its own key in its own configuration database and enrolls it with
    the root cluster at O(enrollment_url) (this needs O(enrollment_credential)), which issues the licensing
    cluster's SLC. A standalone licensing server is a licensing cluster of one.
  - On every run a licensing cluster checks that its SLC chains to the root cluster's active key; when the root
    cluster has a new key, the licensing cluster re-enrolls its own, unchanged key (this needs a fresh
    O(enrollment_credential)).
  - On an existing cluster only the URLs and the state can change. Role, key protection and key size are refused
    with a message saying how to proceed.
  - The module is a thin layer over C(rmsd.admin.ensure_cluster); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
  - rmsops.rms.pkcs11
  - rmsops.rms.enrollment
attributes:
  diff_mode:
    details: The diff shows cluster metadata only, never key material or passwords.
options:
  name:
    description:
      - Name of the cluster, 1 to 64 letters, digits, C(.), C(_) or C(-).
    type: str
    required: true
  role:
    description:
      - Role of the cluster. A root cluster certifies users (RACs), publishes and licenses content, and enrolls
        licensing clusters.
      - A licensing cluster publishes and licenses content only; users get their RACs from the root cluster.
        Every deployment has one root cluster; each cluster has its own configuration database, so a second
        root cluster in the same database is refused.
      - V(licensing) requires O(enrollment_url).
    type: str
    choices: [root, licensing]
    default: root
  key_protection:
    description:
      - How the cluster key is protected.
      - V(password) stores the private key in the configuration database, encrypted with O(key_password);
        each server holds the password in a secret file readable by its owner only.
      - V(pkcs11) generates the key inside the PKCS#11 token given in O(pkcs11) (an HSM), where it signs and
        unwraps content keys and from which it cannot be read out. The configuration database holds the public key
        and the token and key labels only; each server holds the token PIN in its secret file.
    type: str
    choices: [password, pkcs11]
    default: password
  key_password:
    description:
      - The cluster key password. Required with O(state=present) when O(key_protection=password); not used with
        O(key_protection=pkcs11).
      - On an existing cluster the module checks that the password opens the active key and fails otherwise.
    type: str
  previous_key_password:
    description:
      - While the cluster key password changes (see M(rmsops.rms.cluster_key)), the password the keys may still be
        encrypted with; the task accepts either.
    type: str
  key_size:
    description:
      - Size in bits of the RSA cluster key generated when the cluster is provisioned.
      - Cannot change on an existing cluster; set it to the current size.
    type: int
    choices: [2048, 3072, 4096]
    default: 2048
  intranet_url:
    description:
      - URL clients inside the organization reach the cluster at. Required with O(state=present).
    type: str
  extranet_url:
    description:
      - URL clients outside the organization reach the cluster at, if any. Published with the cluster's SLC
        (C(GET /slc)).
    type: str
  state:
    description:
      - V(present) provisions the cluster if it does not exist and updates its URLs.
      - V(decommissioned) makes the cluster stop issuing RACs and publishing licenses and stop enrolling
        licensing clusters; it keeps issuing use licenses, so content it protects can still be recovered.
        This is one-way; going back to V(present) needs O(force=true).
      - V(absent) removes the cluster and its keys. Refused while content is protected by its keys unless
        O(force=true).
    type: str
    choices: [present, decommissioned, absent]
    default: present
  force:
    description:
      - With O(state=absent), remove the cluster even though content published under its keys exists. That content
        can then no longer be opened; export a trusted publishing domain first.
      - With O(state=present), bring a decommissioned cluster back into service.
    type: bool
    default: false
  root_key_replaced:
    description:
      - Check mode only, for a licensing cluster. Set it when an earlier task of the same run replaces the root
        cluster's active key (M(rmsops.rms.cluster_key) reports it in RV(rmsops.rms.cluster_key#module:rotation));
        the check run then reports the re-enrollment the real run makes, although the root cluster still shows its
        current key. A real run ignores it and reads the root cluster's SLC.
    type: bool
    default: false
seealso:
  - module: rmsops.rms.server
  - module: rmsops.rms.cluster_info
  - module: rmsops.rms.enrollment_credential
  - module: rmsops.rms.rights_template
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Provision a single-node root cluster (SQLite)
  rmsops.rms.cluster:
    name: corp
    database_url: sqlite:////var/lib/rmsd/corp/config.db
    key_password: "{{ vault_rms_corp_key_password }}"
    key_size: 3072
    intranet_url: https://rms.corp.example.com
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  # A SQLite database belongs to the user the node runs as.
  become: true
  become_user: rmsd

- name: Provision a root cluster whose configuration database is shared by its members
  rmsops.rms.cluster:
    name: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_corp_key_password }}"
    intranet_url: https://rms.corp.example.com
    extranet_url: https://rms.example.com
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Provision a licensing cluster and enroll it with the root cluster
  rmsops.rms.cluster:
    name: finance
    role: licensing
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_finance?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_finance_key_password }}"
    intranet_url: https://rms-finance.corp.example.com
    enrollment_url: https://rms.corp.example.com
    enrollment_credential: "{{ finance_enrollment_secret }}"
    enrollment_ca_path: /etc/ssl/certs/corp-root-ca.pem
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Decommission a licensing cluster; it keeps issuing use licenses for its content
  rmsops.rms.cluster:
    name: finance
    role: licensing
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_finance?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_finance_key_password }}"
    intranet_url: https://rms-finance.corp.example.com
    enrollment_url: https://rms.corp.example.com
    state: decommissioned
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Remove a cluster that protects no content
  rmsops.rms.cluster:
    name: lab
    database_url: sqlite:////var/lib/rmsd/lab/config.db
    state: absent
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  become: true
  become_user: rmsd
"""

RETURN = r"""
cluster:
  description:
    - The cluster as it is after the task (as it would be, in check mode). Empty when O(state=absent).
  returned: always
  type: dict
  contains:
    name:
      description: Name of the cluster.
      type: str
      sample: corp
    role:
      description: Role of the cluster.
      type: str
      sample: root
    state:
      description: State of the cluster.
      type: str
      sample: provisioned
    intranet_url:
      description: Intranet URL.
      type: str
      sample: https://rms.corp.example.com
    extranet_url:
      description: Extranet URL, or null.
      type: str
    key_protection:
      description: How the cluster key is protected.
      type: str
      sample: password
    key_size:
      description: Size of the cluster key in bits.
      type: int
      sample: 2048
    active_key_id:
      description: Identifier of the active cluster key (C((new key)) in check mode before provisioning).
      type: str
    slc_fingerprint_sha256:
      description: SHA-256 fingerprint of the cluster's current SLC.
      type: str
    slc_not_after:
      description: Expiry of the cluster's current SLC (ISO 8601).
      type: str
    slc_issuer_key_id:
      description:
        - Identifier of the key that issued the current SLC. For a root cluster its own key; for a licensing
          cluster the root cluster key it is enrolled under.
      type: str
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import (
    enrollment_argument_spec,
    pkcs11_argument_spec,
    rmsd_module,
    run_ensure,
)


def main():
    module = rmsd_module(
        dict(
            name=dict(type="str", required=True),
            role=dict(type="str", choices=["root", "licensing"], default="root"),
            key_protection=dict(type="str", choices=["password", "pkcs11"], default="password"),
            key_password=dict(type="str", no_log=True),
            previous_key_password=dict(type="str", no_log=True),
            key_size=dict(type="int", choices=[2048, 3072, 4096], default=2048),
            intranet_url=dict(type="str"),
            extranet_url=dict(type="str"),
            state=dict(type="str", choices=["present", "decommissioned", "absent"], default="present"),
            force=dict(type="bool", default=False),
            root_key_replaced=dict(type="bool", default=False),
            **pkcs11_argument_spec(),
            **enrollment_argument_spec(),
        ),
        required_if=[
            ("state", "present", ("intranet_url",)),
            ("state", "decommissioned", ("intranet_url",)),
            ("key_protection", "pkcs11", ("pkcs11",)),
            ("role", "licensing", ("enrollment_url",)),
        ],
    )
    run_ensure(module, "ensure_cluster", "cluster")


if __name__ == "__main__":
    main()
