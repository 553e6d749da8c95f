"""Every recorded release beside this tree, on one configuration database (SQLite and PostgreSQL): the release's
nodes keep working once this tree's rmsd has migrated the schema (alone, and beside a node of the tree), and the
tree's node refuses a schema the release left, naming both revisions, until it is migrated.

The release is what an operator has installed: its rmsd from the commit changelogs/releases.yml records (git
archive, scripts/release_source.py), built into a wheelhouse by roles/server/files/wheelhouse.py and installed
into its own virtualenv by install_wheelhouse.py, as the server role does on a host."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import release_source

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "roles" / "server" / "files"
TREE_RMSD = Path(sys.executable).with_name("rmsd")
KEY_PASSWORD = "Key-Pass-upgrade-3c1f9e7a2b"
BUILD_TIMEOUT = 300


def _host_target() -> list[str]:
    import platform

    return ["--python-version", "{}.{}".format(*sys.version_info[:2]), "--machine", platform.machine(),
            "--glibc", platform.libc_ver()[1]]


@pytest.fixture(scope="module", params=release_source.releases(), ids=lambda release: release["version"])
def release(request, tmp_path_factory) -> dict:
    """{version, rmsd, python}: the release's rmsd installed from its wheelhouse into a virtualenv of its own."""
    release = request.param
    work = tmp_path_factory.mktemp(f"release-{release['version']}")
    source = release_source.extract(release, work / "source")
    cache = REPO / "build" / "release-wheelhouses"
    built = subprocess.run(
        [sys.executable, str(FILES / "wheelhouse.py"), "--source", str(source / "rmsd"), "--constraints",
         str(source / "constraints.txt"), "--lock", str(source / "requirements" / "rmsd-wheelhouse.lock"),
         "--cache-dir", str(cache), *_host_target()],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    assert built.returncode == 0, built.stderr
    wheelhouse = json.loads(built.stdout)
    assert wheelhouse["rmsd_version"] == release["version"]
    venv = work / "venv"
    installed = subprocess.run(
        [sys.executable, str(FILES / "install_wheelhouse.py"), "--archive", wheelhouse["path"], "--venv", str(venv),
         "--stamp", str(work / "stamp"), "--fingerprint", wheelhouse["sha256"]],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    assert installed.returncode == 0, installed.stderr
    return {**release, "rmsd": venv / "bin" / "rmsd", "python": venv / "bin" / "python"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> dict:
    if request.param == "sqlite":
        return {"database_url": f"sqlite:///{tmp_path / 'db' / 'config.db'}", "database_password": None}
    server = request.getfixturevalue("postgres_server")
    return {"database_url": server.create_database(f"u{os.urandom(6).hex()}"), "database_password": server.password}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, database=None, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, RMSD_DATABASE_PASSWORD=(database or {}).get("database_password") or "")
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, env=env,
                          check=False, **kwargs)


PROVISION = """
import json, sys
from pathlib import Path
from rmsd import admin, demo_issuer
a = json.loads(sys.argv[1])
db = {"database_url": a["database_url"], "database_password": a["database_password"]}
if a["cluster"]:
    admin.ensure_cluster(name="c1", key_password=a["key_password"], intranet_url="https://rms.example.com", **db)
admin.ensure_server(cluster="c1", name=a["name"], key_password=a["key_password"], port=a["port"],
                    config_path=a["config"], secret_path=a["secret"], identity_issuer=demo_issuer.ISSUER,
                    identity_audience=demo_issuer.AUDIENCE, identity_jwks_uri=demo_issuer.jwks_uri(Path(a["issuer"])),
                    **db)
"""


def configure(python, database, directory: Path, issuer: Path, name: str, cluster: bool) -> Path:
    """A node's configuration, made by the admin API of the rmsd that `python` runs (and the cluster with it)."""
    config = directory / f"{name}.toml"
    args = {**database, "key_password": KEY_PASSWORD, "name": name, "port": free_port(), "config": str(config),
            "secret": str(directory / f"{name}.secret"), "issuer": str(issuer), "cluster": cluster}
    made = run([python, "-c", PROVISION, json.dumps(args)])
    assert made.returncode == 0, made.stderr
    return config


class Serving:
    def __init__(self, rmsd: Path, config: Path, log: Path):
        import tomllib

        node = tomllib.loads(config.read_text())["node"]
        self.url = f"http://{node['listen_address']}:{node['port']}"
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([str(rmsd), "serve", "--config", str(config)], stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def health(self, timeout: float = 60.0) -> dict | None:
        """Its /health once it answers; None when the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return None
            try:
                answer = httpx.get(f"{self.url}/health", timeout=2.0)
                if answer.status_code == 200:
                    return answer.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.url} neither answered nor exited:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def roundtrip(rmsd: Path, url: str, issuer: Path) -> None:
    """RAC -> PL -> UL through one node, and the content opened, by the client of the given rmsd."""
    done = run([rmsd, "demo-roundtrip", "--url", url, "--issuer-dir", issuer])
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"


def migrate(database) -> dict:
    done = run([TREE_RMSD, "migrate", "--database-url", database["database_url"]], database)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def tree_revision() -> str:
    from rmsd import db

    return db.HEAD_REVISION


def test_the_releases_nodes_keep_serving_once_the_tree_migrated_the_schema(release, database, tmp_path):
    issuer = tmp_path / "issuer"
    assert run([release["rmsd"], "demo-issuer", "init", "--dir", issuer]).returncode == 0
    old_config = configure(release["python"], database, tmp_path, issuer, "old", cluster=True)
    old = Serving(release["rmsd"], old_config, tmp_path / "old.log")
    nodes = [old]
    try:
        before = old.health()
        assert before is not None and before["version"] == release["version"], old.log.read_text()
        roundtrip(release["rmsd"], old.url, issuer)

        migrated = migrate(database)
        assert migrated["changed"] and migrated["revision"] == tree_revision()
        print(f"{release['version']} on {database['database_url'].split(':')[0]}: schema "
              f"{migrated['revision_before']} -> {migrated['revision']}")
        roundtrip(release["rmsd"], old.url, issuer)  # the running node, on the migrated schema

        # A node of the tree beside it (a rollout half done), then the release's node restarted.
        new_config = configure(sys.executable, database, tmp_path, issuer, "new", cluster=False)
        new = Serving(TREE_RMSD, new_config, tmp_path / "new.log")
        nodes.append(new)
        assert (new.health() or {}).get("schema_revision") == tree_revision(), new.log.read_text()
        roundtrip(TREE_RMSD, new.url, issuer)
        roundtrip(release["rmsd"], old.url, issuer)
        old.stop()
        old = Serving(release["rmsd"], old_config, tmp_path / "old-again.log")
        nodes.append(old)
        assert old.health() is not None, old.log.read_text()
        roundtrip(release["rmsd"], old.url, issuer)
    finally:
        for node in nodes:
            node.stop()


def test_the_trees_node_refuses_the_releases_schema_until_it_is_migrated(release, database, tmp_path):
    issuer = tmp_path / "issuer"
    assert run([release["rmsd"], "demo-issuer", "init", "--dir", issuer]).returncode == 0
    config = configure(release["python"], database, tmp_path, issuer, "n1", cluster=True)
    refused = Serving(TREE_RMSD, config, tmp_path / "refused.log")
    try:
        assert refused.health() is None
    finally:
        refused.stop()
    from rmsd import __version__

    log = refused.log.read_text()
    old_revision = migrate_check(database)["revision_before"]
    assert (f"schema is at revision {old_revision}, older than revision {tree_revision()}, which this rmsd "
            f"{__version__} works on") in log, log
    assert migrate(database)["changed"]
    node = Serving(TREE_RMSD, config, tmp_path / "serve.log")
    try:
        assert node.health() is not None, node.log.read_text()
        roundtrip(TREE_RMSD, node.url, issuer)
    finally:
        node.stop()


def migrate_check(database) -> dict:
    done = run([TREE_RMSD, "migrate", "--check", "--database-url", database["database_url"]], database)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
