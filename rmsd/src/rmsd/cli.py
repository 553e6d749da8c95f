"""The `rmsd` command."""

import argparse
import json
import os
import sys
from pathlib import Path

from rmsd import admin, demo_issuer
from rmsd.config import load_node_config, load_secrets
from rmsd.errors import RmsdError


def _serve(args) -> int:
    from rmsd.service import serve

    serve(load_node_config(args.config))
    return 0


def _status(args) -> int:
    config = load_node_config(args.config)
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


def _issuer_init(args) -> int:
    created = demo_issuer.init(Path(args.dir))
    print(json.dumps({"changed": created, "issuer": demo_issuer.ISSUER, "audience": demo_issuer.AUDIENCE,
                      "jwks_uri": demo_issuer.jwks_uri(Path(args.dir))}))
    return 0


def _issuer_token(args) -> int:
    groups = [g for g in (args.groups or "").split(",") if g]
    print(demo_issuer.token(Path(args.dir), args.sub, groups, ttl=args.ttl))
    return 0


def _roundtrip(args) -> int:
    from rmsd.demo import roundtrip

    return roundtrip(args.url, Path(args.issuer_dir))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmsd", description="RMS node software")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP service of one node")
    s.add_argument("--config", required=True)
    s.set_defaults(func=_serve)

    s = sub.add_parser("status", help="the node's cluster, keys and nodes as JSON")
    s.add_argument("--config", required=True)
    s.set_defaults(func=_status)

    s = sub.add_parser("cluster-info", help="a cluster's state as JSON (database password: RMSD_DATABASE_PASSWORD)")
    s.add_argument("--database-url", required=True)
    s.add_argument("--name", required=True)
    s.set_defaults(func=_cluster_info)

    issuer = sub.add_parser("demo-issuer", help="a local JWT issuer for the demo and tests").add_subparsers(
        dest="issuer_command", required=True
    )
    s = issuer.add_parser("init", help="create the issuer's signing key and jwks.json (once)")
    s.add_argument("--dir", required=True)
    s.set_defaults(func=_issuer_init)
    s = issuer.add_parser("token", help="print a bearer token")
    s.add_argument("--dir", required=True)
    s.add_argument("--sub", required=True)
    s.add_argument("--groups")
    s.add_argument("--ttl", type=int, default=300)
    s.set_defaults(func=_issuer_token)

    s = sub.add_parser("demo-roundtrip", help="RAC -> PL -> UL over HTTP, then open the content")
    s.add_argument("--url", required=True)
    s.add_argument("--issuer-dir", required=True)
    s.set_defaults(func=_roundtrip)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except RmsdError as err:
        print(f"rmsd: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
