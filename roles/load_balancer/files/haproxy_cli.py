"""Talk to an HAProxy instance through its unix sockets (standard library only).

    haproxy_cli.py running MASTER_SOCKET
        exit 0 when the master of the instance answers, 3 when nothing listens
    haproxy_cli.py reload MASTER_SOCKET [--timeout S]
        reload the master-worker instance (a new worker takes over the listening sockets, the
        old one finishes its connections) and fail when the new configuration did not load
    haproxy_cli.py member ADMIN_SOCKET BACKEND NAME ready|drain|maint [--timeout S] [--check]
        put a backend server in that administrative state; for drain and maint wait until it
        has no sessions left; prints {"changed", "before", "after", "status", "sessions"} as JSON

Errors go to stderr with exit code 1.
"""

import argparse
import csv
import json
import re
import socket
import sys
import time

# Bits of srv_admin_state in "show servers state" (HAProxy's SRV_ADMF_* flags): forced
# maintenance and forced drain are what "set server ... state" sets.
FORCED_MAINT = 0x01
FORCED_DRAIN = 0x08


class Unreachable(Exception):
    pass


def ask(path: str, command: str, timeout: float = 10.0) -> str:
    """Send one command and return the whole answer (HAProxy closes after it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        raise Unreachable(f"nothing answers on {path} ({exc.strerror or exc})") from exc
    with sock:
        sock.sendall(command.encode() + b"\n")
        # The master CLI keeps the connection open until the client has said everything.
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def master_counters(master: str) -> tuple[int, int]:
    """(reloads, failed reloads) of the master process, from "show proc"."""
    answer = ask(master, "show proc")
    found = re.search(r"^\d+\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", answer, re.MULTILINE)
    if not found:
        raise RuntimeError(f"unexpected answer to 'show proc' on {master}: {answer!r}")
    return int(found.group(1)), int(found.group(2))


def reload(master: str, timeout: float, check: bool = False) -> dict:
    reloads, failed = master_counters(master)
    if check:  # the master answers: a real run would reload it
        return {"reloads": reloads, "check": True}
    # The master re-executes itself, so the connection ends without an answer.
    ask(master, "reload")
    deadline = time.monotonic() + timeout
    while True:
        try:
            now_reloads, now_failed = master_counters(master)
            if now_reloads > reloads:
                break
        except (Unreachable, RuntimeError, OSError):
            pass  # the master is re-executing
        if time.monotonic() > deadline:
            raise RuntimeError(f"the master on {master} did not come back within {timeout:g}s after reload")
        time.sleep(0.1)
    if now_failed > failed:
        raise RuntimeError(
            "HAProxy could not load the new configuration; the previous one keeps serving. "
            f"Run 'haproxy -c -f <configuration>' and see 'show startup-logs' on {master}.")
    return {"reloads": now_reloads}


def server_row(admin: str, backend: str, name: str) -> dict:
    """The server's line of "show servers state" merged with its line of "show stat"."""
    lines = ask(admin, f"show servers state {backend}").splitlines()
    if not lines or lines[0].startswith("Can't find backend"):
        raise RuntimeError(f"HAProxy on {admin} has no backend {backend}: {' '.join(lines)}")
    header = next((line for line in lines if line.startswith("# be_id")), None)
    if header is None:
        raise RuntimeError(f"unexpected answer to 'show servers state {backend}': {lines!r}")
    fields = header[2:].split()
    # Server lines have one value per header field (the first line is the format version).
    rows = [dict(zip(fields, values)) for values in map(str.split, lines[1:]) if len(values) == len(fields)]
    row = next((r for r in rows if r["srv_name"] == name), None)
    if row is None:
        members = ", ".join(r["srv_name"] for r in rows) or "none"
        raise RuntimeError(f"backend {backend} has no member named {name} (members: {members})")
    stats = csv.DictReader(ask(admin, "show stat").lstrip("# ").splitlines())
    stat = next(s for s in stats if s["pxname"] == backend and s["svname"] == name)
    return {"admin_state": int(row["srv_admin_state"]), "status": stat["status"], "sessions": int(stat["scur"])}


def admin_state(row: dict) -> str:
    if row["admin_state"] & FORCED_MAINT:
        return "maint"
    if row["admin_state"] & FORCED_DRAIN:
        return "drain"
    return "ready"


def member(admin: str, backend: str, name: str, state: str, timeout: float, check: bool) -> dict:
    row = server_row(admin, backend, name)
    before = admin_state(row)
    changed = before != state
    if changed and not check:
        answer = ask(admin, f"set server {backend}/{name} state {state}").strip()
        if answer:  # HAProxy answers nothing on success
            raise RuntimeError(f"set server {backend}/{name} state {state}: {answer}")
    if state != "ready" and not check:
        deadline = time.monotonic() + timeout
        while (row := server_row(admin, backend, name))["sessions"] > 0:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{backend}/{name} still has {row['sessions']} sessions after {timeout:g}s in state {state}; "
                    "raise load_balancer_drain_timeout or find the client holding them")
            time.sleep(0.2)
    else:
        row = server_row(admin, backend, name)
    return {"changed": changed, "before": before, "after": state if check else admin_state(row),
            "status": row["status"], "sessions": row["sessions"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("running").add_argument("socket")
    p_reload = sub.add_parser("reload")
    p_reload.add_argument("socket")
    p_reload.add_argument("--timeout", type=float, default=30)
    p_reload.add_argument("--check", action="store_true")
    p_member = sub.add_parser("member")
    p_member.add_argument("socket")
    p_member.add_argument("backend")
    p_member.add_argument("name")
    p_member.add_argument("state", choices=["ready", "drain", "maint"])
    p_member.add_argument("--timeout", type=float, default=30)
    p_member.add_argument("--check", action="store_true")
    args = parser.parse_args()
    try:
        if args.action == "running":
            master_counters(args.socket)
            return 0
        if args.action == "reload":
            result = reload(args.socket, args.timeout, args.check)
        else:
            result = member(args.socket, args.backend, args.name, args.state, args.timeout, args.check)
    except Unreachable as exc:
        print(exc, file=sys.stderr)
        return 3
    except (RuntimeError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
