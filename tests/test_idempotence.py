"""The four-run pattern (check, real, check, real) for every module that changes state."""

from state import cluster_state, file_state, four_runs, server_params


def observe_cluster(params):
    return lambda: cluster_state(params["name"], params["database_url"], params.get("database_password"))


def test_cluster_four_runs(ansible, sqlite_cluster):
    outcome = four_runs(ansible, "rmsops.rms.cluster", sqlite_cluster, observe_cluster(sqlite_cluster))
    state = outcome["state"]
    assert state["exists"] is True
    assert state["cluster"]["name"] == "rms1"
    assert [k["status"] for k in state["cluster_keys"]] == ["active"]
    assert state["slc"]


def test_server_four_runs(ansible, sqlite_cluster, tmp_path):
    ansible.run("rmsops.rms.cluster", sqlite_cluster).ok()
    params = server_params(sqlite_cluster, tmp_path)
    cluster_before = observe_cluster(sqlite_cluster)()
    assert cluster_before["nodes"] == []

    def observe():
        return (observe_cluster(sqlite_cluster)()["nodes"],
                file_state(params["config_path"]), file_state(params["secret_path"]))

    outcome = four_runs(ansible, "rmsops.rms.server", params, observe)
    nodes, config, secret = outcome["state"]
    assert nodes == [("node1", "127.0.1.1", 18081)]
    assert config is not None and secret is not None
    assert secret[1] == "0o600"


def test_cluster_info_never_changes(ansible, sqlite_cluster):
    query = {k: sqlite_cluster[k] for k in ("name", "database_url")}
    for check in (True, False):
        missing = ansible.run("rmsops.rms.cluster_info", query, check=check).ok()
        assert not missing.changed
        assert missing.result["exists"] is False
    assert observe_cluster(sqlite_cluster)() == {"database": "absent"}, "cluster_info created the database"

    ansible.run("rmsops.rms.cluster", sqlite_cluster).ok()
    before = observe_cluster(sqlite_cluster)()
    for check in (True, False):
        found = ansible.run("rmsops.rms.cluster_info", query, check=check).ok()
        assert not found.changed
        assert found.result["exists"] is True
        assert found.result["cluster"]["active_key_id"] == before["cluster"]["active_key_id"]
        assert [k["status"] for k in found.result["cluster_keys"]] == ["active"]
    assert observe_cluster(sqlite_cluster)() == before
