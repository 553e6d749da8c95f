"""The `rmsd` command."""

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import signal
import sys
from pathlib import Path

from rmsd import admin, demo_issuer
from rmsd.config import load_node_config, load_secrets, write_atomic_bytes
from rmsd.errors import RmsdError

# The server role installs each node's configuration as BASE/INSTANCE/rmsd.toml (server_config_path).
CONFIG_NAME = "rmsd.toml"
# The page GET /status serves, beside the configuration file unless the configuration names another.
STATUS_PAGE_NAME = "status.html"
DEFAULT_BASE_DIR = "/var/lib/rmsd"
CONFIG_HELP = ("the node's configuration file; default: $RMSD_CONFIG, else the one node's rmsd.toml under "
               f"$RMSD_BASE_DIR/*/ (RMSD_BASE_DIR defaults to {DEFAULT_BASE_DIR}, where the server role installs it)")
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){LABEL}(\.{LABEL})*")


def config_path(given: str | None) -> str:
    """--config, else RMSD_CONFIG, else the only rmsd.toml of an instance under the base folder."""
    if given:
        return given
    if os.environ.get("RMSD_CONFIG"):
        return os.environ["RMSD_CONFIG"]
    base = Path(os.environ.get("RMSD_BASE_DIR") or DEFAULT_BASE_DIR)
    found = sorted(str(path) for path in base.glob(f"*/{CONFIG_NAME}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise RmsdError(f"no node configuration found (no {base}/*/{CONFIG_NAME}); give --config PATH or set "
                        "RMSD_CONFIG")
    raise RmsdError(f"{len(found)} nodes are configured on this machine ({', '.join(found)}); give --config with "
                    "one of them")


def _serve(args) -> int:
    from rmsd.service import serve

    path = config_path(args.config)
    config = load_node_config(path)
    if not config.status_page:
        config = dataclasses.replace(config, status_page=str(Path(path).resolve().parent / STATUS_PAGE_NAME))
    serve(config)
    return 0


def _status_page(args) -> int:
    from rmsd.status_page import render_file

    written = render_file(args.state, args.output)
    print(f"rmsd: {'wrote' if written else 'unchanged (same state)'} {args.output}", file=sys.stderr)
    return 0


def _status(args) -> int:
    config = load_node_config(config_path(args.config))
    secrets = load_secrets(config.secret_path)
    info = admin.cluster_info(
        name=config.cluster, database_url=config.database_url, database_password=secrets.database_password
    )
    print(json.dumps({"node": config.name, "url": config.url, **info}, indent=2))
    return 0 if info["exists"] else 1


def _cluster_info(args) -> int:
    info = admin.cluster_info(name=args.name, database_url=args.database_url,
                              database_password=os.environ.get("RMSD_DATABASE_PASSWORD"))
    print(json.dumps(info, indent=2))
    return 0 if info["exists"] else 1


def _migrate(args) -> int:
    print(json.dumps(admin.migrate_schema(database_url=args.database_url,
                                          database_password=os.environ.get("RMSD_DATABASE_PASSWORD"),
                                          check_mode=args.check)))
    return 0


def _check_roundtrip(args) -> int:
    import httpx

    from rmsd.client import ServiceError
    from rmsd.smoke import roundtrip

    token = os.environ.get("RMSD_BEARER_TOKEN", "").strip()
    if not token:
        raise RmsdError("set RMSD_BEARER_TOKEN to a bearer token of a user allowed to publish (never on the command "
                        "line, where other users of the host read it)")
    try:
        print(json.dumps(roundtrip(args.url, token, args.ca)))
    except ServiceError as err:
        raise RmsdError(f"the round trip through {args.url} failed: HTTP {err.status} {err.detail}") from None
    except httpx.HTTPError as err:  # refused, reset, timed out, TLS not verified
        raise RmsdError(f"the round trip through {args.url} failed: {type(err).__name__}: {err}") from None
    return 0


def _issuer_init(args) -> int:
    created = demo_issuer.init(Path(args.dir))
    print(json.dumps({"changed": created, "issuer": demo_issuer.ISSUER, "audience": demo_issuer.AUDIENCE,
                      "jwks_uri": demo_issuer.jwks_uri(Path(args.dir))}))
    return 0


def _issuer_token(args) -> int:
    groups = [g for g in (args.groups or "").split(",") if g]
    print(demo_issuer.token(Path(args.dir), args.sub, groups, ttl=args.ttl))
    return 0


def _tls_key(path: Path, key_type: str):
    """The private key at `path`, created (0600 from the first byte) when there is none. Returns (key, created)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    for _attempt in range(2):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1()) if key_type == "ec" else rsa.generate_private_key(65537, 2048)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            # No clobbering: when another run created the key meanwhile, that one is used.
            if write_atomic_bytes(path, pem, 0o600, replace=False):
                return key, True
            continue
        except OSError as err:
            raise RmsdError(f"cannot read the key file {path}: {err.strerror}") from None
        try:
            loaded = serialization.load_pem_private_key(data, password=None)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            raise RmsdError(f"{path} exists but holds no unencrypted PEM private key; move it away or give another "
                            "--key path") from None
        if not (isinstance(loaded, ec.EllipticCurvePrivateKey)
                or (isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size >= 2048)):
            raise RmsdError(f"the key in {path} is neither an EC nor an RSA (2048 bits or more) key; move it away "
                            "or give another --key path")
        return loaded, False
    raise RmsdError(f"the key file {path} appeared and vanished while it was created; run again")


def _tls_request(args) -> int:
    """Print a CSR for the node's TLS key (created if missing). The key never leaves its file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    try:
        address = ipaddress.ip_address(args.address)
    except ValueError:
        raise RmsdError(f"--address {args.address!r} is not an IP address (the node's listen_address)") from None
    names = list(dict.fromkeys(n.lower().rstrip(".") for n in args.dns or []))
    for name in names:
        if not DNS_NAME.fullmatch(name):
            raise RmsdError(f"--dns {name!r} is not a DNS name (letters, digits and '-', labels separated by '.')")
    path = Path(args.key)
    if not path.is_absolute():
        raise RmsdError(f"--key must be an absolute path, not {args.key!r}")
    key, created = _tls_key(path, args.key_type)
    common_name = names[0] if names else str(address)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(address), *(x509.DNSName(n) for n in names)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    sys.stdout.write(csr.public_bytes(serialization.Encoding.PEM).decode())
    # Said on stderr, so stdout is the request only; a role can tell a new key from a reused one.
    print(f"rmsd: {'created' if created else 'reused'} the private key {path}", file=sys.stderr)
    return 0


def _roundtrip(args) -> int:
    from rmsd.demo import roundtrip

    return roundtrip(args.url, Path(args.issuer_dir))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmsd", description="RMS node software")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service of one node")
    s.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    s.set_defaults(func=_serve)

    s = sub.add_parser("status", help="the node's cluster, keys and nodes as JSON")
    s.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    s.set_defaults(func=_status)

    s = sub.add_parser("cluster-info", help="a cluster's state as JSON (database password: RMSD_DATABASE_PASSWORD)")
    s.add_argument("--database-url", required=True, metavar="URL",
                   help="the cluster's configuration database (SQLAlchemy URL, e.g. sqlite:////var/lib/rmsd/c1.db "
                   "or postgresql+psycopg://rms@db.example.com/rms); the password comes from RMSD_DATABASE_PASSWORD")
    s.add_argument("--name", required=True, help="the cluster's name")
    s.set_defaults(func=_cluster_info)

    s = sub.add_parser(
        "migrate", help="bring a configuration database's schema to this rmsd's revision (once, under a lock)",
        description="Migrate the schema of a configuration database to the revision this rmsd works on, in one "
        "transaction under a lock, and print the revisions before and after as JSON. Migrations only add, so nodes "
        "of the release before keep working on the migrated schema; a node of this release refuses to start "
        "before it. A newer schema is left as it is when this rmsd can work on it, and refused otherwise. The "
        "password comes from RMSD_DATABASE_PASSWORD.",
    )
    s.add_argument("--database-url", required=True, metavar="URL", help="the configuration database (SQLAlchemy URL)")
    s.add_argument("--check", action="store_true", help="report what would change; change nothing")
    s.set_defaults(func=_migrate)

    s = sub.add_parser(
        "status-page", help="render a fleet-state JSON file as the HTML status page GET /status serves",
        description="Render the fleet-state document playbooks/fleet_state.yml writes (rms_fleet_state_path) as one "
        "self-contained HTML page (no script, nothing fetched). The output is replaced atomically (0644) unless "
        f"it already shows the same state. A node serves the {STATUS_PAGE_NAME} beside its configuration file.",
    )
    s.add_argument("--state", required=True, metavar="PATH", help="the fleet-state JSON file")
    s.add_argument("--output", required=True, metavar="PATH",
                   help=f"the HTML file to write, e.g. /var/lib/rmsd/NODE/{STATUS_PAGE_NAME}")
    s.set_defaults(func=_status_page)

    issuer = sub.add_parser("demo-issuer", help="a local JWT issuer for the demo and tests").add_subparsers(
        dest="issuer_command", required=True
    )
    s = issuer.add_parser("init", help="create the issuer's signing key and jwks.json (once)")
    s.add_argument("--dir", required=True, help="the issuer's folder (created if missing)")
    s.set_defaults(func=_issuer_init)
    s = issuer.add_parser("token", help="print a bearer token")
    s.add_argument("--dir", required=True, help="the issuer's folder, made by demo-issuer init")
    s.add_argument("--sub", required=True, help="the token's subject, e.g. alice@example.com")
    s.add_argument("--groups", metavar="G1,G2", help="comma-separated groups the subject is a member of")
    s.add_argument("--ttl", type=int, default=300, metavar="SECONDS", help="lifetime of the token (default: 300)")
    s.set_defaults(func=_issuer_token)

    s = sub.add_parser(
        "tls-request",
        help="print a PEM certificate request (CSR) for this node's TLS key; the key is created (0600) if missing",
        description="Print to stdout a PEM certificate signing request for the node's TLS private key, with "
        "subjectAltName IP:ADDRESS and DNS:NAME for every --dns. The key at --key is created (EC P-256 or RSA "
        "2048, mode 0600) when there is none and reused otherwise; it is never printed.",
    )
    s.add_argument("--key", required=True, help="absolute path of the private key (PEM)")
    s.add_argument("--address", required=True, help="the node's IP address (its listen_address)")
    s.add_argument("--dns", action="append", metavar="NAME", help="a DNS name of the node; the first is the CN")
    s.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                   help="type of a new key: ec (P-256, default) or rsa (2048 bits); an existing key is kept")
    s.set_defaults(func=_tls_request)

    s = sub.add_parser(
        "check-roundtrip", help="a real RAC -> PL -> UL round trip through one node, with RMSD_BEARER_TOKEN's user",
        description="Get a RAC for the user of the bearer token in RMSD_BEARER_TOKEN, publish a small document as its "
        "owner, get a use license for it and open it: through the node at --url alone. Prints the node, its version, "
        "the cluster and the content id as JSON; fails (exit 2) saying what failed.",
    )
    s.add_argument("--url", required=True, help="the node's base URL (not its balancer's)")
    s.add_argument("--ca", metavar="FILE", help="the CA certificate that issued the node's TLS certificate")
    s.set_defaults(func=_check_roundtrip)

    s = sub.add_parser("demo-roundtrip", help="RAC -> PL -> UL over HTTP, then open the content")
    s.add_argument("--url", required=True, help="the node's (or its balancer's) base URL")
    s.add_argument("--issuer-dir", required=True, metavar="DIR", help="the folder of the demo issuer the node trusts")
    s.set_defaults(func=_roundtrip)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled, rather than at exit
        return code
    except RmsdError as err:
        print(f"rmsd: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`rmsd cluster-info | head`): nothing more to say, and no traceback. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again; exit as SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
