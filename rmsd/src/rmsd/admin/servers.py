"""Servers (nodes) of a cluster: registered, with their configuration file and their 0600 secret file."""

import ipaddress
import os
import pwd
import re
import tomllib
import uuid
from pathlib import Path

from rmsd import clusters
from rmsd.admin.common import Result, Unlock, check_absolute, check_name, check_state
from rmsd.admin.store import Store, opened
from rmsd.config import (
    NodeConfig,
    Secrets,
    check_http_limits,
    check_tls_paths,
    check_tls_validity,
    check_trusted_proxies,
    check_workers,
    load_tls_files,
    read_text_or_none,
    write_atomic,
)
from rmsd.errors import RmsdError
from rmsd.identity import check_jwks_uri
from rmsd.keys import TokenSettings
from rmsd.schema import utcnow

INSTANCE_ID = re.compile(r"[0-9a-f]{32}")


def ensure_server(
    *, cluster, name, database_url, database_password=None, key_password=None, previous_key_password=None,
    listen_address="127.0.0.1", port=8080, config_path, secret_path, identity_issuer=None, identity_audience="rmsd",
    identity_jwks_uri=None, pkcs11=None, tls_certificate=None, tls_key=None, http_limits=None, workers=None,
    trusted_proxies=None, state="present", check_mode=False,
) -> Result:
    """A node of `cluster`: registered, with its configuration file and its 0600 secret file. A node of
    a pkcs11 cluster gets the token (`pkcs11`: module, token_label, pin; the PIN goes to the secret file).
    With `tls_certificate` and `tls_key` (paths of PEM files already on the node) it serves HTTPS.
    `http_limits`: rmsd.config.HTTP_LIMITS to set (the others keep their defaults). `workers`: worker
    processes (None or 0: one per core of the host). The node's instance id is made when its configuration
    file is first written and kept by every rewrite. `trusted_proxies`: addresses, networks or host names of
    the load balancers whose X-Forwarded-For the node believes."""
    check_name("cluster", cluster)
    check_name("server name", name)
    check_absolute("config_path", config_path)
    check_absolute("secret_path", secret_path)
    check_state(state, ("present", "absent"))
    with opened(database_url, database_password) as store:
        if state == "absent":
            return _server_absent(store, cluster, name, config_path, secret_path, check_mode)
        try:
            ipaddress.ip_address(listen_address)
        except ValueError:
            raise RmsdError(f"listen_address {listen_address!r} is not an IP address") from None
        if not 1 <= int(port) <= 65535:
            raise RmsdError(f"port {port} is out of range 1-65535")
        check_tls_paths(tls_certificate, tls_key)
        if identity_jwks_uri:
            check_jwks_uri(identity_jwks_uri)
        chosen_limits = check_http_limits(http_limits)
        workers = check_workers(workers)
        proxies = check_trusted_proxies(trusted_proxies)
        warnings = _check_tls_files(tls_certificate, tls_key, check_mode) if tls_certificate else []
        token = TokenSettings.from_options(pkcs11)
        config = NodeConfig(
            name=name, cluster=cluster, database_url=database_url, listen_address=listen_address, port=int(port),
            secret_path=secret_path, identity_issuer=identity_issuer, identity_audience=identity_audience,
            identity_jwks_uri=identity_jwks_uri, pkcs11_module=token.module if token else None,
            pkcs11_token_label=token.token_label if token else None, tls_certificate=tls_certificate or None,
            tls_key=tls_key or None, workers=workers, instance_id=_instance_id(config_path), trusted_proxies=proxies,
            **chosen_limits,
        )
        secrets = Secrets(key_password=key_password, previous_key_password=previous_key_password or None,
                          database_password=database_password, pkcs11_pin=token.pin if token else None)
        result = _server_present(store, config, config_path, secrets, check_mode)
        result.warnings.extend(warnings)
        return result


def _instance_id(config_path) -> str:
    """The node's instance id: the one its configuration file holds (kept by every rewrite), else a new one."""
    try:
        found = tomllib.loads(read_text_or_none(config_path) or "").get("node", {}).get("instance_id")
    except tomllib.TOMLDecodeError:
        found = None
    if isinstance(found, str) and INSTANCE_ID.fullmatch(found):
        return found
    return uuid.uuid4().hex


def _check_tls_files(tls_certificate, tls_key, check_mode) -> list[str]:
    """The node's certificate and key: readable, matching, the certificate valid now (RmsdError otherwise,
    before anything is written). In check mode files not there yet are a warning: an earlier task of the
    same run (e.g. one that gets the certificate signed) would have written them."""
    missing = [path for path in (tls_certificate, tls_key) if not os.path.exists(path)]
    if missing:
        if check_mode:
            it = "them" if len(missing) > 1 else "it"
            warning = (f"{' and '.join(missing)} not found; assuming an earlier task writes {it}. A real run fails "
                       "if it is still missing then")
            return [warning]
        raise RmsdError(
            f"{' and '.join(missing)} not found: tls_certificate and tls_key must be on the node before it joins "
            "(rmsd tls-request makes the key and a certificate request for it). Nothing was changed."
        )
    try:
        files = load_tls_files(tls_certificate, tls_key)
        check_tls_validity(files, tls_certificate, utcnow())
    except RmsdError as err:
        raise RmsdError(f"{err}. Nothing was changed.") from None
    return []


def _server_present(store: Store, config: NodeConfig, config_path, secrets: Secrets, check_mode) -> Result:
    def registration(conn):
        row = clusters.get_cluster(conn, config.cluster)
        if row is None:
            return None
        token = TokenSettings.for_node(config, secrets)
        Unlock(secrets.key_password, secrets.previous_key_password, token).open_active_key(conn, row)
        for other in clusters.servers_of(conn, row.id):
            if other.name != config.name and (other.listen_address, other.port) == (
                config.listen_address, config.port,
            ):
                raise RmsdError(
                    f"{config.listen_address}:{config.port} is already used by server {other.name!r} of this cluster; "
                    "give this server another listen_address or port"
                )
        server = clusters.server_row(conn, row.id, config.name)
        if server is None:
            return row.state, None
        return row.state, {"listen_address": server.listen_address, "port": server.port, "tls": server.tls}

    found = store.read(registration)
    if found is None and check_mode:
        # In a check run the cluster may be one that an earlier task would have provisioned.
        found = ("provisioned", None)
    if found is None:
        raise store.missing(config.cluster, "provision it first")
    _state, registered = found
    wanted_reg = {"listen_address": config.listen_address, "port": config.port, "tls": config.tls}
    config_text = config.render()
    secret_text = secrets.render()
    secret_path = config.secret_path
    # What the node reads at start differs: it must restart to use it.
    config_changed = read_text_or_none(config_path) != config_text
    secret_changed = read_text_or_none(secret_path) != secret_text
    # Same content, wrong mode or owner: rewritten, no restart needed.
    files_drifted = not (_owned_with_mode(config_path, 0o640) and _owned_with_mode(secret_path, 0o600))
    reg_changed = registered != wanted_reg
    changed = config_changed or secret_changed or files_drifted or reg_changed
    facts = {
        "server": {
            "name": config.name, "cluster": config.cluster, "listen_address": config.listen_address,
            "port": config.port, "url": config.url, "config_path": config_path, "secret_path": secret_path,
            "tls": config.tls, "tls_certificate": config.tls_certificate, "tls_key": config.tls_key,
            "instance_id": config.instance_id,
        },
        "config_changed": config_changed or secret_changed,
    }
    diff = {
        "before": {
            "registration": registered,
            "config": read_text_or_none(config_path),
            "secret_file": "present" if os.path.exists(secret_path) else "absent",
            "files": _mode_and_owner(config_path, secret_path),
        },
        "after": {
            "registration": wanted_reg,
            "config": config_text,
            # Secret content is never shown, only whether it changes.
            "secret_file": "will be rewritten (0600)" if secret_changed else "present",
            "files": {config_path: f"0640 {_me()}", secret_path: f"0600 {_me()}"},
        },
    }
    if reg_changed and not check_mode:
        with store.writing(config.cluster) as conn:
            row = clusters.get_cluster(conn, config.cluster)
            clusters.save_server(conn, row.id, config.name, config.listen_address, config.port, utcnow(),
                                 tls=config.tls)
    if (secret_changed or files_drifted) and not check_mode:
        write_atomic(secret_path, secret_text, 0o600)
    if (config_changed or files_drifted) and not check_mode:
        write_atomic(config_path, config_text, 0o640)
    return Result(changed=changed, diff=diff if changed else {"before": {}, "after": {}}, facts=facts)


def _owned_with_mode(path, mode: int) -> bool:
    """The file exists with `mode` and belongs to the user the node runs as (who runs this)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_mode & 0o777 == mode and st.st_uid == os.geteuid()


def pwd_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _me() -> str:
    return pwd_name(os.geteuid())


def _mode_and_owner(*paths) -> dict:
    described = {}
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            described[path] = "absent"
            continue
        described[path] = f"{st.st_mode & 0o777:04o} {pwd_name(st.st_uid)}"
    return described


def _server_absent(store: Store, cluster, name, config_path, secret_path, check_mode) -> Result:
    def registered(conn):
        row = clusters.get_cluster(conn, cluster)
        return row is not None and clusters.server_row(conn, row.id, name) is not None

    is_registered = bool(store.read(registered))
    files = [p for p in (config_path, secret_path) if os.path.exists(p)]
    if not is_registered and not files:
        return Result(changed=False, facts={"server": {}, "config_changed": False})
    if not check_mode:
        if is_registered:
            with store.writing(cluster) as conn:
                row = clusters.get_cluster(conn, cluster)
                clusters.delete_server(conn, row.id, name)
        for path in files:
            Path(path).unlink(missing_ok=True)
    before = {"registered": is_registered, "files": files}
    return Result(changed=True, diff={"before": before, "after": {"registered": False, "files": []}},
                  facts={"server": {}, "config_changed": True})
