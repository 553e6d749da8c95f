"""Print the status HAProxy gives each server of a backend (UP, DOWN, MAINT, DRAIN, ...) as JSON,
read from the instance's admin socket with "show stat".

usage: haproxy_status.py ADMIN_SOCKET BACKEND
"""

import csv
import json
import socket
import sys


def show_stat(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def main() -> int:
    path, backend = sys.argv[1:3]
    rows = csv.DictReader(show_stat(path).lstrip("# ").splitlines())
    status = {row["svname"]: row["status"] for row in rows
              if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}
    print(json.dumps(status, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
