"""The server role's wheelhouse: roles/server/files/wheelhouse.py builds rmsd and its pinned dependencies
into one tar on the controller (real pip, real package index), install_wheelhouse.py installs it on a
host with no index. Built once from the index for this machine's Python, machine and glibc; the other
builds here come from a folder of the wheels that build fetched (pip with no index), so they are quick.

Nothing is trusted: every wheel must be one the hash lock (requirements/rmsd-wheelhouse.lock) allows, at
download and in the cache; a cached tar that is not what a build writes is refused and built again."""

import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import release_source
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "roles" / "server" / "files"
WHEELHOUSE = FILES / "wheelhouse.py"
INSTALL = FILES / "install_wheelhouse.py"
LOCK = Path("requirements") / "rmsd-wheelhouse.lock"
# Budgets that keep the module well under three minutes, and a hung pip from hanging the run.
BUILD_TIMEOUT = 150
INSTALL_TIMEOUT = 120
# Nothing listens on port 9 (discard): pip fails at once if it reaches for this index.
DEAD_INDEX = "http://127.0.0.1:9/simple/"
# The Linux hosts the lock must serve: the pythons rmsd supports and the machines wheels are built for.
HOST_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
HOST_MACHINES = ("x86_64", "aarch64")
HYPOTHESIS = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))


def load_wheelhouse(name):
    spec = importlib.util.spec_from_file_location(name, WHEELHOUSE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_target():
    libc, version = platform.libc_ver()
    if libc != "glibc":
        pytest.skip(f"the wheelhouse is for glibc hosts; this one has {libc!r}")
    return ["--python-version", "{}.{}".format(*sys.version_info[:2]), "--machine", platform.machine(),
            "--glibc", version]


def build_args(source, cache_dir, *extra):
    return ["--source", str(source / "rmsd"), "--constraints", str(source / "constraints.txt"),
            "--lock", str(source / LOCK), "--cache-dir", str(cache_dir), *host_target(), *extra]


def call_wheelhouse(args, env=None, timeout=BUILD_TIMEOUT):
    return subprocess.run([sys.executable, str(WHEELHOUSE), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def run_wheelhouse(args, env=None, timeout=BUILD_TIMEOUT):
    proc = call_wheelhouse(args, env, timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def run_install(args, env=None):
    return subprocess.run([sys.executable, str(INSTALL), *args], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT, env=env, check=False)


def no_index_env(find_links=None):
    """An environment in which pip has no index to fall back on: a dead one, and none of this machine's
    pip configuration (its find-links and extra indexes); with find_links, pip reads that folder only."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    env["PIP_INDEX_URL"] = DEAD_INDEX
    env["PIP_CONFIG_FILE"] = os.devnull
    if find_links is not None:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(find_links))
    return env


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def members_of(tar_path):
    with tarfile.open(tar_path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def lock_entries(text):
    """{name: (version, marker or None, hashes)} of a lock's entries, read with packaging."""
    entries = {}
    for line in text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement_part, *hashes = line.split("--hash=sha256:")
        requirement = Requirement(requirement_part.strip())
        version = str(requirement.specifier).removeprefix("==")
        entries[canonicalize_name(requirement.name)] = (version, requirement.marker, {h.split()[0] for h in hashes})
    return entries


def constraint_pins(text):
    return {canonicalize_name(name): version
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, flags=re.MULTILINE)}


def linux_hosts():
    for python in HOST_PYTHONS:
        for machine in HOST_MACHINES:
            yield {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
                   "platform_system": "Linux", "os_name": "posix", "platform_machine": machine,
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def test_lock_pins_what_constraints_pin_for_every_linux_host():
    """The lock is derived from constraints.txt (scripts/update-constraints.sh): the same versions, every
    dependency of rmsd, the supervisor extra and the exact build backend of rmsd/pyproject.toml."""
    entries = lock_entries((REPO / LOCK).read_text())
    pins = constraint_pins((REPO / "constraints.txt").read_text())
    pyproject = tomllib.loads((REPO / "rmsd" / "pyproject.toml").read_text())
    backend = Requirement(*pyproject["build-system"]["requires"])
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"
    assert backend.name == "setuptools" and str(backend.specifier).startswith("==")
    for name, (version, marker, hashes) in entries.items():
        assert hashes, f"{name} has no hash"
        if name == "setuptools":
            assert f"=={version}" == str(backend.specifier), "the lock's setuptools is not [build-system]'s"
        elif marker is None or any(marker.evaluate(host) for host in linux_hosts()):
            assert pins.get(name) == version, f"the lock pins {name}=={version}, constraints.txt {pins.get(name)}"
    for dependency in pyproject["project"]["dependencies"] + ["supervisor"]:
        requirement = Requirement(dependency)
        assert canonicalize_name(requirement.name) in entries, f"the lock lacks {requirement.name}"
        for extra in requirement.extras:
            assert canonicalize_name(f"{requirement.name}-{extra}") in entries, f"the lock lacks {dependency}"


def test_lock_reader_refuses_what_it_cannot_read(tmp_path):
    module = load_wheelhouse("wheelhouse_lock")
    lock = tmp_path / "lock"
    for text in ("idna>=3.20 --hash=sha256:" + "0" * 64 + "\n", "idna==3.20\n", "# nothing\n",
                 "idna==3.20 --hash=sha256:" + "0" * 63 + "\n"):
        lock.write_text(text)
        with pytest.raises(module.Error, match="update-constraints.sh --lock-only"):
            module.read_lock(str(lock))
    lock.write_text("idna==3.20 ; sys_platform == 'linux' \\\n    --hash=sha256:" + "a" * 64 + " \\\n"
                    "    --hash=sha256:" + "b" * 64 + "\n    # via anyio\n")
    entry = f"idna==3.20 ; sys_platform == 'linux' --hash=sha256:{'a' * 64} --hash=sha256:{'b' * 64}"
    assert module.read_lock(str(lock)) == {"idna": ("3.20", frozenset({"a" * 64, "b" * 64}), entry)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A snapshot of rmsd, constraints.txt and the lock: edits to the working tree during the run must not
    make the two builds differ."""
    root = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "rmsd" / "src", root / "rmsd" / "src", ignore=ignore)
    shutil.copy(REPO / "rmsd" / "pyproject.toml", root / "rmsd" / "pyproject.toml")
    shutil.copy(REPO / "constraints.txt", root / "constraints.txt")
    (root / LOCK).parent.mkdir()
    shutil.copy(REPO / LOCK, root / LOCK)
    return root


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    started = time.monotonic()
    result = run_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"))
    print(f"cold build: {time.monotonic() - started:.1f}s")
    return cache_dir, result


@pytest.fixture(scope="module")
def local_index(built, tmp_path_factory):
    """A folder with every wheel the build fetched (its dependencies and its build backend): what pip reads
    instead of an index in the tests that build again."""
    cache_dir, result = built
    folder = tmp_path_factory.mktemp("local-index")
    for name, data in members_of(result["path"]).items():
        if name.endswith(".whl") and not name.startswith("rmsd-"):
            (folder / name).write_bytes(data)
    for wheel in (cache_dir / "build-backend").glob("*.whl"):
        shutil.copy(wheel, folder / wheel.name)
    return folder


def cache_copy(built, tmp_path):
    """A copy of the built cache (tar and build backend) to tamper with."""
    cache_dir, result = built
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    return copy, copy / Path(result["path"]).name


@pytest.mark.parametrize("release", release_source.releases(), ids=lambda release: release["version"])
def test_every_recorded_release_builds_its_wheelhouse_from_git_history(release, built, tmp_path):
    """What an upgrade test installs first: a release's rmsd, constraints and lock, taken from the commit
    changelogs/releases.yml records for it (scripts/release_source.py: git archive), built into a wheelhouse like
    the tree's (in a copy of the tree's cache: the build backend is there, and the tests of the cache see only the
    tree's build)."""
    cache_dir, _tree_tar = cache_copy(built, tmp_path)
    release_source.extract(release, tmp_path / "source")
    result = run_wheelhouse(build_args(tmp_path / "source", cache_dir))
    assert result["rmsd_version"] == release["version"]
    rmsd_wheels = [name for name in members_of(result["path"]) if name.startswith("rmsd-")]
    assert rmsd_wheels == [f"rmsd-{release['version']}-py3-none-any.whl"]


def test_build_result(built):
    cache_dir, result = built
    assert result["cached"] is False
    tar = Path(result["path"])
    assert tar == cache_dir / (result["key"] + ".tar")
    assert result["sha256"] == sha256(tar)
    assert result["bytes"] == tar.stat().st_size
    assert result["rmsd_version"]
    # Nothing beside the tar says what it is: the sha256 handed to the host is the tar's own.
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([tar.name, "build-backend"])
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


def test_every_wheel_is_one_the_lock_allows(built):
    _, result = built
    entries = lock_entries((REPO / LOCK).read_text())
    wheels = {name: data for name, data in members_of(result["path"]).items() if name.endswith(".whl")}
    assert len(wheels) > 20
    for name, data in wheels.items():
        if name.startswith("rmsd-"):
            continue
        project, version = name.split("-")[:2]
        assert entries[canonicalize_name(project)][0] == version, name
        assert hashlib.sha256(data).hexdigest() in entries[canonicalize_name(project)][2], name


def test_second_call_is_answered_from_the_cache(built, source):
    cache_dir, first = built
    started = time.monotonic()
    # No index: a cache hit fetches nothing.
    again = run_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"), env=no_index_env(), timeout=60)
    print(f"cache hit, checked: {time.monotonic() - started:.1f}s")
    assert again["cached"] is True
    del again["cached"]
    assert again == {k: v for k, v in first.items() if k != "cached"}


def test_cached_call_runs_no_pip_and_one_build(built, source, monkeypatch, capsys):
    cache_dir, first = built
    module = load_wheelhouse("wheelhouse_under_test")
    real_run = subprocess.run
    calls = []

    def recorded(argv, *args, **kwargs):
        calls.append(argv)
        assert "pip" not in argv[:3], f"a cached call ran {argv}"
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(module.subprocess, "run", recorded)
    assert module.main(build_args(source, cache_dir, "--extra", "supervisor")) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == first["sha256"]
    # The rmsd wheel built again from the source, to compare with the cached one: nothing else.
    assert len(calls) == 1 and calls[0][1:4] == ["-I", "-S", "-B"]


def test_requirements_pin_every_wheel_by_its_hash(built):
    _, result = built
    content = members_of(result["path"])
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


# --- a poisoned cache or index ------------------------------------------------------------------------------------


def rewrite_cache(tar_path, members):
    """The attacker's tar: members changed, the requirements files rewritten to pin what is now there, written
    as the script writes its tars (nothing but the content differs)."""
    module = load_wheelhouse("wheelhouse_tamper")
    wheels = {n: d for n, d in members.items() if n.endswith(".whl")}
    supervisor = {n: d for n, d in wheels.items() if n.startswith("supervisor-")}
    members["requirements.txt"] = module.requirement_text(
        {n: d for n, d in wheels.items() if n not in supervisor}).encode()
    members["requirements-supervisor.txt"] = module.requirement_text(supervisor).encode()
    tar_path.write_bytes(module.tar_bytes(members))


def a_wheel(files):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        for name, content in files.items():
            wheel.writestr(name, content)
    return out.getvalue()


def dependency_wheel(members, project):
    return next(name for name in members if name.startswith(project + "-") and name.endswith(".whl"))


def test_a_cached_wheel_changed_by_one_byte_is_refused_and_the_same_bytes_built_again(built, source, local_index,
                                                                                     tmp_path):
    """The requirements files rewritten to pin the changed wheel; the build that replaces the tar (from the
    wheels the first build fetched, in another folder) writes the first build's bytes again."""
    cache_dir, tar = cache_copy(built, tmp_path)
    _, first = built
    members = members_of(tar)
    name = dependency_wheel(members, "idna")
    data = bytearray(members[name])
    data[len(data) // 2] ^= 0x01
    members[name] = bytes(data)
    rewrite_cache(tar, members)

    started = time.monotonic()
    proc = call_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"), env=no_index_env(local_index))
    print(f"build from a local folder: {time.monotonic() - started:.1f}s")
    assert proc.returncode == 0, proc.stderr
    assert f"refusing the cached {tar}: {name}: its sha256" in proc.stderr
    assert "building it again" in proc.stderr
    result = json.loads(proc.stdout)
    assert result["cached"] is False
    assert {k: v for k, v in result.items() if k not in ("cached", "path")} == \
        {k: v for k, v in first.items() if k not in ("cached", "path")}
    assert tar.read_bytes() == Path(first["path"]).read_bytes()


@pytest.mark.parametrize("attack", ["a dependency replaced", "a wheel added", "the rmsd wheel of another build"])
def test_a_poisoned_cache_is_refused(built, source, tmp_path, attack):
    """The tar and everything the cache could say about it rewritten to match; the rebuild has no index here,
    so it fails: nothing is handed to the host."""
    cache_dir, tar = cache_copy(built, tmp_path)
    members = members_of(tar)
    if attack == "a dependency replaced":
        name = dependency_wheel(members, "idna")
        members[name] = a_wheel({"idna/__init__.py": "import os\nos.system('id')\n",
                                 "idna-3.20.dist-info/METADATA": "Name: idna\nVersion: 3.20\n"})
        reason = f"{name}: its sha256"
    elif attack == "a wheel added":
        name = "aaa_evil-1.0-py3-none-any.whl"
        members[name] = a_wheel({"aaa_evil.pth": "import os; os.system('id')\n"})
        reason = f"{name}: the hash lock has no aaa-evil"
    else:
        other = tmp_path / "other-source"
        shutil.copytree(source / "rmsd", other)
        with open(other / "src" / "rmsd" / "__init__.py", "a") as handle:
            handle.write("import os\nos.system('id')\n")
        module = load_wheelhouse("wheelhouse_other_build")
        backend = next((cache_dir / "build-backend").glob("*.whl"))
        wheel = Path(module.build_rmsd(str(other), module.source_files(str(other)), str(backend), str(tmp_path)))
        name = dependency_wheel(members, "rmsd")
        assert wheel.name == name and wheel.read_bytes() != members[name]
        members[name] = wheel.read_bytes()
        reason = "its rmsd wheel"
    rewrite_cache(tar, members)

    proc = call_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"), env=no_index_env(tmp_path / "none"))
    assert f"refusing the cached {tar}: {reason}" in proc.stderr
    assert proc.returncode == 1 and proc.stdout == ""


def test_any_byte_changed_in_a_cached_tar_is_refused(built, source, tmp_path):
    """Each byte of the tar, headers and padding too: the check reads nothing but the tar, the source and the
    lock, so any change is refused (here without rewriting the requirements files to match)."""
    _, result = built
    module = load_wheelhouse("wheelhouse_bytes")
    original = Path(result["path"]).read_bytes()
    members = members_of(result["path"])
    rmsd = dependency_wheel(members, "rmsd")
    lock = module.read_lock(str(source / LOCK))
    constraints = (source / "constraints.txt").read_text()

    def check(found):
        module.check_members(found, (rmsd, members[rmsd]), lock, constraints, ["supervisor"], False)

    tar = tmp_path / "cached.tar"
    tar.write_bytes(original)
    assert module.verified_cache(str(tar), check) == original
    with tarfile.open(result["path"]) as archive:
        found = archive.getmembers()
    # Each member's header, content and padding; the last one's padding runs to the end of the archive.
    ends = [m.offset for m in found[1:]] + [len(original)]
    regions = [region for m, end in zip(found, ends)
               for region in ((m.offset, m.offset_data), (m.offset_data, m.offset_data + m.size),
                              (m.offset_data + m.size, end)) if region[1] > region[0]]
    cases = 0

    @given(region=st.sampled_from(regions), where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
    @HYPOTHESIS
    def changed(region, where, flip):
        nonlocal cases
        data = bytearray(original)
        data[region[0] + int(where * (region[1] - region[0]))] ^= flip
        tar.write_bytes(bytes(data))
        assert module.verified_cache(str(tar), check) is None
        cases += 1

    changed()
    assert cases == HYPOTHESIS.max_examples
    for data in (original + b"\0" * 512, original[:-512], original[:len(original) // 2]):
        tar.write_bytes(data)
        assert module.verified_cache(str(tar), check) is None


@pytest.mark.parametrize("project", ["idna", "setuptools"])
def test_an_index_serving_another_file_for_a_pinned_release_is_refused_at_download(built, source, local_index,
                                                                                tmp_path, project):
    """A dependency, and the build backend that runs on the controller: pip downloads with --require-hashes
    against the lock, so the file is refused before anything is built or unpacked."""
    cache_dir, _ = built
    index = tmp_path / "index"
    shutil.copytree(local_index, index)
    name = dependency_wheel(os.listdir(index), project)
    (index / name).write_bytes(a_wheel({f"{project}/__init__.py": "import os\nos.system('id')\n"}))
    cache = tmp_path / "cache"
    if project != "setuptools":
        shutil.copytree(cache_dir / "build-backend", cache / "build-backend")

    proc = call_wheelhouse(build_args(source, cache, "--extra", "supervisor"), env=no_index_env(index))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "refused what the package index served" in proc.stderr
    assert re.search(rf"{project}==\S+ has a sha256 the hash lock does not allow", proc.stderr), proc.stderr
    assert not list(cache.glob("*.tar"))
    assert [p.name for p in (cache / "build-backend").glob("*.whl")] == ([] if project == "setuptools" else
                                                                         [p.name for p in index.glob("setuptools-*")])


def test_a_cached_build_backend_that_is_not_the_locked_one_is_replaced(built, source, local_index, tmp_path):
    cache_dir, _ = cache_copy(built, tmp_path)
    backend = next((cache_dir / "build-backend").glob("*.whl"))
    good = backend.read_bytes()
    backend.write_bytes(a_wheel({"setuptools/build_meta.py": "import os\nos.system('id')\n"}))
    proc = call_wheelhouse(build_args(source, cache_dir, "--extra", "supervisor"), env=no_index_env(local_index))
    assert proc.returncode == 0, proc.stderr
    assert f"refusing the cached build backend {backend}" in proc.stderr
    assert json.loads(proc.stdout)["cached"] is True
    assert backend.read_bytes() == good


# --- the host ------------------------------------------------------------------------------------------------------


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


# Stands in for the virtualenv's python, to see how pip is called: records its arguments and the index pip would
# use, and fails the way pip does, repeating the URL it was given.
PIP_PROBE = """#!/bin/sh
printf '%s\\n' "$@" > "$(dirname "$0")/argv"
printf '%s\\n' "$PIP_INDEX_URL" > "$(dirname "$0")/index-url"
echo "Looking in indexes: $PIP_INDEX_URL"
echo "ERROR: No matching distribution found for alembic"
exit 1
"""


def test_an_index_url_with_a_credential_reaches_pip_in_its_environment_and_is_never_shown(built, tmp_path):
    """server_pip_index_url reaches the host in a file and pip in its environment, never on a command line (which
    -vvv and the host's other users see); the install removes the file once read and shows the URL without its
    user and password, pip's own lines too."""
    _, result = built
    canary = "cn-" + secrets.token_hex(8)
    url = f"http://rms-ci:{canary}@127.0.0.1:9/simple/"
    url_file = tmp_path / "pip-index-url"
    url_file.write_text(url + "\n")
    venv, stamp = tmp_path / "opt" / "venv", tmp_path / "opt" / "stamp"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(PIP_PROBE)
    (venv / "bin" / "python").chmod(0o755)
    proc = run_install(["--archive", result["path"], "--venv", str(venv), "--stamp", str(stamp),
                        "--fingerprint", result["sha256"], "--index-url-file", str(url_file)])
    assert proc.returncode == 1
    assert "from http://***@127.0.0.1:9/simple/" in proc.stderr and "pip failed" in proc.stderr
    assert "Looking in indexes: http://***@127.0.0.1:9/simple/" in proc.stderr
    assert canary not in proc.stdout + proc.stderr
    argv = (venv / "bin" / "argv").read_text().splitlines()
    assert argv[:3] == ["-m", "pip", "install"] and canary not in " ".join(argv)
    assert (venv / "bin" / "index-url").read_text().strip() == url
    assert not url_file.exists() and not stamp.exists()


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


def test_host_without_wheels_is_told_to_use_its_own_index(built, source, tmp_path):
    # No wheel of the compiled dependencies is published for this machine.
    cache_dir, _ = built
    shutil.copytree(cache_dir / "build-backend", tmp_path / "cache" / "build-backend")
    args = build_args(source, tmp_path / "cache")
    args[args.index("--machine") + 1] = "riscv64"
    proc = call_wheelhouse(args)
    assert proc.returncode == 1
    assert "fits the managed host" in proc.stderr and "server_pip_index_url" in proc.stderr
    assert proc.stdout == ""
    assert not list((tmp_path / "cache").glob("*.tar"))


def test_target_options():
    module = load_wheelhouse("wheelhouse_options")
    options = module.pip_target_options({"python_version": "3.11", "machine": "aarch64", "glibc": "2.19"})
    assert options == ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                       "--abi", "cp311", "--platform", "manylinux_2_19_aarch64",
                       "--platform", "manylinux_2_18_aarch64", "--platform", "manylinux_2_17_aarch64",
                       "--platform", "manylinux2014_aarch64"]
