"""Find a canary that must never be seen: every secret of the scenario starts with the same marker, so a
search for the marker finds any of them wherever it leaked, without the search itself holding a secret.

  secrets_canary.py --marker-hex HEX [--allow PATH]... [--since EPOCH] [--journal] PATH...

The marker is given in hexadecimal, so that the search's own command line (which sudo logs, for one) does not
put the marker where it is searched for. Searches every regular file under each PATH (files and folders; symlinks are not followed; /proc, /sys and
/dev are never entered) for MARKER, and prints one line per file that holds it: the path, and how many
times. Files under an --allow path are meant to hold secrets (a node's 0600 secret file, the controller's
vault of the scenario) and are listed apart, with their mode. With --since, only files changed since then.
With --journal, also the systemd journal's messages (journalctl), counted as the leak "journal".
Standard library only (it runs on the managed hosts' python3).

stdout: one JSON object {"leaks": [{"path", "count"}], "allowed": [{"path", "mode"}], "files": N, "bytes": N}.
Exit 0 when there is no leak, 1 otherwise.
"""

import argparse
import json
import os
import stat
import subprocess
import sys

SKIP = ("/proc", "/sys", "/dev")
BLOCK = 1 << 20


def count_in(path: str, marker: bytes) -> tuple[int, int]:
    """(occurrences of marker, bytes read), reading in blocks that overlap by len(marker) - 1."""
    found = size = 0
    tail = b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(BLOCK)
            if not block:
                return found, size
            size += len(block)
            data = tail + block
            found += data.count(marker)
            tail = data[-(len(marker) - 1):] if len(marker) > 1 else b""
            # A marker split across blocks is counted once: the tail cannot hold a whole marker.


def files_under(root: str):
    if any(root == skip or root.startswith(skip + "/") for skip in SKIP):
        return
    try:
        st = os.lstat(root)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        yield root, st
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in SKIP]
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield path, st


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marker-hex", required=True)
    parser.add_argument("--allow", action="append", default=[])
    parser.add_argument("--since", type=float, default=None)
    parser.add_argument("--journal", action="store_true")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    marker = bytes.fromhex(args.marker_hex)
    allowed_roots = [os.path.abspath(p) for p in args.allow]
    leaks, allowed = [], []
    files = total = 0
    for root in args.paths:
        for path, st in files_under(os.path.abspath(root)):
            if args.since is not None and max(st.st_mtime, st.st_ctime) < args.since:
                continue
            try:
                found, size = count_in(path, marker)
            except OSError:
                continue
            files += 1
            total += size
            if not found:
                continue
            if any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed_roots):
                allowed.append({"path": path, "mode": oct(st.st_mode & 0o7777)})
            else:
                leaks.append({"path": path, "count": found})
    if args.journal:
        messages = subprocess.run(["journalctl", "--no-pager", "--output=cat"], capture_output=True, check=True).stdout
        if messages.count(marker):
            leaks.append({"path": "journal", "count": messages.count(marker)})
    print(json.dumps({"leaks": leaks, "allowed": allowed, "files": files, "bytes": total}, sort_keys=True))
    return 1 if leaks else 0


if __name__ == "__main__":
    sys.exit(main())
