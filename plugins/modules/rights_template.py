#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: rights_template
short_description: Manage a rights policy template of an RMS cluster
version_added: 0.1.0
description:
  - A rights policy template is a named set of rights (who may do what) kept by a cluster. A publisher names the
    template in C(POST /publishing) instead of listing the rights; the publishing license records the template.
  - Each cluster has its own templates, so a department's licensing cluster carries the department's policy.
  - The module is a thin layer over C(rmsd.admin.ensure_rights_template); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
options:
  cluster:
    description:
      - Name of the cluster the template belongs to.
    type: str
    required: true
  name:
    description:
      - Name of the template, 1 to 64 letters, digits, C(.), C(_) or C(-).
    type: str
    required: true
  description:
    description:
      - What the template is for, up to 512 characters.
    type: str
    default: ""
  rights:
    description:
      - Principal to the list of rights granted. A principal is a user id or C(group:NAME).
      - Rights are V(OWNER), V(VIEW), V(EDIT), V(PRINT), V(EXPORT), V(EXTRACT), V(FORWARD), V(REPLY).
      - Required with O(state=present).
    type: dict
  state:
    description:
      - V(present) creates or updates the template; V(absent) removes it. Publishing licenses issued with it keep
        the rights they were issued with.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: rmsops.rms.cluster
  - module: rmsops.rms.cluster_info
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: The finance department's confidential policy, on its licensing cluster
  rmsops.rms.rights_template:
    cluster: finance
    name: finance-confidential
    description: Finance staff may view and print; the controllers may also edit.
    rights:
      "group:finance": [VIEW, PRINT]
      "group:finance-controllers": [VIEW, PRINT, EDIT]
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_finance?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
"""

RETURN = r"""
template:
  description: The template after the task (empty when O(state=absent)).
  returned: always
  type: dict
  contains:
    name:
      description: Name of the template.
      type: str
      sample: finance-confidential
    description:
      description: What the template is for.
      type: str
    rights:
      description: Principal to rights, with the rights sorted.
      type: dict
      sample: {"group:finance": ["PRINT", "VIEW"]}
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import rmsd_module, run_ensure


def main():
    module = rmsd_module(
        dict(
            cluster=dict(type="str", required=True),
            name=dict(type="str", required=True),
            description=dict(type="str", default=""),
            rights=dict(type="dict"),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        required_if=[("state", "present", ("rights",))],
    )
    run_ensure(module, "ensure_rights_template", "template")


if __name__ == "__main__":
    main()
