"""Build the rmsd wheelhouse for a managed host, on the controller.

The managed hosts have no package index: this script builds the bundled rmsd and downloads its pinned
dependencies as wheels that fit the host (its Python, machine and glibc, not the controller's), and packs
them into one reproducible tar with requirements files that pin every wheel by sha256.

Nothing is taken on trust from the package index or from the cache. Every wheel must have a sha256 that
the committed hash lock (--lock, derived from constraints.txt) allows for its name and version: pip
downloads with --require-hashes against it. rmsd is built with the build backend the lock pins (its wheel
hash-checked, run in a Python that sees nothing else), so the same source always gives the same wheel.
The tar is cached under --cache-dir by a key over every input; a cached tar is used only when it passes
the same checks as a new one (every member wheel in the lock, the rmsd wheel identical to the one just
built from the source, the requirements files and constraints.txt as a build writes them, no other member,
the tar byte for byte as this script writes it), otherwise it is built again. The sha256 returned is that
of the tar's bytes.

Runs with the Python that runs Ansible; standard library only (pip is called as a subprocess).

    wheelhouse.py --source RMSD_PROJECT_DIR --constraints FILE --lock FILE --cache-dir DIR
                  --python-version 3.11 --machine x86_64 --glibc 2.36 [--extra supervisor] [--rmsd-only]

stdout: one JSON object {"path", "sha256", "key", "wheels", "bytes", "cached", "rmsd_version"}.
Errors: a message on stderr and exit status 1. A refused cached tar is said on stderr, then built again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# Wheel times are taken from this when set (bdist_wheel honours it): without it the rmsd wheel, and so
# the tar, would differ on every build. 1980-01-01, the earliest time a zip file can hold.
SOURCE_DATE_EPOCH = "315532800"
# rmsd's build backend ([build-system] in its pyproject.toml); its version and hashes come from the lock.
BUILD_BACKEND = "setuptools"
BUILD_BACKEND_MODULE = "setuptools.build_meta"
# manylinux_2_17 is manylinux2014, the oldest glibc the manylinux_2_N scheme names.
OLDEST_GLIBC_MINOR = 17
# PEP 599: the machines manylinux2014 wheels are built for.
MANYLINUX2014_MACHINES = ("x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x")
# A wheel's file name (PEP 427): name-version(-build)?-python-abi-platform.whl
WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
# An entry of the lock, its continuation lines joined: name==version [; marker] --hash=sha256:... ...
LOCK_ENTRY_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)\s*(?:;[^#]*?)?"
                           r"(?P<hashes>(?:\s*--hash=sha256:[0-9a-f]{64})+)\s*$")
# The only members a wheelhouse has besides wheels and requirements files; plain names only.
MEMBER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
EXCLUDED_DIRS = ("__pycache__",)
EXCLUDED_SUFFIXES = (".pyc", ".egg-info")
PIP_TAIL_LINES = 15
OUTPUT_TAIL_LINES = 15

# Runs the build backend in `python -I -S -B`: no site-packages, no PYTHON* variables, so nothing but the
# standard library and the hash-checked backend can take part in the build.
BUILD_CODE = """
import os, sys
module, backend, project, out = sys.argv[1:]
sys.path.insert(0, backend)
os.chdir(project)
from importlib import import_module
import_module(module).build_wheel(out)
"""


class Error(Exception):
    """A failure to report on one line (plus pip's last lines, when pip failed)."""


class MissingWheel(Error):
    """pip found no file of a pinned release that it may use."""

    def __init__(self, names: list[str], tail: str):
        super().__init__(", ".join(names))
        self.names = names
        self.tail = tail


def canonical_name(name: str) -> str:
    # PEP 503: the name pip compares.
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def read_lock(path: str) -> dict[str, tuple[str, frozenset[str], str]]:
    """{canonical name: (version, allowed sha256s, the entry as pip reads it)} from the hash lock."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as exc:
        raise Error(f"cannot read --lock: {exc}") from None
    pins: dict[str, tuple[str, frozenset[str], str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        match = LOCK_ENTRY_RE.match(entry)
        if not match:
            raise Error(f"{path}: {entry[:80]!r} is not name==version [; marker] --hash=sha256:...; "
                        "regenerate the lock with scripts/update-constraints.sh --lock-only")
        name = canonical_name(match.group("name"))
        if name in pins:
            raise Error(f"{path} lists {name} twice; regenerate it with scripts/update-constraints.sh --lock-only")
        hashes = frozenset(re.findall(r"[0-9a-f]{64}", match.group("hashes")))
        pins[name] = (match.group("version"), hashes, " ".join(entry.split()))
    if not pins:
        raise Error(f"{path} pins nothing; regenerate it with scripts/update-constraints.sh --lock-only")
    return pins


def wheel_identity(file_name: str) -> tuple[str, str]:
    match = WHEEL_RE.match(file_name)
    if not match:
        raise Error(f"{file_name} is not a wheel file name")
    return canonical_name(match.group("name")), match.group("version").replace("_", "-")


def lock_refusal(file_name: str, data: bytes, lock: dict) -> str | None:
    """Why the lock does not allow this wheel, or None when it does."""
    name, version = wheel_identity(file_name)
    if name not in lock:
        return f"{file_name}: the hash lock has no {name}"
    if lock[name][0] != version:
        return f"{file_name}: the hash lock pins {name}=={lock[name][0]}"
    if sha256_bytes(data) not in lock[name][1]:
        return f"{file_name}: its sha256 {sha256_bytes(data)} is none the hash lock allows for {name}=={version}"
    return None


def source_files(source: str) -> list[str]:
    """Relative paths of the rmsd files that go into its wheel: pyproject.toml and src/, sorted,
    without caches and build output."""
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        raise Error(f"{source} has no pyproject.toml: --source must be the rmsd project folder")
    if not os.path.isdir(os.path.join(source, "src")):
        raise Error(f"{source} has no src/ folder: --source must be the rmsd project folder")
    files = ["pyproject.toml"]
    for root, dirs, names in os.walk(os.path.join(source, "src")):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.endswith(EXCLUDED_SUFFIXES)]
        for name in names:
            if not name.endswith(EXCLUDED_SUFFIXES):
                files.append(os.path.relpath(os.path.join(root, name), source).replace(os.sep, "/"))
    return sorted(files)


def target_of(args: argparse.Namespace) -> dict:
    """The managed host as given on the command line, checked and normalised."""
    if not re.match(r"^3\.\d+$", args.python_version):
        raise Error("--python-version must be MAJOR.MINOR of the host's python3, e.g. 3.11 "
                    f"(got {args.python_version!r})")
    if not re.match(r"^[A-Za-z0-9_]+$", args.machine):
        raise Error(f"--machine must be platform.machine() of the host, e.g. x86_64 (got {args.machine!r})")
    match = re.match(r"^2\.(\d+)", args.glibc)
    if not match:
        # An empty libc_ver() is a musl (or otherwise non-glibc) host: no manylinux wheel fits it.
        raise Error(f"--glibc must be the host's glibc version, e.g. 2.36 (got {args.glibc!r}); hosts "
                    "without glibc (musl) cannot use the wheelhouse: point server_pip_index_url at an "
                    "index that serves them")
    minor = int(match.group(1))
    if minor < OLDEST_GLIBC_MINOR:
        raise Error(f"glibc 2.{minor} is older than 2.17, the oldest manylinux wheels are built for")
    machine = args.machine.lower()
    if machine == "amd64":
        machine = "x86_64"
    elif machine == "arm64":
        machine = "aarch64"
    return {"python_version": args.python_version, "machine": machine, "glibc": f"2.{minor}"}


def pip_target_options(target: dict) -> list[str]:
    """pip download options for wheels that run on the host (not the controller)."""
    major, minor = target["python_version"].split(".")
    options = ["--only-binary=:all:", "--python-version", target["python_version"],
               "--implementation", "cp", "--abi", f"cp{major}{minor}"]
    # Newest first: a wheel for a newer glibc than the host's would not load there.
    glibc_minor = int(target["glibc"].split(".")[1])
    for n in range(glibc_minor, OLDEST_GLIBC_MINOR - 1, -1):
        options += ["--platform", f"manylinux_2_{n}_{target['machine']}"]
    if target["machine"] in MANYLINUX2014_MACHINES:
        options += ["--platform", f"manylinux2014_{target['machine']}"]
    return options


def cache_key(source: str, files: list[str], constraints_text: str, lock_text: str, target: dict,
              extras: list[str], rmsd_only: bool) -> str:
    digest = hashlib.sha256()

    def field(label: str, data: bytes) -> None:
        # Length-prefixed, so no two different inputs feed the same bytes.
        digest.update(b"%s %d\n" % (label.encode(), len(data)))
        digest.update(data)

    for rel in files:
        field("file " + rel, read_file(os.path.join(source, rel)))
    field("constraints", constraints_text.encode())
    field("lock", lock_text.encode())
    field("target", json.dumps(target, sort_keys=True).encode())
    field("extras", json.dumps(extras).encode())
    field("rmsd_only", b"1" if rmsd_only else b"0")
    # A changed script may build a different tar.
    field("script", read_file(os.path.abspath(__file__)))
    return digest.hexdigest()


def run_pip(argv: list[str], what: str) -> None:
    env = dict(os.environ, PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip"] + argv + ["--disable-pip-version-check"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode == 0:
        return
    output = proc.stdout.decode("utf-8", "replace")
    tail = "\n".join("  pip: " + line for line in output.rstrip().splitlines()[-PIP_TAIL_LINES:])
    if "DO NOT MATCH THE HASHES" in output:
        served = sorted(set(re.findall(r"^\s+(\S+==\S+) from ", output, flags=re.MULTILINE)))
        raise Error(f"refused what the package index served while {what}: {', '.join(served) or 'a file'} "
                    "has a sha256 the hash lock does not allow. The index, a proxy or pip's cache is serving "
                    "a file that is not the published one; nothing was built or installed. Find out why "
                    f"before running again\n{tail}")
    # With every version pinned, "no matching distribution" and a resolution conflict over a pinned
    # project both mean: no file of that release fits.
    missing = (re.findall(r"No matching distribution found for (\S+)", output)
               or re.findall(r"The user requested \(constraint\) (\S+)", output))
    if missing:
        raise MissingWheel(missing, tail)
    raise Error(f"pip failed (exit {proc.returncode}) while {what}\n{tail}")


def wheels_in(folder: str) -> dict[str, str]:
    """{file name: path} of the wheels in folder; anything else there means pip fetched a non-wheel."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".whl"):
            raise Error(f"pip fetched {name}, which is not a wheel")
        found[name] = os.path.join(folder, name)
    return found


def build_backend(lock: dict, lock_path: str, cache_dir: str) -> str:
    """The build backend's wheel, the one the lock pins: kept in the cache, checked on every use, downloaded
    with --require-hashes when missing or refused."""
    if BUILD_BACKEND not in lock:
        raise Error(f"{lock_path} has no {BUILD_BACKEND}, rmsd's build backend; regenerate it with "
                    "scripts/update-constraints.sh --lock-only")
    folder = os.path.join(cache_dir, "build-backend")
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".whl") or not os.path.isfile(path):
            continue
        refusal = lock_refusal(name, read_file(path), lock)
        if refusal is None and wheel_identity(name)[0] == BUILD_BACKEND:
            return path
        sys.stderr.write(f"wheelhouse.py: refusing the cached build backend {path}: {refusal or 'not it'}\n")
        os.unlink(path)
    download = tempfile.mkdtemp(prefix=".download-", dir=folder)
    try:
        requirement = os.path.join(download, "requirements.txt")
        with open(requirement, "w") as handle:
            handle.write(lock[BUILD_BACKEND][2] + "\n")
        version = lock[BUILD_BACKEND][0]
        what = f"downloading the build backend {BUILD_BACKEND}=={version}"
        try:
            run_pip(["download", "--require-hashes", "--no-deps", "--only-binary=:all:", "-r", requirement,
                     "--dest", os.path.join(download, "wheels")], what)
        except MissingWheel as exc:
            raise Error(f"no wheel of {BUILD_BACKEND}=={version} with a sha256 the hash lock allows was found "
                        f"while {what}: is pip's index reachable?\n{exc.tail}") from None
        wheels = wheels_in(os.path.join(download, "wheels"))
        if len(wheels) != 1:
            raise Error(f"pip fetched {sorted(wheels) or 'nothing'} while {what}")
        name, path = next(iter(wheels.items()))
        refusal = lock_refusal(name, read_file(path), lock)
        if refusal:
            raise Error(f"refused the build backend pip fetched: {refusal}")
        dest = os.path.join(folder, name)
        os.replace(path, dest)
        return dest
    finally:
        shutil.rmtree(download, ignore_errors=True)


def build_rmsd(source: str, files: list[str], backend: str, work: str) -> str:
    """The rmsd wheel, built from a copy holding just the hashed files (no build/ or egg-info lands in the
    repository, and nothing the key does not cover goes into the wheel) with the checked backend."""
    project = os.path.join(work, "rmsd")
    for rel in files:
        dest = os.path.join(project, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(os.path.join(source, rel), dest)
        os.chmod(dest, 0o644)  # the checkout's umask must not reach the wheel
    backend_dir = os.path.join(work, "build-backend")
    with zipfile.ZipFile(backend) as wheel:
        wheel.extractall(backend_dir)
    built = os.path.join(work, "built")
    os.makedirs(built)
    # HOME: no ~/.pydistutils.cfg of the controller's user changes the build.
    env = {"PATH": os.defpath, "HOME": work, "TMPDIR": tempfile.gettempdir(),
           "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    proc = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", BUILD_CODE, BUILD_BACKEND_MODULE, backend_dir,
                           project, built],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    made = sorted(os.listdir(built))
    if proc.returncode != 0 or len(made) != 1 or wheel_identity(made[0])[0] != "rmsd":
        lines = proc.stdout.decode("utf-8", "replace").rstrip().splitlines()[-OUTPUT_TAIL_LINES:]
        tail = "\n".join("  build: " + line for line in lines)
        raise Error(f"building the rmsd wheel failed (exit {proc.returncode}, made {made or 'nothing'})\n{tail}")
    return os.path.join(built, made[0])


def requirement_text(wheels: dict[str, bytes]) -> str:
    """name==version --hash=sha256:... for each wheel; several wheels of one release share a line."""
    releases: dict[str, tuple[str, list[str]]] = {}
    for file_name in sorted(wheels):
        name, version = wheel_identity(file_name)
        previous = releases.setdefault(name, (version, []))
        if previous[0] != version:
            raise Error(f"two versions of {name}: {previous[0]} and {version}")
        previous[1].append(sha256_bytes(wheels[file_name]))
    return "".join(name + "==" + version + "".join(" --hash=sha256:" + h for h in hashes) + "\n"
                   for name, (version, hashes) in sorted(releases.items()))


def check_members(members: dict[str, bytes], rmsd_wheel: tuple[str, bytes], lock: dict, constraints_text: str,
                  extras: list[str], rmsd_only: bool) -> None:
    """Raises Error unless members are what a build from these inputs writes: the rmsd wheel just built, wheels
    the lock allows, constraints.txt, and requirements files that pin exactly those wheels."""
    texts = {"constraints.txt"} if rmsd_only else (
        {"constraints.txt", "requirements.txt"} | {f"requirements-{extra}.txt" for extra in extras})
    wheels = {name: data for name, data in members.items() if name.endswith(".whl")}
    unexpected = sorted(set(members) - set(wheels) - texts)
    if unexpected or not texts <= set(members):
        raise Error(f"it holds {unexpected or 'no'} unexpected members and lacks {sorted(texts - set(members))}")
    if members["constraints.txt"] != constraints_text.encode():
        raise Error("its constraints.txt is not the one given")
    rmsd = [name for name in wheels if wheel_identity(name)[0] == "rmsd"]
    if rmsd != [rmsd_wheel[0]] or wheels[rmsd[0]] != rmsd_wheel[1]:
        raise Error(f"its rmsd wheel {rmsd} is not the one built from the source ({rmsd_wheel[0]})")
    others = {name: data for name, data in wheels.items() if name not in rmsd}
    if rmsd_only:
        if others:
            raise Error(f"it holds wheels besides rmsd's: {sorted(others)}")
        return
    for name, data in others.items():
        refusal = lock_refusal(name, data, lock)
        if refusal:
            raise Error(refusal)
    # Each wheel in exactly one requirements file (rmsd's, then each extra's), each file as a build writes it.
    unlisted = dict(wheels)
    for text in ["requirements.txt"] + [f"requirements-{extra}.txt" for extra in extras]:
        listed = {line.split("==", 1)[0] for line in members[text].decode("utf-8", "replace").splitlines()}
        part = {name: unlisted.pop(name) for name in list(unlisted) if wheel_identity(name)[0] in listed}
        if members[text] != requirement_text(part).encode() or (text == "requirements.txt" and "rmsd" not in listed):
            raise Error(f"its {text} is not what a build writes for its wheels")
    if unlisted:
        raise Error(f"no requirements file pins {sorted(unlisted)}")


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar of members that depends on nothing but their names and content: sorted, times 0,
    owner 0/"", mode 0644."""
    out = io.BytesIO()
    # PAX, as wheel file names can pass ustar's 100 characters.
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(members[name]))
    return out.getvalue()


def tar_members(data: bytes) -> dict[str, bytes]:
    """{name: content} of a wheelhouse tar: plain files with plain names, each once."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if not member.isfile() or not MEMBER_NAME_RE.match(member.name) or member.name in members:
                    raise Error(f"it holds {member.name!r}, which is not a plain file of its own")
                members[member.name] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise Error(f"it is not a whole tar ({exc})") from None
    return members


def write_atomic(data: bytes, dest: str) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file (and two builds racing
    write the same bytes)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=os.path.dirname(dest))
    try:
        with os.fdopen(fd, "wb") as raw:
            raw.write(data)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def verified_cache(tar_path: str, check) -> bytes | None:
    """The cached tar's bytes when it passes check (and is byte for byte what tar_bytes writes), None when
    there is none; a refused one is said on stderr, to be built again."""
    try:
        data = read_file(tar_path)
    except FileNotFoundError:
        return None
    try:
        members = tar_members(data)
        check(members)
        if tar_bytes(members) != data:
            raise Error("its tar headers or padding are not the ones this script writes")
    except Error as exc:
        sys.stderr.write(f"wheelhouse.py: refusing the cached {tar_path}: {exc}; building it again\n")
        return None
    return data


def download(lock_path: str, lock: dict, rmsd_wheel: str, target: dict, extras: list[str], work: str
             ) -> tuple[dict[str, bytes], dict[str, dict[str, bytes]]]:
    """The wheels rmsd needs on the host, and each extra's besides those: every file of the lock that fits
    the host, downloaded with --require-hashes (the index can substitute nothing), then resolved from those
    files alone."""
    options = pip_target_options(target)
    what = (f"fetching wheels for Python {target['python_version']} on {target['machine']} "
            f"with glibc {target['glibc']}")
    verified = os.path.join(work, "verified")
    try:
        run_pip(["download", "--require-hashes", "--no-deps", "-r", lock_path, "--dest", verified] + options, what)
    except MissingWheel as exc:
        raise Error(f"no wheel of {', '.join(exc.names)} with a sha256 the hash lock allows fits the managed host "
                    f"({what}): build one into your own index and set server_pip_index_url to install from it "
                    f"instead\n{exc.tail}") from None

    def resolve(requirement: str, folder: str, label: str) -> dict[str, bytes]:
        # --isolated: no find-links or index from the environment; the checked files only.
        try:
            run_pip(["download", "--isolated", "--no-index", "--find-links", verified, "--dest", folder]
                    + options + [requirement], f"resolving {label} from the checked wheels")
        except MissingWheel as exc:
            raise Error(f"{label} needs {', '.join(exc.names)}, which the hash lock {lock_path} does not provide "
                        f"for this host ({what}); regenerate it with scripts/update-constraints.sh "
                        f"--lock-only\n{exc.tail}") from None
        return {name: read_file(path) for name, path in wheels_in(folder).items()
                if wheel_identity(name)[0] != "rmsd"}

    base = resolve(rmsd_wheel, os.path.join(work, "deps"), "rmsd")
    base_names = {wheel_identity(name)[0] for name in base}
    extra_wheels = {}
    for extra in extras:
        wheels = resolve(f"{extra}=={lock[extra][0]}", os.path.join(work, "extra-" + extra), f"the extra {extra}")
        extra_wheels[extra] = {name: data for name, data in wheels.items()
                               if wheel_identity(name)[0] not in base_names}
    return base, extra_wheels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--source", required=True, help="the rmsd project folder (pyproject.toml, src/)")
    parser.add_argument("--constraints", required=True, help="constraints.txt pinning every dependency")
    parser.add_argument("--lock", required=True,
                        help="the hash lock: every wheel's name==version and the sha256s it may have")
    parser.add_argument("--cache-dir", required=True, help="where built wheelhouses are kept")
    parser.add_argument("--python-version", required=True, help="the host's python3 MAJOR.MINOR")
    parser.add_argument("--machine", required=True, help="the host's platform.machine()")
    parser.add_argument("--glibc", required=True, help="the host's glibc version (platform.libc_ver())")
    parser.add_argument("--extra", action="append", default=[], metavar="PROJECT",
                        help="a project pinned in the lock to add, with its own requirements file")
    parser.add_argument("--rmsd-only", action="store_true",
                        help="just the rmsd wheel and constraints.txt (the host installs from an index)")
    args = parser.parse_args(argv)
    work = None
    try:
        source = os.path.abspath(args.source)
        try:
            with open(os.path.abspath(args.constraints)) as handle:
                constraints_text = handle.read()
        except OSError as exc:
            raise Error(f"cannot read --constraints: {exc}") from None
        lock_path = os.path.abspath(args.lock)
        lock = read_lock(lock_path)
        extras = sorted({canonical_name(e) for e in args.extra})
        for extra in extras:
            if extra not in lock:
                raise Error(f"--extra {extra}: the hash lock {lock_path} has no {extra}; add it to the lock's "
                            "inputs in scripts/update-constraints.sh")
        target = target_of(args)
        files = source_files(source)
        key = cache_key(source, files, constraints_text, read_file(lock_path).decode(), target, extras,
                        args.rmsd_only)

        cache_dir = os.path.abspath(args.cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        tar_path = os.path.join(cache_dir, key + ".tar")
        backend = build_backend(lock, lock_path, cache_dir)
        work = tempfile.mkdtemp(prefix="rmsd-wheelhouse-")
        built = build_rmsd(source, files, backend, work)
        rmsd_wheel = (os.path.basename(built), read_file(built))

        def check(members: dict[str, bytes]) -> None:
            check_members(members, rmsd_wheel, lock, constraints_text, extras, args.rmsd_only)

        data = verified_cache(tar_path, check)
        cached = data is not None
        if data is None:
            members = {rmsd_wheel[0]: rmsd_wheel[1], "constraints.txt": constraints_text.encode()}
            if not args.rmsd_only:
                # rmsd and each extra are resolved on their own: requirements.txt must install without the
                # extras, and an extra's file lists only what rmsd's does not already bring.
                base, extra_wheels = download(lock_path, lock, built, target, extras, work)
                members.update(base)
                members["requirements.txt"] = requirement_text({**base, rmsd_wheel[0]: rmsd_wheel[1]}).encode()
                for extra, wheels in extra_wheels.items():
                    members.update(wheels)
                    members[f"requirements-{extra}.txt"] = requirement_text(wheels).encode()
            check(members)
            data = tar_bytes(members)
            write_atomic(data, tar_path)
    except Error as exc:
        sys.stderr.write(f"wheelhouse.py: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"wheelhouse.py: {exc}\n")
        return 1
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"path": tar_path, "sha256": sha256_bytes(data), "key": key, "bytes": len(data), "cached": cached,
              "wheels": sum(1 for name in tar_members(data) if name.endswith(".whl")),
              "rmsd_version": wheel_identity(rmsd_wheel[0])[1]}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
