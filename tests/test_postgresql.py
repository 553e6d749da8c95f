"""The modules against a real PostgreSQL configuration database (started for the session)."""

import itertools

import pytest
from state import cluster_state, file_state, four_runs, server_params

_numbers = itertools.count(1)


@pytest.fixture
def pg_cluster(postgres_server, key_password):
    database = f"drms_config_{next(_numbers)}"
    return {
        "name": "rmspg",
        "database_url": postgres_server.create_database(database),
        "database_password": postgres_server.password,
        "key_password": key_password,
        "intranet_url": "http://127.0.0.1:18180",
    }


def observe(cluster):
    return lambda: cluster_state(cluster["name"], cluster["database_url"], cluster["database_password"])


def test_cluster_and_server_four_runs(ansible, pg_cluster, tmp_path):
    assert observe(pg_cluster)()["exists"] is False
    state = four_runs(ansible, "rmsops.rms.cluster", pg_cluster, observe(pg_cluster))["state"]
    assert [k["status"] for k in state["cluster_keys"]] == ["active"]

    server = dict(server_params(pg_cluster, tmp_path), database_password=pg_cluster["database_password"])
    four_runs(ansible, "rmsops.rms.server", server,
              lambda: (observe(pg_cluster)()["nodes"], file_state(server["config_path"])))
    assert observe(pg_cluster)()["nodes"] == [("node1", "127.0.1.1", 18081)]
    assert file_state(server["secret_path"])[1] == "0o600"


def test_passwords_stay_out_of_output(ansible, pg_cluster, tmp_path):
    runs = [ansible.run("rmsops.rms.cluster", pg_cluster, check=check, diff=True, verbosity=3).ok()
            for check in (True, False)]
    server = dict(server_params(pg_cluster, tmp_path), database_password=pg_cluster["database_password"])
    runs += [ansible.run("rmsops.rms.server", server, diff=True, verbosity=3).ok()]
    for run in runs:
        assert pg_cluster["key_password"] not in run.output
        assert pg_cluster["database_password"] not in run.output


def test_wrong_database_password(ansible, pg_cluster):
    run = ansible.run("rmsops.rms.cluster", dict(pg_cluster, database_password="not-the-db-password"))
    assert run.failed
    assert "database_password" in run.msg, run.msg
    assert "Traceback" not in run.output
    assert "not-the-db-password" not in run.output
    assert observe(pg_cluster)()["exists"] is False
