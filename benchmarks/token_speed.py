"""A PKCS#11 token's raw RSA-2048 rates through python-pkcs11, in one session: signatures
(CKM_SHA256_RSA_PKCS) and RSA-OAEP decryptions per second, on a throwaway key pair generated in the
token (not extractable, destroyed afterwards). Used by hsm_throughput.py, which starts several of
these at once for the parallel rate (python-pkcs11 initializes the module for one thread at a time,
so parallel use means processes).

usage: token_speed.py MODULE TOKEN_LABEL SECONDS   (the PIN on stdin)
Prints JSON: {"sign_per_s", "decrypt_per_s"}."""

import json
import os
import sys
import time

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism


def rate(operation, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        operation()
        count += 1
    return count / (time.perf_counter() - started)


def main() -> int:
    module, label, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    token = pkcs11.lib(module).get_token(token_label=label)
    with token.open(rw=True, user_pin=sys.stdin.readline().strip()) as session:
        key_label = "speed-" + os.urandom(4).hex()
        public, private = session.generate_keypair(KeyType.RSA, 2048, label=key_label, store=True,
                                                   private_template={Attribute.EXTRACTABLE: False,
                                                                     Attribute.SENSITIVE: True})
        try:
            public_key = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                              int.from_bytes(public[Attribute.MODULUS], "big")).public_key()
            oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
            ciphertext = public_key.encrypt(os.urandom(32), oaep)
            sign = rate(lambda: private.sign(b"x" * 200, mechanism=Mechanism.SHA256_RSA_PKCS), seconds)
            decrypt = rate(lambda: private.decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                                   mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None)), seconds)
        finally:
            public.destroy()
            private.destroy()
    print(json.dumps({"sign_per_s": sign, "decrypt_per_s": decrypt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
