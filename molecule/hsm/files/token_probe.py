"""What a PKCS#11 token holds and gives away: for each private key, the cluster key id of its public
half, its protection attributes, and what happens when the private key is read out (its private
exponent and primes) or wrapped under a key of the token's own. Uses python-pkcs11 directly, not rmsd.

usage: token_probe.py MODULE TOKEN_LABEL   (the PIN on stdin; SOFTHSM2_CONF names the token folder)
Prints JSON: a list with one object per private key."""

import hashlib
import json
import sys

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, ObjectClass


def key_id(private_key) -> str:
    """rmsd's key id (SHA-256 over the SubjectPublicKeyInfo, 40 hex digits), from the public attributes."""
    public = rsa.RSAPublicNumbers(int.from_bytes(private_key[Attribute.PUBLIC_EXPONENT], "big"),
                                  int.from_bytes(private_key[Attribute.MODULUS], "big")).public_key()
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:40]


def attempt(action) -> str:
    try:
        action()
    except pkcs11.PKCS11Error as err:
        return f"refused: {type(err).__name__}"
    return "GIVEN AWAY"


def main() -> int:
    module, label = sys.argv[1:3]
    pin = sys.stdin.readline().strip()
    with pkcs11.lib(module).get_token(token_label=label).open(user_pin=pin, rw=True) as session:
        wrapping = session.generate_key(KeyType.AES, 256, template={Attribute.TOKEN: False, Attribute.WRAP: True})
        keys = []
        for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            keys.append({
                "key_id": key_id(key),
                "label": key[Attribute.LABEL],
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "extractable": bool(key[Attribute.EXTRACTABLE]),
                "never_extractable": bool(key[Attribute.NEVER_EXTRACTABLE]),
                "read_private_exponent": attempt(lambda k=key: k[Attribute.PRIVATE_EXPONENT]),
                "read_primes": attempt(lambda k=key: (k[Attribute.PRIME_1], k[Attribute.PRIME_2])),
                "wrap": attempt(lambda k=key: wrapping.wrap_key(k)),
            })
    print(json.dumps(sorted(keys, key=lambda k: k["label"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
