"""What every cluster key provider offers: `ClusterKey` (a usable key), `KeyProvider` (generate, load,
adopt, and what becomes of a compromised key where it is kept), `NewKey`, the key policy and ids."""

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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

    def cluster_key(self) -> ClusterKey:
        """The usable key; a provider's generate and adopt always give one, a public-only key has none."""
        if self.loaded is None:
            raise RmsdError(f"cluster key {self.key_id} is public-only: it can neither sign nor decrypt")
        return self.loaded


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

    def compromised_key_state(self, row) -> str | None:
        """Where the private key of compromised key `row` stands in a store that can still use it: present,
        disabled (can neither sign nor decrypt) or destroyed. None when nothing outside the configuration
        database holds it (there is nothing to settle)."""
        return None

    def settle_compromised(self, row, action: str) -> None:  # noqa: B027 (nothing to do unless overridden)
        """Make compromised key `row` unusable where this provider keeps it: destroy it, or disable it."""

    def reencrypt(self, row, previous: "KeyProvider") -> bytes:
        """The stored key `row`, opened by `previous`, protected this provider's way (a key password change)."""
        raise RmsdError(f"cluster keys protected by {self.protection} are not re-encrypted")


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
