"""A required variable left out stops a role at the validation of its arguments, the first task, with a
message naming it: before rmsd is installed or anything else changes. Real ansible-playbook runs against
localhost, in check mode."""

import json
import os
import secrets
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
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
