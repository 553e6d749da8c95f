"""What a running node does when its cluster's key is rotated: content under a compromised key is refused
with a message that names it, its owner republishes it, nothing is signed with a retired key, RACs of a
compromised root key are no longer trusted, and content under an archived key still opens. ULs are
checked with jwcrypto, not the joserfc that issued them."""

import importlib.metadata
import json
import tomllib
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa
from conftest import KEY_PASSWORD, _running_node, eventually, postgres_database, sqlite_database
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwcrypto import jwk, jws

from rmsd import admin, clusters, pki
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.config import load_node_config
from rmsd.errors import RmsdError
from rmsd.node import Node as RmsNode
from rmsd.schema import cluster_keys, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_node(request, tmp_path):
    """A root cluster of its own with one running node (rotations change it)."""
    database = sqlite_database(tmp_path) if request.param == "sqlite" else postgres_database(
        request.getfixturevalue("pg"))
    yield from _running_node(tmp_path, database)


def rotate(node, **kwargs):
    return admin.ensure_cluster_key(cluster=node.cluster, key_password=KEY_PASSWORD, **node.database.admin_args(),
                                    **kwargs)


def users(node, client, *names):
    out = []
    for name in names:
        user = User.new(f"{name}@example.com", node.token(f"{name}@example.com"))
        client.certify(user)
        out.append(user)
    return out


def verify_ul_with_jwcrypto(ul: str, slc_pem: str) -> dict:
    public_pem = pki.load_pem(slc_pem).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    token = jws.JWS()
    token.deserialize(ul)
    token.verify(jwk.JWK.from_pem(public_pem))
    return json.loads(token.payload)


def test_compromise_refuses_old_content_until_its_owner_republishes_it(fresh_node):
    node, client = fresh_node, RmsClient(fresh_node.url)
    alice, bob = users(node, client, "alice", "bob")
    content_key, blob = encrypt_content(b"board minutes")
    old_pl = client.publish(alice, "minutes-2026", content_key, {"bob@example.com": ["VIEW"]})
    client.license(bob, old_pl["pl"])
    old_key = old_pl["key_id"]

    new_key = rotate(node, compromised_keys=[old_key]).facts["active_key_id"]
    # At once, not after the node's cache expires: nothing is licensed or signed under the old key.
    with pytest.raises(ServiceError) as refused:
        client.license(bob, old_pl["pl"])
    assert refused.value.status == 410
    for word in ("minutes-2026", old_pl["pl_id"], "alice@example.com", old_key, "republished by its owner"):
        assert word in refused.value.detail
    fresh = client.publish(alice, "minutes-2027", encrypt_content(b"x")[0], {"bob@example.com": ["VIEW"]})
    assert fresh["key_id"] == new_key
    slc = client.slc()
    assert slc["key_id"] == new_key and slc["revoked_key_ids"] == [old_key]

    # RACs issued by the compromised key are no longer trusted; a new RAC is.
    with pytest.raises(ServiceError) as untrusted:
        client.license(bob, fresh["pl"])
    assert untrusted.value.status == 403 and "RAC" in untrusted.value.detail
    client.certify(bob)
    client.certify(alice)

    # Only the owner republishes, once, for the same content.
    with pytest.raises(ServiceError) as not_owner:
        client.publish(bob, "minutes-2026", content_key, {"bob@example.com": ["VIEW"]}, supersedes=old_pl["pl_id"])
    assert not_owner.value.status == 403 and "only the owner" in not_owner.value.detail
    with pytest.raises(ServiceError) as other_content:
        client.publish(alice, "minutes-1999", content_key, {"bob@example.com": ["VIEW"]}, supersedes=old_pl["pl_id"])
    assert other_content.value.status == 400 and "is for content 'minutes-2026'" in other_content.value.detail
    new_content_key, new_blob = encrypt_content(b"board minutes")
    republished = client.publish(alice, "minutes-2026", new_content_key, {"bob@example.com": ["VIEW"]},
                                 supersedes=old_pl["pl_id"])
    assert republished["key_id"] == new_key and republished["supersedes"] == old_pl["pl_id"]
    with pytest.raises(ServiceError) as twice:
        client.publish(alice, "minutes-2026", new_content_key, {"bob@example.com": ["VIEW"]},
                       supersedes=old_pl["pl_id"])
    assert twice.value.status == 400 and "already republished" in twice.value.detail

    with pytest.raises(ServiceError) as still_refused:
        client.license(bob, old_pl["pl"])
    assert republished["pl_id"] in still_refused.value.detail
    ul = client.license(bob, republished["pl"])
    claims, opened = open_use_license(ul["ul"], client.slc()["chain"][0], bob)
    assert decrypt_content(opened, new_blob) == b"board minutes"
    assert verify_ul_with_jwcrypto(ul["ul"], client.slc()["chain"][0])["content_id"] == "minutes-2026"
    del claims, blob


def test_content_under_an_archived_key_still_opens_after_rollover(fresh_node):
    node, client = fresh_node, RmsClient(fresh_node.url)
    alice, bob = users(node, client, "alice", "bob")
    content_key, blob = encrypt_content(b"last year's report")
    old_pl = client.publish(alice, "report-2025", content_key, {"bob@example.com": ["VIEW"]})
    engine = node.database.engine()
    with engine.begin() as conn:
        conn.execute(cluster_keys.update().values(created_at=utcnow() - timedelta(days=400)))
    engine.dispose()
    done = rotate(node, max_age=365)
    assert done.facts["rotation"]["reason"] == "max_age"
    ul = client.license(bob, old_pl["pl"])  # the RAC of the archived root key is still trusted

    def new_slc_served():  # GET /slc shows the rotation within a second
        slc = client.slc()["chain"][0]
        assert pki.cert_key_id(pki.load_pem(slc)) == done.facts["active_key_id"] != old_pl["key_id"]
        return slc

    new_slc = eventually(new_slc_served)
    _claims, opened = open_use_license(ul["ul"], new_slc, bob)  # signed by the new key
    assert decrypt_content(opened, blob) == b"last year's report"
    assert verify_ul_with_jwcrypto(ul["ul"], new_slc)["pl_id"] == old_pl["pl_id"]


def test_a_key_password_change_and_a_compromise_in_one_run_keep_the_node_serving(fresh_node):
    """The member's secret file gets the new password beside the previous one first (what the server
    role does while the password changes); then one run re-encrypts every key with the new password
    and replaces the compromised key. The running node opens the new key at once, without a restart."""
    node, client = fresh_node, RmsClient(fresh_node.url)
    new_password = "Changed-Key-Pass-0b7e1d44"
    started = client.health()["started_at"]
    config = {k: v for k, v in _node_config(node).items() if k in (
        "listen_address", "port", "identity_issuer", "identity_audience", "identity_jwks_uri")}
    server = {"cluster": node.cluster, "name": "n1", "config_path": str(node.config_path),
              "secret_path": str(node.secret_path), **config, **node.database.admin_args()}
    with pytest.raises(RmsdError, match="does not decrypt"):
        admin.ensure_server(key_password=new_password, previous_key_password="not-it-either-3f2a", **server)
    assert admin.ensure_server(key_password=new_password, previous_key_password=KEY_PASSWORD, **server).changed
    secret = node.secret_path.read_text()
    assert new_password in secret and KEY_PASSWORD in secret and oct(node.secret_path.stat().st_mode)[-3:] == "600"

    old_key = client.slc()["key_id"]
    done = admin.ensure_cluster_key(cluster=node.cluster, key_password=new_password, previous_key_password=KEY_PASSWORD,
                                    compromised_keys=[old_key], **node.database.admin_args())
    assert done.facts["password_changed"] and done.facts["rotation"]["reason"] == "compromised"
    (alice,) = users(node, client, "alice")
    published = client.publish(alice, "after-change", encrypt_content(b"x")[0], {"alice@example.com": ["VIEW"]})
    assert published["key_id"] == done.facts["active_key_id"]
    assert client.health()["started_at"] == started

    # Once done, the previous password leaves the secret file.
    assert admin.ensure_server(key_password=new_password, **server).changed
    assert KEY_PASSWORD not in node.secret_path.read_text()


def _node_config(node) -> dict:
    return tomllib.loads(node.config_path.read_text())["node"]


def test_health_advises_a_restart_once_a_key_was_revoked_after_the_node_started(fresh_node):
    health = httpx.get(f"{fresh_node.url}/health").json()
    assert health["started_at"] <= utcnow().isoformat() and health["restart_advised"] is False
    assert health["version"] == importlib.metadata.version("rmsd")  # the version installed, as operators read it
    engine = fresh_node.database.engine()
    with engine.connect() as conn:
        changed_at = conn.execute(sa.select(cluster_keys.c.status_changed_at)).scalar_one()
    engine.dispose()
    assert changed_at.isoformat() <= health["started_at"]
    rotate(fresh_node, compromised_keys=[health["active_key_id"]])

    def advised():  # within a second: /health reads the cluster at most once a second
        after = httpx.get(f"{fresh_node.url}/health").json()
        assert after["restart_advised"] is True and after["active_key_id"] != health["active_key_id"]

    eventually(advised)


@pytest.fixture
def postgresql_node(tmp_path, pg):
    yield from _running_node(tmp_path, postgres_database(pg))


def test_a_rotation_committed_while_a_node_reads_its_cluster_shows_it_before_or_after_never_between(
        postgresql_node, monkeypatch):
    """A node reads its keys once per refresh. A compromise committed in the middle of the refresh shows
    the node the cluster before it (the next refresh shows it after), never its active key as compromised:
    with a second read of the keys, that request failed with 'was revoked as compromised'. (PostgreSQL
    only: on SQLite a refresh holds the database lock, so no rotation commits during it.)"""
    fresh_node = postgresql_node
    reader = RmsNode(load_node_config(fresh_node.config_path))
    try:
        old = reader.state().active.key_id
        read_keys, rotations = clusters.keys_of, []

        def keys_then_a_rotation_commits(conn, cluster_id):
            rows = read_keys(conn, cluster_id)
            if not rotations:
                rotations.append("started")  # the rotation reads the keys too
                rotations.append(rotate(fresh_node, compromised_keys=[old]))
            return rows

        monkeypatch.setattr(clusters, "keys_of", keys_then_a_rotation_commits)
        during = reader.state(refresh=True)
        assert rotations[-1].changed and during.active.key_id == old
        monkeypatch.undo()
        after = reader.state(refresh=True)
        assert after.active.key_id == rotations[-1].facts["active_key_id"] != old and old in after.revoked
    finally:
        reader.stop()
