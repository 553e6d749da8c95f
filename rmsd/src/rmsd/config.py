"""A node's configuration file (TOML, no secrets), its secret file (TOML, 0600) and its TLS files."""

import ipaddress
import os
import socket
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from rmsd.errors import RmsdError

# The limits a node's configuration may set, each with the smallest and largest value it accepts.
HTTP_LIMITS = {
    "max_body_bytes": (1024, 16 * 1024 * 1024),
    "max_header_bytes": (1024, 1024 * 1024),
    "keep_alive_seconds": (1, 600),
    "read_timeout_seconds": (1, 600),
    "retry_after_seconds": (1, 3600),
    "max_connections": (16, 100_000),
}


def check_http_limits(given: dict | None) -> dict:
    """The HTTP limits a node is configured with: known names, whole numbers in range (RmsdError otherwise).
    A limit left out or null keeps its default."""
    chosen = {}
    for name, value in (given or {}).items():
        if name not in HTTP_LIMITS:
            raise RmsdError(f"unknown HTTP limit {name!r}; the limits are {', '.join(HTTP_LIMITS)}")
        if value is None:
            continue
        low, high = HTTP_LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RmsdError(f"HTTP limit {name} must be a whole number from {low} to {high}, not {value!r}")
        chosen[name] = value
    return chosen


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
    # Seconds the issuer's JWKS, once read, is used before it is read again (default 300): a key the issuer
    # drops stops verifying within that time.
    identity_jwks_ttl_seconds: int | None = None
    heartbeat_seconds: int = 10
    # Cluster keys in a PKCS#11 token (key_protection pkcs11): the module and the token's label;
    # the PIN is a secret.
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None
    # HTTPS: absolute paths of the node's PEM certificate (chain, leaf first) and its PEM private key.
    # The paths only; the key stays in its own file.
    tls_certificate: str | None = None
    tls_key: str | None = None
    # HTTP limits (unset: rmsd.limits' defaults; unset fields stay out of the rendered file).
    # Largest request body in bytes (default 64 KiB); more is answered 413 before it is read or parsed.
    max_body_bytes: int | None = None
    # Largest request line plus headers in bytes (default 16 KiB); more closes the connection (uvicorn h11).
    max_header_bytes: int | None = None
    # Seconds an idle keep-alive connection stays open (default 5).
    keep_alive_seconds: int | None = None
    # Retry-After, in seconds, on a 503 while the configuration database is unavailable (default 5).
    retry_after_seconds: int | None = None
    # Seconds a client has to complete the TLS handshake, to send a request's line and headers, then again its
    # body, and to take a response it is sent (default 10); a client slower than that is disconnected (408 for a
    # body).
    read_timeout_seconds: int | None = None
    # Connections one worker holds at once (default 1000). A new one beyond it takes the place of the oldest
    # connection waiting for a request, or is answered 503 when every connection is busy.
    max_connections: int | None = None
    # Worker processes serving the node's port (unset: one per core of the host). Each opens its own
    # database connections and its own PKCS#11 session.
    workers: int | None = None
    # The deployment's status page the node serves at GET /status (absolute path; it only reads it). Unset:
    # status.html beside the configuration file (rmsd serve fills it in).
    status_page: str | None = None
    # This node's identity, made once when its configuration is first written and kept by every rewrite: GET
    # /health says it, so whoever checks the node knows it reached this node and not another process on the port.
    instance_id: str | None = None
    # Addresses or networks of the proxies (its load balancer) whose X-Forwarded-For names the client; unset:
    # the client is the peer. Per-address limits (enrollment) count the client.
    trusted_proxies: list[str] | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_certificate and self.tls_key)

    @property
    def url(self) -> str:
        return node_url(self.listen_address, self.port, self.tls)

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


def check_trusted_proxies(given, resolve=socket.getaddrinfo) -> list[str] | None:
    """The node's trusted proxies as addresses and networks (a host name becomes the addresses it resolves to
    here), sorted; None for none. RmsdError for anything else."""
    found: set[str] = set()
    for value in given or []:
        if not isinstance(value, str) or not value.strip() or value.strip() == "*":
            raise RmsdError(f"trusted_proxies: {value!r} is not an address, network or host name of a proxy; name "
                            "each load balancer in front of the node (trusting every address would let any client "
                            "choose the address it is counted as)")
        value = value.strip()
        try:
            if "/" in value:
                found.add(str(ipaddress.ip_network(value, strict=False)))
            else:
                found.add(str(ipaddress.ip_address(value.strip("[]"))))
            continue
        except ValueError:
            if "/" in value:
                raise RmsdError(f"trusted_proxies: {value!r} is not a network (ADDRESS/PREFIX)") from None
        try:
            found.update(str(ipaddress.ip_address(info[4][0])) for info in resolve(value, None, 0, socket.SOCK_STREAM))
        except (OSError, UnicodeError, ValueError):
            raise RmsdError(f"trusted_proxies: host name {value!r} does not resolve here; give the proxy's address "
                            "instead") from None
    return sorted(found) or None


MAX_WORKERS = 256


def check_workers(workers) -> int | None:
    """The worker count a node is configured with: None (one per core) or a whole number from 1."""
    if workers is None or workers == 0:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise RmsdError(f"workers must be a whole number from 1 to {MAX_WORKERS} (0 or unset: one per core), "
                        f"not {workers!r}")
    return workers


def worker_count(config: NodeConfig) -> int:
    return config.workers or os.cpu_count() or 1


def node_url(listen_address: str, port: int, tls: bool) -> str:
    host = f"[{listen_address}]" if ":" in listen_address else listen_address  # IPv6
    return f"{'https' if tls else 'http'}://{host}:{port}"


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
    write_atomic_bytes(path, text.encode(), mode, folder_mode=0o750)


def write_atomic_bytes(
    path: str | Path, data: bytes, mode: int, replace: bool = True, folder_mode: int = 0o700,
) -> bool:
    """Write `data` to `path` with `mode` from the first byte on (temp file + rename). With replace=False
    an existing file is kept (hard link instead of rename, so two concurrent writers cannot both win):
    returns whether `path` now holds `data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=folder_mode)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


# --- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A node's certificate chain and the public half of its key, read and checked."""

    certificate: x509.Certificate  # the leaf
    chain_length: int

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


def check_tls_paths(tls_certificate: str | None, tls_key: str | None) -> None:
    """Both or neither, absolute paths (the service may run in another working directory)."""
    if bool(tls_certificate) != bool(tls_key):
        raise RmsdError("tls_certificate and tls_key go together: give both (HTTPS) or neither (HTTP)")
    for what, path in (("tls_certificate", tls_certificate), ("tls_key", tls_key)):
        if path and not os.path.isabs(path):
            raise RmsdError(f"{what} must be an absolute path, not {path!r}")


def load_tls_files(tls_certificate: str, tls_key: str) -> TlsFiles:
    """Read the certificate chain and the private key and check that the key belongs to the certificate.
    Messages name the files, never their content."""
    try:
        chain = x509.load_pem_x509_certificates(Path(tls_certificate).read_bytes())
    except OSError as err:
        raise RmsdError(f"cannot read tls_certificate {tls_certificate}: {err.strerror}; give the path of the "
                        "node's PEM certificate, readable by the user rmsd runs as") from None
    except ValueError:
        raise RmsdError(f"tls_certificate {tls_certificate} holds no PEM certificate; give the node's certificate "
                        "(PEM, leaf first, then any intermediate CA certificates)") from None
    try:
        key_bytes = Path(tls_key).read_bytes()
    except OSError as err:
        raise RmsdError(f"cannot read tls_key {tls_key}: {err.strerror}; give the path of the node's PEM private "
                        "key, readable by the user rmsd runs as") from None
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError:
        raise RmsdError(f"tls_key {tls_key} is encrypted; rmsd needs an unencrypted PEM key, protected by its file "
                        "mode (0600 or 0640 for the service's group)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise RmsdError(f"tls_key {tls_key} holds no PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise RmsdError(
            f"tls_key {tls_key} does not belong to the certificate in {tls_certificate} (their public keys differ); "
            "give the key the certificate was issued for, or a certificate issued for this key"
        )
    return TlsFiles(chain[0], len(chain))


def check_tls_validity(files: TlsFiles, tls_certificate: str, now: datetime) -> None:
    if not files.not_before <= now <= files.not_after:
        raise RmsdError(
            f"the certificate in tls_certificate {tls_certificate} is not valid now: valid from "
            f"{files.not_before:%Y-%m-%d %H:%M} until {files.not_after:%Y-%m-%d %H:%M} UTC; renew it (rmsd tls-request "
            "makes a request for the node's key) and run again"
        )
