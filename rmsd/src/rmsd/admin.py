"""The admin API: idempotent `ensure_*` calls with check mode and a metadata-only diff.
This is what the Ansible collection calls; it never returns key material or secrets."""

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import sqlalchemy as sa

from rmsd import clusters, db, pki
from rmsd.config import NodeConfig, Secrets, read_text_or_none, write_atomic
from rmsd.errors import RmsdError
from rmsd.keys import KEY_SIZES, provider_for
from rmsd.schema import utcnow

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("root",)
PROTECTIONS = ("password",)
HEARTBEAT_STALE_AFTER = 3  # heartbeats missed before a node counts as down


@dataclass
class Result:
    changed: bool
    diff: dict = field(default_factory=lambda: {"before": {}, "after": {}})
    facts: dict = field(default_factory=dict)


def _check_name(what: str, value: str) -> None:
    if not value or not NAME.match(value):
        raise RmsdError(f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'")


def _check_url(what: str, value: str | None, required: bool) -> None:
    if not value:
        if required:
            raise RmsdError(f"{what} is required: the URL clients reach the cluster at, e.g. https://rms.example.com")
        return
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RmsdError(f"{what} {value!r} is not an http(s) URL")


def _engine(database_url: str, database_password: str | None) -> sa.Engine:
    return db.make_engine(database_url, database_password)


def _read(engine: sa.Engine, database_url: str, fn):
    """Run `fn(conn)` read-only; None when the database does not exist yet or has no schema."""
    if not db.database_exists(engine):
        return None
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("clusters"):
                return None
            return fn(conn)
    except sa.exc.OperationalError as err:
        raise db.connect_error(err, database_url) from None


def _cluster_view(conn, row) -> dict:
    key = clusters.active_key_row(conn, row.id)
    slc = clusters.current_slc_row(conn, row.id, key.id)
    return {
        "name": row.name,
        "role": row.role,
        "state": row.state,
        "intranet_url": row.intranet_url,
        "extranet_url": row.extranet_url,
        "key_protection": row.key_protection,
        "key_size": row.key_size,
        "active_key_id": key.id,
        "slc_fingerprint_sha256": slc.fingerprint_sha256 if slc else None,
        "slc_not_after": slc.not_after.isoformat() if slc else None,
    }


def _open_active_key(conn, row, key_password: str | None):
    """Prove the key password opens the active key (RmsdError otherwise)."""
    provider = provider_for(row.key_protection, key_password=key_password)
    try:
        return provider.load(clusters.active_key_row(conn, row.id))
    except RmsdError as err:
        raise RmsdError(f"{err}. Nothing was changed.") from None


def ensure_cluster(
    *, name, database_url, database_password=None, role="root", key_protection="password", key_password=None,
    key_size=2048, intranet_url=None, extranet_url=None, state="present", force=False, check_mode=False,
) -> Result:
    _check_name("cluster name", name)
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    engine = _engine(database_url, database_password)
    try:
        if state == "absent":
            return _cluster_absent(engine, database_url, name, force, check_mode)
        if role not in ROLES:
            raise RmsdError(f"role {role!r} is not supported; use one of {', '.join(ROLES)}")
        if key_protection not in PROTECTIONS:
            raise RmsdError(f"key_protection {key_protection!r} is not supported; use one of {', '.join(PROTECTIONS)}")
        if key_size not in KEY_SIZES:
            raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {key_size}")
        _check_url("intranet_url", intranet_url, required=True)
        _check_url("extranet_url", extranet_url, required=False)
        provider = provider_for(key_protection, key_password=key_password)
        wanted = {
            "name": name, "role": role, "state": "provisioned", "intranet_url": intranet_url,
            "extranet_url": extranet_url, "key_protection": key_protection, "key_size": key_size,
        }
        existing = _read(engine, database_url, lambda conn: _existing_cluster(conn, name, key_password))
        if existing is None:
            return _provision(engine, database_url, wanted, provider, check_mode)
        return _update_cluster(engine, database_url, existing, wanted, key_password, check_mode)
    finally:
        engine.dispose()


def _existing_cluster(conn, name, key_password):
    row = clusters.get_cluster(conn, name)
    if row is None:
        other = clusters.other_cluster(conn, name)
        if other is not None:
            raise RmsdError(
                f"this configuration database already holds cluster {other.name!r}; every cluster has its own "
                f"configuration database: give cluster {name!r} another database_url"
            )
        return None
    _open_active_key(conn, row, key_password)
    return _cluster_view(conn, row)


def _provision(engine, database_url, wanted, provider, check_mode) -> Result:
    after = dict(wanted, active_key_id="(new key)")
    result = Result(changed=True, diff={"before": {}, "after": after}, facts={"cluster": after})
    if check_mode:
        return result
    # Generate before taking the lock: key generation is the slow part.
    new_key = provider.generate(wanted["key_size"])
    now = utcnow()
    db.prepare_sqlite_file(engine)
    try:
        # One transaction: schema, cluster, key and SLC appear together or not at all.
        with engine.begin() as conn:
            db.lock(conn, wanted["name"])
            db.migrate(conn)
            row = clusters.get_cluster(conn, wanted["name"])
            if row is not None:
                # Provisioned concurrently by another run: converge on what is there.
                return Result(changed=False, facts={"cluster": _cluster_view(conn, row)})
            if clusters.other_cluster(conn, wanted["name"]) is not None:
                raise RmsdError("this configuration database already holds another cluster")
            clusters.provision_root(
                conn, name=wanted["name"], intranet_url=wanted["intranet_url"],
                extranet_url=wanted["extranet_url"], provider=provider, new_key=new_key, now=now,
            )
            view = _cluster_view(conn, clusters.get_cluster(conn, wanted["name"]))
    except sa.exc.OperationalError as err:
        raise db.connect_error(err, database_url) from None
    result.diff["after"] = view
    result.facts["cluster"] = view
    return result


IMMUTABLE = {
    "role": "a cluster's role cannot change; provision a new cluster with the role you want and move servers to it",
    "key_protection": "key protection cannot change in place; it applies when a new cluster key is generated "
    "(key rollover) or to a newly provisioned cluster",
    "key_size": "the size of the existing cluster key cannot change; key_size applies when a new cluster key is "
    "generated (key rollover). Set key_size to the current value to keep this cluster as it is",
}


def _update_cluster(engine, database_url, current, wanted, key_password, check_mode) -> Result:
    for option, how in IMMUTABLE.items():
        if current[option] != wanted[option]:
            raise RmsdError(
                f"cluster {current['name']!r} has {option}={current[option]!r}, asked for {wanted[option]!r}: {how}. "
                "Nothing was changed."
            )
    changes = {k: wanted[k] for k in ("intranet_url", "extranet_url") if current[k] != wanted[k]}
    if not changes:
        return Result(changed=False, facts={"cluster": current})
    before = {k: current[k] for k in changes}
    after = dict(current, **changes)
    if not check_mode:
        try:
            with engine.begin() as conn:
                db.lock(conn, current["name"])
                row = clusters.get_cluster(conn, current["name"])
                _open_active_key(conn, row, key_password)
                clusters.update_cluster(conn, row.id, utcnow(), **changes)
        except sa.exc.OperationalError as err:
            raise db.connect_error(err, database_url) from None
    return Result(changed=True, diff={"before": before, "after": changes}, facts={"cluster": after})


def _cluster_absent(engine, database_url, name, force, check_mode) -> Result:
    def current(conn):
        row = clusters.get_cluster(conn, name)
        if row is None:
            return None
        return _cluster_view(conn, row), sum(clusters.content_counts(conn, row.id).values())

    found = _read(engine, database_url, current)
    if found is None:
        return Result(changed=False, facts={"cluster": {}})
    view, content_count = found
    if content_count and not force:
        raise RmsdError(
            f"cluster {name!r} protects {content_count} content item(s); removing it destroys the keys they need. "
            "Export a trusted publishing domain first, then set force=true to unprovision. Nothing was changed."
        )
    if not check_mode:
        with engine.begin() as conn:
            db.lock(conn, name)
            row = clusters.get_cluster(conn, name)
            if row is not None:
                clusters.delete_cluster(conn, row.id)
    return Result(changed=True, diff={"before": view, "after": {}}, facts={"cluster": {}})


# --- servers -------------------------------------------------------------------------------------


def ensure_server(
    *, cluster, name, database_url, database_password=None, key_password=None, listen_address="127.0.0.1",
    port=8080, config_path, secret_path, identity_issuer=None, identity_audience="rmsd",
    identity_jwks_uri=None, state="present", check_mode=False,
) -> Result:
    _check_name("cluster", cluster)
    _check_name("server name", name)
    for what, path in (("config_path", config_path), ("secret_path", secret_path)):
        if not path or not os.path.isabs(path):
            raise RmsdError(f"{what} must be an absolute path, not {path!r}")
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    engine = _engine(database_url, database_password)
    try:
        if state == "absent":
            return _server_absent(engine, database_url, cluster, name, config_path, secret_path, check_mode)
        try:
            ipaddress.ip_address(listen_address)
        except ValueError:
            raise RmsdError(f"listen_address {listen_address!r} is not an IP address") from None
        if not 1 <= int(port) <= 65535:
            raise RmsdError(f"port {port} is out of range 1-65535")
        config = NodeConfig(
            name=name, cluster=cluster, database_url=database_url, listen_address=listen_address, port=int(port),
            secret_path=secret_path, identity_issuer=identity_issuer, identity_audience=identity_audience,
            identity_jwks_uri=identity_jwks_uri,
        )
        secrets = Secrets(key_password=key_password, database_password=database_password)
        return _server_present(engine, database_url, config, config_path, secrets, check_mode)
    finally:
        engine.dispose()


def _server_present(engine, database_url, config: NodeConfig, config_path, secrets: Secrets, check_mode) -> Result:
    def registration(conn):
        row = clusters.get_cluster(conn, config.cluster)
        if row is None:
            return None
        _open_active_key(conn, row, secrets.key_password)
        for other in clusters.servers_of(conn, row.id):
            if other.name != config.name and (other.listen_address, other.port) == (
                config.listen_address, config.port,
            ):
                raise RmsdError(
                    f"{config.listen_address}:{config.port} is already used by server {other.name!r} of this cluster; "
                    "give this server another listen_address or port"
                )
        server = clusters.server_row(conn, row.id, config.name)
        return row.state, (None if server is None else {"listen_address": server.listen_address, "port": server.port})

    found = _read(engine, database_url, registration)
    if found is None and check_mode:
        # In a check run the cluster may be one that an earlier task would have provisioned.
        found = ("provisioned", None)
    if found is None:
        raise RmsdError(
            f"cluster {config.cluster!r} does not exist in {database_url}; provision it first with rmsops.rms.cluster"
        )
    _state, registered = found
    wanted_reg = {"listen_address": config.listen_address, "port": config.port}
    config_text = config.render()
    secret_text = secrets.render()
    secret_path = config.secret_path
    config_changed = read_text_or_none(config_path) != config_text
    secret_changed = read_text_or_none(secret_path) != secret_text or _mode(secret_path) != 0o600
    reg_changed = registered != wanted_reg
    changed = config_changed or secret_changed or reg_changed
    facts = {
        "server": {
            "name": config.name, "cluster": config.cluster, "listen_address": config.listen_address,
            "port": config.port, "url": config.url, "config_path": config_path, "secret_path": secret_path,
        },
        "config_changed": config_changed or secret_changed,
    }
    diff = {
        "before": {
            "registration": registered,
            "config": read_text_or_none(config_path),
            "secret_file": "present" if os.path.exists(secret_path) else "absent",
        },
        "after": {
            "registration": wanted_reg,
            "config": config_text,
            # Secret content is never shown, only whether it changes.
            "secret_file": "will be rewritten (0600)" if secret_changed else "present",
        },
    }
    if changed and not check_mode:
        with engine.begin() as conn:
            db.lock(conn, config.cluster)
            row = clusters.get_cluster(conn, config.cluster)
            clusters.save_server(conn, row.id, config.name, config.listen_address, config.port, utcnow())
        write_atomic(secret_path, secret_text, 0o600)
        write_atomic(config_path, config_text, 0o640)
    return Result(changed=changed, diff=diff if changed else {"before": {}, "after": {}}, facts=facts)


def _mode(path) -> int | None:
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None


def _server_absent(engine, database_url, cluster, name, config_path, secret_path, check_mode) -> Result:
    def registered(conn):
        row = clusters.get_cluster(conn, cluster)
        return row is not None and clusters.server_row(conn, row.id, name) is not None

    is_registered = bool(_read(engine, database_url, registered))
    files = [p for p in (config_path, secret_path) if os.path.exists(p)]
    if not is_registered and not files:
        return Result(changed=False, facts={"server": {}, "config_changed": False})
    if not check_mode:
        if is_registered:
            with engine.begin() as conn:
                db.lock(conn, cluster)
                row = clusters.get_cluster(conn, cluster)
                clusters.delete_server(conn, row.id, name)
        for path in files:
            Path(path).unlink(missing_ok=True)
    before = {"registered": is_registered, "files": files}
    return Result(changed=True, diff={"before": before, "after": {"registered": False, "files": []}},
                  facts={"server": {}, "config_changed": True})


# --- information ----------------------------------------------------------------------------------


def cluster_info(*, name, database_url, database_password=None) -> dict:
    _check_name("cluster name", name)
    engine = _engine(database_url, database_password)
    try:
        info = _read(engine, database_url, lambda conn: _info(conn, name))
    finally:
        engine.dispose()
    return info or {"exists": False, "cluster": {}, "nodes": [], "keys": [], "slc": {}, "content_per_key": {}}


def _info(conn, name) -> dict | None:
    row = clusters.get_cluster(conn, name)
    if row is None:
        return None
    now = utcnow()
    view = _cluster_view(conn, row)
    slc_row = clusters.current_slc_row(conn, row.id, view["active_key_id"])
    slc = pki.load_pem(slc_row.pem)
    nodes = []
    for server in clusters.servers_of(conn, row.id):
        beat = server.last_heartbeat
        # A node that beats every 10 s and has missed a few counts as down.
        up = beat is not None and (now - beat).total_seconds() < 10 * HEARTBEAT_STALE_AFTER
        nodes.append({
            "name": server.name, "listen_address": server.listen_address, "port": server.port,
            "url": f"http://{server.listen_address}:{server.port}", "joined_at": server.joined_at.isoformat(),
            "last_heartbeat": beat.isoformat() if beat else None, "status": "up" if up else "down",
        })
    keys = [
        {
            "id": k.id, "status": k.status, "protection": k.protection, "size": k.size,
            "created_at": k.created_at.isoformat(), "age_days": (now - k.created_at).days,
            "wrap_alg": k.wrap_alg, "sign_alg": k.sign_alg,
        }
        for k in clusters.keys_of(conn, row.id)
    ]
    return {
        "exists": True,
        "cluster": view,
        "nodes": nodes,
        "keys": keys,
        "slc": {
            "subject": slc.subject.rfc4514_string(), "issuer": slc.issuer.rfc4514_string(),
            "serial": slc_row.serial, "fingerprint_sha256": slc_row.fingerprint_sha256,
            "not_before": slc_row.not_before.isoformat(), "not_after": slc_row.not_after.isoformat(),
        },
        "content_per_key": clusters.content_counts(conn, row.id),
    }
