"""Trusted publishing domain export and import: a 0600 password-encrypted file that jwcrypto and openssl
open (not only the joserfc that wrote it), idempotent export with a backup of a replaced file, import as
archived decrypt-only keys, compromised keys that stay revoked, and a restore drill over HTTP."""

import json
import os
import stat
import subprocess

import jwcrypto.jwa
import pytest
from asn1crypto import pem
from conftest import KEY_PASSWORD, _running_node, eventually, provision, sqlite_database
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwe, jwk

from rmsd import admin, pkcs8, tpd
from rmsd.client import RmsClient, ServiceError, User, decrypt_content, encrypt_content, open_use_license
from rmsd.errors import RmsdError
from rmsd.keys import key_id_of, public_pem

TPD_PASSWORD = "tpd-Backup-Pass-5c81f0"


def tpd_call(node_or_database, path, state="exported", cluster="c1", **kwargs):
    database = getattr(node_or_database, "database", node_or_database)
    return admin.ensure_trusted_publishing_domain(
        cluster=cluster, key_password=KEY_PASSWORD, path=str(path), password=TPD_PASSWORD, state=state,
        **database.admin_args(), **kwargs,
    )


@pytest.fixture
def source(tmp_path):
    """Root cluster c1 with one node; alice published a document bob may view; one key is archived and
    one compromised besides the active one."""
    gen = _running_node(tmp_path / "source", sqlite_database(tmp_path / "source"))
    node = next(gen)
    client = RmsClient(node.url)
    alice = User.new("alice@example.com", node.token("alice@example.com"))
    bob = User.new("bob@example.com", node.token("bob@example.com"))
    for user in (alice, bob):
        client.certify(user)
    content_key, blob = encrypt_content(b"the design")
    pl = client.publish(alice, "design", content_key, {"bob@example.com": ["VIEW"]})
    leaked = admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, **node.database.admin_args())
    admin.ensure_rights_template(cluster="c1", name="staff", rights={"group:staff": ["VIEW"]},
                                 **node.database.admin_args())
    try:
        yield {"node": node, "client": client, "alice": alice, "bob": bob, "pl": pl, "blob": blob,
               "key_id": leaked.facts["active_key_id"]}
    finally:
        gen.close()


def test_export_is_a_0600_file_that_other_libraries_open(source, tmp_path):
    path = tmp_path / "backup" / "c1.tpd"
    check = tpd_call(source["node"], path, check_mode=True)
    assert check.changed and not path.exists()
    done = tpd_call(source["node"], path)
    assert done.changed and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert done.facts["tpd"]["keys"] == [{"id": source["key_id"], "status": "active", "exported": True}]
    assert TPD_PASSWORD not in repr(done) and "PRIVATE KEY" not in repr(done)
    # jwcrypto (not joserfc, which wrote it) opens the envelope; openssl opens the key inside.
    jwcrypto.jwa.default_max_pbkdf2_iterations = tpd.P2C
    envelope = jwe.JWE()
    envelope.deserialize(path.read_text().strip(), key=jwk.JWK.from_password(TPD_PASSWORD))
    header = json.loads(envelope.objects["protected"])
    assert (header["alg"], header["enc"], header["typ"]) == ("PBES2-HS512+A256KW", "A256GCM", "rmsd-tpd+jwe")
    document = json.loads(envelope.payload)
    assert [c["content_id"] for c in document["content"]] == ["design"]
    assert [t["name"] for t in document["rights_templates"]] == ["staff"]
    key_pem = tmp_path / "key.pem"
    key_pem.write_text(document["keys"][0]["private_key_pem"])
    assert "ENCRYPTED PRIVATE KEY" in key_pem.read_text()
    opened = subprocess.run(["openssl", "pkey", "-in", str(key_pem), "-passin", "env:P", "-pubout"],
                            env={"P": TPD_PASSWORD, "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert opened.returncode == 0 and opened.stdout.strip() == document["keys"][0]["public_key_pem"].strip()
    # A second export of an unchanged cluster changes nothing.
    assert tpd_call(source["node"], path).changed is False


def test_export_after_a_change_keeps_the_old_file_as_a_backup(source, tmp_path):
    path = tmp_path / "c1.tpd"
    tpd_call(source["node"], path)
    first = path.read_text()
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[source["key_id"]],
                             **source["node"].database.admin_args())
    done = tpd_call(source["node"], path)
    assert done.changed and done.facts["backup_file"]
    backup = tmp_path / os.path.basename(done.facts["backup_file"])
    assert backup.read_text() == first and stat.S_IMODE(backup.stat().st_mode) == 0o600
    statuses = {k["id"]: k for k in done.facts["tpd"]["keys"]}
    assert statuses[source["key_id"]] == {"id": source["key_id"], "status": "compromised", "exported": False}
    assert done.facts["tpd"]["not_exported"][0]["reason"].startswith("revoked as compromised")
    # A file this password does not open is kept unless the backup is refused.
    other = tmp_path / "other.tpd"
    other.write_text("not a tpd")
    with pytest.raises(RmsdError, match="set backup=true"):
        tpd_call(source["node"], other, backup=False)
    assert other.read_text() == "not a tpd"


def test_a_large_content_registry_exports_reruns_and_imports(source, tmp_path):
    """Thousands of PLs make a TPD of megabytes, beyond the 64 KB that joserfc opens by default: the
    export is read back (a rerun changes nothing), jwcrypto opens it, and a new cluster imports it."""
    import sqlalchemy as sa

    from rmsd.schema import clusters, content, utcnow

    count = 5000
    engine = source["node"].database.engine()
    with engine.begin() as conn:
        cluster_id = conn.execute(sa.select(clusters.c.id).where(clusters.c.name == "c1")).scalar_one()
        conn.execute(content.insert(), [
            {"pl_id": f"{i:040x}", "cluster_id": cluster_id, "content_id": f"report-{i}",
             "owner": f"u{i % 97}@example.com", "key_id": source["key_id"], "rights": {"bob@example.com": ["VIEW"]},
             "created_at": utcnow()}
            for i in range(count)
        ])
    engine.dispose()
    path = tmp_path / "c1.tpd"
    assert tpd_call(source["node"], path).facts["tpd"]["content"] == count + 1
    assert path.stat().st_size > 1024**2
    assert tpd_call(source["node"], path).changed is False
    envelope = jwe.JWE()
    jwcrypto.jwa.default_max_pbkdf2_iterations = tpd.P2C
    envelope.deserialize(path.read_text().strip(), key=jwk.JWK.from_password(TPD_PASSWORD))
    assert len(json.loads(envelope.payload)["content"]) == count + 1
    restored = sqlite_database(tmp_path / "restored")
    provision(restored)
    imported = tpd_call(restored, path, state="imported")
    assert imported.facts["imported"]["content"] == imported.diff["after"]["content"] == count + 1


def test_restore_drill_opens_old_content_in_a_new_cluster(source, tmp_path):
    """The configuration database is lost: a new cluster imports the TPD, and content published
    before opens again; the imported key only decrypts, the new key publishes."""
    path = tmp_path / "c1.tpd"
    tpd_call(source["node"], path)
    gen = _running_node(tmp_path / "restored", sqlite_database(tmp_path / "restored"), source["node"].issuer_dir)
    node = next(gen)
    try:
        client = RmsClient(node.url)
        with pytest.raises(ServiceError) as unknown:
            client.license(source["bob"], source["pl"]["pl"])
        assert unknown.value.status == 403 and "RAC" in unknown.value.detail
        with pytest.raises(RmsdError, match="password opens"):
            admin.ensure_trusted_publishing_domain(cluster="c1", key_password=KEY_PASSWORD, path=str(path),
                                                   password="wrong-password-123", state="imported",
                                                   **node.database.admin_args())
        check = tpd_call(node, path, state="imported", check_mode=True)
        assert check.changed and check.facts["imported"]["keys"] == [source["key_id"]]
        done = tpd_call(node, path, state="imported")
        assert done.changed and tpd_call(node, path, state="imported").changed is False
        info = admin.cluster_info(name="c1", **node.database.admin_args())
        imported = next(k for k in info["cluster_keys"] if k["id"] == source["key_id"])
        assert imported["status"] == "archived" and imported["imported_from"] == "c1"
        assert info["cluster"]["active_key_id"] != source["key_id"]
        # The old RAC (from the imported root key) and the old PL work again, once the node has read the
        # imported trust (it re-reads it on an untrusted RAC, at most once a second).
        def licensed():
            try:
                return client.license(source["bob"], source["pl"]["pl"])
            except ServiceError as refused:
                assert refused.status != 403, refused.detail
                raise

        ul = eventually(licensed)
        _claims, opened = open_use_license(ul["ul"], client.slc()["chain"][0], source["bob"])
        assert decrypt_content(opened, source["blob"]) == b"the design"
        alice = source["alice"]
        assert client.publish(alice, "new", encrypt_content(b"n")[0],
                              {"alice@example.com": ["VIEW"]})["key_id"] == info["cluster"]["active_key_id"]
    finally:
        gen.close()


def test_compromised_keys_travel_public_only_and_stay_revoked(source, tmp_path):
    admin.ensure_cluster_key(cluster="c1", key_password=KEY_PASSWORD, compromised_keys=[source["key_id"]],
                             **source["node"].database.admin_args())
    path = tmp_path / "c1.tpd"
    tpd_call(source["node"], path)
    document = tpd.unseal(path.read_text(), TPD_PASSWORD)
    leaked = next(k for k in document["keys"] if k["id"] == source["key_id"])
    assert leaked["private_key_pem"] is None and leaked["status"] == "compromised"
    target = sqlite_database(tmp_path / "target")
    admin.ensure_cluster(name="c1", key_password=KEY_PASSWORD, intranet_url="https://rms.example.com",
                         **target.admin_args())
    tpd_call(target, path, state="imported")
    statuses = {k["id"]: k["status"] for k in admin.cluster_info(name="c1", **target.admin_args())["cluster_keys"]}
    assert statuses[source["key_id"]] == "compromised"
    assert list(statuses.values()).count("active") == 1


def test_tpd_password_and_paths_are_checked(source, tmp_path):
    with pytest.raises(RmsdError, match="at least 12 characters"):
        admin.ensure_trusted_publishing_domain(cluster="c1", key_password=KEY_PASSWORD, path=str(tmp_path / "x"),
                                               password="short", **source["node"].database.admin_args())
    with pytest.raises(RmsdError, match="absolute path"):
        tpd_call(source["node"], "relative.tpd")
    with pytest.raises(RmsdError, match="does not exist"):
        tpd_call(source["node"], tmp_path / "missing.tpd", state="imported")
    armored = pem.armor("X", b"y")
    assert armored  # asn1crypto is what wraps the keys inside


@pytest.mark.parametrize(("bits", "exponent"), [(1024, 65537), (2048, 3)])
def test_weak_keys_in_a_tpd_are_refused_before_anything_is_imported(source, tmp_path, bits, exponent):
    path = tmp_path / "c1.tpd"
    tpd_call(source["node"], path)
    document = tpd.unseal(path.read_text(), TPD_PASSWORD)
    weak = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    document["keys"].append({
        **document["keys"][0], "id": key_id_of(weak.public_key()), "status": "archived", "size": bits,
        "public_key_pem": public_pem(weak.public_key()),
        "private_key_pem": pem.armor("ENCRYPTED PRIVATE KEY", pkcs8.encrypt(weak, TPD_PASSWORD)).decode(),
    })
    path.write_text(tpd.seal(document, TPD_PASSWORD))
    target = sqlite_database(tmp_path / "target")
    admin.ensure_cluster(name="c1", key_password=KEY_PASSWORD, intranet_url="https://rms.example.com",
                         **target.admin_args())
    before = target.dump()
    for check_mode in (True, False):
        with pytest.raises(RmsdError, match="too weak.*2048 bits or more and public exponent 65537"):
            tpd_call(target, path, state="imported", check_mode=check_mode)
    assert target.dump() == before
