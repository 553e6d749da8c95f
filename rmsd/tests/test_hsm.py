"""Cluster keys in a PKCS#11 token (SoftHSM2): generated in the token as sensitive and not extractable,
the database holding only the public key and labels; a node signs and unwraps through the token (the
results checked with openssl and jwcrypto); rotation and compromise with the old key destroyed or
disabled in the token; a run killed before the token is settled converges; TPD export says what it
cannot export, and import puts keys into the token."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pkcs11
import pytest
import sqlalchemy as sa
from conftest import (
    KEY_PASSWORD,
    configure_node,
    eventually,
    make_issuer,
    provision,
    sqlite_database,
    start_node,
    stop_node,
)
from jwcrypto import jwk, jws
from pkcs11 import Attribute, KeyType, ObjectClass

from rmsd import admin
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.errors import RmsdError
from rmsd.keys import TokenSettings
from rmsd.keys import pkcs11 as token_keys
from rmsd.schema import cluster_keys

MODULE = os.environ.get("RMSD_TEST_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so")
PIN, SO_PIN = "4711-token-pin", "so-pin-93d1"
TPD_PASSWORD = "tpd-Backup-Pass-5c81f0"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(MODULE) and shutil.which("softhsm2-util")),
    reason="SoftHSM2 is not installed (Debian package softhsm2; .ci/run installs it)",
)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """SoftHSM2 with its token directory in a temp dir. The module reads SOFTHSM2_CONF once per process,
    so one configuration serves the session; every test gets a token of its own."""
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # also for the `rmsd serve` processes the tests start
    return conf


@pytest.fixture
def token(softhsm):
    label = f"t{uuid.uuid4().hex[:12]}"
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", PIN],
                   check=True, capture_output=True)
    return {"module": MODULE, "token_label": label, "pin": PIN}


def token_session(token):
    """A logged-in session on the token. PKCS#11 login is per process, and closing a logged-in session
    logs the whole process out: share rmsd's session (a plain python-pkcs11 one) and never close it."""
    return token_keys._Token.session(TokenSettings(**token))


def key_rows(database) -> list:
    engine = database.engine()
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(cluster_keys).order_by(cluster_keys.c.created_at)))
    engine.dispose()
    return rows


def provision_hsm(database, token, name="c1"):
    return provision(database, name, key_password=None, key_protection="pkcs11", pkcs11=token)


def rotate(database, token, **kwargs):
    return admin.ensure_cluster_key(cluster="c1", pkcs11=token, **database.admin_args(), **kwargs)


def test_key_is_generated_in_the_token_and_cannot_be_read_out(tmp_path, token):
    database = sqlite_database(tmp_path)
    result = provision_hsm(database, token)
    assert result.changed and result.facts["cluster"]["key_protection"] == "pkcs11"
    (row,) = key_rows(database)
    # The database holds the public key and the labels, no private key in any form.
    assert row.encrypted_private_key is None and row.protection == "pkcs11"
    assert row.token_label == token["token_label"] and row.key_label.startswith("rmsd-")
    assert row.wrap_alg == "RSA-OAEP"  # what SoftHSM2 unwraps (SHA-1 OAEP)
    session = token_session(token)
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=row.key_label)
    assert key[Attribute.SENSITIVE] and key[Attribute.ALWAYS_SENSITIVE]
    assert not key[Attribute.EXTRACTABLE] and key[Attribute.NEVER_EXTRACTABLE]
    for secret in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2):
        with pytest.raises(pkcs11.AttributeSensitive):
            key[secret]
    # Not even wrapped under a key of the token's own.
    wrapping = session.generate_key(KeyType.AES, 256, template={Attribute.WRAP: True, Attribute.TOKEN: False})
    with pytest.raises(pkcs11.KeyUnextractable):
        wrapping.wrap_key(key)
    # A second run finds it and changes nothing.
    assert not provision_hsm(database, token).changed


def test_options_that_do_not_fit_the_protection_are_refused(tmp_path, token):
    database = sqlite_database(tmp_path)
    with pytest.raises(RmsdError, match="needs pkcs11"):
        provision(database, key_password=None, key_protection="pkcs11")
    with pytest.raises(RmsdError, match="key_password is for key_protection=password"):
        provision(database, key_protection="pkcs11", pkcs11=token)
    with pytest.raises(RmsdError, match="PIN of PKCS#11 token"):
        provision_hsm(database, dict(token, pin="not-the-pin"))
    with pytest.raises(RmsdError, match="no PKCS#11 token labelled"):
        provision_hsm(database, dict(token, token_label="no-such-token"))
    assert database.dump() is None  # nothing was created


@pytest.fixture
def hsm_node(tmp_path, token):
    """A root cluster with its key in the token and one running node that uses the token."""
    database = sqlite_database(tmp_path)
    provision_hsm(database, token)
    issuer_dir = make_issuer(tmp_path / "issuer")
    _result, config_path, secret_path = configure_node(database, tmp_path, issuer_dir, key_password=None,
                                                       pkcs11=token)
    url, process = start_node(config_path, tmp_path / "serve.log")
    try:
        yield {"url": url, "database": database, "issuer": issuer_dir, "secret_path": secret_path,
               "config_path": config_path, "token": token}
    finally:
        stop_node(process)


def test_a_node_signs_and_unwraps_with_the_token(hsm_node):
    from rmsd import demo_issuer

    client = RmsClient(hsm_node["url"])
    alice = User.new("alice@example.com", demo_issuer.token(hsm_node["issuer"], "alice@example.com"))
    bob = User.new("bob@example.com", demo_issuer.token(hsm_node["issuer"], "bob@example.com"))
    for user in (alice, bob):
        client.certify(user)
    content_key, blob = encrypt_content(b"token protected")
    pl = client.publish(alice, "doc-1", content_key, {"bob@example.com": ["VIEW"]})["pl"]
    ul = client.license(bob, pl)["ul"]
    slc = client.slc()["chain"][0]
    claims, opened_key = open_use_license(ul, slc, bob)
    assert decrypt_content(opened_key, blob) == b"token protected" and claims["rights"] == ["VIEW"]
    # The PL and UL signatures, made in the token, verify with jwcrypto against the SLC's key.
    public = jwk.JWK.from_pem(_slc_public_pem(slc))
    for token in (pl, ul):
        verified = jws.JWS()
        verified.deserialize(token)
        verified.verify(public)
    # The node's secret file holds the PIN and is 0600; the configuration names module and token only.
    assert os.stat(hsm_node["secret_path"]).st_mode & 0o777 == 0o600
    assert PIN in hsm_node["secret_path"].read_text() and PIN not in hsm_node["config_path"].read_text()


def _slc_public_pem(slc_pem: str) -> bytes:
    out = subprocess.run(["openssl", "x509", "-noout", "-pubkey"], input=slc_pem, capture_output=True, text=True,
                         check=True)
    return out.stdout.encode()


def test_openssl_verifies_the_slc_the_token_signed(tmp_path, token):
    database = sqlite_database(tmp_path)
    provision_hsm(database, token)
    path = tmp_path / "slc.pem"
    path.write_text(_current_slc(database))
    verified = subprocess.run(["openssl", "verify", "-CAfile", path, path], capture_output=True, text=True)
    assert verified.stdout.strip().endswith(": OK"), verified.stderr


def _current_slc(database) -> str:
    from rmsd import clusters

    engine = database.engine()
    with engine.connect() as conn:
        row = clusters.get_cluster(conn, "c1")
        pem = clusters.current_slc_row(conn, row.id, clusters.active_key_row(conn, row.id).id).pem
    engine.dispose()
    return pem


@pytest.mark.parametrize("action,state", [("destroy", "destroyed"), ("disable", "disabled")])
def test_compromised_token_key_is_replaced_in_the_token(tmp_path, token, action, state):
    database = sqlite_database(tmp_path)
    provision_hsm(database, token)
    (old,) = key_rows(database)
    # The fate of the old key in the token is explicit: without it nothing happens.
    with pytest.raises(RmsdError, match="set compromised_key_in_token"):
        rotate(database, token, compromised_keys=[old.id])
    assert [r.status for r in key_rows(database)] == ["active"]
    check = rotate(database, token, compromised_keys=[old.id], compromised_key_in_token=action, check_mode=True)
    assert check.changed and check.diff["after"]["token"] == {old.id: state}
    assert [r.status for r in key_rows(database)] == ["active"]
    done = rotate(database, token, compromised_keys=[old.id], compromised_key_in_token=action)
    assert done.changed and done.facts["token"] == {old.id: state}
    old_row, new_row = key_rows(database)
    assert (old_row.status, new_row.status) == ("compromised", "active")
    assert new_row.protection == "pkcs11" and new_row.encrypted_private_key is None
    session = token_session(token)
    labels = {o[Attribute.LABEL] for o in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})}
    assert new_row.key_label in labels
    if action == "destroy":
        assert old_row.key_label not in labels
    else:
        kept = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=old_row.key_label)
        assert not kept[Attribute.SIGN] and not kept[Attribute.DECRYPT] and not kept[Attribute.UNWRAP]
        # python-pkcs11 offers the operations the token allows: neither signing nor decrypting.
        assert not hasattr(kept, "sign") and not hasattr(kept, "decrypt")
    again = rotate(database, token, compromised_keys=[old.id], compromised_key_in_token=action)
    assert not again.changed, again.diff


KILLER = textwrap.dedent("""
    import json, sys
    from rmsd import admin
    token = json.loads(sys.argv[3])
    result = admin.ensure_cluster_key(cluster="c1", database_url=sys.argv[1], pkcs11=token,
                                      compromised_keys=[sys.argv[2]], compromised_key_in_token="destroy")
    print(json.dumps({"changed": result.changed, "token": result.facts.get("token", {})}))
""")


def test_a_rotation_killed_before_the_token_is_settled_converges(tmp_path, token, record_property):
    database = sqlite_database(tmp_path)
    provision_hsm(database, token)
    (old,) = key_rows(database)
    script = tmp_path / "rotate.py"
    script.write_text(KILLER)

    def run(failpoint=None):
        env = {k: v for k, v in os.environ.items() if k != "RMSD_FAILPOINT"}
        if failpoint:
            env["RMSD_FAILPOINT"] = failpoint
        return subprocess.run([sys.executable, str(script), database.url, old.id, json.dumps(token)], env=env,
                              capture_output=True, text=True, timeout=120)

    assert run("rotation.committed").returncode == -9
    # Committed: the old key is revoked in the database and still in the token.
    assert [r.status for r in key_rows(database)] == ["compromised", "active"]
    session = token_session(token)
    assert len(list(session.get_objects({Attribute.LABEL: old.key_label}))) == 2  # private and public
    rerun = run()
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout) == {"changed": True, "token": {old.id: "destroyed"}}
    session = token_session(token)
    assert not list(session.get_objects({Attribute.LABEL: old.key_label}))
    assert json.loads(run().stdout)["changed"] is False
    record_property("kill_point", "pkcs11     rotation.committed  process killed (SIGKILL) before the token was "
                    "settled; rerun destroyed the compromised key in the token; new key active in the token")


def test_tpd_export_says_plainly_what_a_token_cannot_export(tmp_path, token):
    database = sqlite_database(tmp_path)
    provision_hsm(database, token)
    (row,) = key_rows(database)
    path = tmp_path / "c1.tpd"
    result = admin.ensure_trusted_publishing_domain(cluster="c1", pkcs11=token, path=str(path),
                                                     password=TPD_PASSWORD, **database.admin_args())
    assert result.changed and os.stat(path).st_mode & 0o777 == 0o600
    assert result.facts["tpd"]["keys"] == [{"id": row.id, "status": "active", "exported": False}]
    (warning,) = result.warnings
    assert row.id in warning and "cannot be exported" in warning and token["token_label"] in warning
    # What the file holds: SLC and public key, no private key.
    from rmsd import tpd

    document = tpd.unseal(path.read_text(), TPD_PASSWORD)
    (key,) = document["keys"]
    assert key["private_key_pem"] is None and "not extractable" in key["not_exported"]
    assert any(c["key_id"] == row.id for c in document["certificates"])
    again = admin.ensure_trusted_publishing_domain(cluster="c1", pkcs11=token, path=str(path),
                                                    password=TPD_PASSWORD, **database.admin_args())
    assert again.changed is False and tpd.unseal(path.read_text(), TPD_PASSWORD) == document


def test_tpd_import_puts_software_keys_into_the_token(tmp_path, token):
    source = sqlite_database(tmp_path / "source")
    provision(source)
    path = tmp_path / "c1.tpd"
    admin.ensure_trusted_publishing_domain(cluster="c1", key_password=KEY_PASSWORD, path=str(path),
                                           password=TPD_PASSWORD, **source.admin_args())
    (imported_id,) = [r.id for r in key_rows(source)]
    target = sqlite_database(tmp_path / "target")
    provision_hsm(target, token, name="c1")
    result = admin.ensure_trusted_publishing_domain(cluster="c1", pkcs11=token, path=str(path),
                                                     password=TPD_PASSWORD, state="imported", **target.admin_args())
    assert result.changed
    row = next(r for r in key_rows(target) if r.id == imported_id)
    assert (row.status, row.protection, row.encrypted_private_key) == ("archived", "pkcs11", None)
    session = token_session(token)
    key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=row.key_label)
    assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
    rerun = admin.ensure_trusted_publishing_domain(cluster="c1", pkcs11=token, path=str(path),
                                                    password=TPD_PASSWORD, state="imported", **target.admin_args())
    assert not rerun.changed


def test_a_node_with_the_wrong_pin_does_not_serve(tmp_path, token):
    database = sqlite_database(tmp_path)
    provision_hsm(database, token)
    issuer_dir = make_issuer(tmp_path / "issuer")
    with pytest.raises(RmsdError, match="PIN"):
        configure_node(database, tmp_path, issuer_dir, key_password=None, pkcs11=dict(token, pin="wrong-pin"))
    assert not (tmp_path / "etc" / "n1.secret").exists()


def _alice_publishes(hsm_node, content_id: str):
    """A client of the node, alice with a RAC, and the PL of a document only she may view."""
    from rmsd import demo_issuer

    client = RmsClient(hsm_node["url"])
    alice = User.new("alice@example.com", demo_issuer.token(hsm_node["issuer"], "alice@example.com"))
    client.certify(alice)
    content_key, _blob = encrypt_content(content_id.encode())
    pl = client.publish(alice, content_id, content_key, {"alice@example.com": ["VIEW"]})["pl"]
    return client, alice, pl


def test_content_published_under_a_destroyed_key_is_refused(hsm_node):
    client, alice, pl = _alice_publishes(hsm_node, "doc-old")
    (old,) = key_rows(hsm_node["database"])
    rotate(hsm_node["database"], hsm_node["token"], compromised_keys=[old.id], compromised_key_in_token="destroy")
    with pytest.raises(ServiceError) as refused:
        client.license(alice, pl)
    assert refused.value.status == 410 and "doc-old" in refused.value.detail
    client.certify(alice)  # a RAC from the new key
    new_key, blob = encrypt_content(b"after")
    pl2 = client.publish(alice, "doc-new", new_key, {"alice@example.com": ["VIEW"]})["pl"]

    def new_slc():  # GET /slc shows the new key within a second
        slc = client.slc()
        assert slc["key_id"] != old.id
        return slc["chain"][0]

    _claims, opened = open_use_license(client.license(alice, pl2)["ul"], eventually(new_slc), alice)
    assert decrypt_content(opened, blob) == b"after"


@pytest.mark.parametrize("action,state", [("destroy", "destroyed"), ("disable", "disabled")])
def test_a_key_settled_in_the_token_during_a_request_refuses_it_as_revoked(hsm_node, monkeypatch, action, state):
    """A licensing request reads its key as active; a rotation then compromises the key and destroys (or
    disables) it in the token before the request unwraps with it. The request is answered as one made after the
    rotation (refused as revoked, naming the content), not with the token's error (it was a 500)."""
    from rmsd import clusters
    from rmsd.config import load_node_config
    from rmsd.errors import RevokedError
    from rmsd.node import Node

    _client, alice, pl = _alice_publishes(hsm_node, "doc-mid")
    (old,) = key_rows(hsm_node["database"])
    node = Node(load_node_config(hsm_node["config_path"]))
    try:
        principal = node.authenticate(alice.token)
        assert node.license(principal, pl, alice.rac_pem)["content_id"] == "doc-mid"  # the key is loaded
        read_checks, rotations = clusters.license_checks, []

        def checks_then_a_rotation_destroys_the_key(*args, **kwargs):
            checked = read_checks(*args, **kwargs)
            if not rotations:
                rotations.append(rotate(hsm_node["database"], hsm_node["token"], compromised_keys=[old.id],
                                        compromised_key_in_token=action))
            return checked

        monkeypatch.setattr(clusters, "license_checks", checks_then_a_rotation_destroys_the_key)
        with pytest.raises(RevokedError, match="doc-mid"):
            node.license(principal, pl, alice.rac_pem)
        assert rotations[0].changed and rotations[0].facts["token"] == {old.id: state}
    finally:
        node.stop()


def test_concurrent_requests_share_the_token_safely(hsm_node):
    """A node's request threads share one token session: many use licenses at once all succeed, and the
    node stays up."""
    from concurrent.futures import ThreadPoolExecutor

    from rmsd import demo_issuer

    client = RmsClient(hsm_node["url"])
    alice = User.new("alice@example.com", demo_issuer.token(hsm_node["issuer"], "alice@example.com"))
    client.certify(alice)
    content_key, _blob = encrypt_content(b"busy")
    pl = client.publish(alice, "doc-busy", content_key, {"alice@example.com": ["VIEW"]})["pl"]

    def licenses(_worker):
        worker_client = RmsClient(hsm_node["url"])
        return [bool(worker_client.license(alice, pl)["ul"]) for _ in range(15)]

    with ThreadPoolExecutor(8) as pool:
        results = [ok for batch in pool.map(licenses, range(8)) for ok in batch]
    assert results == [True] * 120
    assert client.health()["status"] == "ok"
