"""The source of a recorded release, taken from git history: what builds its rmsd wheelhouse.

changelogs/releases.yml records each release's commit (a tag does not travel with the repository's
commits). This extracts, from that commit, what roles/server/files/wheelhouse.py builds from: rmsd's
project (pyproject.toml, src/), constraints.txt and the wheelhouse lock. Standard library only.

    python scripts/release_source.py VERSION DEST    # prints {"version": ..., "commit": ..., "source": DEST}
    python scripts/release_source.py --last DEST     # the newest recorded release

From Python: releases() -> [{"version", "commit"}, ...] (oldest first); extract(release, dest).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RELEASES = REPO / "changelogs" / "releases.yml"
# What wheelhouse.py reads: --source rmsd, --constraints, --lock.
PATHS = ("rmsd/src", "rmsd/pyproject.toml", "constraints.txt", "requirements/rmsd-wheelhouse.lock")


class Error(Exception):
    pass


def releases() -> list[dict]:
    """The recorded releases, oldest first. The file is YAML in one fixed shape; read without a YAML library."""
    found = re.findall(r"^\s*-\s*version:\s*(\S+)\s*\n\s*commit:\s*([0-9a-f]{40})\s*$", RELEASES.read_text(), re.MULTILINE)
    return [{"version": version, "commit": commit} for version, commit in found]


def extract(release: dict, dest: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", release["commit"], *PATHS],
                             capture_output=True, timeout=120, check=False)
    if archive.returncode != 0:
        raise Error(f"commit {release['commit']} of release {release['version']} is not in this checkout's "
                    f"history: {archive.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    known = releases()
    wanted = [r for r in known if argv[1] == "--last" or r["version"] == argv[1]][-1:]
    if not wanted:
        print(f"release {argv[1]} is not recorded in {RELEASES} (recorded: "
              f"{', '.join(r['version'] for r in known) or 'none'})", file=sys.stderr)
        return 1
    try:
        dest = extract(wanted[0], Path(argv[2]).resolve())
    except Error as err:
        print(err, file=sys.stderr)
        return 1
    print(json.dumps({**wanted[0], "source": str(dest)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
