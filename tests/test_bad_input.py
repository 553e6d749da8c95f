"""Bad input fails with a message that says what to do, and changes nothing."""

import ast
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from state import cluster_state, file_state, server_params

MODULES = ["rmsops.rms.cluster", "rmsops.rms.server", "rmsops.rms.cluster_info"]


@pytest.fixture
def provisioned(ansible, sqlite_cluster):
    ansible.run("rmsops.rms.cluster", sqlite_cluster).ok()
    return sqlite_cluster


def state_of(cluster):
    return cluster_state(cluster["name"], cluster["database_url"])


@pytest.mark.parametrize("module", MODULES)
def test_unknown_parameter(ansible, sqlite_cluster, tmp_path, module):
    params = {
        "rmsops.rms.cluster": sqlite_cluster,
        "rmsops.rms.server": server_params(sqlite_cluster, tmp_path),
        "rmsops.rms.cluster_info": {k: sqlite_cluster[k] for k in ("name", "database_url")},
    }[module]
    run = ansible.run(module, dict(params, bogus_option="x"))
    assert run.failed
    assert "bogus_option" in run.msg and "Unsupported parameters" in run.msg
    assert state_of(sqlite_cluster) == {"database": "absent"}


@pytest.mark.parametrize("check", [False, True])
def test_server_wrong_key_password(ansible, provisioned, tmp_path, check):
    before = state_of(provisioned)
    params = dict(server_params(provisioned, tmp_path), key_password="not-the-key-password")
    run = ansible.run("rmsops.rms.server", params, check=check)
    assert run.failed
    assert "password" in run.msg.lower(), run.msg
    assert "Traceback" not in run.output
    assert state_of(provisioned) == before
    assert file_state(params["config_path"]) is None and file_state(params["secret_path"]) is None


def test_cluster_wrong_key_password(ansible, provisioned):
    before = state_of(provisioned)
    run = ansible.run("rmsops.rms.cluster", dict(provisioned, key_password="not-the-key-password",
                                                 intranet_url="http://127.0.0.1:18090"))
    assert run.failed
    assert "password" in run.msg.lower(), run.msg
    assert state_of(provisioned) == before


def test_key_size_cannot_change_in_place(ansible, provisioned):
    before = state_of(provisioned)
    assert before["cluster_keys"][0]["size"] == 2048
    run = ansible.run("rmsops.rms.cluster", dict(provisioned, key_size=3072))
    assert run.failed
    # The message names the option and the way to get a new key size: a key rollover.
    assert "key_size" in run.msg and "rollover" in run.msg, run.msg
    assert state_of(provisioned) == before


def test_server_for_missing_cluster(ansible, sqlite_cluster, tmp_path):
    params = server_params(sqlite_cluster, tmp_path)
    run = ansible.run("rmsops.rms.server", params)
    assert run.failed
    assert "rmsops.rms.cluster" in run.msg, run.msg
    assert file_state(params["config_path"]) is None


@pytest.mark.parametrize("module", MODULES)
def test_missing_rmsd_is_a_clear_failure(ansible, sqlite_cluster, tmp_path, module):
    """On a host whose Python lacks rmsd, the module says so instead of a traceback."""
    params = {
        "rmsops.rms.cluster": sqlite_cluster,
        "rmsops.rms.server": server_params(sqlite_cluster, tmp_path),
        "rmsops.rms.cluster_info": {k: sqlite_cluster[k] for k in ("name", "database_url")},
    }[module]
    bare_python = sys._base_executable  # the interpreter this virtualenv was made from
    run = ansible.run(module, params, interpreter=bare_python)
    assert run.failed
    assert "rmsd" in run.msg, run.msg
    assert "Traceback" not in run.output
    assert state_of(sqlite_cluster) == {"database": "absent"}


def test_server_http_limits_reach_the_node_configuration(ansible, provisioned, tmp_path):
    params = dict(server_params(provisioned, tmp_path), http_limits={"max_body_bytes": 131072,
                                                                      "read_timeout_seconds": 20})
    assert ansible.run("rmsops.rms.server", params).ok().changed
    config = tomllib.loads(Path(params["config_path"]).read_text())["node"]
    assert config["max_body_bytes"] == 131072 and config["read_timeout_seconds"] == 20
    assert "max_header_bytes" not in config  # left out: rmsd's default
    assert not ansible.run("rmsops.rms.server", params).ok().changed


@pytest.mark.parametrize("limits", [{"max_body_bytes": 10}, {"read_timeout_seconds": 100000}])
def test_server_http_limits_out_of_range_change_nothing(ansible, provisioned, tmp_path, limits):
    before = state_of(provisioned)
    params = dict(server_params(provisioned, tmp_path), http_limits=limits)
    run = ansible.run("rmsops.rms.server", params)
    assert run.failed and "HTTP limit" in run.msg and "Traceback" not in run.output, run.msg
    assert state_of(provisioned) == before and file_state(params["config_path"]) is None


def test_server_http_limit_names_are_rmsds():
    """One vocabulary: the module's http_limits suboptions are exactly the limits rmsd's configuration has."""
    from rmsd.config import HTTP_LIMITS

    source = ast.parse((Path(__file__).parents[1] / "plugins/modules/server.py").read_text())
    text = next(node.value.value for node in source.body if isinstance(node, ast.Assign)
                and node.targets[0].id == "DOCUMENTATION")
    documented = yaml.safe_load(text)["options"]["http_limits"]["suboptions"]
    assert set(documented) == set(HTTP_LIMITS)
    for name, (low, high) in HTTP_LIMITS.items():
        assert f"({low} to {high}" in " ".join(documented[name]["description"]), name
