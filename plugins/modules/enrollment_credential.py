#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: enrollment_credential
short_description: Let a licensing cluster enroll with the root cluster
version_added: 0.1.0
description:
  - Manages an enrollment credential on the root cluster. A licensing cluster presents the credential's secret
    to the root cluster's C(POST /enrollment) to get its server licensor certificate (SLC); see
    M(rmsops.rms.cluster) with O(rmsops.rms.cluster#module:role=licensing).
  - A credential is scoped to one licensing cluster, expires, and enrolls once; the enrollment it makes spends it,
    and the root cluster refuses it afterwards. The root cluster stores only a salted scrypt hash of the secret; the
    secret is never returned or shown in a diff.
  - With O(state=present) the task changes nothing while a credential for O(scope) with this O(secret) is still
    usable (not expired, not yet used); otherwise a fresh credential, valid for O(valid_for) seconds, replaces it.
  - The root cluster checks a credential only so often per client address and so many at once (it answers 429,
    which rmsd on the licensing cluster waits for and retries), and takes a licensing cluster's claim that its
    keys were revoked only with each key's own signed revocation statement.
  - The module is a thin layer over C(rmsd.admin.ensure_enrollment_credential); run it where rmsd is importable,
    against the root cluster's configuration database.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
attributes:
  diff_mode:
    details: The diff shows the scope and expiry only.
options:
  cluster:
    description:
      - Name of the root cluster.
    type: str
    required: true
  scope:
    description:
      - Name of the licensing cluster the credential lets enroll.
    type: str
    required: true
  secret:
    description:
      - The credential's secret, at least 24 characters; use a random string, for example
        C(lookup('ansible.builtin.password', '/dev/null', length=40)). Required with O(state=present).
    type: str
  valid_for:
    description:
      - Seconds the credential stays valid once created, from 60 to 604800 (a week).
    type: int
    default: 900
  state:
    description:
      - V(present) makes sure a valid credential with this secret exists; V(absent) revokes it.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: rmsops.rms.cluster
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Let licensing cluster finance enroll once within the next 15 minutes
  rmsops.rms.enrollment_credential:
    cluster: corp
    scope: finance
    secret: "{{ finance_enrollment_secret }}"
    valid_for: 900
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Revoke it once the licensing cluster is enrolled
  rmsops.rms.enrollment_credential:
    cluster: corp
    scope: finance
    state: absent
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
"""

RETURN = r"""
credential:
  description: The credential after the task, without its secret. Empty when O(state=absent).
  returned: always
  type: dict
  contains:
    scope:
      description: The licensing cluster it lets enroll.
      type: str
      sample: finance
    expires_at:
      description: End of validity (ISO 8601).
      type: str
      sample: "2026-11-22T10:15:00+00:00"
    used:
      description: Whether it has enrolled the licensing cluster already (it is then refused).
      type: bool
      sample: false
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import rmsd_module, run_ensure


def main():
    module = rmsd_module(
        dict(
            cluster=dict(type="str", required=True),
            scope=dict(type="str", required=True),
            secret=dict(type="str", no_log=True),
            valid_for=dict(type="int", default=900),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        required_if=[("state", "present", ("secret",))],
    )
    run_ensure(module, "ensure_enrollment_credential", "credential")


if __name__ == "__main__":
    main()
