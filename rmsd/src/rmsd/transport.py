"""Transport policy: where a secret, a token or a certificate a node trusts may travel in clear.

Bearer tokens, enrollment credentials, the issuer's signing keys and the configuration database's rows all
travel between hosts. Off the loopback interface they travel only over TLS whose peer is verified; on
loopback (one machine, no network) plain transport is allowed, as the demo and single-node clusters use it.
"""

import ipaddress
from urllib.parse import urlsplit

from rmsd.errors import RmsdError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str | None) -> bool:
    """True when `host` (a name or an address, IPv6 with or without brackets) is this machine's loopback
    interface. An empty host (a Unix socket, a libpq default) counts as local."""
    if host is None or host == "":
        return True
    host = host.strip("[]").lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_clear_url(url: str, what: str, setting: str, allowed: tuple[str, ...] = ("https",)) -> None:
    """RmsdError when `url` would carry `what` in clear (or unverified) to another host: its scheme must be
    one of `allowed`, or plain http to a loopback address. `setting` names the option to fix."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise RmsdError(f"{setting} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme in allowed:
        return
    if scheme == "http" and is_loopback(host):
        return
    if scheme == "http":
        raise RmsdError(
            f"{setting} uses plain http to {host}, off the loopback interface: {what} would cross the network in "
            f"clear. Use an https URL (its certificate is verified)."
        )
    raise RmsdError(f"{setting} scheme {scheme or '(none)'!r} is not supported; use {' or '.join(allowed)}")
