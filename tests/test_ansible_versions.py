"""The collection on the older ansible-core releases it supports (tests/ansible-core-versions.txt; the
project's virtualenv has the newest, which tests/test_release.py covers): built with that release's
ansible-galaxy, installed from the tarball into an empty path, every playbook syntax-checked, every module
and role documented by ansible-doc, and a playbook of several modules run twice against a SQLite database,
the second run changing nothing.

Each release's virtualenv is made once under build/ansible-core/VERSION and kept (a file lock keeps two
test processes from making it at once); everything else lives in the test's temp folders, so the file
runs beside the rest of the suite (pytest-xdist keeps a file on one worker). The modules run under this
virtualenv's python, where rmsd is importable, as they would under a managed host's rmsd virtualenv."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VERSIONS_FILE = REPO / "tests" / "ansible-core-versions.txt"
VERSIONS = [line.split("==", 1)[1] for line in VERSIONS_FILE.read_text().splitlines()
            if line.startswith("ansible-core==")]
CACHE = REPO / "build" / "ansible-core"
INSTALLED = ("ansible_collections", "rmsops", "rms")
# constraints.txt pins the packages ansible-core shares with the project (Jinja2, PyYAML, cryptography...);
# not ansible-core itself, nor resolvelib, whose range each ansible-core release sets on its own.
NOT_CONSTRAINED = ("ansible-core==", "resolvelib==")


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


def core_venv(version: str) -> Path:
    """The virtualenv of ansible-core `version`, made on first use and kept."""
    venv = CACHE / version
    stamp = venv / ".installed"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            shutil.rmtree(venv, ignore_errors=True)  # a make that was cut short
            run([sys.executable, "-m", "venv", venv])
            constraints = venv / "constraints.txt"
            constraints.write_text("".join(line + "\n" for line in (REPO / "constraints.txt").read_text().splitlines()
                                           if not line.startswith(NOT_CONSTRAINED)))
            run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "-c", constraints, f"ansible-core=={version}"])
            stamp.touch()
    return venv


@dataclass
class Core:
    version: str
    bin: Path
    collections: Path
    env: dict
    root: Path

    @property
    def installed(self) -> Path:
        return self.collections.joinpath(*INSTALLED)

    def run(self, tool: str, *args, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.bin / tool, *args]
        if check:
            return run(cmd, cwd=self.root, env=self.env)
        return subprocess.run([str(c) for c in cmd], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=600, check=False)


@pytest.fixture(scope="module", params=VERSIONS)
def core(request, tmp_path_factory) -> Core:
    """ansible-core of one release, and the collection built and installed with it."""
    version = request.param
    venv = core_venv(version)
    root = tmp_path_factory.mktemp(f"ansible-core-{version}")
    collections = root / "collections"
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_HOME=str(root / "ansible-home"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false", ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false",
               ANSIBLE_DEPRECATION_WARNINGS="true")
    core = Core(version, venv / "bin", collections, env, root)
    reported = core.run("ansible", "--version").stdout
    assert f"core {version}]" in reported, reported
    core.run("ansible-galaxy", "collection", "build", "--output-path", root / "dist", REPO)
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    core.run("ansible-galaxy", "collection", "install", "--offline", "-p", collections,
             root / "dist" / f"rmsops-rms-{galaxy['version']}.tar.gz")
    assert not core.installed.is_symlink() and (core.installed / "MANIFEST.json").exists()
    return core


def warnings(stderr: str) -> list[str]:
    """What ansible-core warned about; add_server.yml's balancer group is made by the play (empty here)."""
    return [line for line in stderr.splitlines() if re.match(r"\[(WARNING|DEPRECATION WARNING|ERROR)\]", line)
            and "Could not match supplied host pattern" not in line]


def test_the_oldest_release_tested_is_the_one_the_collection_requires():
    oldest = min(VERSIONS, key=lambda v: tuple(map(int, v.split("."))))
    required = yaml.safe_load((REPO / "meta" / "runtime.yml").read_text())["requires_ansible"]
    assert required == ">=" + ".".join(oldest.split(".")[:2]) + ".0"


def test_every_playbook_passes_the_syntax_check(core):
    playbooks = sorted(path.stem for path in (core.installed / "playbooks").glob("*.yml"))
    assert "site" in playbooks and "rotate_compromised_key" in playbooks and "backup_key" in playbooks
    inventory = core.installed / "playbooks" / "inventories" / "example"
    for name in playbooks:
        proc = core.run("ansible-playbook", "-i", inventory, "--syntax-check", f"rmsops.rms.{name}")
        assert "playbook: " in proc.stdout, proc.stdout
        assert warnings(proc.stderr) == [], (name, proc.stderr)


@pytest.mark.parametrize("kind, folder", [("module", "plugins/modules"), ("role", "roles")])
def test_ansible_doc_documents_every_module_and_role(core, kind, folder):
    found = (core.installed / folder).iterdir()
    names = sorted(path.stem for path in found if path.suffix == ".py" and not path.name.startswith("_")) \
        if kind == "module" else sorted(path.name for path in found if path.is_dir())
    assert len(names) >= 5, names
    proc = core.run("ansible-doc", "-t", kind, "--json", *(f"rmsops.rms.{name}" for name in names))
    docs = json.loads(proc.stdout)
    assert sorted(docs) == sorted(f"rmsops.rms.{name}" for name in names)
    for name, doc in docs.items():
        if kind == "module":
            assert doc["doc"]["short_description"] and doc["doc"]["options"], name
        else:
            assert doc["entry_points"]["main"]["short_description"], name
    assert warnings(proc.stderr) == [], proc.stderr


def recap(output: str) -> dict:
    found = re.search(r"^localhost\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output,
                      re.MULTILINE)
    assert found, output
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, found.groups())))


def test_modules_run_against_a_sqlite_cluster_and_a_rerun_changes_nothing(core):
    work = core.root / "play"
    work.mkdir()
    password = "kp-" + secrets.token_hex(12)
    (work / "secrets.json").write_text(json.dumps({"rms_test_key_password": password}))
    rights = {"group:finance": ["VIEW", "PRINT"]}
    playbook = work / "cluster.yml"
    playbook.write_text(json.dumps([{
        "name": "A cluster, its rights policy template, read back",
        "hosts": "localhost",
        "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        # The action group of meta/runtime.yml: the database once for every module.
        "module_defaults": {"group/rmsops.rms.rmsd": {"database_url": f"sqlite:///{work}/db/config.db"}},
        "tasks": [
            {"name": "The cluster, its key protected by a password", "rmsops.rms.cluster": {
                "name": "corp", "key_password": "{{ rms_test_key_password }}",
                "intranet_url": "http://127.0.0.1:18080"}, "register": "rms_test_cluster"},
            {"name": "A rights policy template", "rmsops.rms.rights_template": {
                "cluster": "corp", "name": "finance-confidential", "description": "Finance only",
                "rights": rights}},
            {"name": "Read the cluster", "rmsops.rms.cluster_info": {"name": "corp"}, "register": "rms_test_info"},
            {"name": "Check what was read", "ansible.builtin.assert": {"that": [
                "rms_test_info.exists",
                "rms_test_info.cluster.active_key_id == rms_test_cluster.cluster.active_key_id",
                "rms_test_info.cluster_keys | map(attribute='status') | list == ['active']",
                "rms_test_info.rights_templates | map(attribute='name') | list == ['finance-confidential']",
            ], "quiet": True}},
        ],
    }], indent=1))
    outputs = []
    for _ in range(2):
        proc = core.run("ansible-playbook", "-i", "localhost,", "-e", f"@{work / 'secrets.json'}", playbook,
                        check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert password not in output
        outputs.append(recap(proc.stdout))
    assert outputs[0]["changed"] == 2 and outputs[0]["failed"] == 0, outputs
    assert outputs[1] == {**outputs[0], "changed": 0}, outputs


def test_a_missing_key_password_names_the_variable(core):
    """undef(hint=...) in a role's defaults (the required key password) on this release."""
    playbook = core.root / "no-password.yml"
    playbook.write_text(json.dumps([{
        "name": "A role given no key password", "hosts": "localhost", "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "roles": [{"role": "rmsops.rms.key_rotation", "vars": {
            "key_rotation_cluster": "corp", "key_rotation_database_url": "sqlite:////nonexistent/config.db"}}],
    }]))
    proc = core.run("ansible-playbook", "-i", "localhost,", "--check", playbook, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "key_rotation_key_password is required" in output
    assert recap(proc.stdout)["failed"] == 1
