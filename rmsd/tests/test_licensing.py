"""Licensing clusters: enrollment with the root cluster over HTTP (scoped, expiring, hashed
credentials), their own key and database, rights policy templates, and decommissioning."""

import subprocess

import pytest
import sqlalchemy as sa
from conftest import KEY_PASSWORD, configure_node, eventually, sqlite_database, start_node, stop_node

from rmsd import admin, pki
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.errors import RmsdError

SECRET = "enroll-7d1e0c55b2f94a0e8c31"
LICENSING_PASSWORD = "Licensing-Key-Pass-3b8e51"


def credential(node, scope, secret=SECRET, **kwargs):
    return admin.ensure_enrollment_credential(
        cluster=node.cluster, scope=scope, secret=secret, **node.database.admin_args(), **kwargs
    )


def licensing(database, node, name, credential_secret=SECRET, **overrides):
    args = {
        "name": name, "role": "licensing", "key_password": LICENSING_PASSWORD,
        "intranet_url": f"https://{name}.example.com", "enrollment_url": node.url,
        "enrollment_credential": credential_secret, **database.admin_args(), **overrides,
    }
    return admin.ensure_cluster(**args)


def test_credential_is_idempotent_and_stored_hashed(node):
    first = credential(node, "hashed", valid_for=600)
    assert first.changed and first.diff["after"]["secret"] == "(set)"
    assert SECRET not in repr(first)
    assert not credential(node, "hashed", valid_for=600).changed
    # Another secret for the same scope replaces the credential.
    assert credential(node, "hashed", secret=SECRET + "-rotated").changed
    dump = repr(node.database.dump())
    assert SECRET not in dump and SECRET.encode().hex() not in dump
    listed = admin.cluster_info(name=node.cluster, **node.database.admin_args())["enrollment_credentials"]
    assert [c["scope"] for c in listed] == ["hashed"] and set(listed[0]) == {
        "scope", "expires_at", "expired", "last_used_at",
    }
    assert credential(node, "hashed", state="absent").changed
    assert not credential(node, "hashed", state="absent").changed


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"secret": "short"}, "at least 24 characters"),
    ({"valid_for": 5}, "valid_for must be between"),
    ({"scope": "c1"}, "not the root cluster itself"),
    ({"scope": "bad name"}, "scope 'bad name' is not valid"),
])
def test_bad_credential_input_is_refused(node, kwargs, message):
    dump = node.database.dump()
    with pytest.raises(RmsdError, match=message):
        credential(node, **{"scope": "dept", **kwargs})
    assert node.database.dump() == dump


@pytest.mark.parametrize("case", ["missing", "wrong", "expired", "other-scope"])
def test_enrollment_needs_a_valid_credential_for_this_cluster(tmp_path, node, case):
    name = f"refused-{case}"
    if case == "wrong":
        credential(node, name)
    elif case == "expired":
        credential(node, name)
        engine = node.database.engine()
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE enrollment_credentials SET expires_at = '2020-01-01 00:00:00' "
                                 "WHERE scope = :s"), {"s": name})
        engine.dispose()
    elif case == "other-scope":
        credential(node, "someone-else")
    database = sqlite_database(tmp_path)
    secret = SECRET + "-wrong" if case == "wrong" else SECRET
    with pytest.raises(RmsdError) as err:
        licensing(database, node, name, credential_secret=secret)
    assert "refused the enrollment credential" in str(err.value) and "Nothing was changed" in str(err.value)
    assert secret not in str(err.value)
    assert database.dump() is None


def test_enrollment_without_a_credential_says_how_to_get_one(tmp_path, node):
    database = sqlite_database(tmp_path)
    with pytest.raises(RmsdError, match="create an enrollment credential on the root cluster"):
        licensing(database, node, "no-credential", credential_secret=None)
    assert database.dump() is None


def test_enrollment_url_must_be_a_root_cluster(tmp_path, node):
    with pytest.raises(RmsdError, match="cannot reach the root cluster"):
        licensing(sqlite_database(tmp_path), node, "dept", enrollment_url="http://127.0.0.1:9")


@pytest.fixture(scope="module")
def dept(tmp_path_factory, node):
    """Licensing cluster "dept" enrolled with the root node, and one running node of it."""
    base = tmp_path_factory.mktemp("dept")
    database = sqlite_database(base)
    credential(node, "dept")
    provisioned = licensing(database, node, "dept")
    _result, config_path, _secret = configure_node(
        database, base, node.issuer_dir, cluster="dept", name="d1", key_password=LICENSING_PASSWORD,
    )
    url, process = start_node(config_path, base / "serve.log")
    try:
        yield {"database": database, "url": url, "provisioned": provisioned, "base": base}
    finally:
        stop_node(process)


def test_licensing_cluster_has_its_own_key_and_an_slc_from_the_root(node, dept):
    assert dept["provisioned"].changed
    info = admin.cluster_info(name="dept", **dept["database"].admin_args())
    root = admin.cluster_info(name=node.cluster, **node.database.admin_args())
    assert info["cluster"]["role"] == "licensing"
    assert info["cluster"]["active_key_id"] != root["cluster"]["active_key_id"]
    assert info["slc"]["issuer_key_id"] == root["cluster"]["active_key_id"]
    assert info["root_slc"]["fingerprint_sha256"] == root["slc"]["fingerprint_sha256"]
    assert [e["licensing_cluster"] for e in root["enrollments"]].count("dept") == 1
    used = [c for c in root["enrollment_credentials"] if c["scope"] == "dept"]
    assert used[0]["last_used_at"] is not None


def test_licensing_slc_chains_to_the_root_for_openssl(tmp_path, node, dept):
    chain = RmsClient(dept["url"]).slc()["chain"]
    assert len(chain) == 2
    (tmp_path / "slc.pem").write_text(chain[0])
    (tmp_path / "root.pem").write_text(RmsClient(node.url).slc()["chain"][0])
    assert chain[1] == (tmp_path / "root.pem").read_text()
    verified = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "root.pem", tmp_path / "slc.pem"],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext", "basicConstraints", "-in",
                              tmp_path / "slc.pem"], capture_output=True, text=True, check=True).stdout
    assert "dept SLC" in subject and "CA:FALSE" in subject


def test_rerun_changes_nothing_and_needs_no_credential(node, dept):
    again = licensing(dept["database"], node, "dept", credential_secret=None)
    assert not again.changed and again.diff == {"before": {}, "after": {}}


def test_extranet_url_is_published_with_the_slc(node, dept):
    changed = licensing(dept["database"], node, "dept", extranet_url="https://dept.partner.example.com",
                        credential_secret=None)
    assert changed.changed and changed.diff["after"] == {"extranet_url": "https://dept.partner.example.com"}

    def published():  # /slc reads the cluster at most once a second
        assert RmsClient(dept["url"]).slc()["extranet_url"] == "https://dept.partner.example.com"

    eventually(published)


def test_round_trip_rac_from_root_pl_and_ul_from_licensing(node, dept):
    root, lic = RmsClient(node.url), RmsClient(dept["url"])
    alice = User.new("alice@example.com", node.token("alice@example.com"))
    bob = User.new("bob@example.com", node.token("bob@example.com", ["dept-staff"]))
    for user in (alice, bob):
        root.certify(user)
    with pytest.raises(ServiceError) as refused:
        lic.certify(alice)
    assert refused.value.status == 403 and "root cluster" in refused.value.detail
    content_key, blob = encrypt_content(b"department plan")
    pl = lic.publish(alice, "dept-plan", content_key, {"group:dept-staff": ["VIEW"]})
    ul = lic.license(bob, pl["pl"])
    claims, opened = open_use_license(ul["ul"], lic.slc()["chain"][0], bob)
    assert decrypt_content(opened, blob) == b"department plan" and claims["iss"] == "dept"
    # A PL of the licensing cluster is not the root cluster's to license.
    with pytest.raises(ServiceError) as foreign:
        root.license(bob, pl["pl"])
    assert foreign.value.status == 400


def test_rights_template_is_used_by_publishing(node, dept):
    args = {"cluster": "dept", **dept["database"].admin_args()}
    rights = {"group:dept-staff": ["VIEW", "PRINT"]}
    made = admin.ensure_rights_template(name="dept-confidential", rights=rights, description="Dept only", **args)
    assert made.changed and made.diff["after"]["rights"] == {"group:dept-staff": ["PRINT", "VIEW"]}
    assert not admin.ensure_rights_template(name="dept-confidential", rights=rights, description="Dept only",
                                            **args).changed
    lic = RmsClient(dept["url"])
    alice = User.new("alice@example.com", node.token("alice@example.com"))
    carol = User.new("carol@example.com", node.token("carol@example.com", ["dept-staff"]))
    for user in (alice, carol):
        RmsClient(node.url).certify(user)
    content_key, _blob = encrypt_content(b"templated")
    body = {"content_id": "dept-templated", "content_key": _b64(content_key), "template": "dept-confidential"}
    pl = lic._call("POST", "/publishing", alice.token, body)
    assert lic.license(carol, pl["pl"])["rights"] == ["PRINT", "VIEW"]
    body["template"] = "no-such-template"
    with pytest.raises(ServiceError) as missing:
        lic._call("POST", "/publishing", alice.token, body)
    assert missing.value.status == 404 and "no-such-template" in missing.value.detail
    with pytest.raises(RmsdError, match="unknown rights"):
        admin.ensure_rights_template(name="bad", rights={"bob": ["FLY"]}, **args)
    info = admin.cluster_info(name="dept", **dept["database"].admin_args())
    assert [t["name"] for t in info["rights_templates"]] == ["dept-confidential"]


def test_decommissioned_cluster_only_serves_use_licenses(node, dept):
    lic = RmsClient(dept["url"])
    alice = User.new("alice@example.com", node.token("alice@example.com"))
    RmsClient(node.url).certify(alice)
    content_key, _blob = encrypt_content(b"before decommissioning")
    pl = lic.publish(alice, "dept-old", content_key, {"alice@example.com": ["VIEW"]})
    # The extranet URL as the decommissioning below declares it, whichever tests ran before this one.
    licensing(dept["database"], node, "dept", credential_secret=None, extranet_url="https://dept.partner.example.com")
    check = licensing(dept["database"], node, "dept", state="decommissioned", credential_secret=None,
                      extranet_url="https://dept.partner.example.com", check_mode=True)
    assert check.changed and check.diff == {"before": {"state": "provisioned"}, "after": {"state": "decommissioned"}}
    done = licensing(dept["database"], node, "dept", state="decommissioned", credential_secret=None,
                     extranet_url="https://dept.partner.example.com")
    assert done.changed and done.facts["cluster"]["state"] == "decommissioned"
    def refused_to_publish():  # once the node has read the cluster again
        try:
            lic.publish(alice, "dept-new", content_key, {"alice@example.com": ["VIEW"]})
        except ServiceError as refused:
            return refused
        raise AssertionError("the node still publishes")

    refused = eventually(refused_to_publish)
    assert refused.status == 403 and "decommissioned" in refused.detail
    assert lic.license(alice, pl["pl"])["content_id"] == "dept-old"
    # One-way unless forced.
    dump = dept["database"].dump()
    with pytest.raises(RmsdError, match="one-way; set force=true"):
        licensing(dept["database"], node, "dept", credential_secret=None,
                  extranet_url="https://dept.partner.example.com")
    assert dept["database"].dump() == dump
    back = licensing(dept["database"], node, "dept", credential_secret=None, force=True,
                     extranet_url="https://dept.partner.example.com")
    assert back.changed and back.facts["cluster"]["state"] == "provisioned"


def test_decommissioning_a_missing_cluster_is_refused(tmp_path, node):
    database = sqlite_database(tmp_path)
    with pytest.raises(RmsdError, match="nothing to decommission"):
        licensing(database, node, "ghost", state="decommissioned")
    assert database.dump() is None


def test_root_cluster_takes_no_enrollment_options(tmp_path):
    database = sqlite_database(tmp_path)
    with pytest.raises(RmsdError, match="role=licensing only"):
        admin.ensure_cluster(name="r", key_password=KEY_PASSWORD, intranet_url="https://r.example.com",
                             enrollment_url="https://x.example.com", **database.admin_args())
    assert database.dump() is None


def test_enrollment_refuses_the_root_itself_and_licensing_nodes_do_not_enroll(node, dept):
    request = {"cluster": node.cluster, "csr": "x", "intranet_url": "https://x.example.com", "credential": SECRET}
    assert RmsClient(node.url).http.post("/enrollment", json=request).status_code == 403
    request["cluster"] = "other"
    answer = RmsClient(dept["url"]).http.post("/enrollment", json=request)
    assert answer.status_code == 403 and "root cluster only" in answer.json()["detail"]


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_slc_advertises_the_key_and_state(node, dept):
    slc = RmsClient(dept["url"]).slc()
    info = admin.cluster_info(name="dept", **dept["database"].admin_args())
    assert slc["key_id"] == info["cluster"]["active_key_id"] == pki.cert_key_id(pki.load_pem(slc["chain"][0]))
    assert slc["role"] == "licensing"
