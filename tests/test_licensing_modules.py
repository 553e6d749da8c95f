"""Licensing clusters through the modules: enrollment_credential on the root, cluster with
role=licensing enrolling over HTTP with a running root node, rights_template, decommissioning.
Four runs each; the enrollment secret never reaches the output."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from state import file_state, four_runs, server_params

from rmsd import admin

RMSD = Path(sys.executable).with_name("rmsd")
ROOT_PORT = 18091


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A root cluster (SQLite) with one running node on 127.0.1.1."""
    base = tmp_path_factory.mktemp("root")
    cluster = {"name": "corp", "database_url": f"sqlite:///{base}/db/config.db",
               "key_password": "root-" + secrets.token_hex(12), "intranet_url": f"http://127.0.1.1:{ROOT_PORT}"}
    admin.ensure_cluster(**cluster)
    node = server_params(cluster, base, name="root1", port=ROOT_PORT)
    admin.ensure_server(**node)
    log = open(base / "serve.log", "wb")  # noqa: SIM115 (lives as long as the process)
    process = subprocess.Popen([str(RMSD), "serve", "--config", node["config_path"]], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.1.1:{ROOT_PORT}"
    try:
        for _ in range(150):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail((base / "serve.log").read_text())
        yield dict(cluster, url=url)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
        log.close()


def credential_params(root, scope, secret):
    return {"cluster": root["name"], "scope": scope, "secret": secret, "valid_for": 600,
            "database_url": root["database_url"]}


def licensing_params(root, tmp_path, name, secret):
    return {"name": name, "role": "licensing", "database_url": f"sqlite:///{tmp_path}/{name}/config.db",
            "key_password": "lic-" + secrets.token_hex(12), "intranet_url": f"https://{name}.example.com",
            "enrollment_url": root["url"], "enrollment_credential": secret}


def info(params):
    return admin.cluster_info(name=params["name"], database_url=params["database_url"])


def test_enrollment_credential_four_runs(ansible, root):
    secret = secrets.token_urlsafe(30)
    params = credential_params(root, "four-runs", secret)

    def observe():
        return [c for c in info(root)["enrollment_credentials"] if c["scope"] == "four-runs"]

    outcome = four_runs(ansible, "rmsops.rms.enrollment_credential", params, observe, diff=True, verbosity=3)
    assert [c["expired"] for c in outcome["state"]] == [False]
    for run in outcome["runs"]:
        assert secret not in run.output
    assert outcome["runs"][1].result["credential"]["scope"] == "four-runs"


def test_licensing_cluster_enrolls_in_four_runs(ansible, root, tmp_path):
    secret = secrets.token_urlsafe(30)
    ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "dept", secret)).ok()
    params = licensing_params(root, tmp_path, "dept", secret)
    db_file = tmp_path / "dept" / "config.db"

    def observe():
        return info(params)["cluster"] if db_file.exists() else None

    outcome = four_runs(ansible, "rmsops.rms.cluster", params, observe, diff=True, verbosity=3)
    for run in outcome["runs"]:
        assert secret not in run.output and params["key_password"] not in run.output
    enrolled = info(params)
    assert enrolled["cluster"]["role"] == "licensing"
    assert enrolled["slc"]["issuer_key_id"] == info(root)["cluster"]["active_key_id"]
    assert [e["licensing_cluster"] for e in info(root)["enrollments"]] == ["dept"]
    # A rerun with the credential gone (revoked) still changes nothing: it only checks the root's key.
    ansible.run("rmsops.rms.enrollment_credential", {**credential_params(root, "dept", None), "state": "absent"}).ok()
    rerun = ansible.run("rmsops.rms.cluster", {**params, "enrollment_credential": None}).ok()
    assert not rerun.changed


def test_enrollment_with_a_revoked_credential_fails_and_changes_nothing(ansible, root, tmp_path):
    secret = secrets.token_urlsafe(30)
    ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "revoked", secret)).ok()
    ansible.run("rmsops.rms.enrollment_credential",
                {**credential_params(root, "revoked", None), "state": "absent"}).ok()
    params = licensing_params(root, tmp_path, "revoked", secret)
    run = ansible.run("rmsops.rms.cluster", params, verbosity=3)
    assert run.failed and "refused the enrollment credential" in run.msg and "Nothing was changed" in run.msg
    assert secret not in run.output
    assert not (tmp_path / "revoked" / "config.db").exists()


def test_licensing_needs_an_enrollment_url(ansible, tmp_path):
    run = ansible.run("rmsops.rms.cluster", {"name": "x", "role": "licensing", "key_password": "k" * 20,
                                            "intranet_url": "https://x.example.com",
                                            "database_url": f"sqlite:///{tmp_path}/x.db"})
    assert run.failed and "enrollment_url" in run.msg
    assert not (tmp_path / "x.db").exists()


def test_rights_template_and_decommission_four_runs(ansible, root, tmp_path):
    secret = secrets.token_urlsafe(30)
    ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "finance", secret)).ok()
    params = licensing_params(root, tmp_path, "finance", secret)
    ansible.run("rmsops.rms.cluster", params).ok()
    template = {"cluster": "finance", "name": "finance-confidential", "description": "Finance only",
                "rights": {"group:finance": ["VIEW", "PRINT"]}, "database_url": params["database_url"]}
    outcome = four_runs(ansible, "rmsops.rms.rights_template", template,
                        lambda: info(params)["rights_templates"], diff=True)
    assert outcome["state"] == [{"name": "finance-confidential", "description": "Finance only",
                                 "rights": {"group:finance": ["PRINT", "VIEW"]}}]
    bad = ansible.run("rmsops.rms.rights_template", {**template, "rights": {"bob": ["FLY"]}})
    assert bad.failed and "unknown rights" in bad.msg
    assert info(params)["rights_templates"] == outcome["state"]

    decommission = {**params, "state": "decommissioned", "enrollment_credential": None}
    outcome = four_runs(ansible, "rmsops.rms.cluster", decommission, lambda: info(params)["cluster"]["state"],
                        diff=True)
    assert outcome["state"] == "decommissioned"
    assert outcome["runs"][1].result["diff"] == {"before": {"state": "provisioned"},
                                                 "after": {"state": "decommissioned"}}
    back = ansible.run("rmsops.rms.cluster", {**params, "enrollment_credential": None})
    assert back.failed and "force=true" in back.msg
    assert info(params)["cluster"]["state"] == "decommissioned"


def test_secret_file_of_a_licensing_node_is_private(ansible, root, tmp_path):
    secret = secrets.token_urlsafe(30)
    ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "private", secret)).ok()
    params = licensing_params(root, tmp_path, "private", secret)
    ansible.run("rmsops.rms.cluster", params).ok()
    node = server_params(params, tmp_path, name="lic1", port=18092)
    ansible.run("rmsops.rms.server", node).ok()
    content, mode = file_state(node["secret_path"])
    assert mode == "0o600" and params["key_password"].encode() in content
    assert secret.encode() not in content and secret.encode() not in Path(node["config_path"]).read_bytes()


def test_a_credential_enrolls_once(ansible, root, tmp_path):
    secret = secrets.token_urlsafe(30)
    made = ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "once", secret)).ok()
    assert made.changed and made.result["credential"]["used"] is False
    params = licensing_params(root, tmp_path, "once", secret)
    ansible.run("rmsops.rms.cluster", params).ok()
    # The same secret again, for a cluster provisioned afresh: the credential was spent by the first enrollment.
    again = {**params, "database_url": f"sqlite:///{tmp_path}/again/config.db"}
    run = ansible.run("rmsops.rms.cluster", again, verbosity=3)
    assert run.failed and "refused the enrollment credential" in run.msg and "Nothing was changed" in run.msg
    assert secret not in run.output and not (tmp_path / "again" / "config.db").exists()
    # Asked for again, the credential is made afresh (present means usable), and then stays as it is.
    fresh = ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "once", secret)).ok()
    assert fresh.changed and fresh.result["credential"]["used"] is False
    assert not ansible.run("rmsops.rms.enrollment_credential", credential_params(root, "once", secret)).ok().changed


def test_enrollment_and_database_urls_off_loopback_must_be_verified(ansible, tmp_path):
    secret = secrets.token_urlsafe(30)
    root = {"url": "http://rms-root.corp.example.com:8080"}
    run = ansible.run("rmsops.rms.cluster", licensing_params(root, tmp_path, "clear", secret), verbosity=3)
    assert run.failed and "enrollment_url uses plain http to rms-root.corp.example.com" in run.msg
    assert "https" in run.msg and secret not in run.output
    assert not (tmp_path / "clear" / "config.db").exists()
    password = "db-" + secrets.token_hex(12)
    for sslmode in ("", "?sslmode=require", "?sslmode=verify-ca&sslrootcert=/etc/ssl/ca.pem"):
        run = ansible.run("rmsops.rms.enrollment_credential", {
            **credential_params({"name": "corp", "database_url": "postgresql://rms@pg.corp.example.com/corp" + sslmode},
                                "x", secret), "database_password": password})
        assert run.failed and "sslmode=verify-full&sslrootcert=" in run.msg, run.msg
        assert password not in run.output and secret not in run.output


ROLE_VARS = {"licensing_cluster_name": "finance", "licensing_cluster_intranet_url": "https://finance.example.com",
             "licensing_cluster_root_host": "localhost", "licensing_cluster_root_name": "corp",
             "licensing_cluster_root_database_url": "sqlite:////nonexistent/config.db",
             "licensing_cluster_key_password": "kp-" + secrets.token_hex(12),
             "server_install_done": True, "server_rmsd_ready": False}
REFUSAL = "Refuse a plain HTTP root cluster URL off the loopback interface"


@pytest.mark.parametrize("root_url, refused", [
    ("http://rms.corp.example.com", True), ("http://10.0.10.10:8080", True), ("ftp://rms.corp.example.com", True),
    ("https://rms.corp.example.com", False), ("http://127.0.1.1:8080", False), ("http://localhost:8080", False),
])
def test_the_licensing_cluster_role_refuses_a_plain_http_root_url_off_loopback(tmp_path, root_url, refused):
    playbook = tmp_path / "play.yml"
    playbook.write_text(json.dumps([{
        "name": "A licensing cluster", "hosts": "localhost", "gather_facts": False,
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "roles": [{"role": "rmsops.rms.licensing_cluster",
                   "vars": {**ROLE_VARS, "licensing_cluster_root_url": root_url}}],
    }]))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_RETRY_FILES_ENABLED="false")
    proc = subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,", "--check",
                           str(playbook)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    output = proc.stdout + proc.stderr
    after = output.split(REFUSAL, 1)[1]
    outcome = next(line for line in after.splitlines() if line.startswith(("ok:", "fatal:")))
    if refused:
        assert outcome.startswith("fatal:") and "licensing_cluster_root_url" in after and "https" in after, output
        assert proc.returncode == 2 and "changed=0" in output
    else:
        assert outcome.startswith("ok:"), output
