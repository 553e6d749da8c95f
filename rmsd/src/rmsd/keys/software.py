"""Cluster keys protected by a password: PKCS#8 (scrypt + AES-256) in the configuration database."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from rmsd import pkcs8
from rmsd.errors import RmsdError
from rmsd.keys.interface import KEY_SIZES, ClusterKey, KeyProvider, NewKey, key_id_of, public_pem


class SoftwareKey(ClusterKey):
    wrap_alg = "RSA-OAEP-256"
    sign_alg = "RS256"

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)
        self._jose = None

    def sign_certificate(self, builder):
        return builder.sign(self._private_key, hashes.SHA256())

    def jose_key(self):
        if self._jose is None:  # made once: importing a private key costs more than signing with it
            from joserfc.jwk import RSAKey

            self._jose = RSAKey.import_key(self._private_key, {"kid": self.key_id})
        return self._jose

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

    def reencrypt(self, row, previous: KeyProvider) -> bytes:
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
