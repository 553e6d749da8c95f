"""Key rotation across clusters: a licensing cluster's compromised key is replaced by a new key pair that
the root cluster enrolls, and the root never certifies the old key again; re-enrollment is refused as the
remedy for a compromised key; after the root key is compromised every licensing cluster re-enrolls and
stops trusting the old root SLC and the RACs it issued."""

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from conftest import (
    KEY_PASSWORD,
    _running_node,
    configure_node,
    eventually,
    sqlite_database,
    start_node,
    stop_node,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from rmsd import admin, clusters, enrollment, pki
from rmsd.client import RmsClient, ServiceError, User, encrypt_content
from rmsd.config import load_node_config
from rmsd.errors import ForbiddenError, RmsdError
from rmsd.keys import PasswordKeyProvider
from rmsd.node import Node as RmsNode
from rmsd.schema import utcnow

SECRET = "enroll-4b1f7c2ad9e06a3b5c88"
DEPT_PASSWORD = "Dept-Key-Pass-92c4e1f7"


@pytest.fixture
def deployment(tmp_path):
    """A root cluster and licensing cluster "dept", one running node each."""
    root_gen = _running_node(tmp_path / "root", sqlite_database(tmp_path / "root"))
    root = next(root_gen)
    database = sqlite_database(tmp_path / "dept")
    credential(root)
    admin.ensure_cluster(name="dept", role="licensing", key_password=DEPT_PASSWORD,
                         intranet_url="https://dept.example.com", enrollment_url=root.url,
                         enrollment_credential=SECRET, **database.admin_args())
    _result, config_path, _secret = configure_node(database, tmp_path / "dept", root.issuer_dir, cluster="dept",
                                                   name="d1", key_password=DEPT_PASSWORD)
    url, process = start_node(config_path, tmp_path / "dept" / "serve.log")
    try:
        yield {"root": root, "database": database, "url": url}
    finally:
        stop_node(process)
        root_gen.close()


def credential(root):
    admin.ensure_enrollment_credential(cluster="c1", scope="dept", secret=SECRET, **root.database.admin_args())


def dept_key(deployment, **kwargs):
    args = {"cluster": "dept", "key_password": DEPT_PASSWORD, "enrollment_url": deployment["root"].url,
            **deployment["database"].admin_args(), **kwargs}
    return admin.ensure_cluster_key(**args)


def dept_cluster(deployment, **kwargs):
    return admin.ensure_cluster(name="dept", role="licensing", key_password=DEPT_PASSWORD,
                                intranet_url="https://dept.example.com", enrollment_url=deployment["root"].url,
                                **deployment["database"].admin_args(), **kwargs)


def info(database, name):
    return admin.cluster_info(name=name, **database.admin_args())


def test_compromised_licensing_key_gets_a_new_key_the_root_enrolls(deployment):
    root, lic = deployment["root"], RmsClient(deployment["url"])
    alice = User.new("alice@example.com", root.token("alice@example.com"))
    RmsClient(root.url).certify(alice)
    old_pl = lic.publish(alice, "dept-doc", encrypt_content(b"d")[0], {"alice@example.com": ["VIEW"]})
    old_key = old_pl["key_id"]
    with pytest.raises(RmsdError, match="enrollment_credential"):
        dept_key(deployment, compromised_keys=[old_key])
    assert info(deployment["database"], "dept")["cluster"]["active_key_id"] == old_key

    credential(root)
    done = dept_key(deployment, compromised_keys=[old_key], enrollment_credential=SECRET)
    new_key = done.facts["active_key_id"]
    assert done.changed and new_key != old_key
    dept = info(deployment["database"], "dept")
    root_info = info(root.database, "c1")
    assert dept["slc"]["key_id"] == new_key and dept["slc"]["issuer_key_id"] == root_info["cluster"]["active_key_id"]
    enrolled = {e["key_id"] for e in root_info["enrollments"]}
    assert {old_key, new_key} <= enrolled
    assert dept_key(deployment, compromised_keys=[old_key]).changed is False

    with pytest.raises(ServiceError) as refused:
        lic.license(alice, old_pl["pl"])
    assert refused.value.status == 410 and "dept-doc" in refused.value.detail
    fresh = lic.publish(alice, "dept-new", encrypt_content(b"n")[0], {"alice@example.com": ["VIEW"]})
    assert fresh["key_id"] == new_key

    # The root cluster never certifies the revoked key again, whoever asks.
    engine = deployment["database"].engine()
    with engine.connect() as conn:
        leaked = PasswordKeyProvider(DEPT_PASSWORD).load(clusters.key_row(conn, old_key))
    engine.dispose()
    credential(root)
    with pytest.raises(RmsdError, match="revoked as compromised"):
        enrollment.enroll(root.url, None, cluster="dept", key=leaked, intranet_url="https://dept.example.com",
                          extranet_url=None, credential=SECRET,
                          expected_root=enrollment.fetch_root_slc(root.url, None))


def test_reenrollment_is_refused_as_the_remedy_for_a_compromised_key(deployment):
    active = info(deployment["database"], "dept")["cluster"]["active_key_id"]
    credential(deployment["root"])
    dump, root_dump = deployment["database"].dump(), deployment["root"].database.dump()
    with pytest.raises(RmsdError) as refused:
        dept_key(deployment, compromised_keys=[active], reenroll=True, enrollment_credential=SECRET)
    for words in ("re-enrollment is no remedy", "same key pair", "Remove reenroll", "Nothing was changed"):
        assert words in str(refused.value)
    assert deployment["database"].dump() == dump and deployment["root"].database.dump() == root_dump


def test_reenrollment_renews_the_slc_of_the_same_key(deployment):
    before = info(deployment["database"], "dept")
    credential(deployment["root"])
    done = dept_key(deployment, reenroll=True, enrollment_credential=SECRET)
    after = info(deployment["database"], "dept")
    assert done.changed and done.facts["reenrolled"] and done.facts["rotation"] == {}
    assert after["cluster"]["active_key_id"] == before["cluster"]["active_key_id"]
    assert after["slc"]["serial"] != before["slc"]["serial"]


def test_root_compromise_makes_licensing_clusters_reenroll_and_distrust_the_old_root(deployment):
    root, lic = deployment["root"], RmsClient(deployment["url"])
    bob = User.new("bob@example.com", root.token("bob@example.com"))
    RmsClient(root.url).certify(bob)
    old_rac = bob.rac_pem
    pl = lic.publish(bob, "dept-kept", encrypt_content(b"k")[0], {"bob@example.com": ["VIEW"]})
    old_root = info(root.database, "c1")["cluster"]["active_key_id"]
    new_root = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_root],
                                        **root.database.admin_args()).facts["active_key_id"]

    def revoked_served():  # GET /slc shows the revocation within a second
        assert RmsClient(root.url).slc()["revoked_key_ids"] == [old_root]

    eventually(revoked_served)

    # The licensing cluster's own key is fine: re-enrollment is right for it, and needs a credential.
    with pytest.raises(RmsdError, match="enrollment_credential"):
        dept_cluster(deployment)
    credential(root)
    check = dept_cluster(deployment, enrollment_credential=SECRET, check_mode=True)
    assert check.changed and check.diff["after"] == {"slc_issuer_key_id": new_root,
                                                     "untrusted_root_key_ids": [old_root]}
    done = dept_cluster(deployment, enrollment_credential=SECRET)
    dept = info(deployment["database"], "dept")
    assert done.changed and dept["slc"]["issuer_key_id"] == new_root and dept["untrusted_root_key_ids"] == [old_root]
    assert dept["cluster"]["active_key_id"] == pl["key_id"]  # same licensing key, new SLC
    assert dept_cluster(deployment).changed is False

    def new_chain_served():  # within a second
        served = [pki.load_pem(pem) for pem in lic.slc()["chain"]]
        assert pki.cert_key_id(served[1]) == new_root and pki.verify_issued_by(served[0], served[1], utcnow())

    eventually(new_chain_served)

    def distrusted():  # once the node has read the cluster again
        try:
            lic.license(bob, pl["pl"])
        except ServiceError as refused:
            return refused
        raise AssertionError("the node still trusts the RAC of the distrusted root key")

    refused = eventually(distrusted)
    assert refused.status == 403 and "RAC" in refused.detail
    RmsClient(root.url).certify(bob)
    assert bob.rac_pem != old_rac
    assert lic.license(bob, pl["pl"])["content_id"] == "dept-kept"


def mint_rac(issuer_key, issuer_slc: x509.Certificate, subject: str, user_key) -> str:
    """A RAC for `subject` signed by `issuer_key`, built with the cryptography package as an attacker holding
    that key would, in the layout rmsd gives RACs: the id in a urn:rmsd:user-id: URI (UTF-8 percent-encoded),
    the issuer the root SLC's subject, its key identifier, not a CA."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject[:64])]))
        .issuer_name(issuer_slc.subject)
        .public_key(user_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier("urn:rmsd:user-id:" + quote(subject.encode(), safe="")),
            x509.RFC822Name(subject)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_slc.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_racs_of_a_root_key_revoked_as_compromised_are_refused_by_the_licensing_cluster(deployment, tmp_path):
    """After the root key is revoked as compromised and the licensing cluster re-enrolled, a RAC issued under
    the old root key before (one the licensing node already verified and keeps in its cache) and a RAC minted
    afterwards with the old root key (by whoever stole it) are both refused over HTTP, without waiting for the
    node to read its cluster again; a RAC from the new root key is accepted. The minted RAC has the layout
    rmsd gives RACs: before the rotation the licensing cluster accepts one."""
    root, lic = deployment["root"], RmsClient(deployment["url"])
    subject = "carol@example.com"
    carol = User.new(subject, root.token(subject))
    RmsClient(root.url).certify(carol)
    pl = lic.publish(carol, "dept-board", encrypt_content(b"b")[0], {subject: ["VIEW"]})
    assert lic.license(carol, pl["pl"])["content_id"] == "dept-board"  # the node verified (and keeps) this RAC
    issued_before = carol.rac_pem

    # The attacker's copy of the root key: its private half, opened from the configuration database with the
    # key password by the cryptography package, and the root SLC it certified RACs under.
    engine = root.database.engine()
    with engine.connect() as conn:
        row = clusters.get_cluster(conn, "c1")
        old_root = clusters.active_key_row(conn, row.id)
        old_slc = pki.load_pem(clusters.current_slc_row(conn, row.id, old_root.id).pem)
    engine.dispose()
    stolen = serialization.load_der_private_key(old_root.encrypted_private_key, KEY_PASSWORD.encode())

    def holding(rac_pem: str) -> User:
        return User(subject, carol.token, carol.private_key, rac_pem)

    assert lic.license(holding(mint_rac(stolen, old_slc, subject, carol.private_key)), pl["pl"])["content_id"] == (
        "dept-board")

    new_root = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[old_root.id],
                                        **root.database.admin_args()).facts["active_key_id"]
    credential(root)
    assert dept_cluster(deployment, enrollment_credential=SECRET).changed
    assert info(deployment["database"], "dept")["untrusted_root_key_ids"] == [old_root.id]

    # At once: the licensing node reads whether the RAC's root SLC is trusted on every request.
    minted = mint_rac(stolen, old_slc, subject, carol.private_key)
    for rac_pem in (issued_before, minted):
        with pytest.raises(ServiceError) as refused:
            lic.license(holding(rac_pem), pl["pl"])
        assert refused.value.status == 403 and "RAC" in refused.value.detail

    # A node reading its cluster afresh does not even trust the old root SLC to check the minted RAC.
    reader = RmsNode(load_node_config(tmp_path / "dept" / "etc" / "d1.toml"))
    try:
        state = reader.state(refresh=True)
        assert [key_id for key_id, _slc in state.trusted_slcs] == [new_root]
        with pytest.raises(ForbiddenError):
            reader._trusted_rac(state, minted, utcnow())
    finally:
        reader.stop()

    RmsClient(root.url).certify(carol)  # under the new root key
    new_slc = pki.load_pem(RmsClient(root.url).slc()["chain"][0])
    assert pki.cert_key_id(new_slc) == new_root and pki.verify_issued_by(pki.load_pem(carol.rac_pem), new_slc, utcnow())
    assert lic.license(carol, pl["pl"])["content_id"] == "dept-board"


KILLER = textwrap.dedent("""
    import json, os, sys
    from rmsd import admin
    result = admin.ensure_cluster_key(cluster="dept", database_url=sys.argv[1], key_password=os.environ["KEY_PASSWORD"],
                                      compromised_keys=[sys.argv[2]], enrollment_url=sys.argv[3],
                                      enrollment_credential=os.environ["SECRET"])
    print(json.dumps({"changed": result.changed, "active": result.facts["active_key_id"]}))
""")


def test_licensing_rotation_killed_after_the_root_enrolled_the_new_key_converges(deployment, tmp_path,
                                                                                 record_property):
    """Killed between the root cluster's enrollment of the new key and the licensing cluster's commit:
    the licensing cluster keeps its old key until the rerun, which enrolls another new key."""
    old = info(deployment["database"], "dept")["cluster"]["active_key_id"]
    credential(deployment["root"])
    script = tmp_path / "rotate.py"
    script.write_text(KILLER)

    def run(failpoint=None):
        env = dict(os.environ, KEY_PASSWORD=DEPT_PASSWORD, SECRET=SECRET)
        env.pop("RMSD_FAILPOINT", None)
        env.update({"RMSD_FAILPOINT": failpoint} if failpoint else {})
        return subprocess.run([sys.executable, str(script), deployment["database"].url, old, deployment["root"].url],
                              env=env, capture_output=True, text=True, timeout=120)

    assert run("rotation.enrolled").returncode == -9
    after_kill = info(deployment["database"], "dept")["cluster_keys"]
    assert [(k["id"], k["status"]) for k in after_kill] == [(old, "active")]
    credential(deployment["root"])  # the killed run spent its credential; a rerun makes a fresh one (as the roles do)
    rerun = run()
    assert rerun.returncode == 0, rerun.stderr
    keys = {k["id"]: k["status"] for k in info(deployment["database"], "dept")["cluster_keys"]}
    new = json.loads(rerun.stdout)["active"]
    assert keys == {old: "compromised", new: "active"}
    engine = deployment["database"].engine()
    with engine.connect() as conn:
        PasswordKeyProvider(DEPT_PASSWORD).load(clusters.key_row(conn, old))  # the old key is not lost
    engine.dispose()
    assert json.loads(run().stdout)["changed"] is False
    record_property("kill_point", (
        f"licensing  rotation.enrolled   process killed (SIGKILL) after the root enrolled the new key; keys after "
        f"the kill: unchanged; rerun changed: True; converged to {sorted(keys.values())}; no key lost"
    ))
