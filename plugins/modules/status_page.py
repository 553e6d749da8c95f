#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: status_page
short_description: Write the HTML status page of an RMS deployment
version_added: 0.1.0
description:
  - Renders a fleet-state document (the C(rms_fleet_state) that C(playbooks/fleet_state.yml) puts together - clusters,
    keys with status and age, nodes and their health, content under compromised keys and its republishing over time)
    as one self-contained HTML page (inline CSS and SVG; no script, nothing fetched) and writes it to O(dest),
    replaced atomically.
  - Every name in the page is HTML-escaped. Only the fields the page shows are read from O(fleet_state); the document
    holds no secrets and the page none either.
  - The page states when it was written, but that time is left out when the module compares it with the file in
    place. The file is rewritten (and the task reports changed) only when the state it shows differs, so a scheduled
    run reports changed only when the deployment changed.
  - A node serves the C(status.html) beside its configuration file (the server role's C(server_dir)) read-only at
    C(GET /status).
  - The module is a thin layer over C(rmsd.status_page); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - ansible.builtin.files
attributes:
  diff_mode:
    details: The diff shows the page before and after (it holds no secrets).
  action_group:
    support: none
options:
  fleet_state:
    description:
      - The fleet-state document, as C(playbooks/fleet_state.yml) builds it (its C(rms_fleet_state)) or as its
        C(rms_fleet_state_path) JSON file holds it.
    type: dict
    required: true
  dest:
    description:
      - Absolute path of the HTML file to write; its folder must exist.
    type: path
    required: true
  mode:
    description:
      - Mode of the file (see the files fragment); V(0644) when not given, so the node's service reads it.
    type: raw
seealso:
  - module: rmsops.rms.cluster_info
  - module: rmsops.rms.compromise_report
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Write the deployment's status page into the node's folder (served at GET /status)
  rmsops.rms.status_page:
    fleet_state: "{{ rms_fleet_state }}"
    dest: /var/lib/rmsd/rms-root-1/status.html
    mode: "0644"
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python

- name: Render a fleet-state JSON file the controller keeps
  rmsops.rms.status_page:
    fleet_state: "{{ lookup('ansible.builtin.file', 'fleet-state.json') | from_json }}"
    dest: /var/lib/rmsd/rms-root-1/status.html
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
"""

RETURN = r"""
dest:
  description: The path of the page.
  returned: always
  type: str
  sample: /var/lib/rmsd/rms-root-1/status.html
content:
  description:
    - The page as the file holds it after the task (in check mode, as it would hold it), so a playbook can keep a
      copy elsewhere that changes exactly when this file does.
  returned: always
  type: str
digest:
  description: SHA-256 of the page without the time it was written; equal for two pages of the same state.
  returned: always
  type: str
"""

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import RmsdError, require_rmsd


def main():
    module = AnsibleModule(
        argument_spec=dict(fleet_state=dict(type="dict", required=True), dest=dict(type="path", required=True)),
        add_file_common_args=True,
        supports_check_mode=True,
    )
    require_rmsd(module)
    from rmsd import status_page

    dest = module.params["dest"]
    if not os.path.isabs(dest):
        module.fail_json(msg=f"dest must be an absolute path, not {dest!r}")
    if not os.path.isdir(os.path.dirname(dest)):
        module.fail_json(msg=f"the folder of dest {dest} does not exist; the node's folder is made by the "
                             "rmsops.rms.server role")
    try:
        html = status_page.render(module.params["fleet_state"])
    except RmsdError as err:
        module.fail_json(msg=f"fleet_state is not a fleet-state document: {err}")
    try:
        with open(dest, encoding="utf-8") as existing:
            before = existing.read()
    except FileNotFoundError:
        before = None
    except (OSError, UnicodeDecodeError) as err:
        module.fail_json(msg=f"cannot read {dest}: {err}")
    same = before is not None and status_page.digest(before) == status_page.digest(html)
    if same:
        html = before
    elif not module.check_mode:
        # Beside dest, so the rename is atomic; readable before it takes the place of the old page.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(html)
            os.chmod(tmp, 0o644)
            module.atomic_move(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    changed = not same
    file_args = module.load_file_common_arguments(module.params, path=dest)
    if file_args.get("mode") is None:
        file_args["mode"] = "0644"
    if os.path.exists(dest):
        changed = module.set_fs_attributes_if_different(file_args, changed)
    result = dict(changed=changed, dest=dest, content=html, digest=status_page.digest(html))
    if module._diff and not same:
        result["diff"] = dict(before=before or "", after=html, before_header=dest, after_header=dest)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
