"""What the admin calls share: their result, name and URL checks, the view of a cluster, what unlocks its
keys, and enrollment with the root cluster."""

import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

from rmsd import clusters
from rmsd import enrollment as enrollment_lib
from rmsd.errors import RmsdError
from rmsd.keys import ClusterKey, KeyProvider, TokenSettings, provider_for

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Result:
    changed: bool
    diff: dict = field(default_factory=lambda: {"before": {}, "after": {}})
    facts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_name(what: str, value: str) -> None:
    if not value or not NAME.match(value):
        raise RmsdError(f"{what} {value!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'")


def check_url(what: str, value: str | None, required: bool) -> None:
    if not value:
        if required:
            raise RmsdError(f"{what} is required: the URL clients reach the cluster at, e.g. https://rms.example.com")
        return
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RmsdError(f"{what} {value!r} is not an http(s) URL")


def check_state(state: str, states) -> None:
    if state not in states:
        raise RmsdError(f"state must be {' or '.join(states) if len(states) == 2 else 'one of ' + ', '.join(states)}, "
                        f"not {state!r}")


def check_absolute(what: str, path: str | None, required: bool = True) -> None:
    if (required or path) and (not path or not os.path.isabs(path)):
        raise RmsdError(f"{what} must be an absolute path, not {path!r}")


def file_mode(path) -> int | None:
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return None


def cluster_view(conn, row) -> dict:
    key = clusters.active_key_row(conn, row.id)
    slc = clusters.current_slc_row(conn, row.id, key.id)
    return {
        "name": row.name,
        "role": row.role,
        "state": row.state,
        "intranet_url": row.intranet_url,
        "extranet_url": row.extranet_url,
        "key_protection": row.key_protection,
        "key_size": row.key_size,
        "active_key_id": key.id,
        "slc_fingerprint_sha256": slc.fingerprint_sha256 if slc else None,
        "slc_not_after": slc.not_after.isoformat() if slc else None,
        # root: its own key; licensing: the root cluster key its SLC chains to.
        "slc_issuer_key_id": slc.issuer_key_id if slc else None,
    }


@dataclass(frozen=True)
class Unlock:
    """What opens a cluster's keys: its key password (and, while it changes, the previous one), or the
    token of a pkcs11 cluster."""

    key_password: str | None = field(default=None, repr=False)
    previous_key_password: str | None = field(default=None, repr=False)
    token: TokenSettings | None = None

    def provider(self, protection: str, previous: bool = False) -> KeyProvider:
        password = self.previous_key_password if previous else self.key_password
        return provider_for(protection, key_password=password, token=self.token)

    def open_key(self, key_row) -> ClusterKey:
        """Open one of the cluster's stored keys (RmsdError otherwise); while the password changes, the
        previous one may open it instead."""
        try:
            return self.provider(key_row.protection).load(key_row)
        except RmsdError:
            if not self.previous_key_password:
                raise
            return self.provider(key_row.protection, previous=True).load(key_row)

    def open_active_key(self, conn, row) -> ClusterKey:
        """Prove this opens the cluster's active key (RmsdError otherwise). While the password changes,
        the previous one may open it instead."""
        key_row = clusters.active_key_row(conn, row.id)
        try:
            return self.provider(key_row.protection).load(key_row)
        except RmsdError as err:
            if self.previous_key_password:
                try:
                    return provider_for(row.key_protection, key_password=self.previous_key_password).load(key_row)
                except RmsdError:
                    pass
            raise RmsdError(f"{err}. Nothing was changed.") from None


def token_settings(key_protection, pkcs11, key_password=None, previous_key_password=None) -> TokenSettings | None:
    """The token settings for key_protection=pkcs11; errors for options that don't fit the protection."""
    token = TokenSettings.from_options(pkcs11)
    if key_protection == "pkcs11":
        if token is None:
            raise RmsdError("key_protection=pkcs11 needs pkcs11 (module, token_label and pin): the token the cluster "
                            "keys are generated in. Nothing was changed.")
        if key_password or previous_key_password:
            raise RmsdError("key_password is for key_protection=password; the keys of a pkcs11 cluster are opened "
                            "with the token PIN (pkcs11.pin). Nothing was changed.")
    elif token is not None:
        raise RmsdError(f"pkcs11 is for key_protection=pkcs11; this cluster's keys are protected by "
                        f"{key_protection}. Nothing was changed.")
    return token


@dataclass(frozen=True)
class Enrollment:
    """Where and how a licensing cluster enrolls its key with the root cluster."""

    url: str | None
    ca_path: str | None = None
    credential: str | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.url:  # refused before anything is done, in check mode too
            enrollment_lib.check_url(self.url)

    def fetch_root(self):
        return enrollment_lib.fetch_root_slc(self.url, self.ca_path)

    def enroll(self, cluster: str, intranet_url, extranet_url, key: ClusterKey, root=None, revocations=None):
        """(the licensing cluster's SLC, the root SLC), issued by the root cluster for `key`; `revocations`: the
        cluster's revoked keys with their revocation statements."""
        if self.url is None:
            raise RmsdError(f"licensing cluster {cluster!r} enrolls with the root cluster: enrollment_url is required. "
                            "Nothing was changed.")
        root = root or self.fetch_root()
        if root.state != "provisioned":
            raise RmsdError(f"root cluster {root.cluster!r} is {root.state}; it enrolls no licensing clusters")
        return enrollment_lib.enroll(
            self.url, self.ca_path, cluster=cluster, key=key, intranet_url=intranet_url, extranet_url=extranet_url,
            credential=self.credential, expected_root=root, revocations=revocations,
        )
