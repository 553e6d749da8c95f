"""PKCS#8 EncryptedPrivateKeyInfo with PBES2 = scrypt + AES-256-CBC (RFC 5208, RFC 8018, RFC 7914 §7).

cryptography reads this form but writes only PBKDF2, so the outer structure is built here with
asn1crypto; the private key itself is serialized by cryptography and decrypted by it on load.
"""

import os
from typing import ClassVar

from asn1crypto import core
from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from rmsd.errors import RmsdError

OID_PBES2 = "1.2.840.113549.1.5.13"
OID_SCRYPT = "1.3.6.1.4.1.11591.4.11"
OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"
# OpenSSL's own defaults for `openssl pkcs8 -scrypt`: 16 MiB of memory per derivation.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class _AlgorithmIdentifier(core.Sequence):
    _fields: ClassVar[list] = [("algorithm", core.ObjectIdentifier), ("parameters", core.Any, {"optional": True})]


class _ScryptParams(core.Sequence):
    _fields: ClassVar[list] = [
        ("salt", core.OctetString),
        ("cost", core.Integer),
        ("block_size", core.Integer),
        ("parallelization", core.Integer),
        ("key_length", core.Integer, {"optional": True}),
    ]


class _Pbes2Params(core.Sequence):
    _fields: ClassVar[list] = [("kdf", _AlgorithmIdentifier), ("scheme", _AlgorithmIdentifier)]


class _EncryptedPrivateKeyInfo(core.Sequence):
    _fields: ClassVar[list] = [("algorithm", _AlgorithmIdentifier), ("data", core.OctetString)]


def encrypt(private_key, password: str) -> bytes:
    """DER EncryptedPrivateKeyInfo of `private_key` under `password`."""
    salt, iv = os.urandom(16), os.urandom(16)
    kek = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(password.encode())
    plain = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES256(kek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    params = _Pbes2Params(
        {
            "kdf": {
                "algorithm": OID_SCRYPT,
                "parameters": _ScryptParams(
                    {
                        "salt": salt,
                        "cost": SCRYPT_N,
                        "block_size": SCRYPT_R,
                        "parallelization": SCRYPT_P,
                        "key_length": 32,
                    }
                ),
            },
            "scheme": {"algorithm": OID_AES256_CBC, "parameters": core.OctetString(iv)},
        }
    )
    info = _EncryptedPrivateKeyInfo(
        {"algorithm": {"algorithm": OID_PBES2, "parameters": params}, "data": ciphertext}
    )
    return info.dump()


def decrypt(der: bytes, password: str):
    """The private key inside `der`; RmsdError when the password does not open it."""
    try:
        return serialization.load_der_private_key(der, password.encode())
    except (ValueError, TypeError):
        raise RmsdError("the cluster key password does not decrypt the cluster key") from None
