"""A required variable left out stops a role at the validation of its arguments, the first task, with a
message naming it: before rmsd is installed or anything else changes. The playbooks that open cluster keys
(rotate_compromised_key.yml, backup_key.yml) check the key password in their first tasks likewise. Real
ansible-playbook runs against localhost, in check mode."""

import getpass
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

BIN = os.path.dirname(sys.executable)
REPO = Path(__file__).resolve().parent.parent
VALIDATION = "Validating arguments against arg spec 'main'"
# No task carries it: only the tasks tagged `always`, the argument spec validation among them, run.
VALIDATION_ONLY = "rms-validation-only"

CLUSTER = {"root_cluster_name": "corp", "root_cluster_intranet_url": "https://rms.example.com"}
KEYS = {"key_rotation_cluster": "corp", "key_rotation_database_url": "sqlite:////nonexistent/config.db"}
SERVER = {"server_cluster": "corp", "server_database_url": "sqlite:////nonexistent/config.db"}
LICENSING = {"licensing_cluster_name": "finance", "licensing_cluster_intranet_url": "https://finance.example.com",
             "licensing_cluster_root_url": "https://rms.example.com", "licensing_cluster_root_host": "localhost",
             "licensing_cluster_root_name": "corp",
             "licensing_cluster_root_database_url": "sqlite:////nonexistent/config.db"}
TOKEN = {"module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "rms", "pin": "1234"}


def play(tmp_path, role: str, variables: dict, *args: str) -> subprocess.CompletedProcess:
    playbook = tmp_path / "play.yml"
    playbook.write_text(json.dumps([{
        "name": "A role given too little", "hosts": "localhost", "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "roles": [{"role": role, "vars": variables}],
    }]))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false")
    return subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "--check", str(playbook),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def tasks(output: str) -> list[str]:
    return [line.split("[", 1)[1].rsplit("]", 1)[0] for line in output.splitlines() if line.startswith("TASK [")]


@pytest.mark.parametrize("role, variables, missing", [
    ("rmsops.rms.root_cluster", CLUSTER, "root_cluster_key_password is required"),
    ("rmsops.rms.licensing_cluster", LICENSING, "missing required arguments: licensing_cluster_key_password"),
    ("rmsops.rms.key_rotation", KEYS, "key_rotation_key_password is required"),
    ("rmsops.rms.server", SERVER, "server_key_password is required"),
])
def test_a_missing_key_password_fails_at_the_argument_validation(tmp_path, role, variables, missing):
    proc = play(tmp_path, role, variables)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    # The one task that ran is the validation; nothing was installed, not even in check mode.
    ran = tasks(proc.stdout)
    assert len(ran) == 1 and ran[0].startswith(f"{role} : {VALIDATION}"), output
    assert missing in output
    assert "ok=0" in output and "failed=1" in output


@pytest.mark.parametrize("role, variables", [
    ("rmsops.rms.root_cluster", {**CLUSTER, "root_cluster_key_password": "{password}"}),
    ("rmsops.rms.root_cluster", {**CLUSTER, "root_cluster_key_protection": "pkcs11", "root_cluster_pkcs11": TOKEN}),
    ("rmsops.rms.licensing_cluster", {**LICENSING, "licensing_cluster_key_password": "{password}"}),
    ("rmsops.rms.key_rotation", {**KEYS, "key_rotation_key_password": "{password}"}),
    ("rmsops.rms.key_rotation", {**KEYS, "key_rotation_pkcs11": TOKEN}),
    ("rmsops.rms.server", {**SERVER, "server_key_password": "{password}"}),
    ("rmsops.rms.server", {**SERVER, "server_pkcs11_module": TOKEN["module"], "server_pkcs11_token_label": "rms",
                           "server_pkcs11_pin": "1234"}),
])
def test_a_key_password_or_a_token_passes_the_argument_validation(tmp_path, role, variables):
    password = "kp-" + secrets.token_hex(12)
    variables = {name: value.format(password=password) if isinstance(value, str) else value
                 for name, value in variables.items()}
    proc = play(tmp_path, role, variables, "--tags", VALIDATION_ONLY)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    ran = tasks(proc.stdout)
    assert len(ran) == 1 and ran[0].startswith(f"{role} : {VALIDATION}"), output
    assert password not in output


# --- playbooks: the first task checks the cluster key password, before rmsd is installed ------------------------------

PLAYBOOKS = REPO / "playbooks"
ROOT_HOST = {"root_cluster_name": "corp", "root_cluster_intranet_url": "https://rms.example.com"}
LICENSING_HOST = {"licensing_cluster_name": "finance", "licensing_cluster_intranet_url": "https://finance.example.com"}
# The first task of rotate_compromised_key.yml, and the one after the folder's of backup_key.yml.
CHECKS = ("Refuse to start without the cluster key password", "Refuse to run without the cluster key password")
BACKUP = {"backup_key_dir": "/nonexistent/backups", "backup_key_password": "tpd-password-of-at-least-12"}


def run_playbook(tmp_path, playbook: str, root: dict, licensing: dict, *args: str) -> subprocess.CompletedProcess:
    """The playbook against localhost as the one host of a root or a licensing cluster, in check mode; rmsd is
    the one of this virtualenv (no install), the configuration database a SQLite file that does not exist."""
    database = f"sqlite:///{tmp_path}/missing/config.db"
    groups = {"rms_root": {"hosts": {}}, "rms_licensing": {"hosts": {}}}
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "server_install_done": True, "server_rmsd_python": sys.executable, "server_rmsd_ready": True,
            "server_user": getpass.getuser()}
    if root:
        groups["rms_root"]["hosts"]["localhost"] = {**host, "root_cluster_database_url": database, **root}
    else:
        groups["rms_licensing"]["hosts"]["localhost"] = {**host, "licensing_cluster_database_url": database,
                                                         **licensing}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"children": groups}}))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false")
    return subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", str(inventory), "--check",
                           str(PLAYBOOKS / playbook), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize("playbook, root, licensing, checks, missing", [
    ("rotate_compromised_key.yml", ROOT_HOST, None, 1, "root_cluster_key_password is required"),
    ("rotate_compromised_key.yml", None, LICENSING_HOST, 1, "licensing_cluster_key_password is required"),
    ("rotate_compromised_key.yml", {**ROOT_HOST, "root_cluster_key_protection": "pkcs11"}, None, 1,
     "key_rotation_pkcs11 is required"),
    # Its first task checks the folder and the backup password.
    ("backup_key.yml", {**ROOT_HOST, **BACKUP}, None, 2, "root_cluster_key_password is required"),
    ("backup_key.yml", None, {**LICENSING_HOST, **BACKUP}, 2, "licensing_cluster_key_password is required"),
])
def test_a_playbook_given_no_key_password_stops_before_anything_else(tmp_path, playbook, root, licensing, checks,
                                                                    missing):
    proc = run_playbook(tmp_path, playbook, root, licensing)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    ran = tasks(proc.stdout)
    assert len(ran) == checks and ran[-1].startswith("Refuse to "), output
    assert missing in output
    assert "failed=1" in output and "changed=0" in output


@pytest.mark.parametrize("playbook, root, licensing", [
    ("rotate_compromised_key.yml", {**ROOT_HOST, "root_cluster_key_password": "{password}"}, None),
    ("rotate_compromised_key.yml", None, {**LICENSING_HOST, "licensing_cluster_key_password": "{password}"}),
    ("rotate_compromised_key.yml", {**ROOT_HOST, "root_cluster_key_protection": "pkcs11",
                                    "key_rotation_pkcs11": TOKEN}, None),
    ("backup_key.yml", {**ROOT_HOST, **BACKUP, "root_cluster_key_password": "{password}"}, None),
])
def test_a_playbook_given_the_key_password_goes_past_the_check(tmp_path, playbook, root, licensing):
    password = "kp-" + secrets.token_hex(12)
    given = {name: value.format(password=password) if isinstance(value, str) else value
             for name, value in (root or licensing).items()}
    proc = run_playbook(tmp_path, playbook, given if root else None, None if root else given)
    output = proc.stdout + proc.stderr
    ran = tasks(proc.stdout)
    check = next(i for i, name in enumerate(ran) if name.startswith(CHECKS))
    # Later tasks ran (the cluster does not exist: the run may stop there, never at the check).
    assert len(ran) > check + 1, output
    assert "is required" not in output
    assert password not in output
