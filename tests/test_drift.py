"""The rmsops.rms.drift callback: a check run writes what a real run would change (hosts, tasks, the diff's
field names, never values), the real run writes what it changed, a converged rerun writes nothing; a failed
run is never read as "no drift"."""

import json
import os


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
