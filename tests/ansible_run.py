"""Run one rmsops.rms module through ansible-playbook and read back its registered result.

The module task is followed by a task that writes the registered result to a JSON
file (ansible-core ships no JSON stdout callback), so tests assert on the real
result while also seeing everything ansible-playbook printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Run:
    rc: int
    output: str  # stdout and stderr of ansible-playbook
    result: dict  # what the module task registered

    @property
    def changed(self) -> bool:
        return bool(self.result.get("changed"))

    @property
    def failed(self) -> bool:
        return bool(self.result.get("failed"))

    @property
    def msg(self) -> str:
        return str(self.result.get("msg", ""))

    def ok(self) -> Run:
        if self.failed:
            pytest.fail(f"module failed: {self.msg}\n{self.output}")
        return self


class Ansible:
    """Runs modules from a private working directory (playbook, result file)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0

    def run(self, module: str, params: dict, *, check: bool = False, diff: bool = False,
            verbosity: int = 0, interpreter: str | None = None, env: dict | None = None) -> Run:
        self.count += 1
        result_file = self.workdir / f"result-{self.count}.json"
        playbook = self.workdir / f"play-{self.count}.yml"
        # JSON is YAML; no templating surprises from hand-built YAML.
        playbook.write_text(json.dumps([{
            "name": f"Run {module}",
            "hosts": "localhost",
            "gather_facts": False,
            "vars": {
                "ansible_connection": "local",
                # The interpreter of the tests' virtualenv has rmsd installed.
                "ansible_python_interpreter": interpreter or sys.executable,
            },
            "tasks": [
                {"name": "Module under test", module: params, "register": "result", "ignore_errors": True},
                {
                    "name": "Save the result",
                    "ansible.builtin.copy": {"content": "{{ result | to_json }}", "dest": str(result_file),
                                             "mode": "0600"},
                    "check_mode": False,
                    "diff": False,
                    "no_log": True,
                },
            ],
        }], indent=1))
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(playbook)]
        if check:
            cmd.append("--check")
        if diff:
            cmd.append("--diff")
        if verbosity:
            cmd.append("-" + "v" * verbosity)
        env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
                   ANSIBLE_RETRY_FILES_ENABLED="false", **(env or {}))
        proc = subprocess.run(cmd, check=False, cwd=self.workdir, env=env, capture_output=True, text=True,
                              timeout=300)
        output = proc.stdout + proc.stderr
        if not result_file.exists():
            pytest.fail(f"ansible-playbook did not run the module (rc={proc.returncode}):\n{output}")
        return Run(proc.returncode, output, json.loads(result_file.read_text()))
