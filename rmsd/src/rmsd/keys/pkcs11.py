"""Cluster keys in a PKCS#11 token (an HSM partition; SoftHSM2 in tests), through python-pkcs11.

A key is generated inside the token, sensitive and not extractable; the configuration database holds
its public key and the token and key labels only. Signing and unwrapping content keys happen in the
token. Every member of a cluster opens the same token with the same PIN."""

import contextlib
import functools
import secrets
import threading
from typing import TYPE_CHECKING

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc.jwk import RSAKey
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.rsa import decode_rsa_private_key

from rmsd.errors import KeyUnavailableError, RmsdError
from rmsd.keys.interface import (
    KEY_SIZES,
    ClusterKey,
    KeyNotExportable,
    KeyProvider,
    NewKey,
    TokenSettings,
    key_id_of,
    public_pem,
)

if TYPE_CHECKING:
    # What pkcs11.lib() returns; python-pkcs11 imports its extension module only when a module is loaded.
    from pkcs11._pkcs11 import lib as Pkcs11Lib

# SoftHSM2 (and several HSMs) do RSA-OAEP with SHA-1 only: content keys for a token key are wrapped
# with JWE "RSA-OAEP"; the algorithm is stored with each key, so software keys keep RSA-OAEP-256.
WRAP_ALG = "RSA-OAEP"
_OAEP = {
    "SHA1": (Mechanism.SHA_1, pkcs11.MGF.SHA1),
    "SHA256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
}


class _Token:
    """One logged-in session per token and process (PKCS#11 login is per process), shared by the
    threads of a node."""

    _libs: dict[str, "Pkcs11Lib"] = {}
    _sessions: dict[tuple[str, str], tuple[pkcs11.Session, str]] = {}
    # python-pkcs11 initializes a module with C_Initialize(NULL), which tells it that no two threads
    # call it at once: every call into the module holds this lock (SoftHSM2 crashes otherwise).
    calls = threading.RLock()

    @classmethod
    def session(cls, settings: TokenSettings) -> pkcs11.Session:
        key = (settings.module, settings.token_label)
        with cls.calls:
            if key in cls._sessions:
                session, pin = cls._sessions[key]
                if pin != settings.pin:
                    raise RmsdError(f"the PIN of PKCS#11 token {settings.token_label!r} is not the one this process "
                                    "logged in with")
                return session
            token = cls._token(settings)
            try:
                session = token.open(rw=True, user_pin=settings.pin)
            except pkcs11.PinIncorrect:
                raise RmsdError(f"the PIN of PKCS#11 token {settings.token_label!r} is not correct") from None
            except pkcs11.PKCS11Error as err:
                raise RmsdError(f"cannot log in to PKCS#11 token {settings.token_label!r}: "
                                f"{type(err).__name__}") from None
            cls._sessions[key] = (session, settings.pin)
            return session

    @classmethod
    def _token(cls, settings: TokenSettings):
        if settings.module not in cls._libs:
            try:
                cls._libs[settings.module] = pkcs11.lib(settings.module)
            except (RuntimeError, OSError, pkcs11.PKCS11Error) as err:
                raise RmsdError(f"cannot load the PKCS#11 module {settings.module}: {err}") from None
        lib = cls._libs[settings.module]
        for attempt in range(2):
            try:
                return lib.get_token(token_label=settings.token_label)
            except pkcs11.NoSuchToken:
                if attempt:
                    break
                # A module lists the tokens it found when loaded: look again for one made since.
                lib.reinitialize()
                for other in [k for k in cls._sessions if k[0] == settings.module]:
                    del cls._sessions[other]
        raise RmsdError(f"no PKCS#11 token labelled {settings.token_label!r} in {settings.module}")


def _serialized(method):
    """Run `method` holding the module lock (see _Token.calls)."""

    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _Token.calls:
            return method(*args, **kwargs)

    return locked


def _public_key(token_public) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(
        int.from_bytes(token_public[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(token_public[Attribute.MODULUS], "big"),
    ).public_key()


@contextlib.contextmanager
def _usable():
    """A token error while a key is used, as KeyUnavailableError: a rotation may destroy or disable a
    compromised key while a request that read it as active still holds its handle."""
    try:
        yield
    except pkcs11.PKCS11Error as err:
        raise KeyUnavailableError(f"the cluster key cannot be used in its token ({type(err).__name__})") from None


class _TokenPrivateKey(rsa.RSAPrivateKey):
    """A private key of the token behind cryptography's interface, so x509 builders and JOSE sign
    and decrypt through the token. Its numbers never leave the token."""

    def __init__(self, handle, public_key: rsa.RSAPublicKey):
        self._handle = handle
        self._public_key = public_key

    def sign(self, data, pad, algorithm):
        if not isinstance(pad, padding.PKCS1v15) or not isinstance(algorithm, hashes.SHA256):
            raise RmsdError("a token cluster key signs RSASSA-PKCS1-v1_5 with SHA-256 only")
        with _Token.calls, _usable():
            return self._handle.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)

    def decrypt(self, ciphertext, pad):
        name = pad.algorithm.name.upper().replace("-", "") if isinstance(pad, padding.OAEP) else None
        if name not in _OAEP:
            raise RmsdError("a token cluster key decrypts RSA-OAEP (SHA-1 or SHA-256) only")
        digest, mgf = _OAEP[name]
        with _Token.calls, _usable():
            return self._handle.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                        mechanism_param=(digest, mgf, None))

    @property
    def key_size(self):
        return self._public_key.key_size

    def public_key(self):
        return self._public_key

    def private_numbers(self):
        raise KeyNotExportable("the private key is held in a PKCS#11 token")

    def private_bytes(self, *args, **kwargs):
        raise KeyNotExportable("the private key is held in a PKCS#11 token")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class _TokenJoseKey(RSAKey):
    """joserfc reads a private key's JWK members to check its use; a token key has only public ones.
    (Tied to joserfc's RSAKey internals; the version is pinned in constraints.txt.)"""

    def __init__(self, private_key: _TokenPrivateKey, kid: str):
        super().__init__(private_key, private_key)
        self._public = dict(RSAKey.import_key(private_key.public_key()).dict_value, kid=kid)

    @property
    def dict_value(self):
        return self._public


class TokenKey(ClusterKey):
    sign_alg = "RS256"

    def __init__(self, handle, public_key: rsa.RSAPublicKey, wrap_alg: str, token_label: str):
        self._private = _TokenPrivateKey(handle, public_key)
        self.public_key = public_key
        self.key_id = key_id_of(public_key)
        self.wrap_alg = wrap_alg
        self._token_label = token_label
        self._jose = _TokenJoseKey(self._private, self.key_id)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._private, hashes.SHA256())

    def jose_key(self):
        return self._jose

    def sign(self, data):
        return self._private.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def export_pkcs8(self, password):
        raise KeyNotExportable(
            f"cluster key {self.key_id} was generated in PKCS#11 token {self._token_label!r} as not extractable: "
            "it cannot be exported, and content published under it opens only where that token is. Back the key "
            "up with the HSM's own tools (SoftHSM2: a copy of the token directory)"
        )


class Pkcs11KeyProvider(KeyProvider):
    protection = "pkcs11"

    def __init__(self, settings: TokenSettings | None):
        if settings is None:
            raise RmsdError("a cluster key protected by pkcs11 needs its token: give pkcs11 module, token_label, pin")
        self.settings = settings

    def _session(self):
        return _Token.session(self.settings)

    @_serialized
    def generate(self, size):
        if size not in KEY_SIZES:
            raise RmsdError(f"key_size must be one of {', '.join(map(str, KEY_SIZES))}, not {size}")
        label = f"rmsd-{secrets.token_hex(8)}"
        public, private = self._session().generate_keypair(
            KeyType.RSA, size, store=True, label=label, id=label.encode(),
            public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: True, Attribute.WRAP: True},
            private_template={
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                Attribute.SIGN: True, Attribute.DECRYPT: True, Attribute.UNWRAP: True,
            },
        )
        return self._new_key(label, private, _public_key(public))

    @_serialized
    def adopt(self, private_key):
        """Bring a key from a trusted publishing domain into the token, as not extractable from then on."""
        label = f"rmsd-{secrets.token_hex(8)}"
        der = private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        attrs = decode_rsa_private_key(der)
        attrs.update({
            Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: label.encode(), Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: True,
            Attribute.UNWRAP: True,
        })
        handle = self._session().create_object(attrs)
        return self._new_key(label, handle, private_key.public_key())

    def _new_key(self, label, handle, public_key):
        loaded = TokenKey(handle, public_key, WRAP_ALG, self.settings.token_label)
        return NewKey(
            key_id=loaded.key_id, size=public_key.key_size, public_key_pem=public_pem(public_key), wrap_alg=WRAP_ALG,
            sign_alg=TokenKey.sign_alg, token_label=self.settings.token_label, key_label=label, loaded=loaded,
        )

    def _find(self, row):
        if row.token_label != self.settings.token_label:
            raise RmsdError(
                f"cluster key {row.id} is in PKCS#11 token {row.token_label!r}, and this node is set up for token "
                f"{self.settings.token_label!r}"
            )
        template = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: row.key_label}
        found = list(self._session().get_objects(template))
        if len(found) > 1:
            raise RmsdError(f"PKCS#11 token {row.token_label!r} holds {len(found)} keys labelled {row.key_label!r}")
        return found[0] if found else None

    @_serialized
    def load(self, row):
        handle = self._find(row)
        if handle is None:
            raise RmsdError(f"cluster key {row.id} ({row.key_label!r}) is not in PKCS#11 token {row.token_label!r}")
        stored = serialization.load_pem_public_key(row.public_key_pem.encode())
        if int.from_bytes(handle[Attribute.MODULUS], "big") != stored.public_numbers().n:
            raise RmsdError(f"the token key labelled {row.key_label!r} is not cluster key {row.id}")
        return TokenKey(handle, stored, row.wrap_alg, row.token_label)

    @_serialized
    def compromised_key_state(self, row) -> str:
        """present, disabled (can neither sign nor decrypt) or destroyed."""
        handle = self._find(row)
        if handle is None:
            return "destroyed"
        if handle[Attribute.SIGN] or handle[Attribute.DECRYPT] or handle[Attribute.UNWRAP]:
            return "present"
        return "disabled"

    @_serialized
    def settle_compromised(self, row, action: str) -> None:
        """What becomes of a compromised key in the token: destroyed, or kept but unable to sign or decrypt."""
        handle = self._find(row)
        if handle is None:
            return
        if action == "destroy":
            for obj in self._session().get_objects({Attribute.LABEL: row.key_label}):
                obj.destroy()
        else:
            for attribute in (Attribute.SIGN, Attribute.DECRYPT, Attribute.UNWRAP):
                handle[attribute] = False
