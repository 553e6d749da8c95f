"""A PKCS#11 token's raw RSA-2048 rates through python-pkcs11: signatures (CKM_SHA256_RSA_PKCS) and
RSA-OAEP decryptions per second, with one session per thread, on a throwaway key pair generated in the
token (not extractable, destroyed afterwards). Used by hsm_throughput.py.

usage: token_speed.py MODULE TOKEN_LABEL SECONDS THREADS   (the PIN on stdin)
Prints JSON: {"sessions", "sign_per_s", "decrypt_per_s"}."""

import json
import os
import sys
import threading
import time

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass


def rate(operation, sessions: list, seconds: float) -> float:
    counts = [0] * len(sessions)
    stop = threading.Event()

    def worker(index: int):
        while not stop.is_set():
            operation(sessions[index])
            counts[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(sessions))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> int:
    module, label, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    token = pkcs11.lib(module).get_token(token_label=label)
    first = token.open(rw=True, user_pin=sys.stdin.readline().strip())
    sessions = [first] + [token.open(rw=True) for _ in range(threads - 1)]  # login is per process
    key_label = "speed-" + os.urandom(4).hex()
    public, _private = first.generate_keypair(KeyType.RSA, 2048, label=key_label, store=True,
                                              private_template={Attribute.EXTRACTABLE: False,
                                                                Attribute.SENSITIVE: True})
    try:
        numbers = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(public[Attribute.MODULUS], "big")).public_key()
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        ciphertext = numbers.encrypt(os.urandom(32), oaep)
        keys = [s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label) for s in sessions]
        by_session = dict(zip(map(id, sessions), keys, strict=True))
        sign = rate(lambda s: by_session[id(s)].sign(b"x" * 200, mechanism=Mechanism.SHA256_RSA_PKCS),
                    sessions, seconds)
        decrypt = rate(lambda s: by_session[id(s)].decrypt(ciphertext, mechanism=Mechanism.RSA_PKCS_OAEP,
                                                           mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None)),
                       sessions, seconds)
    finally:
        for obj in first.get_objects({Attribute.LABEL: key_label}):
            obj.destroy()
    print(json.dumps({"sessions": threads, "sign_per_s": sign, "decrypt_per_s": decrypt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
