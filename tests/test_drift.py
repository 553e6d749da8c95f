"""The rmsops.rms.drift callback: a check run writes what a real run would change (hosts, tasks, the diff's
field names, never values), the real run writes what it changed, a converged rerun writes nothing; a failed
run is never read as "no drift"."""

import getpass
import grp
import importlib.util
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _drift(ansible, tmp_path, params, check, name="rmsops.rms.cluster"):
    path = tmp_path / f"drift-{ansible.count}.json"
    env = {"ANSIBLE_CALLBACKS_ENABLED": "rmsops.rms.drift", "RMSOPS_DRIFT_PATH": str(path)}
    run = ansible.run(name, params, check=check, diff=True, env=env)
    assert "rmsops.rms.drift:" in run.output, run.output
    report = json.loads(path.read_text())
    assert os.stat(path).st_mode & 0o777 == 0o600
    module_changes = [c for c in report["changes"] if c["task"] == "Module under test"]
    return run, report, module_changes


def test_check_run_predicts_and_real_run_reports_the_same_change(ansible, sqlite_cluster, tmp_path, key_password):
    run, report, changes = _drift(ansible, tmp_path, sqlite_cluster, check=True)
    assert report["check_mode"] is True and run.changed
    assert changes == [{
        "host": "localhost", "play": "Run rmsops.rms.cluster", "role": None, "task": "Module under test",
        "action": "rmsops.rms.cluster", "handler": False, "fields": changes[0]["fields"],
    }]
    assert "name" in changes[0]["fields"] and "key_protection" in changes[0]["fields"]
    predicted = changes

    run, report, changes = _drift(ansible, tmp_path, sqlite_cluster, check=False)
    assert report["check_mode"] is False and run.changed
    assert [(c["host"], c["task"], c["action"]) for c in changes] == [(c["host"], c["task"], c["action"])
                                                                       for c in predicted]
    assert key_password not in json.dumps(report)

    run, report, changes = _drift(ansible, tmp_path, sqlite_cluster, check=True)
    assert changes == [] and not run.changed
    assert report["failures"] == [] and report["stats"]["localhost"]["failures"] == 0


def test_a_failed_run_lists_its_failure(ansible, sqlite_cluster, tmp_path):
    bad = dict(sqlite_cluster, key_password="short")
    run, report, changes = _drift(ansible, tmp_path, bad, check=True)
    assert run.failed and changes == []
    # The module task ignores errors (the test harness reads its result); the stats still count it.
    assert report["stats"]["localhost"]["ignored"] == 1


def test_pipeline_examples_use_the_drift_report_a_lock_and_vault():
    """The pipelines under docs/ parse, enable the report, read only fields it has, and serialize applies."""
    from pathlib import Path

    import yaml

    docs = Path(__file__).parents[1] / "docs"
    gitlab = yaml.safe_load((docs / "pipelines/gitlab-ci.yml").read_text())
    github = yaml.safe_load((docs / "pipelines/github-actions.yml").read_text())
    assert gitlab["apply"]["resource_group"] == gitlab["plan"]["resource_group"]
    assert github["concurrency"] == {"group": "rms-production", "cancel-in-progress": False}
    for text in ((docs / "pipelines/gitlab-ci.yml").read_text(), (docs / "pipelines/github-actions.yml").read_text()):
        assert "--check --diff" in text and ".vault-password" in text and "jq -e '.failures == []'" in text
        for field in (".changed_tasks", ".hosts_changed", ".failures", ".host", ".role", ".task", ".fields"):
            assert field in text, field
    config = (docs / "examples/ansible.cfg").read_text()
    assert "pipelining = true" in config and "callbacks_enabled = rmsops.rms.drift" in config


# --- no credential of a URL in the report ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SCHEMES = st.from_regex(r"[a-z][a-z0-9+.-]{0,7}", fullmatch=True)
# What URL parsers (urllib, so pip) read as userinfo: anything up to the last "@" before "/", "?" or "#".
USERINFO_CHARACTERS = st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"), blacklist_characters="/?#")
HOSTS = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}(:[0-9]{1,5})?", fullmatch=True)
PATHS = st.from_regex(r"(/[A-Za-z0-9._~%@:+-]*){0,4}(\?[A-Za-z0-9=&@]*)?", fullmatch=True)
# Text around a URL (a space between them): no "://" of its own.
AROUND = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).filter(lambda s: "://" not in s)
HYPOTHESIS = settings(max_examples=300, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))


def load_drift():
    spec = importlib.util.spec_from_file_location("drift_callback", REPO / "plugins" / "callback" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_userinfo_of_any_url_is_scrubbed():
    scrubbed = load_drift().scrubbed
    cases = 0

    @given(scheme=SCHEMES, user=st.text(USERINFO_CHARACTERS, min_size=1, max_size=20),
           password=st.none() | st.text(USERINFO_CHARACTERS, max_size=20), host=HOSTS, path=PATHS,
           before=AROUND.map(lambda s: s + " "), after=AROUND.map(lambda s: " " + s))
    @HYPOTHESIS
    def check(scheme, user, password, host, path, before, after):
        nonlocal cases
        userinfo = user if password is None else f"{user}:{password}"
        text = f"{before}{scheme}://{userinfo}@{host}{path}{after}"
        assert scrubbed({"task": [text]}) == {"task": [f"{before}{scheme}://***@{host}{path}{after}"]}
        cases += 1

    check()
    assert cases == HYPOTHESIS.max_examples


def test_text_without_a_url_is_written_as_it_is():
    scrubbed = load_drift().scrubbed
    cases = 0

    @given(text=AROUND)
    @HYPOTHESIS
    def check(text):
        nonlocal cases
        assert scrubbed(text) == text
        cases += 1

    check()
    for text in ("mail rms@example.com", "https://rms.example.com/@scope/x", "https://host:8443/a?b=c@d"):
        assert scrubbed(text) == text
    assert scrubbed({"n": 1, "b": None, "l": ["postgresql://rms:pw@db/rms"]}) == {"n": 1, "b": None,
                                                                                   "l": ["postgresql://***@db/rms"]}


def run_playbook(tmp_path, plays, *args):
    playbook, report = tmp_path / "play.yml", tmp_path / "drift.json"
    playbook.write_text(json.dumps(plays))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false", ANSIBLE_CALLBACKS_ENABLED="rmsops.rms.drift",
               RMSOPS_DRIFT_PATH=str(report))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", str(playbook),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    return proc.stdout + proc.stderr, report.read_text()


def test_a_credential_in_a_play_task_or_reason_is_not_in_the_report(tmp_path):
    canary = "cn-" + secrets.token_hex(8)
    url = f"https://deploy:{canary}@git.example.com/rms.git"
    output, report = run_playbook(tmp_path, [{
        "name": f"Roll out {url}", "hosts": "localhost", "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "tasks": [{"name": f"Deploy from {url}", "ansible.builtin.debug": {"msg": f"would fetch {url}"},
                   "changed_when": True}],
    }], "--check")
    assert "changed=1" in output, output
    changes = json.loads(report)["changes"]
    assert [(c["play"], c["task"], c["reason"]) for c in changes] == [
        ("Roll out https://***@git.example.com/rms.git", "Deploy from https://***@git.example.com/rms.git",
         "would fetch https://***@git.example.com/rms.git")]
    assert canary not in report


def test_a_credential_in_server_pip_index_url_is_not_in_the_report_nor_the_output(tmp_path):
    """The server role's install in check mode with an index that needs a password: what it would change is
    reported (the install from that index among it), the password nowhere."""
    canary = "cn-" + secrets.token_hex(8)
    user, group = getpass.getuser(), grp.getgrgid(os.getgid()).gr_name
    output, report = run_playbook(tmp_path, [{
        "name": "Install rmsd", "hosts": "localhost", "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "tasks": [{"name": "Install", "ansible.builtin.include_role": {"name": "rmsops.rms.server",
                                                                          "tasks_from": "install"},
                   "vars": {"server_pip_index_url": f"https://rms-ci:{canary}@pypi.example.com/simple/",
                            "server_venv_dir": str(tmp_path / "opt" / "venv"), "server_python": sys.executable,
                            "server_base_dir": str(tmp_path / "lib"), "server_packages": [],
                            "server_user": user, "server_group": group,
                            "server_wheelhouse_cache": str(tmp_path / "cache")}}],
    }], "--check", "--diff")
    assert canary not in output
    assert canary not in report
    tasks = [c["task"] for c in json.loads(report)["changes"]]
    assert any("Install rmsd into the virtualenv" in t and t.endswith("from the index server_pip_index_url names")
               for t in tasks), output
    assert any(t.endswith("Hand the install the package index URL (server_pip_index_url) in a file") for t in tasks)
    assert json.loads(report)["failures"] == [], output
