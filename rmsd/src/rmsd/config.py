"""A node's configuration file (TOML, no secrets) and its secret file (TOML, 0600)."""

import os
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from rmsd.errors import RmsdError


@dataclass(frozen=True)
class NodeConfig:
    name: str
    cluster: str
    database_url: str
    listen_address: str
    port: int
    secret_path: str
    identity_issuer: str | None = None
    identity_audience: str = "rmsd"
    identity_jwks_uri: str | None = None
    heartbeat_seconds: int = 10
    # Cluster keys in a PKCS#11 token (key_protection pkcs11): the module and the token's label;
    # the PIN is a secret.
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen_address}:{self.port}"

    def render(self) -> str:
        return tomli_w.dumps({"node": {k: v for k, v in asdict(self).items() if v is not None}})


@dataclass(frozen=True)
class Secrets:
    key_password: str | None = None
    # While the cluster key password changes: the one the keys may still be encrypted with.
    previous_key_password: str | None = None
    database_password: str | None = None
    pkcs11_pin: str | None = None

    @property
    def key_passwords(self) -> list[str]:
        return [p for p in (self.key_password, self.previous_key_password) if p]

    def render(self) -> str:
        return tomli_w.dumps({k: v for k, v in asdict(self).items() if v is not None})


def load_node_config(path: str | Path) -> NodeConfig:
    try:
        data = tomllib.loads(Path(path).read_text())["node"]
        return NodeConfig(**data)
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as err:
        raise RmsdError(f"cannot read node configuration {path}: {err}") from None


def load_secrets(path: str | Path) -> Secrets:
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise RmsdError(f"secret file {path} is mode {mode:o}; it must be readable by its owner only (0600)")
        return Secrets(**tomllib.loads(path.read_text()))
    except (OSError, TypeError, tomllib.TOMLDecodeError) as err:
        raise RmsdError(f"cannot read secret file {path}: {type(err).__name__}") from None


def read_text_or_none(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None


def write_atomic(path: str | Path, text: str, mode: int) -> None:
    """Write `text` to `path` with `mode` from the first byte on (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
