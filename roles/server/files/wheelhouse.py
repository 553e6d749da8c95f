"""Build the rmsd wheelhouse for a managed host, on the controller.

The managed hosts have no package index: this script builds the bundled rmsd and downloads its pinned
dependencies (constraints.txt) as wheels that fit the host (its Python, machine and glibc, not the
controller's), and packs them into one reproducible tar with requirements files that pin every wheel
by sha256. The tar is cached under --cache-dir by a key over every input, so a second run with
unchanged inputs answers at once without calling pip.

Runs with the Python that runs Ansible; standard library only (pip is called as a subprocess).

    wheelhouse.py --source RMSD_PROJECT_DIR --constraints FILE --cache-dir DIR
                  --python-version 3.11 --machine x86_64 --glibc 2.36 [--extra supervisor] [--rmsd-only]

stdout: one JSON object {"path", "sha256", "key", "wheels", "bytes", "cached", "rmsd_version"}.
Errors: a message on stderr and exit status 1.
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

# Wheel times are taken from this when set (bdist_wheel honours it): without it the rmsd wheel, and so
# the tar, would differ on every build. 1980-01-01, the earliest time a zip file can hold.
SOURCE_DATE_EPOCH = "315532800"
# manylinux_2_17 is manylinux2014, the oldest glibc the manylinux_2_N scheme names.
OLDEST_GLIBC_MINOR = 17
# PEP 599: the machines manylinux2014 wheels are built for.
MANYLINUX2014_MACHINES = ("x86_64", "i686", "aarch64", "armv7l", "ppc64", "ppc64le", "s390x")
# A wheel's file name (PEP 427): name-version(-build)?-python-abi-platform.whl
WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
EXCLUDED_DIRS = ("__pycache__",)
EXCLUDED_SUFFIXES = (".pyc", ".egg-info")
PIP_TAIL_LINES = 15


class Error(Exception):
    """A failure to report on one line (plus pip's last lines, when pip failed)."""


def canonical_name(name: str) -> str:
    # PEP 503: the name pip compares.
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def pinned_version(constraints_text: str, project: str) -> str:
    for line in constraints_text.splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if match and canonical_name(match.group(1)) == canonical_name(project):
            return match.group(2)
    raise Error(f"--extra {project}: constraints.txt pins no version of it "
                f"(expected a line {project}==VERSION)")


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


def cache_key(source: str, files: list[str], constraints_text: str, target: dict, extras: list[str],
              rmsd_only: bool) -> str:
    digest = hashlib.sha256()

    def field(label: str, data: bytes) -> None:
        # Length-prefixed, so no two different inputs feed the same bytes.
        digest.update(b"%s %d\n" % (label.encode(), len(data)))
        digest.update(data)

    for rel in files:
        with open(os.path.join(source, rel), "rb") as handle:
            field("file " + rel, handle.read())
    field("constraints", constraints_text.encode())
    field("target", json.dumps(target, sort_keys=True).encode())
    field("extras", json.dumps(extras).encode())
    field("rmsd_only", b"1" if rmsd_only else b"0")
    # A changed script may build a different tar.
    with open(os.path.abspath(__file__), "rb") as handle:
        field("script", handle.read())
    return digest.hexdigest()


def run_pip(argv: list[str], what: str) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip"] + argv + ["--disable-pip-version-check"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode == 0:
        return
    output = proc.stdout.decode("utf-8", "replace")
    tail = "\n".join("  pip: " + line for line in output.rstrip().splitlines()[-PIP_TAIL_LINES:])
    # With every version pinned, "no matching distribution" and a resolution conflict over a pinned
    # project both mean: no file of that release fits the host.
    missing = (re.findall(r"No matching distribution found for (\S+)", output)
               or re.findall(r"The user requested \(constraint\) (\S+)", output))
    if missing:
        raise Error(f"no wheel of {', '.join(missing)} fits the managed host ({what}): build one into your "
                    f"own index and set server_pip_index_url to install from it instead\n{tail}")
    raise Error(f"pip failed (exit {proc.returncode}) while {what}\n{tail}")


def wheels_in(folder: str) -> dict[str, str]:
    """{file name: path} of the wheels in folder; anything else there means pip fetched a non-wheel."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".whl"):
            raise Error(f"pip fetched {name}, which is not a wheel")
        found[name] = os.path.join(folder, name)
    return found


def requirement_lines(paths: list[str]) -> list[str]:
    """name==version --hash=sha256:... for each wheel; several wheels of one release share a line."""
    releases = {}
    for path in sorted(paths, key=os.path.basename):
        match = WHEEL_RE.match(os.path.basename(path))
        if not match:
            raise Error(f"{os.path.basename(path)} is not a wheel file name")
        name = canonical_name(match.group("name"))
        version = match.group("version").replace("_", "-")
        previous = releases.setdefault(name, (version, []))
        if previous[0] != version:
            raise Error(f"two versions of {name} were fetched: {previous[0]} and {version}")
        previous[1].append(sha256_file(path))
    return [name + "==" + version + "".join(" --hash=sha256:" + h for h in hashes)
            for name, (version, hashes) in sorted(releases.items())]


def write_tar(members: dict[str, bytes | str], dest: str) -> None:
    """An uncompressed tar of members ({name: bytes or file path}) that depends on nothing but their
    names and content: sorted, times 0, owner 0/"", mode 0644. Written under a temporary name and
    renamed, so a reader never sees half a file (and two builds racing write the same bytes)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=os.path.dirname(dest))
    try:
        with os.fdopen(fd, "wb") as raw:
            # PAX, as wheel file names can pass ustar's 100 characters.
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(members):
                    content = members[name]
                    if isinstance(content, str):
                        with open(content, "rb") as handle:
                            content = handle.read()
                    info = tarfile.TarInfo(name)
                    info.size = len(content)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.type = tarfile.REGTYPE
                    tar.addfile(info, io.BytesIO(content))
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(data: dict, dest: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(dest))
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def cached_result(tar_path: str, json_path: str) -> dict | None:
    """The metadata of a finished build of this key, or None when it must be built (again)."""
    try:
        with open(json_path) as handle:
            meta = json.load(handle)
        size = os.stat(tar_path).st_size
    except (OSError, ValueError):
        return None
    # A tar that is not the one the metadata describes (cut short, replaced) is built again.
    if not isinstance(meta, dict) or meta.get("bytes") != size:
        return None
    meta["path"] = tar_path  # the cache folder may have been moved or reached another way
    return meta


def build(args: argparse.Namespace, source: str, files: list[str], constraints_path: str,
          constraints_text: str, target: dict, extras: list[str], tar_path: str, key: str) -> dict:
    work = tempfile.mkdtemp(prefix="rmsd-wheelhouse-")
    try:
        # Build from a copy holding just the hashed files: no build/ or egg-info lands in the
        # repository, and nothing the key does not cover goes into the wheel.
        project = os.path.join(work, "rmsd")
        for rel in files:
            dest = os.path.join(project, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(os.path.join(source, rel), dest)
            os.chmod(dest, 0o644)  # the checkout's umask must not reach the wheel
        built = os.path.join(work, "built")
        run_pip(["wheel", "--no-deps", "--quiet", "-w", built, project], "building the rmsd wheel")
        rmsd_wheels = [n for n in wheels_in(built) if n.startswith("rmsd-")]
        if len(rmsd_wheels) != 1:
            made = sorted(os.listdir(built)) or "nothing"
            raise Error(f"pip wheel made {made}, expected one rmsd wheel")
        rmsd_wheel = os.path.join(built, rmsd_wheels[0])
        rmsd_version = WHEEL_RE.match(rmsd_wheels[0]).group("version")

        options = pip_target_options(target)
        what = (f"fetching wheels for Python {target['python_version']} on {target['machine']} "
                f"with glibc {target['glibc']}")
        base = {rmsd_wheels[0]: rmsd_wheel}
        extra_wheels = {}
        if not args.rmsd_only:
            # rmsd and each extra are resolved on their own: requirements.txt must install without the
            # extras, and an extra's file lists only what rmsd's does not already bring.
            deps = os.path.join(work, "deps")
            run_pip(["download", "-c", constraints_path, "--dest", deps] + options + [rmsd_wheel],
                    what)
            base.update(wheels_in(deps))
            for extra in extras:
                folder = os.path.join(work, "extra-" + extra)
                requirement = f"{extra}=={pinned_version(constraints_text, extra)}"
                run_pip(["download", "-c", constraints_path, "--dest", folder] + options
                        + [requirement], what + f" (extra {extra})")
                base_names = {canonical_name(WHEEL_RE.match(n).group("name")) for n in base}
                extra_wheels[extra] = {n: p for n, p in wheels_in(folder).items()
                                       if canonical_name(WHEEL_RE.match(n).group("name")) not in base_names}

        members = dict(base)
        members["constraints.txt"] = constraints_text.encode()
        members["requirements.txt"] = ("\n".join(requirement_lines(list(base.values()))) + "\n").encode()
        for extra, wheels in extra_wheels.items():
            members.update(wheels)
            lines = requirement_lines(list(wheels.values()))
            members[f"requirements-{extra}.txt"] = "".join(line + "\n" for line in lines).encode()
        write_tar(members, tar_path)
        wheel_count = sum(1 for name in members if name.endswith(".whl"))
        return {"path": tar_path, "sha256": sha256_file(tar_path), "key": key, "wheels": wheel_count,
                "bytes": os.stat(tar_path).st_size, "rmsd_version": rmsd_version,
                "target": target, "extras": extras, "rmsd_only": args.rmsd_only,
                "files": sorted(members)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--source", required=True, help="the rmsd project folder (pyproject.toml, src/)")
    parser.add_argument("--constraints", required=True, help="constraints.txt pinning every dependency")
    parser.add_argument("--cache-dir", required=True, help="where built wheelhouses are kept")
    parser.add_argument("--python-version", required=True, help="the host's python3 MAJOR.MINOR")
    parser.add_argument("--machine", required=True, help="the host's platform.machine()")
    parser.add_argument("--glibc", required=True, help="the host's glibc version (platform.libc_ver())")
    parser.add_argument("--extra", action="append", default=[], metavar="PROJECT",
                        help="a project pinned in constraints.txt to add, with its own requirements file")
    parser.add_argument("--rmsd-only", action="store_true",
                        help="just the rmsd wheel and constraints.txt (the host installs from an index)")
    args = parser.parse_args(argv)
    try:
        source = os.path.abspath(args.source)
        constraints_path = os.path.abspath(args.constraints)
        try:
            with open(constraints_path) as handle:
                constraints_text = handle.read()
        except OSError as exc:
            raise Error(f"cannot read --constraints: {exc}") from None
        extras = sorted({canonical_name(e) for e in args.extra})
        for extra in extras:
            pinned_version(constraints_text, extra)  # fail before any work
        target = target_of(args)
        files = source_files(source)
        key = cache_key(source, files, constraints_text, target, extras, args.rmsd_only)

        cache_dir = os.path.abspath(args.cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        tar_path = os.path.join(cache_dir, key + ".tar")
        json_path = os.path.join(cache_dir, key + ".json")
        meta = cached_result(tar_path, json_path)
        cached = meta is not None
        if not cached:
            meta = build(args, source, files, constraints_path, constraints_text, target, extras,
                         tar_path, key)
            write_json(meta, json_path)
    except Error as exc:
        sys.stderr.write(f"wheelhouse.py: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"wheelhouse.py: {exc}\n")
        return 1
    result = {name: meta[name] for name in ("path", "sha256", "key", "wheels", "bytes", "rmsd_version")}
    result["cached"] = cached
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
