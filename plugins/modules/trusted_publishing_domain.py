#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: trusted_publishing_domain
short_description: Export or import an RMS cluster's trusted publishing domain (key backup and migration)
version_added: 0.1.0
description:
  - A trusted publishing domain (TPD) holds a cluster's keys, SLCs, rights policy templates and content registry in
    one file encrypted with O(password); it is the unit of backup, restore and migration.
  - The file is a compact JWE (C(PBES2-HS512+A256KW), C(A256GCM)) around a JSON document, in which every private
    key is again PKCS#8 encrypted with the password (scrypt + AES-256), so any JOSE library and C(openssl pkey) can
    read it with the password. Keys revoked as compromised travel without their private half.
  - O(state=exported) writes the TPD to O(path) (mode 0600) when the file does not hold the cluster as it is now;
    with O(backup) the file it replaces is kept as C(PATH.TIMESTAMP~).
  - O(state=imported) adds the keys of the TPD at O(path) to the cluster as C(archived) keys, which open content
    published under them and never sign or publish; compromised keys stay compromised. With its SLCs, RACs issued
    under the imported root keys are trusted again. A rerun changes nothing.
  - The module is a thin layer over C(rmsd.admin.ensure_trusted_publishing_domain); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
  - rmsops.rms.pkcs11
attributes:
  diff_mode:
    details: The diff shows key ids, statuses and counts, never key material or passwords.
options:
  cluster:
    description:
      - Name of the cluster.
    type: str
    required: true
  key_password:
    description:
      - The cluster key password, which opens the keys to export and encrypts the imported keys. Give either this or
        O(pkcs11) (a cluster whose keys are in a PKCS#11 token).
      - Keys in a token are not extractable; an export lists them without their private key and warns about each
        (back such keys up with the HSM's own tools). Imported keys go into the token.
    type: str
  path:
    description:
      - Absolute path of the TPD file on the host the module runs on.
    type: path
    required: true
  password:
    description:
      - The password the TPD is encrypted with, at least 12 characters. Keep it apart from the file.
    type: str
    required: true
  state:
    description:
      - V(exported) writes the cluster's TPD to O(path); V(imported) adds the TPD at O(path) to the cluster.
    type: str
    choices: [exported, imported]
    default: exported
  backup:
    description:
      - With O(state=exported), keep a file that is replaced as C(PATH.TIMESTAMP~) (0600). With V(false), a file at
        O(path) that O(password) does not open is refused rather than replaced, as it may be the only copy of older
        keys.
    type: bool
    default: true
seealso:
  - module: rmsops.rms.cluster_key
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Back up the cluster's keys
  rmsops.rms.trusted_publishing_domain:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_corp_key_password }}"
    path: /var/backups/rms/corp.tpd
    password: "{{ vault_rms_tpd_password }}"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Restore the keys into a newly provisioned cluster
  rmsops.rms.trusted_publishing_domain:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    key_password: "{{ vault_rms_corp_key_password }}"
    path: /var/backups/rms/corp.tpd
    password: "{{ vault_rms_tpd_password }}"
    state: imported
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
"""

RETURN = r"""
tpd:
  description: What the TPD at O(path) holds (metadata only).
  returned: always
  type: dict
  contains:
    cluster:
      description: Cluster the TPD was exported from.
      type: str
    path:
      description: Path of the TPD file.
      type: str
    keys:
      description: Its keys, each with C(id), C(status) and C(exported) (whether the private key is in it).
      type: list
      elements: dict
    not_exported:
      description: Keys whose private half is not in the TPD, each with C(id) and the C(reason).
      type: list
      elements: dict
    certificates:
      description: Number of certificates (SLCs) in it.
      type: int
    rights_templates:
      description: Number of rights policy templates in it.
      type: int
    content:
      description: Number of content registry entries in it.
      type: int
backup_file:
  description: Where the file this task replaced was kept (O(state=exported) with O(backup)), or null.
  returned: always
  type: str
imported:
  description:
    - With O(state=imported), what the import added (would add, in check mode), as lists of ids; C(keys),
      C(compromise), C(certificates), C(rights_templates), and C(skipped) (keys the TPD has no private
      half of); C(content) is the number of publishing licenses added (a registry may hold millions). Empty with
      O(state=exported).
  returned: always
  type: dict
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import (
    pkcs11_argument_spec,
    rmsd_module,
    run_ensure,
)


def main():
    module = rmsd_module(
        dict(
            cluster=dict(type="str", required=True),
            key_password=dict(type="str", no_log=True),
            path=dict(type="path", required=True),
            password=dict(type="str", required=True, no_log=True),
            state=dict(type="str", choices=["exported", "imported"], default="exported"),
            backup=dict(type="bool", default=True),
            **pkcs11_argument_spec(),
        ),
        required_one_of=[("key_password", "pkcs11")],
        mutually_exclusive=[("key_password", "pkcs11")],
    )
    run_ensure(module, "ensure_trusted_publishing_domain", "tpd", "backup_file", "imported", backup_file=None)


if __name__ == "__main__":
    main()
