"""The admin API: idempotent `ensure_*` calls with check mode and a metadata-only diff.
This is what the Ansible collection calls; it never returns key material or secrets."""

import ipaddress
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import sqlalchemy as sa

from rmsd import clusters, db, licenses, pki
from rmsd import enrollment as enrollment_lib
from rmsd.config import NodeConfig, Secrets, read_text_or_none, write_atomic
from rmsd.errors import RmsdError
from rmsd.keys import KEY_SIZES, provider_for
from rmsd.schema import utcnow

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("root", "licensing")
STATES = ("present", "decommissioned", "absent")
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
        # root: its own key; licensing: the root cluster key its SLC chains to.
        "slc_issuer_key_id": slc.issuer_key_id if slc else None,
    }


def _open_active_key(conn, row, key_password: str | None):
    """Prove the key password opens the active key (RmsdError otherwise)."""
    provider = provider_for(row.key_protection, key_password=key_password)
    try:
        return provider.load(clusters.active_key_row(conn, row.id))
    except RmsdError as err:
        raise RmsdError(f"{err}. Nothing was changed.") from None


@contextmanager
def _writing(engine, database_url, name):
    """A write transaction on cluster `name`: locked against concurrent runs, schema up to date."""
    try:
        with engine.begin() as conn:
            db.lock(conn, name)
            db.migrate(conn)
            yield conn
    except sa.exc.OperationalError as err:
        raise db.connect_error(err, database_url) from None


def ensure_cluster(
    *, name, database_url, database_password=None, role="root", key_protection="password", key_password=None,
    key_size=2048, intranet_url=None, extranet_url=None, enrollment_url=None, enrollment_credential=None,
    enrollment_ca_path=None, state="present", force=False, check_mode=False,
) -> Result:
    _check_name("cluster name", name)
    if state not in STATES:
        raise RmsdError(f"state must be one of {', '.join(STATES)}, not {state!r}")
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
        if role == "licensing":
            _check_url("enrollment_url", enrollment_url, required=True)
            if enrollment_ca_path and not os.path.isfile(enrollment_ca_path):
                raise RmsdError(f"enrollment_ca_path {enrollment_ca_path!r} is not a file")
        elif enrollment_url or enrollment_credential:
            raise RmsdError("enrollment_url and enrollment_credential are for role=licensing only: a root cluster "
                            "certifies itself")
        provider = provider_for(key_protection, key_password=key_password)
        wanted = {
            "name": name, "role": role, "state": "decommissioned" if state == "decommissioned" else "provisioned",
            "intranet_url": intranet_url, "extranet_url": extranet_url, "key_protection": key_protection,
            "key_size": key_size,
        }
        enrollment = {"url": enrollment_url, "ca_path": enrollment_ca_path, "credential": enrollment_credential}
        existing = _read(engine, database_url, lambda conn: _existing_cluster(conn, name, key_password))
        if existing is None:
            if state == "decommissioned":
                raise RmsdError(f"cluster {name!r} does not exist in {database_url}; there is nothing to decommission")
            return _provision(engine, database_url, wanted, provider, enrollment, check_mode)
        return _update_cluster(engine, database_url, existing, wanted, key_password, enrollment, force, check_mode)
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
    return dict(_cluster_view(conn, row), schema_revision=db.schema_revision(conn))


def _provision(engine, database_url, wanted, provider, enrollment, check_mode) -> Result:
    after = dict(wanted, active_key_id="(new key)")
    result = Result(changed=True, diff={"before": {}, "after": after}, facts={"cluster": after})
    if check_mode:
        return result
    # Generate (and enroll) before taking the lock: those are the slow parts.
    new_key = provider.generate(wanted["key_size"])
    slcs = None
    if wanted["role"] == "licensing":
        slcs = _enroll(wanted, new_key.loaded, enrollment)
    now = utcnow()
    db.prepare_sqlite_file(engine)
    # One transaction: schema, cluster, key and SLC appear together or not at all.
    with _writing(engine, database_url, wanted["name"]) as conn:
        row = clusters.get_cluster(conn, wanted["name"])
        if row is not None:
            # Provisioned concurrently by another run: converge on what is there.
            return Result(changed=False, facts={"cluster": _cluster_view(conn, row)})
        if clusters.other_cluster(conn, wanted["name"]) is not None:
            raise RmsdError("this configuration database already holds another cluster")
        common = {
            "name": wanted["name"], "intranet_url": wanted["intranet_url"], "extranet_url": wanted["extranet_url"],
            "provider": provider, "new_key": new_key, "now": now,
        }
        if slcs is None:
            clusters.provision_root(conn, **common)
        else:
            clusters.provision_licensing(conn, slc=slcs[0], root_slc=slcs[1], **common)
        view = _cluster_view(conn, clusters.get_cluster(conn, wanted["name"]))
    result.diff["after"] = view
    result.facts["cluster"] = view
    return result


def _enroll(wanted, key, enrollment, root=None):
    root = root or enrollment_lib.fetch_root_slc(enrollment["url"], enrollment["ca_path"])
    if root.state != "provisioned":
        raise RmsdError(f"root cluster {root.cluster!r} is {root.state}; it enrolls no licensing clusters")
    return enrollment_lib.enroll(
        enrollment["url"], enrollment["ca_path"], cluster=wanted["name"], key=key,
        intranet_url=wanted["intranet_url"], extranet_url=wanted["extranet_url"],
        credential=enrollment["credential"], expected_root=root,
    )


IMMUTABLE = {
    "role": "a cluster's role cannot change; provision a new cluster with the role you want and move servers to it",
    "key_protection": "key protection cannot change in place; it applies when a new cluster key is generated "
    "(key rollover) or to a newly provisioned cluster",
    "key_size": "the size of the existing cluster key cannot change; key_size applies when a new cluster key is "
    "generated (key rollover). Set key_size to the current value to keep this cluster as it is",
}


def _update_cluster(engine, database_url, current, wanted, key_password, enrollment, force, check_mode) -> Result:
    name = current["name"]
    for option, how in IMMUTABLE.items():
        if current[option] != wanted[option]:
            raise RmsdError(
                f"cluster {name!r} has {option}={current[option]!r}, asked for {wanted[option]!r}: {how}. "
                "Nothing was changed."
            )
    if current["state"] == "decommissioned" and wanted["state"] == "provisioned" and not force:
        raise RmsdError(
            f"cluster {name!r} is decommissioned: it only serves use licenses. Decommissioning is one-way; set "
            "force=true to let it issue certificates and publishing licenses again. Nothing was changed."
        )
    changes = {k: wanted[k] for k in ("state", "intranet_url", "extranet_url") if current[k] != wanted[k]}
    revision = current.pop("schema_revision")
    if revision != db.HEAD_REVISION:
        changes["schema_revision"] = db.HEAD_REVISION  # _writing migrates
    root = None
    if current["role"] == "licensing":
        root = enrollment_lib.fetch_root_slc(enrollment["url"], enrollment["ca_path"])
        if current["slc_issuer_key_id"] != root.key_id:
            # The root cluster has a new key: a licensing cluster re-enrolls its own (unchanged) key.
            changes["slc_issuer_key_id"] = root.key_id
    if not changes:
        return Result(changed=False, facts={"cluster": current})
    before = dict(current, schema_revision=revision)
    before = {k: before[k] for k in changes}
    after = dict(current, **changes)
    if not check_mode:
        with engine.connect() as conn:
            key = _open_active_key(conn, clusters.get_cluster(conn, name), key_password)
        slcs = _enroll(wanted, key, enrollment, root) if "slc_issuer_key_id" in changes else None
        with _writing(engine, database_url, name) as conn:
            row = clusters.get_cluster(conn, name)
            if slcs is not None:
                clusters.save_enrollment(conn, row.id, slcs[0], slcs[1], utcnow())
            columns = {k: v for k, v in changes.items() if k not in ("slc_issuer_key_id", "schema_revision")}
            if columns:
                clusters.update_cluster(conn, row.id, utcnow(), **columns)
            after = _cluster_view(conn, clusters.get_cluster(conn, name))
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
        with _writing(engine, database_url, name) as conn:
            row = clusters.get_cluster(conn, name)
            if row is not None:
                clusters.delete_cluster(conn, row.id)
    return Result(changed=True, diff={"before": view, "after": {}}, facts={"cluster": {}})


# --- enrollment credentials (root cluster) --------------------------------------------------------

MIN_SECRET_LENGTH = 24
CREDENTIAL_VALIDITY = (60, 7 * 24 * 3600)  # seconds


def ensure_enrollment_credential(
    *, cluster, scope, database_url, database_password=None, secret=None, valid_for=900, state="present",
    check_mode=False,
) -> Result:
    """On the root cluster: let licensing cluster `scope` enroll with `secret` for `valid_for` seconds.
    Only a salted scrypt hash of the secret is stored. present: unchanged while a credential for
    `scope` with this secret is still valid; otherwise a fresh one replaces it."""
    _check_name("cluster", cluster)
    _check_name("scope", scope)
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    if state == "present":
        if not secret or len(secret) < MIN_SECRET_LENGTH:
            raise RmsdError(f"secret must be at least {MIN_SECRET_LENGTH} characters (a random string)")
        low, high = CREDENTIAL_VALIDITY
        if not low <= int(valid_for) <= high:
            raise RmsdError(f"valid_for must be between {low} and {high} seconds, not {valid_for}")
    engine = _engine(database_url, database_password)
    try:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            if row.role != "root":
                raise RmsdError(f"cluster {cluster!r} is a {row.role} cluster; enrollment credentials live on the root")
            if scope == cluster:
                raise RmsdError("scope names the licensing cluster that may enroll, not the root cluster itself")
            # An older schema has no credentials yet; the write migrates it.
            cred = clusters.credential_row(conn, row.id, scope) if db.schema_current(conn) else None
            if cred is None:
                return {}
            return {
                "scope": scope, "expires_at": cred.expires_at,
                "matches": bool(secret) and clusters.secret_matches(cred, secret),
            }

        found = _read(engine, database_url, current)
        if found is None:
            raise RmsdError(f"root cluster {cluster!r} does not exist in {database_url}; provision it first")
        now = utcnow()
        before = {"scope": scope, "expires_at": found["expires_at"].isoformat()} if found else {}
        if state == "absent":
            if not found:
                return Result(changed=False, facts={"credential": {}})
            if not check_mode:
                with _writing(engine, database_url, cluster) as conn:
                    clusters.delete_credential(conn, clusters.get_cluster(conn, cluster).id, scope)
            return Result(changed=True, diff={"before": before, "after": {}}, facts={"credential": {}})
        if found and found["matches"] and found["expires_at"] > now:
            return Result(changed=False, facts={"credential": before})
        expires_at = now + timedelta(seconds=int(valid_for))
        after = {"scope": scope, "expires_at": expires_at.isoformat()}
        if not check_mode:
            with _writing(engine, database_url, cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.save_credential(conn, row.id, scope, secret, expires_at, now)
        # The secret is never part of the diff, only that it is (re)set.
        return Result(changed=True, diff={"before": before, "after": dict(after, secret="(set)")},
                      facts={"credential": after})
    finally:
        engine.dispose()


# --- rights policy templates ----------------------------------------------------------------------


def ensure_rights_template(
    *, cluster, name, database_url, database_password=None, rights=None, description="", state="present",
    check_mode=False,
) -> Result:
    """A named rights policy of cluster `cluster` that publishing licenses can reference."""
    _check_name("cluster", cluster)
    _check_name("template name", name)
    if state not in ("present", "absent"):
        raise RmsdError(f"state must be present or absent, not {state!r}")
    description = description or ""
    if len(description) > 512:
        raise RmsdError("description is longer than 512 characters")
    if state == "present":
        try:
            rights = licenses.normalize_rights(rights or {})
        except RmsdError as err:
            raise RmsdError(f"rights of template {name!r}: {err}") from None
    engine = _engine(database_url, database_password)
    try:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            template = clusters.template_row(conn, row.id, name) if db.schema_current(conn) else None
            return {} if template is None else _template_view(template)

        found = _read(engine, database_url, current)
        if found is None:
            raise RmsdError(f"cluster {cluster!r} does not exist in {database_url}; provision it first")
        if state == "absent":
            if not found:
                return Result(changed=False, facts={"template": {}})
            if not check_mode:
                with _writing(engine, database_url, cluster) as conn:
                    clusters.delete_template(conn, clusters.get_cluster(conn, cluster).id, name)
            return Result(changed=True, diff={"before": found, "after": {}}, facts={"template": {}})
        wanted = {"name": name, "description": description, "rights": rights}
        if found == wanted:
            return Result(changed=False, facts={"template": wanted})
        if not check_mode:
            with _writing(engine, database_url, cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.save_template(conn, row.id, name, description, rights, utcnow())
        return Result(changed=True, diff={"before": found, "after": wanted}, facts={"template": wanted})
    finally:
        engine.dispose()


def _template_view(row) -> dict:
    return {"name": row.name, "description": row.description, "rights": row.rights}


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
        with _writing(engine, database_url, config.cluster) as conn:
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
            with _writing(engine, database_url, cluster) as conn:
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
    return info or {
        "exists": False, "cluster": {}, "nodes": [], "cluster_keys": [], "slc": {}, "root_slc": {},
        "content_per_key": {}, "rights_templates": [], "enrollment_credentials": [], "enrollments": [],
    }


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
    current = db.schema_current(conn)  # tables of newer revisions are empty until the schema is upgraded
    root_slc = {}
    if row.role == "licensing":
        root_row = clusters.root_slc_row(conn, row.id, slc_row.issuer_key_id)
        root_slc = _cert_view(pki.load_pem(root_row.pem), root_row)
    return {
        "exists": True,
        "cluster": view,
        "nodes": nodes,
        "cluster_keys": keys,
        "slc": dict(_cert_view(slc, slc_row), issuer_key_id=slc_row.issuer_key_id),
        "root_slc": root_slc,
        "content_per_key": clusters.content_counts(conn, row.id),
        "rights_templates": [_template_view(t) for t in clusters.templates_of(conn, row.id)] if current else [],
        # Metadata only: the secret's hash never leaves the database.
        "enrollment_credentials": [
            {
                "scope": c.scope, "expires_at": c.expires_at.isoformat(), "expired": c.expires_at <= now,
                "last_used_at": c.last_used_at.isoformat() if c.last_used_at else None,
            }
            for c in (clusters.credentials_of(conn, row.id) if current else [])
        ],
        "enrollments": [
            {
                "licensing_cluster": e.licensing_cluster, "key_id": e.key_id, "issuer_key_id": e.issuer_key_id,
                "slc_fingerprint_sha256": e.fingerprint_sha256, "not_after": e.not_after.isoformat(),
                "created_at": e.created_at.isoformat(),
            }
            for e in (clusters.enrollments_of(conn, row.id) if current else [])
        ],
    }


def _cert_view(cert, cert_row) -> dict:
    return {
        "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
        "serial": cert_row.serial, "fingerprint_sha256": cert_row.fingerprint_sha256, "key_id": cert_row.key_id,
        "not_before": cert_row.not_before.isoformat(), "not_after": cert_row.not_after.isoformat(),
    }
