"""`make test` on a machine without the Debian packages the tests use stops first, with the apt-get
command that installs them, instead of failing (or skipping) deep inside a test. The machine is
simulated: a PATH holding only bash, and CHECK_PACKAGES_ROOT for the files the checks look at."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALL = "chromium git haproxy mmdebstrap openssh-client openssl podman postgresql runc softhsm2"
COMMANDS = ("chromium", "softhsm2-util", "ssh", "ssh-keygen", "podman", "runc", "mmdebstrap", "openssl", "git")
FILES = ("usr/sbin/haproxy", "usr/lib/postgresql/16/bin/initdb", "usr/lib/softhsm/libsofthsm2.so")


def machine(tmp_path, commands=(), files=()) -> dict:
    """The environment of a machine that has only these commands and files."""
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    for name in commands:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return {"PATH": str(bin_dir), "CHECK_PACKAGES_ROOT": str(root), "HOME": str(tmp_path)}


def make(env: dict, *targets: str) -> subprocess.CompletedProcess:
    # -o: the shared virtualenv counts as up to date, so this never reinstalls it.
    return subprocess.run([shutil.which("make"), "--no-print-directory", "-o", str(REPO / ".venv" / ".installed"),
                           *targets], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_fresh_machine_is_told_the_apt_get_command(tmp_path):
    proc = make(machine(tmp_path), "packages")
    assert proc.returncode != 0
    prefix = "" if os.geteuid() == 0 else "sudo "
    assert proc.stdout == (
        f"Missing Debian packages: {ALL}. Install them, then run make again:\n"
        f"  {prefix}mkdir -p /etc/postgresql-common\n"
        f"  echo 'create_main_cluster = false' | {prefix}tee /etc/postgresql-common/createcluster.conf\n"
        f"  {prefix}apt-get install --no-install-recommends {ALL}\n"
    )


def test_each_stage_checks_its_own_packages_before_it_runs(tmp_path):
    env = machine(tmp_path, commands=[c for c in COMMANDS if c != "softhsm2-util"],
                  files=[f for f in FILES if "haproxy" not in f])
    proc = make(env, "pytest")
    assert proc.returncode != 0
    # Only the packages the pytest stage uses, and pytest never started (it would have printed here).
    assert proc.stdout.splitlines() == [
        "Missing Debian packages: haproxy softhsm2. Install them, then run make again:",
        f"  {'' if os.geteuid() == 0 else 'sudo '}apt-get install --no-install-recommends haproxy softhsm2",
    ]


def test_a_machine_with_every_package_passes_quietly(tmp_path):
    proc = make(machine(tmp_path, commands=COMMANDS, files=FILES), "packages")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
