#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: compromise_report
short_description: Report content under compromised RMS cluster keys per owner, and notify the owners
version_added: 0.1.0
description:
  - Lists, per content owner, the content published under cluster keys revoked as compromised (see
    M(rmsops.rms.cluster_key)), each item either C(pending) (still to be republished) or C(republished) (its owner
    published it again under the new key, superseding the old publishing license). Use of such content is refused.
  - Writes the report when it changed, mode 0640, streamed from the configuration database in owner order (memory
    stays bounded with millions of items) and replaced atomically. With O(json_path) a small summary (counts, the
    owners with most content pending, the rows' sha256) and beside it C(NAME.owners.jsonl) (for
    O(json_path=NAME.json)), JSON Lines with one owner a line and that owner's items; with O(csv_path) one line per
    item. The summary (or, without O(json_path), C(CSV.summary.json) beside the CSV) also keeps the revision the rows
    were at; the database gives a content row a new revision on every insert and update, so a rerun asks it only
    for a count and a sum of the revisions, reads no row and rewrites nothing when they match (any change to a row
    the report covers, by rmsd or by hand, changes them); the report holds no time of its own.
  - With O(notify), every owner with content still pending gets one notice per compromised key, rendered from Jinja2
    templates (built in, or C(owner_notice.subject.j2) and C(owner_notice.txt.j2) in O(template_dir)) and sent
    over SMTP (O(smtp_host)) or written to O(outbox_dir) as C(.eml) files (0600). All notices go through one SMTP
    connection (opened again once if the server drops it), at most O(notify_rate) a second. Each notice is recorded
    in the configuration database as soon as the SMTP server accepted it, so a rerun sends nothing twice, a failed
    delivery is retried by the next run, and a run killed in the middle sends at most the one notice in flight again.
  - With O(notify_dry_run), every notice due is rendered and counted, and none is sent or recorded.
  - On SQLite, sending notices switches the configuration database to write-ahead logging (it stays so), and each
    notice's record is then committed without waiting for the disk, which a killed run keeps (a power cut may lose
    the last records, and those owners are told again; the database itself is never damaged).
  - With O(progress_path), the task's progress goes to that file as JSON Lines, one line per step, each with its
    C(time) and C(step), which is C(started), C(report) every 100,000 rows read (C(rows), C(rows_total),
    C(seconds)), C(notices) every 1,000 notices or 10 seconds (C(done), C(due), C(per_second), C(seconds_left)),
    and last C(done) or C(failed) (C(error)). Follow it with C(tail -f) while the task runs; each run empties it
    first. Not written in check mode.
  - The module is a thin layer over C(rmsd.admin.ensure_compromise_report); run it where rmsd is importable.
extends_documentation_fragment:
  - rmsops.rms.attributes
  - rmsops.rms.database
attributes:
  diff_mode:
    details: The diff names the files that are rewritten, counts the notices and names the first owners notified.
options:
  cluster:
    description:
      - Name of the cluster.
    type: str
    required: true
  json_path:
    description:
      - Absolute path of the JSON report.
    type: path
  csv_path:
    description:
      - Absolute path of the CSV report, one line per content item. A cell that would start a spreadsheet formula
        (C(=), C(+), C(-), C(@), a tab or a carriage return first, as in a content id a publisher chose) has a single
        quote before it; the JSON files keep every value exact.
    type: path
  notify:
    description:
      - Notify the owners of content still to be republished, once per owner and compromised key.
    type: bool
    default: false
  sender:
    description:
      - Address the notices come from. Required with O(notify=true).
    type: str
  smtp_host:
    description:
      - SMTP server the notices are sent through. Give this or O(outbox_dir) with O(notify=true).
    type: str
  smtp_port:
    description:
      - Port of the SMTP server.
    type: int
    default: 25
  smtp_starttls:
    description:
      - Upgrade the SMTP connection with STARTTLS (the server certificate is verified against the system CAs).
    type: bool
    default: false
  smtp_username:
    description:
      - User to log in to the SMTP server as, if it requires it.
    type: str
  smtp_password:
    description:
      - Password of O(smtp_username).
    type: str
  outbox_dir:
    description:
      - Folder the notices are written to as C(.eml) files, for delivery by other means, instead of SMTP. A file is
        named by the SHA-256 of its owner and the notice's Message-ID; the owner is on its C(To:) line.
    type: path
  notify_rate:
    description:
      - Notices sent a second at most; V(0) sends them as fast as the SMTP server accepts them.
    type: float
    default: 0
  notify_dry_run:
    description:
      - Render every notice due (a template that fails for one owner fails the task) and count them, sending and
        recording none. The report is still written.
    type: bool
    default: false
  expected_compromised_keys:
    description:
      - Check mode only. Ids of keys an earlier task of the same run declares compromised
        (M(rmsops.rms.cluster_key)'s O(rmsops.rms.cluster_key#module:compromised_keys)); the check run's report and
        notices then cover them as the real run's will. A real run reads the keys' status from the configuration
        database and ignores it.
    type: list
    elements: str
    default: []
  progress_path:
    description:
      - Absolute path of a file (0640) the task writes its progress to while it runs, as JSON Lines. See the
        description.
    type: path
  template_dir:
    description:
      - Folder with C(owner_notice.subject.j2) and/or C(owner_notice.txt.j2) that replace the built-in templates.
        They see C(owner), C(cluster) (C(name), C(intranet_url), C(extranet_url)), C(key) (C(id),
        C(compromised_at)) and C(items) (C(content_id), C(pl_id), C(published_at)).
    type: path
seealso:
  - module: rmsops.rms.cluster_key
author:
  - rmsops.rms maintainers (@rmsops)
"""

EXAMPLES = r"""
- name: Write the report of content to republish and tell each owner once
  rmsops.rms.compromise_report:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    json_path: /var/lib/rms-reports/corp-compromised-content.json
    csv_path: /var/lib/rms-reports/corp-compromised-content.csv
    notify: true
    sender: rms-admins@corp.example.com
    smtp_host: smtp.corp.example.com
    smtp_port: 587
    smtp_starttls: true
    smtp_username: rms-notices
    smtp_password: "{{ vault_smtp_password }}"
    progress_path: /var/lib/rms-reports/corp-compromised-content.progress.jsonl  # tail -f it while the task runs
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  register: compromised

- name: Show what is still to be republished
  ansible.builtin.debug:
    msg: "{{ compromised.report.pending }} items pending, {{ compromised.report.republished }} republished"

- name: Render every notice without sending any (a rehearsal before a large run)
  rmsops.rms.compromise_report:
    cluster: corp
    database_url: postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem
    database_password: "{{ vault_rms_database_password }}"
    notify: true
    notify_dry_run: true
    sender: rms-admins@corp.example.com
    smtp_host: smtp.corp.example.com
  vars:
    ansible_python_interpreter: /opt/rmsd/venv/bin/python
  register: rehearsal
"""

RETURN = r"""
report:
  description: The report's summary; its size does not grow with the number of items or owners.
  returned: always
  type: dict
  contains:
    cluster:
      description: Name of the cluster.
      type: str
    compromised_keys:
      description: The cluster's compromised keys, each with C(id) and C(compromised_at).
      type: list
      elements: dict
    pending:
      description: Content items still to be republished.
      type: int
    republished:
      description: Content items republished under a new key.
      type: int
    owner_count:
      description: Owners of content under compromised keys.
      type: int
    owners_pending:
      description: Owners with content still to be republished.
      type: int
    top_owners:
      description: The (at most 10) owners with most content pending, most first, each with C(owner), C(pending)
        and C(republished). Every owner is in the per-owner file and the CSV.
      type: list
      elements: dict
    rows_sha256:
      description: The sha256 of the report's rows, as kept in the summary file.
      type: str
notified:
  description: Owner notices sent by this task (that would be, in check mode; rendered, with O(notify_dry_run)).
  returned: always
  type: int
notified_owners:
  description: The first (at most 10, in owner order) owners counted in RV(notified).
  returned: always
  type: list
  elements: str
notify_dry_run:
  description: Whether the notices were only rendered.
  returned: always
  type: bool
"""

from ansible_collections.rmsops.rms.plugins.module_utils.rmsd_common import rmsd_module, run_ensure


def main():
    module = rmsd_module(
        dict(
            cluster=dict(type="str", required=True),
            json_path=dict(type="path"),
            csv_path=dict(type="path"),
            notify=dict(type="bool", default=False),
            sender=dict(type="str"),
            smtp_host=dict(type="str"),
            smtp_port=dict(type="int", default=25),
            smtp_starttls=dict(type="bool", default=False),
            smtp_username=dict(type="str"),
            smtp_password=dict(type="str", no_log=True),
            outbox_dir=dict(type="path"),
            notify_rate=dict(type="float", default=0),
            notify_dry_run=dict(type="bool", default=False),
            expected_compromised_keys=dict(type="list", elements="str", default=[], no_log=False),  # key ids, not secrets
            template_dir=dict(type="path"),
            progress_path=dict(type="path"),
        ),
        required_if=[("notify", True, ("sender",)), ("notify", True, ("smtp_host", "outbox_dir"), True)],
        mutually_exclusive=[("smtp_host", "outbox_dir")],
    )
    run_ensure(module, "ensure_compromise_report", "report", "notified", "notified_owners", "notify_dry_run",
               notified=0, notified_owners=[], notify_dry_run=False)


if __name__ == "__main__":
    main()
