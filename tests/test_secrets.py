"""Secrets never reach Ansible's output (not even at -vvv or with --diff); files holding them are 0600."""

import os
import re

from state import file_state, server_params

PEM = re.compile(r"-----BEGIN|PRIVATE KEY")


def test_no_secret_in_verbose_output(ansible, sqlite_cluster, tmp_path, key_password):
    runs = []
    for check in (True, False):
        runs.append(ansible.run("rmsops.rms.cluster", sqlite_cluster, check=check, diff=True, verbosity=3).ok())
    server = server_params(sqlite_cluster, tmp_path)
    for check in (True, False):
        runs.append(ansible.run("rmsops.rms.server", server, check=check, diff=True, verbosity=3).ok())
    assert [r.changed for r in runs] == [True, True, True, True]
    for run in runs:
        assert key_password not in run.output
        assert not PEM.search(run.output), PEM.search(run.output)
    # The secret really went somewhere: into the node's 0600 secret file only.
    secret_bytes, secret_mode = file_state(server["secret_path"])
    assert secret_mode == "0o600"
    assert key_password.encode() in secret_bytes
    config_bytes, config_mode = file_state(server["config_path"])
    assert key_password.encode() not in config_bytes
    assert int(config_mode, 8) & 0o007 == 0, "the node configuration is not world-readable"


def test_diff_shows_metadata_only(ansible, sqlite_cluster, tmp_path):
    cluster = ansible.run("rmsops.rms.cluster", sqlite_cluster, diff=True).ok()
    server = ansible.run("rmsops.rms.server", server_params(sqlite_cluster, tmp_path), diff=True).ok()
    for run in (cluster, server):
        assert run.result.get("diff"), "a changing run returns a diff"
        text = repr(run.result["diff"])
        assert not PEM.search(text)
        assert sqlite_cluster["key_password"] not in text
    # The diff still says what changed: the cluster by name.
    assert "rms1" in repr(cluster.result["diff"])


def test_sqlite_database_is_private(ansible, sqlite_cluster):
    """The SQLite file holds the encrypted cluster key: owner-only."""
    ansible.run("rmsops.rms.cluster", sqlite_cluster).ok()
    path = sqlite_cluster["database_url"].removeprefix("sqlite:///")
    assert os.stat(path).st_mode & 0o077 == 0
