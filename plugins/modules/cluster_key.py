#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: cluster_key
short_description: Revoke compromised RMS cluster keys, roll the active key over, change the key password
version_added: 0.1.0
description:
  - Keeps an RMS cluster's keys as the desired state says. The desired state names the keys that must be revoked
    (O(compromised_keys)) and how old the active key may be (O(max_age)); it never says "rotate now", so a rerun
    with the same inputs changes nothing.
  - A compromised active key is replaced by a B(brand-new key pair) with a new server licensor certificate (SLC);
    the old key becomes C(compromised) and is never used again. Content published under it is refused and must be
    republished by its owners (see M(rmsops.rms.compromise_report)).
  - Re-enrollment is no remedy for a compromised key, because it renews the SLC of the same key pair; asking for
    O(reenroll) while the active key is listed in O(compromised_keys) fails and changes nothing.
  - An active key older than O(max_age) days is C(archived) and replaced; content published under an archived key
    is still licensed.
  - On a licensing cluster a new key is enrolled with the root cluster, which needs O(enrollment_url) and a fresh
    O(enrollment_credential); the root cluster never certifies a key revoked as compromised again.
  - When O(key_password) does not open the keys but O(previous_key_password) does, every key is re-encrypted with
    O(key_password). The members' secret files must then get the new password (the rmsops.rms.server role writes
    them); running nodes read it from there.
  - The rotation happens in one transaction of the configuration database, under the cluster's lock. A run killed at
    any point leaves the old key in place and a rerun converges; two runs at once perform one rotation.
  - The module is a thin layer over C(rmsd.admin.ensure_cluster_key); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
  - rmsops.rms.pkcs11
  - rmsops.rms.enrollment
attributes:
  diff_mode:
    details: The diff shows key ids and statuses only, never key material or passwords.
options:
  cluster:
    description:
      - Name of the cluster.
    type: str
    required: true
  key_password:
    description:
      - The password the cluster keys must be encrypted with (C(key_protection=password) clusters, see
        M(rmsops.rms.cluster)). Give either this or O(pkcs11).
    type: str
  previous_key_password:
    description:
      - The password the keys are encrypted with until now. Only used when O(key_password) does not open the active
        key yet; then every key is re-encrypted with O(key_password).
    type: str
  compromised_key_in_token:
    description:
      - For a cluster whose keys are in a PKCS#11 token (O(pkcs11)), what becomes of a compromised key in the token
        once its revocation is stored.
      - V(destroy) deletes the key from the token. V(disable) keeps it (for forensics), with signing, decryption
        and unwrapping switched off.
      - Required as soon as a compromised key can still sign or decrypt in the token; the task fails, changing
        nothing, until it is set. A run stopped after the revocation settles the token on the rerun.
    type: str
    choices: [destroy, disable]
  compromised_keys:
    description:
      - Ids of the cluster keys that must be revoked as compromised (as M(rmsops.rms.cluster_info) lists them in
        C(cluster_keys)). An active key listed here is replaced by a new key pair.
      - A key once compromised stays so; removing it from the list changes nothing and gives a warning.
    type: list
    elements: str
    default: []
  max_age:
    description:
      - Age in days after which the active key is archived and replaced by a new one (scheduled rollover). No
        rollover when not set.
    type: int
  key_size:
    description:
      - Size in bits of a new key; the size of the current key when not set.
    type: int
    choices: [2048, 3072, 4096]
  reenroll:
    description:
      - For a licensing cluster, renew the SLC of the active key with the root cluster at O(enrollment_url) (the same
        key pair). This is an action, not a state; every run with it set renews the SLC.
      - Refused while the active key is listed in O(compromised_keys).
    type: bool
    default: false
seealso:
  - module: rmsops.rms.cluster_info
  - module: rmsops.rms.compromise_report
  - module: rmsops.rms.trusted_publishing_domain
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Revoke a compromised key; a new key pair and SLC replace it
  rmsops.rms.cluster_key:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_corp_key_password }}"
    compromised_keys:
      - 3f1c0e9a7b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Replace a compromised key held in an HSM; the new key is generated in the same token
  rmsops.rms.cluster_key:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    pkcs11:
      module: /usr/lib/softhsm/libsofthsm2.so
      token_label: rms-corp
      pin: "{{ vault_rms_token_pin }}"
    compromised_keys:
      - 3f1c0e9a7b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e
    compromised_key_in_token: destroy
  environment:
    SOFTHSM2_CONF: /etc/softhsm/softhsm2.conf
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Roll the key over once a year
  rmsops.rms.cluster_key:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_corp_key_password }}"
    max_age: 365
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Change the cluster key password
  rmsops.rms.cluster_key:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_corp_key_password_2027 }}"
    previous_key_password: "{{ vault_rms_corp_key_password }}"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Replace a licensing cluster's compromised key; the root cluster enrolls the new one
  rmsops.rms.cluster_key:
    cluster: finance
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_finance?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_finance_key_password }}"
    compromised_keys: ["{{ finance_leaked_key_id }}"]
    enrollment_url: https://rms.corp.example.com
    enrollment_credential: "{{ finance_enrollment_secret }}"
    enrollment_ca_path: /etc/ssl/certs/corp-root-ca.pem
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
"""

RETURN = r"""
cluster_keys:
  description: The cluster's keys after the task (metadata only).
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Key id.
      type: str
    status:
      description: C(active), C(archived) or C(compromised).
      type: str
    protection:
      description: How the key is protected.
      type: str
    size:
      description: Key size in bits.
      type: int
    created_at:
      description: When the key was made (ISO 8601).
      type: str
    age_days:
      description: Age of the key in days.
      type: int
    status_changed_at:
      description: When the key got its status (ISO 8601).
      type: str
    imported_from:
      description: Cluster whose trusted publishing domain brought the key in, or null.
      type: str
    wrap_alg:
      description: JWE algorithm content keys are wrapped to this key with.
      type: str
    sign_alg:
      description: JWS algorithm of this key's signatures.
      type: str
active_key_id:
  description: Id of the active key after the task (before, in check mode).
  returned: always
  type: str
rotation:
  description: The replacement of the active key this task made (or would make); empty when none.
  returned: always
  type: dict
  contains:
    reason:
      description: C(compromised) or C(max_age).
      type: str
    retired_key_id:
      description: The key that was active.
      type: str
    new_key_id:
      description: The new active key (C((new key)) in check mode).
      type: str
password_changed:
  description: Whether the keys were re-encrypted with O(key_password).
  returned: always
  type: bool
reenrolled:
  description: Whether the SLC of the active key was renewed (O(reenroll)).
  returned: always
  type: bool
token:
  description:
    - Compromised keys this task destroyed or disabled in the PKCS#11 token (O(compromised_key_in_token)), key id to
      C(destroyed) or C(disabled). Empty when none.
  returned: always
  type: dict
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
            cluster=dict(type="str", required=True),
            key_password=dict(type="str", no_log=True),
            previous_key_password=dict(type="str", no_log=True),
            # Key ids, not keys: nothing secret (validate-modules asks because of the name).
            compromised_keys=dict(type="list", elements="str", default=[], no_log=False),
            max_age=dict(type="int"),
            key_size=dict(type="int", choices=[2048, 3072, 4096]),
            reenroll=dict(type="bool", default=False),
            compromised_key_in_token=dict(type="str", choices=["destroy", "disable"]),
            **pkcs11_argument_spec(),
            **enrollment_argument_spec(),
        ),
        required_one_of=[("key_password", "pkcs11")],
        mutually_exclusive=[("key_password", "pkcs11"), ("previous_key_password", "pkcs11")],
    )
    run_ensure(module, "ensure_cluster_key", "cluster_keys", "active_key_id", "rotation", "password_changed",
               "reenrolled", "token", cluster_keys=[], active_key_id="", password_changed=False, reenrolled=False)


if __name__ == "__main__":
    main()
