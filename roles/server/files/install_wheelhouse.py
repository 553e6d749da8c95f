"""Install rmsd from a wheelhouse (made by wheelhouse.py on the controller) on a managed host.

Runs on the managed host with its system python3 (ansible.builtin.script, executable python3);
standard library only, Python 3.9 syntax.

    install_wheelhouse.py --archive PATH --venv DIR --stamp FILE --fingerprint SHA256
                          [--extra supervisor] [--index-url-file FILE]

The archive must have the sha256 given as --fingerprint. pip installs from it with no index and every
wheel checked against requirements.txt's hashes; with --index-url-file, only the rmsd wheel comes from the
archive and its dependencies from the index that file names, pinned by the archive's constraints.txt. The
URL may carry a credential: it is read from that file (removed once read), handed to pip in its environment,
never on a command line, and shown without its user and password. pip's log is
appended to pip-install.log next to the virtualenv. The stamp is written last, so an interrupted
install is redone by the next run.

stdout: one JSON object, {"changed": false} or {"changed": true, "wheels": n, "seconds": s, "mode": ...}.
Progress on stderr; on failure, the reason (and pip's last lines) on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

PIP_TAIL_LINES = 20


class Error(Exception):
    """A failure reported on stderr with exit status 1."""


def progress(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_stamp(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""


def write_stamp(path: str, content: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stamp-", dir=folder)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(content + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def extract(archive: str, dest: str) -> list[str]:
    """Unpack the wheelhouse (flat: wheels and .txt files) into dest; returns the member names.
    Anything else (paths, links, devices) means the archive was not made by wheelhouse.py."""
    with tarfile.open(archive, mode="r:") as tar:
        members = tar.getmembers()
        for member in members:
            name = member.name
            if (not member.isfile() or name != os.path.basename(name) or name in ("", ".", "..")
                    or name.startswith(".") or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", name)):
                raise Error(f"refusing the archive: unexpected member {name!r} (only plain files at the top)")
        if hasattr(tarfile, "data_filter"):
            # Python 3.12, and security updates of 3.8 to 3.11: the "data" filter also strips modes.
            tar.extractall(dest, members=members, filter="data")
        else:
            tar.extractall(dest, members=members)  # every member checked above
    return [m.name for m in members]


def requirement_count(path: str) -> int:
    with open(path) as handle:
        return sum(1 for line in handle if line.strip() and not line.lstrip().startswith("#"))


def run_pip(python: str, argv: list[str], log: str, what: str, env: dict | None = None) -> None:
    command = [python, "-m", "pip"] + argv + ["--disable-pip-version-check", "--no-input", "--log", log]
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
                          env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        output = without_userinfo(proc.stdout.decode("utf-8", "replace"))
        lines = output.rstrip().splitlines()[-PIP_TAIL_LINES:]
        tail = "\n".join("  " + line for line in lines)
        raise Error(f"pip failed (exit {proc.returncode}) {what}; its last lines (whole log: {log}):\n{tail}")


def without_userinfo(text: str) -> str:
    """text with the user and password (a credential) of every URL in it replaced by ***."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@", r"\1***@", text)


def read_index_url(path: str) -> str:
    """The index URL in path (written for this install only), which is removed once read."""
    try:
        with open(path) as handle:
            url = handle.read().strip()
        os.unlink(path)
    except OSError as exc:
        raise Error(f"cannot read the index URL from --index-url-file: {exc}") from None
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$", url):
        raise Error(f"{path} does not hold an index URL (scheme://host/path): set server_pip_index_url to one")
    return url


def rmsd_installed(venv: str) -> bool:
    return bool(glob.glob(os.path.join(venv, "lib", "python*", "site-packages", "rmsd-*.dist-info")))


def install(args: argparse.Namespace) -> dict:
    venv = os.path.abspath(args.venv)
    archive = os.path.abspath(args.archive)
    fingerprint = args.fingerprint.strip().lower()

    index_url = read_index_url(args.index_url_file) if args.index_url_file else ""
    if read_stamp(args.stamp) == fingerprint and os.path.exists(os.path.join(venv, "bin", "rmsd")):
        return {"changed": False}

    # Checked before anything changes on the host.
    if not os.path.isfile(archive):
        raise Error(f"no archive at {archive}")
    actual = sha256_file(archive)
    if actual != fingerprint:
        raise Error(f"refusing {archive}: its sha256 is {actual}, not {fingerprint} as built on the "
                    "controller: the copy is corrupt or was tampered with")

    started = time.monotonic()
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        progress(f"creating the virtualenv {venv}")
        proc = subprocess.run([sys.executable, "-m", "venv", venv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            output = proc.stdout.decode("utf-8", "replace").rstrip()
            raise Error(f"{sys.executable} -m venv {venv} failed (on Debian and Ubuntu: install "
                        f"python3-venv):\n{output}")
    # Next to the virtualenv, appended to on every install: an auditor can see what pip contacted.
    log = os.path.join(os.path.dirname(venv), "pip-install.log")
    # Same file system as the virtualenv, whose space is known to be there (unlike /tmp's).
    work = tempfile.mkdtemp(prefix=".wheelhouse-", dir=os.path.dirname(venv))
    try:
        names = extract(archive, work)
        wheels = sorted(n for n in names if n.endswith(".whl"))
        rmsd_wheels = [n for n in wheels if n.startswith("rmsd-")]
        if len(rmsd_wheels) != 1:
            raise Error(f"the archive holds {len(rmsd_wheels)} rmsd wheels, expected one")
        rmsd_wheel = os.path.join(work, rmsd_wheels[0])
        # pip keeps an installed rmsd of the same version; a changed source must replace it.
        reinstall_rmsd = rmsd_installed(venv)

        if index_url:
            mode = "index"
            if "constraints.txt" not in names:
                raise Error("the archive has no constraints.txt")
            count = 1 + len(args.extra)
            extras = "".join(" and " + e for e in args.extra)
            progress(f"installing rmsd{extras} into {venv} from {without_userinfo(index_url)}...")
            constraints = os.path.join(work, "constraints.txt")
            run_pip(python, ["install", "-c", constraints, rmsd_wheel] + list(args.extra), log,
                    f"installing from {without_userinfo(index_url)}", env={"PIP_INDEX_URL": index_url})
        else:
            mode = "wheelhouse"
            requirement_files = ["requirements.txt"] + [f"requirements-{e}.txt" for e in args.extra]
            for name in requirement_files:
                if name not in names:
                    hint = "not a wheelhouse" if name == "requirements.txt" else "built without this --extra"
                    raise Error(f"the archive has no {name} ({hint})")
            count = sum(requirement_count(os.path.join(work, n)) for n in requirement_files)
            progress(f"installing {count} wheels into {venv} (no index)...")
            argv = ["install", "--no-index", "--find-links", work, "--require-hashes"]
            for name in requirement_files:
                argv += ["-r", os.path.join(work, name)]
            run_pip(python, argv, log, "installing from the wheelhouse with no index")
        if reinstall_rmsd:
            progress(f"reinstalling rmsd from {rmsd_wheels[0]}")
            run_pip(python, ["install", "--no-index", "--no-deps", "--force-reinstall", rmsd_wheel], log,
                    "reinstalling rmsd")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not os.path.exists(os.path.join(venv, "bin", "rmsd")):
        raise Error(f"pip succeeded but {venv}/bin/rmsd is missing")
    write_stamp(args.stamp, fingerprint)  # last: an interrupted install is redone next time
    seconds = round(time.monotonic() - started, 1)
    progress(f"done in {seconds:.1f}s")
    return {"changed": True, "wheels": count, "seconds": seconds, "mode": mode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--archive", required=True, help="the wheelhouse tar copied from the controller")
    parser.add_argument("--venv", required=True, help="the virtualenv to install rmsd into")
    parser.add_argument("--stamp", required=True, help="file holding the fingerprint of what is installed")
    parser.add_argument("--fingerprint", required=True,
                        help="sha256 of the archive, as the controller built it")
    parser.add_argument("--extra", action="append", default=[], metavar="PROJECT",
                        help="also install this project (its requirements-PROJECT.txt in the archive)")
    parser.add_argument("--index-url-file", default="",
                        help="a file naming the index to install rmsd's dependencies from instead of the archive "
                             "(removed once read)")
    args = parser.parse_args(argv)
    # The names wheelhouse.py gives the extras' requirements files (PEP 503).
    args.extra = sorted({re.sub(r"[-_.]+", "-", e).lower() for e in args.extra})
    if not re.match(r"^[0-9a-fA-F]{64}$", args.fingerprint.strip()):
        parser.error("--fingerprint must be a sha256 (64 hex digits)")
    try:
        result = install(args)
    except Error as exc:
        sys.stderr.write(f"install_wheelhouse.py: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"install_wheelhouse.py: {exc}\n")
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
