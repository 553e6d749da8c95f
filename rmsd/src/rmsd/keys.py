"""Cluster key providers. Callers see `ClusterKey` and `KeyProvider` only, so a PKCS#11 provider
(key generated and used inside a token) fits without touching them."""

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from rmsd import pkcs8
from rmsd.errors import RmsdError

KEY_SIZES = (2048, 3072, 4096)


def key_id_of(public_key) -> str:
    """A stable id for a public key: the first 20 bytes of SHA-256 over its SubjectPublicKeyInfo, hex."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:40]


def check_strength(public_key, what: str) -> None:
    """The policy for every RSA key rmsd holds or certifies: 2048 bits or more, public exponent 65537."""
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise RmsdError(f"{what} is not an RSA key")
    if public_key.key_size < min(KEY_SIZES) or public_key.public_numbers().e != 65537:
        raise RmsdError(f"{what} is too weak: RSA keys need {min(KEY_SIZES)} bits or more and public exponent 65537 "
                        f"(it has {public_key.key_size} bits, exponent {public_key.public_numbers().e})")


def public_pem(public_key) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


class ClusterKey(ABC):
    """A usable cluster key: public half always, private operations through the provider."""

    key_id: str
    public_key: rsa.RSAPublicKey
    wrap_alg: str  # JWE "alg" content keys are wrapped with to this key
    sign_alg: str  # JWS "alg" of signatures made with this key

    @abstractmethod
    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...

    @abstractmethod
    def jose_key(self):
        """A key object the JOSE layer signs and decrypts with."""

    @abstractmethod
    def sign(self, data: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 over `data`."""

    def export_pkcs8(self, password: str) -> bytes:
        """The private key as PKCS#8 encrypted with `password` (scrypt + AES-256), for a trusted
        publishing domain. Keys that never leave their store (an HSM) raise KeyNotExportable."""
        raise KeyNotExportable(f"cluster key {self.key_id} cannot leave its key store")


class KeyNotExportable(RmsdError):
    """The private key cannot be read out of where it is kept."""


@dataclass
class NewKey:
    """What a provider stores for a key it generated: everything but the private key in clear."""

    key_id: str
    size: int
    public_key_pem: str
    wrap_alg: str
    sign_alg: str
    encrypted_private_key: bytes | None = None
    token_label: str | None = None
    key_label: str | None = None
    loaded: ClusterKey | None = field(default=None, repr=False)


class KeyProvider(ABC):
    protection: str

    @abstractmethod
    def generate(self, size: int) -> NewKey: ...

    @abstractmethod
    def load(self, row) -> ClusterKey:
        """Open the stored key `row` (a cluster_keys row); RmsdError when the secret does not open it."""

    @abstractmethod
    def adopt(self, private_key: rsa.RSAPrivateKey) -> NewKey:
        """Store a private key brought in from elsewhere (a trusted publishing domain) this provider's way."""


class SoftwareKey(ClusterKey):
    wrap_alg = "RSA-OAEP-256"
    sign_alg = "RS256"

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    def sign_certificate(self, builder):
        return builder.sign(self._private_key, hashes.SHA256())

    def jose_key(self):
        from joserfc.jwk import RSAKey

        return RSAKey.import_key(self._private_key, {"kid": self.key_id})

    def sign(self, data):
        return self._private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def export_pkcs8(self, password):
        return pkcs8.encrypt(self._private_key, password)


class PasswordKeyProvider(KeyProvider):
    """"Centrally managed" key: PKCS#8 encrypted with the cluster key password (scrypt + AES-256),
    stored in the configuration database. The password itself is never stored there."""

    protection = "password"

    def __init__(self, password: str | None):
        if not password:
            raise RmsdError("key_password is required for a cluster key protected by a password")
        self._password = password

    def generate(self, size):
        if size not in KEY_SIZES:
            raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {size}")
        return self.adopt(rsa.generate_private_key(public_exponent=65537, key_size=size))

    def adopt(self, private_key):
        loaded = SoftwareKey(private_key)
        return NewKey(
            key_id=loaded.key_id,
            size=private_key.key_size,
            public_key_pem=public_pem(loaded.public_key),
            wrap_alg=SoftwareKey.wrap_alg,
            sign_alg=SoftwareKey.sign_alg,
            encrypted_private_key=pkcs8.encrypt(private_key, self._password),
            loaded=loaded,
        )

    def reencrypt(self, row, previous: "PasswordKeyProvider") -> bytes:
        """The stored key `row`, opened with the `previous` provider's password, encrypted with this
        provider's (a cluster key password change)."""
        return previous.load(row).export_pkcs8(self._password)

    def load(self, row):
        try:
            private_key = pkcs8.decrypt(row.encrypted_private_key, self._password)
        except RmsdError:
            raise RmsdError(
                f"the cluster key password does not decrypt cluster key {row.id}; give the password the "
                "cluster was provisioned with"
            ) from None
        key = SoftwareKey(private_key)
        if key.key_id != row.id:
            raise RmsdError(f"stored cluster key {row.id} does not match its public key; the database is damaged")
        return key


PROTECTIONS = ("password", "pkcs11")


@dataclass(frozen=True)
class TokenSettings:
    """Where a cluster's keys live: the PKCS#11 module (a shared library), the token label, the PIN."""

    module: str
    token_label: str
    pin: str = field(repr=False)

    @classmethod
    def from_options(cls, options: dict | None) -> "TokenSettings | None":
        if not options:
            return None
        missing = [k for k in ("module", "token_label", "pin") if not options.get(k)]
        if missing:
            raise RmsdError(f"pkcs11 needs module, token_label and pin; missing: {', '.join(missing)}")
        return cls(options["module"], options["token_label"], options["pin"])

    @classmethod
    def for_node(cls, config, secrets) -> "TokenSettings | None":
        """The token of a node set up for one (NodeConfig, Secrets)."""
        if not config.pkcs11_module:
            return None
        return cls(config.pkcs11_module, config.pkcs11_token_label or "", secrets.pkcs11_pin or "")


def provider_for(protection: str, *, key_password: str | None = None, token=None) -> KeyProvider:
    """The provider of `protection`: "password" opens keys with `key_password`, "pkcs11" uses the
    token of `token` (TokenSettings)."""
    if protection == "password":
        return PasswordKeyProvider(key_password)
    if protection == "pkcs11":
        from rmsd.hsm import Pkcs11KeyProvider  # loads python-pkcs11 only where a token is used

        return Pkcs11KeyProvider(token)
    raise RmsdError(f"key_protection {protection!r} is not supported; use one of {', '.join(PROTECTIONS)}")
