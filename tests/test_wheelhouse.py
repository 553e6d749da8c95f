"""The server role's wheelhouse: roles/server/files/wheelhouse.py builds rmsd and its pinned dependencies
into one tar on the controller (real pip, real package index), install_wheelhouse.py installs it on a
host with no index. Built once for this machine's Python, machine and glibc (about a minute in all)."""

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "roles" / "server" / "files"
WHEELHOUSE = FILES / "wheelhouse.py"
INSTALL = FILES / "install_wheelhouse.py"
# Budgets that keep the module well under three minutes, and a hung pip from hanging the run.
BUILD_TIMEOUT = 150
INSTALL_TIMEOUT = 120
# Nothing listens on port 9 (discard): pip fails at once if it reaches for this index.
DEAD_INDEX = "http://127.0.0.1:9/simple/"


def host_target():
    libc, version = platform.libc_ver()
    if libc != "glibc":
        pytest.skip(f"the wheelhouse is for glibc hosts; this one has {libc!r}")
    return ["--python-version", "{}.{}".format(*sys.version_info[:2]), "--machine", platform.machine(),
            "--glibc", version]


def build_args(source, cache_dir, *extra):
    return ["--source", str(source / "rmsd"), "--constraints", str(source / "constraints.txt"),
            "--cache-dir", str(cache_dir), *host_target(), *extra]


def run_wheelhouse(args, timeout=BUILD_TIMEOUT):
    proc = subprocess.run([sys.executable, str(WHEELHOUSE), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_install(args, env=None):
    return subprocess.run([sys.executable, str(INSTALL), *args], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT, env=env, check=False)


def no_index_env():
    """An environment in which pip has no index to fall back on: a dead one, and none of this machine's
    pip configuration (its find-links and extra indexes)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    env["PIP_INDEX_URL"] = DEAD_INDEX
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A snapshot of rmsd and constraints.txt: edits to the working tree during the run must not make
    the two builds differ."""
    root = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "rmsd" / "src", root / "rmsd" / "src", ignore=ignore)
    shutil.copy(REPO / "rmsd" / "pyproject.toml", root / "rmsd" / "pyproject.toml")
    shutil.copy(REPO / "constraints.txt", root / "constraints.txt")
    return root


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    started = time.monotonic()
    result = run_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"))
    print(f"cold build: {time.monotonic() - started:.1f}s")
    return cache_dir, result


def test_build_result(built):
    cache_dir, result = built
    assert result["cached"] is False
    tar = Path(result["path"])
    assert tar == cache_dir / (result["key"] + ".tar")
    assert (cache_dir / (result["key"] + ".json")).is_file()
    assert result["sha256"] == sha256(tar)
    assert result["bytes"] == tar.stat().st_size
    assert result["rmsd_version"]
    with tarfile.open(tar) as archive:
        members = archive.getmembers()
    wheels = [m.name for m in members if m.name.endswith(".whl")]
    assert result["wheels"] == len(wheels)
    assert {"constraints.txt", "requirements.txt", "requirements-supervisor.txt"} <= {m.name for m in members}
    assert [m.name for m in members] == sorted(m.name for m in members)
    for member in members:
        assert member.isfile() and "/" not in member.name
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == \
            (0, 0, 0, "", "", 0o644)


def test_same_inputs_give_the_same_bytes(built, source, tmp_path):
    _, first = built
    second = run_wheelhouse(build_args(source, tmp_path / "other-cache", "--extra", "supervisor"))
    assert second["cached"] is False
    assert second["key"] == first["key"]
    assert second["sha256"] == first["sha256"]
    assert Path(second["path"]).read_bytes() == Path(first["path"]).read_bytes()


def test_second_call_is_answered_from_the_cache(built, source):
    cache_dir, first = built
    started = time.monotonic()
    again = run_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"), timeout=30)
    assert time.monotonic() - started < 3
    assert again["cached"] is True
    del again["cached"]
    assert again == {k: v for k, v in first.items() if k != "cached"}


def test_cached_call_runs_no_pip(built, source, monkeypatch, capsys):
    cache_dir, first = built
    spec = importlib.util.spec_from_file_location("wheelhouse_under_test", WHEELHOUSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a cached call ran {args}")

    monkeypatch.setattr(module.subprocess, "run", no_subprocess)
    assert module.main(build_args(source, cache_dir, "--extra", "supervisor")) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == first["sha256"]


def test_requirements_pin_every_wheel_by_its_hash(built):
    _, result = built
    with tarfile.open(result["path"]) as archive:
        content = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    pins = {}
    for name in ("requirements.txt", "requirements-supervisor.txt"):
        for line in content[name].decode().splitlines():
            requirement, *hashes = line.split()
            project, version = requirement.split("==")
            assert project not in pins, f"{project} is listed twice"
            pins[project] = (version, {h.removeprefix("--hash=sha256:") for h in hashes})
    wheels = {name: data for name, data in content.items() if name.endswith(".whl")}
    assert len(pins) == len(wheels)
    for name, data in wheels.items():
        project, version = name.split("-")[:2]
        project = project.replace("_", "-").replace(".", "-").lower()
        assert project in pins, f"{name} is in no requirements file"
        assert pins[project][0] == version
        assert hashlib.sha256(data).hexdigest() in pins[project][1], name
    supervisor = content["requirements-supervisor.txt"].decode()
    assert supervisor.startswith("supervisor==")
    assert "supervisor==" not in content["requirements.txt"].decode()
    assert f"rmsd=={result['rmsd_version']} " in content["requirements.txt"].decode()


def test_install_with_no_index(built, tmp_path):
    _, result = built
    venv, stamp = tmp_path / "opt" / "venv", tmp_path / "opt" / "stamp"
    args = ["--archive", result["path"], "--venv", str(venv), "--stamp", str(stamp),
            "--fingerprint", result["sha256"], "--extra", "supervisor"]
    proc = run_install(args, env=no_index_env())
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["changed"] is True and outcome["mode"] == "wheelhouse"
    assert outcome["wheels"] == result["wheels"]
    assert "(no index)" in proc.stderr
    assert stamp.read_text().strip() == result["sha256"]

    subprocess.run([str(venv / "bin" / "rmsd"), "--help"], check=True, capture_output=True, timeout=60)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import rmsd.admin"], check=True, timeout=60)
    assert (venv / "bin" / "supervisord").exists()
    log = (tmp_path / "opt" / "pip-install.log").read_text()
    assert f"Ignoring indexes: {DEAD_INDEX}" in log

    again = run_install(args, env=no_index_env())
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"changed": False}


def test_wrong_fingerprint_is_refused(built, tmp_path):
    _, result = built
    venv, stamp = tmp_path / "venv", tmp_path / "stamp"
    wrong = hashlib.sha256(b"not the archive").hexdigest()
    proc = run_install(["--archive", result["path"], "--venv", str(venv), "--stamp", str(stamp),
                        "--fingerprint", wrong])
    assert proc.returncode != 0
    assert "corrupt or was tampered with" in proc.stderr
    assert not stamp.exists()
    assert not venv.exists()


def test_tampered_archive_is_refused(built, tmp_path):
    _, result = built
    tampered = tmp_path / "tampered.tar"
    data = bytearray(Path(result["path"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    venv, stamp = tmp_path / "venv", tmp_path / "stamp"
    proc = run_install(["--archive", str(tampered), "--venv", str(venv), "--stamp", str(stamp),
                        "--fingerprint", result["sha256"]])
    assert proc.returncode != 0
    assert "corrupt or was tampered with" in proc.stderr
    assert not stamp.exists()
    assert not venv.exists()


def test_host_without_wheels_is_told_to_use_its_own_index(source, tmp_path):
    # No wheel of the compiled dependencies is published for this machine.
    args = build_args(source, tmp_path / "cache")
    args[args.index("--machine") + 1] = "riscv64"
    proc = subprocess.run([sys.executable, str(WHEELHOUSE), *args], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False)
    assert proc.returncode == 1
    assert "fits the managed host" in proc.stderr and "server_pip_index_url" in proc.stderr
    assert proc.stdout == ""
    assert not list((tmp_path / "cache").glob("*.tar"))


def test_target_options(built):
    spec = importlib.util.spec_from_file_location("wheelhouse_options", WHEELHOUSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = module.pip_target_options({"python_version": "3.11", "machine": "aarch64", "glibc": "2.19"})
    assert options == ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                       "--abi", "cp311", "--platform", "manylinux_2_19_aarch64",
                       "--platform", "manylinux_2_18_aarch64", "--platform", "manylinux_2_17_aarch64",
                       "--platform", "manylinux2014_aarch64"]
