"""What a module run left behind, read independently of the collection through rmsd's
public API and the file system, and the four-run idempotence check built on it."""

from __future__ import annotations

import os
from pathlib import Path

from rmsd import admin


def sqlite_file(database_url: str) -> Path | None:
    return Path(database_url.removeprefix("sqlite:///")) if database_url.startswith("sqlite:///") else None


def cluster_state(name: str, database_url: str, database_password: str | None = None) -> dict:
    """The cluster as stored, without fields that move with time (ages, heartbeats)."""
    path = sqlite_file(database_url)
    if path is not None and not path.exists():
        return {"database": "absent"}
    info = admin.cluster_info(name=name, database_url=database_url, database_password=database_password)
    return {
        "exists": info["exists"],
        "cluster": info["cluster"],
        "cluster_keys": [{k: key[k] for k in ("id", "status", "size", "protection")} for key in info["cluster_keys"]],
        "slc": info["slc"].get("fingerprint_sha256"),
        "nodes": sorted((n["name"], n["listen_address"], n["port"]) for n in info["nodes"]),
    }


def server_params(cluster: dict, tmp_path, name="node1", port=18081) -> dict:
    """Parameters of rmsops.rms.server for a node of `cluster` with its files under tmp_path."""
    return {
        "cluster": cluster["name"],
        "name": name,
        "database_url": cluster["database_url"],
        "key_password": cluster["key_password"],
        "listen_address": "127.0.1.1",
        "port": port,
        "config_path": str(tmp_path / name / "rmsd.toml"),
        "secret_path": str(tmp_path / name / "secret.toml"),
    }


def file_state(path: str) -> tuple | None:
    """Content and mode of a file, None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (Path(path).read_bytes(), oct(st.st_mode & 0o777))


def four_runs(ansible, module: str, params: dict, observe, **run_kwargs) -> dict:
    """check -> real -> check -> real: changed True, True, False, False; check mode changes nothing."""
    start = observe()
    first = ansible.run(module, params, check=True, **run_kwargs).ok()
    assert first.changed, f"check run on a fresh state must report a change:\n{first.output}"
    assert observe() == start, "check mode changed something"
    second = ansible.run(module, params, **run_kwargs).ok()
    assert second.changed, second.output
    done = observe()
    assert done != start, "the real run reported a change but nothing changed"
    third = ansible.run(module, params, check=True, **run_kwargs).ok()
    assert not third.changed, f"check run on a converged state must report nothing:\n{third.output}"
    assert observe() == done
    fourth = ansible.run(module, params, **run_kwargs).ok()
    assert not fourth.changed, f"second real run must change nothing:\n{fourth.output}"
    assert observe() == done
    return {"runs": (first, second, third, fourth), "state": done}
