"""Which users' passwords do not match the SCRAM-SHA-256 verifiers PostgreSQL keeps (RFC 5802, 7677).

Reads {"verifiers": {user: "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>" or ""},
"passwords": {user: password}} on stdin and prints {"differ": [users]}: a user without a verifier, with
another kind of verifier, or whose password gives other keys. Runs on the controller; prints no secret.
"""

import base64
import hashlib
import hmac
import json
import sys


def matches(password: str, verifier: str) -> bool:
    try:
        method, rest = verifier.split("$", 1)
        salted, keys = rest.split("$", 1)
        iterations, salt = salted.split(":", 1)
        stored_key, server_key = (base64.b64decode(part) for part in keys.split(":", 1))
        salted_password = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    except ValueError:
        return False
    if method != "SCRAM-SHA-256":
        return False
    client_key = hmac.new(salted_password, b"Client Key", hashlib.sha256).digest()
    computed_server_key = hmac.new(salted_password, b"Server Key", hashlib.sha256).digest()
    return (hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
            and hmac.compare_digest(computed_server_key, server_key))


def main() -> int:
    given = json.load(sys.stdin)
    verifiers = given.get("verifiers", {})
    differ = [user for user, password in given["passwords"].items() if not matches(password, verifiers.get(user, ""))]
    print(json.dumps({"differ": differ}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
