"""Collection-level tests: rmsops.rms modules run through ansible-playbook against real
configuration databases (SQLite files, and a PostgreSQL server started for the session)."""

import os
import secrets
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from ansible_run import Ansible
from pgserver import postgres_server  # noqa: F401  (session fixture)


def _collection_path() -> str:
    """The Makefile exports ANSIBLE_COLLECTIONS_PATH; without it, resolve the collection the same way."""
    if os.environ.get("ANSIBLE_COLLECTIONS_PATH"):
        return os.environ["ANSIBLE_COLLECTIONS_PATH"]
    root = REPO / "build" / "collections"
    link = root / "ansible_collections" / "rmsops" / "rms"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(REPO)
    return str(root)


os.environ["ANSIBLE_COLLECTIONS_PATH"] = _collection_path()


@pytest.fixture
def ansible(tmp_path):
    workdir = tmp_path / "ansible"
    workdir.mkdir()
    return Ansible(workdir)


@pytest.fixture
def key_password():
    # Distinctive, so a leak into any output is unambiguous.
    return "kp-" + secrets.token_hex(12)


@pytest.fixture
def sqlite_cluster(tmp_path, key_password):
    """Parameters of rmsops.rms.cluster for a root cluster in a SQLite file that does not exist yet."""
    db_file = tmp_path / "db" / "config.db"
    return {
        "name": "rms1",
        "database_url": f"sqlite:///{db_file}",
        "key_password": key_password,
        "intranet_url": "http://127.0.0.1:18080",
    }
