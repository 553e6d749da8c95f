"""An HTTP client of rmsd, and what a user's RMS client does with the answers: make a RAC key pair,
encrypt content under a content key, open a use license and decrypt the content."""

import base64
import json
import os
from dataclasses import dataclass

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID
from joserfc import jwe, jws
from joserfc.jwk import RSAKey

from rmsd import pki
from rmsd.errors import RmsdError
from rmsd.identity import identifier_problem


class ServiceError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class User:
    """A user's identity (bearer token) and RAC key pair."""

    subject: str
    token: str
    private_key: rsa.RSAPrivateKey
    rac_pem: str | None = None

    @classmethod
    def new(cls, subject: str, token: str) -> "User":
        return cls(subject, token, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def csr_pem(self) -> str:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._csr_common_name())]))
            .sign(self.private_key, hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def _csr_common_name(self) -> str:
        # Only a label: the RAC names whoever the bearer token says (its full id is in the RAC's subjectAltName).
        return pki.rac_common_name(self.subject) if identifier_problem(self.subject) is None else "rmsd user"


class RmsClient:
    def __init__(self, base_url: str, timeout: float = 10.0, ca_file: str | None = None):
        # ca_file: the CA that issued the node's certificate (a private CA), else the system's.
        self.http = httpx.Client(base_url=base_url, timeout=timeout, verify=ca_file if ca_file else True)

    def _call(self, method: str, path: str, token: str | None = None, body: dict | None = None) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = self.http.request(method, path, json=body, headers=headers)
        if response.status_code != 200:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, str(detail))
        return response.json()

    def health(self) -> dict:
        return self._call("GET", "/health")

    def slc(self) -> dict:
        return self._call("GET", "/slc")

    def certify(self, user: User) -> str:
        user.rac_pem = self._call("POST", "/certification", user.token, {"csr": user.csr_pem()})["rac"]
        return user.rac_pem

    def publish(self, user: User, content_id: str, content_key: bytes, rights: dict,
                supersedes: str | None = None) -> dict:
        """A PL for content; `supersedes` republishes: the owner's new PL replaces that older one."""
        body = {"content_id": content_id, "content_key": b64url(content_key), "rights": rights}
        if supersedes:
            body["supersedes"] = supersedes
        return self._call("POST", "/publishing", user.token, body)

    def license(self, user: User, pl: str) -> dict:
        return self._call("POST", "/licensing", user.token, {"pl": pl, "rac": user.rac_pem})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encrypt_content(plaintext: bytes) -> tuple[bytes, bytes]:
    """(content_key, nonce || AES-256-GCM ciphertext)."""
    key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
    return key, nonce + AESGCM(key).encrypt(nonce, plaintext, None)


def decrypt_content(content_key: bytes, blob: bytes) -> bytes:
    return AESGCM(content_key).decrypt(blob[:12], blob[12:], None)


def open_use_license(ul: str, slc_pem: str, user: User) -> tuple[dict, bytes]:
    """Verify the UL against the cluster's SLC and unwrap the content key with the user's RAC key."""
    slc_key = pki.load_pem(slc_pem).public_key()
    if not isinstance(slc_key, rsa.RSAPublicKey):
        raise RmsdError("the cluster's SLC does not certify an RSA key; it cannot have signed the use license")
    claims = json.loads(jws.deserialize_compact(ul, RSAKey.import_key(slc_key)).payload)
    registry = jwe.JWERegistry(algorithms=["RSA-OAEP-256", "A256GCM"])
    content_key = jwe.decrypt_compact(claims["wrapped_key"], RSAKey.import_key(user.private_key), registry=registry)
    if content_key.plaintext is None:
        raise RmsdError("the content key in the use license does not open")
    return claims, content_key.plaintext
