"""Wait on the member that restores until Patroni runs the restored cluster there as its primary, or until the
restore has failed: Patroni moved its attempt to the data folder's `.failed` sibling (it would try again, and
again), or the time is up. Standard library only; runs on the member.

usage: wait_restored.py --url PATRONI_URL --ca CA_FILE --failed-dir DIR --timeout SECONDS
Prints one JSON object {"restored", "state", "role", "timeline", "reason"}; exits 0 only when restored.
"""

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

POLL_SECONDS = 2.0


def member(url: str, context: ssl.SSLContext) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/patroni", context=context, timeout=5) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as err:  # 503 while it is not the primary: its body says what it is
        try:
            return json.load(err)
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--failed-dir", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.ca)
    deadline = time.monotonic() + args.timeout
    seen: dict = {}
    reason = f"Patroni did not run the restored cluster as its primary within {args.timeout:.0f} seconds"
    while time.monotonic() < deadline:
        seen = member(args.url, context) or seen
        if seen.get("role") in ("master", "primary") and seen.get("state") == "running":
            print(json.dumps({"restored": True, "state": seen["state"], "role": seen["role"],
                              "timeline": seen.get("timeline"), "reason": ""}))
            return 0
        if os.path.isdir(args.failed_dir):
            reason = (f"the restore failed: Patroni moved its attempt to {args.failed_dir} (journalctl -u patroni "
                      "says why; for instance a target the repository's WAL does not reach)")
            break
        time.sleep(POLL_SECONDS)
    print(json.dumps({"restored": False, "state": seen.get("state"), "role": seen.get("role"),
                      "timeline": seen.get("timeline"), "reason": reason}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
