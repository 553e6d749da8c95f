# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: drift
type: aggregate
short_description: Write what a run changed, or would change in check mode, as JSON a pipeline can act on
version_added: 0.1.0
description:
  - Records every task that reports C(changed), per host, and writes the list to a JSON file when the run ends. In
    check mode (C(--check)) that is the drift a real run would correct; a merge request pipeline posts it, an apply
    pipeline compares it with what the real run changed.
  - For each change it records the host, the play, the role, the task name, the action (module FQCN), whether a
    handler made it, and the names of the fields its diff covers (for example V(config), V(registration),
    V(keys)). Never the values, so no key material or secret reaches the file; a task with C(no_log) is recorded
    without its fields.
  - The roles report a change that a command makes, and that cannot run in check mode (starting or restarting
    rmsd under supervisord, installing rmsd), with a stand-in task of the same name in check mode; its message,
    the reason for the change, is recorded as C(reason).
  - Failed and unreachable hosts are listed too, so a pipeline never reads a failed run as "no drift".
  - The user and password of every URL in the report (in a task or play name, a reason) are written as C(***), so
    a credential in a URL (a package index's, a database's) never reaches the file a merge request shows.
  - Enable it next to the usual output with C(callbacks_enabled = rmsops.rms.drift) in C(ansible.cfg) or
    C(ANSIBLE_CALLBACKS_ENABLED=rmsops.rms.drift).
author:
  - rmsops.rms maintainers (@rmsops)
options:
  path:
    description:
      - Where the JSON report is written (replaced at the end of every run, mode 0600).
    type: path
    default: drift.json
    env:
      - name: RMSOPS_DRIFT_PATH
    ini:
      - section: callback_rmsops_drift
        key: path
"""

import json
import os
import re
import tempfile

from ansible import context
from ansible.playbook.handler import Handler
from ansible.plugins.callback import CallbackBase

# scheme://user:password@ or scheme://user@: the userinfo ends at the last "@" before the path, as URL parsers read
# it (a password may hold an unescaped "@").
URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def scrubbed(value):
    """value (a string, or lists and dicts of them) with the userinfo of every URL in it replaced by ***."""
    if isinstance(value, str):
        return URL_USERINFO.sub(r"\1***@", value)
    if isinstance(value, dict):
        return {scrubbed(key): scrubbed(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrubbed(item) for item in value]
    return value


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "rmsops.rms.drift"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._play = None
        self._changes = []
        self._failures = []

    def v2_playbook_on_play_start(self, play):
        self._play = play.get_name()

    def v2_runner_on_ok(self, result):
        if result._result.get("changed"):
            self._changes.append(self._entry(result))

    def v2_runner_item_on_ok(self, result):
        # A loop's items are summed up in the task's own result (changed when any item changed).
        return

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if not ignore_errors:
            self._failures.append(dict(self._where(result), reason="failed"))

    def v2_runner_on_unreachable(self, result):
        self._failures.append(dict(self._where(result), reason="unreachable"))

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed)
        report = {
            "check_mode": bool(context.CLIARGS.get("check")),
            "changed_tasks": len(self._changes),
            "hosts_changed": sorted({change["host"] for change in self._changes}),
            "changes": self._changes,
            "failures": self._failures,
            "stats": {host: stats.summarize(host) for host in hosts},
        }
        path = self.get_option("path")
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".drift.")
        with os.fdopen(fd, "w") as out:
            json.dump(scrubbed(report), out, indent=1, sort_keys=True)
            out.write("\n")
        os.replace(tmp, path)
        self._display.display(
            f"rmsops.rms.drift: {len(self._changes)} changed task(s) on {len(report['hosts_changed'])} host(s)"
            f"{' (check mode)' if report['check_mode'] else ''}, {len(self._failures)} failure(s) -> {path}"
        )

    def _where(self, result):
        task = result._task
        role = getattr(task, "_role", None)
        return {
            "host": result._host.get_name(),
            "play": self._play,
            "role": role.get_name() if role else None,
            "task": task.get_name(),
            "action": task.resolved_action or task.action,
            "handler": isinstance(task, Handler),
        }

    def _entry(self, result):
        entry = self._where(result)
        fields = set()
        if not result._result.get("censored"):  # no_log: nothing about what changed
            diffs = result._result.get("diff") or []
            for diff in diffs if isinstance(diffs, list) else [diffs]:
                for side in ("before", "after"):
                    value = diff.get(side) if isinstance(diff, dict) else None
                    if isinstance(value, dict):
                        fields.update(str(key) for key in value)
                    elif value is not None:
                        fields.add("content")
        entry["fields"] = sorted(fields)
        # A check-mode stand-in (a debug task the roles write for a command that cannot run in check mode)
        # says why the real run changes something; the roles' messages name no secret.
        if entry["action"] == "ansible.builtin.debug" and not result._result.get("censored"):
            entry["reason"] = str(result._result.get("msg", ""))
        return entry
