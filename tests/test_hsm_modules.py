"""The modules with cluster keys in a PKCS#11 token (SoftHSM2): cluster with key_protection=pkcs11,
server and cluster_key (compromise, the old key destroyed in the token) in four runs each; the fate of a
compromised token key must be explicit; the PIN never appears in -vvv output or diffs."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from state import cluster_state, four_runs

MODULE = "/usr/lib/softhsm/libsofthsm2.so"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(MODULE) and shutil.which("softhsm2-util")),
    reason="SoftHSM2 is not installed (Debian package softhsm2; .ci/run installs it)",
)

# Lists the token's private keys and whether each can still sign, from a process of its own.
TOKEN_KEYS = textwrap.dedent("""
    import json, sys, pkcs11
    from pkcs11 import Attribute, ObjectClass
    token = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])
    with token.open(user_pin=sys.argv[3]) as session:
        keys = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        print(json.dumps(sorted([k[Attribute.LABEL], bool(k[Attribute.SIGN]), bool(k[Attribute.EXTRACTABLE])]
                                for k in keys)))
""")


@pytest.fixture
def token(tmp_path):
    base = tmp_path / "softhsm"
    (base / "tokens").mkdir(parents=True)
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    pin = "pin-" + os.urandom(8).hex()  # distinctive, so a leak is unambiguous
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "rms", "--so-pin", "so-" + pin,
                    "--pin", pin], check=True, capture_output=True, env=dict(os.environ, **env))
    return {"params": {"module": MODULE, "token_label": "rms", "pin": pin}, "env": env}


def token_keys(token) -> list:
    out = subprocess.run([sys.executable, "-c", TOKEN_KEYS, MODULE, "rms", token["params"]["pin"]], check=True,
                         capture_output=True, text=True, env=dict(os.environ, **token["env"]))
    return json.loads(out.stdout)


@pytest.fixture
def hsm_cluster(tmp_path, token):
    return {
        "name": "hsm1", "database_url": f"sqlite:///{tmp_path / 'db' / 'config.db'}", "key_protection": "pkcs11",
        "pkcs11": token["params"], "intranet_url": "http://127.0.0.1:18080",
    }


def test_cluster_and_server_with_the_key_in_a_token(ansible, hsm_cluster, token, tmp_path):
    pin = token["params"]["pin"]

    def observe():
        return cluster_state(hsm_cluster["name"], hsm_cluster["database_url"]), token_keys(token)

    runs = four_runs(ansible, "rmsops.rms.cluster", hsm_cluster, observe, env=token["env"], diff=True)
    state, keys = runs["state"]
    ((_label, can_sign, extractable),) = keys
    assert can_sign and not extractable
    assert state["cluster"]["key_protection"] == "pkcs11"
    server = {"cluster": "hsm1", "name": "n1", "database_url": hsm_cluster["database_url"],
              "pkcs11": token["params"], "listen_address": "127.0.0.1", "port": 18099,
              "config_path": str(tmp_path / "etc" / "n1.toml"), "secret_path": str(tmp_path / "etc" / "n1.secret")}
    verbose = ansible.run("rmsops.rms.server", server, diff=True, verbosity=3, env=token["env"]).ok()
    assert verbose.changed
    secret = tmp_path / "etc" / "n1.secret"
    assert os.stat(secret).st_mode & 0o777 == 0o600 and pin in secret.read_text()
    assert "libsofthsm2" in (tmp_path / "etc" / "n1.toml").read_text()
    for run in (*runs["runs"], verbose):
        assert pin not in run.output and pin not in json.dumps(run.result)
    wrong = ansible.run("rmsops.rms.server", dict(server, pkcs11=dict(token["params"], pin="0000")),
                        env=token["env"])
    assert wrong.failed and "PIN" in wrong.msg and "0000" not in wrong.output


def test_compromise_replaces_the_token_key_and_destroys_the_old_one(ansible, hsm_cluster, token):
    ansible.run("rmsops.rms.cluster", hsm_cluster, env=token["env"]).ok()
    ((old_label, _sign, _extractable),) = token_keys(token)
    old_id = cluster_state("hsm1", hsm_cluster["database_url"])["cluster"]["active_key_id"]
    params = {"cluster": "hsm1", "database_url": hsm_cluster["database_url"], "pkcs11": token["params"],
              "compromised_keys": [old_id]}
    undecided = ansible.run("rmsops.rms.cluster_key", params, env=token["env"])
    assert undecided.failed and "compromised_key_in_token" in undecided.msg and "Nothing was changed" in undecided.msg
    params["compromised_key_in_token"] = "destroy"

    def observe():
        return cluster_state("hsm1", hsm_cluster["database_url"])["cluster_keys"], token_keys(token)

    runs = four_runs(ansible, "rmsops.rms.cluster_key", params, observe, env=token["env"], diff=True)
    keys, in_token = runs["state"]
    assert sorted(k["status"] for k in keys) == ["active", "compromised"]
    assert [label for label, _s, _e in in_token] != [old_label] and len(in_token) == 1
    assert runs["runs"][1].result["token"] == {old_id: "destroyed"}
    assert all(token["params"]["pin"] not in run.output for run in runs["runs"])
