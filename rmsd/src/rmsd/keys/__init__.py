"""Cluster key providers. Callers see `ClusterKey` and `KeyProvider` only (rmsd.keys.interface), so the
password provider (rmsd.keys.software) and the PKCS#11 one (rmsd.keys.pkcs11: keys generated and used
inside a token) fit without callers telling them apart."""

from rmsd.errors import RmsdError
from rmsd.keys.interface import (
    KEY_SIZES,
    PROTECTIONS,
    ClusterKey,
    KeyNotExportable,
    KeyProvider,
    NewKey,
    TokenSettings,
    check_strength,
    key_id_of,
    public_pem,
)
from rmsd.keys.software import PasswordKeyProvider, SoftwareKey

__all__ = [
    "KEY_SIZES", "PROTECTIONS", "ClusterKey", "KeyNotExportable", "KeyProvider", "NewKey", "PasswordKeyProvider",
    "SoftwareKey", "TokenSettings", "check_strength", "key_id_of", "provider_for", "public_pem",
]


def provider_for(protection: str, *, key_password: str | None = None, token=None) -> KeyProvider:
    """The provider of `protection`: "password" opens keys with `key_password`, "pkcs11" uses the
    token of `token` (TokenSettings)."""
    if protection == "password":
        return PasswordKeyProvider(key_password)
    if protection == "pkcs11":
        from rmsd.keys.pkcs11 import Pkcs11KeyProvider  # loads python-pkcs11 only where a token is used

        return Pkcs11KeyProvider(token)
    raise RmsdError(f"key_protection {protection!r} is not supported; use one of {', '.join(PROTECTIONS)}")
