"""A licensing cluster's side of enrollment: ask the root cluster (over HTTP) to certify the
licensing cluster key, and check what comes back before anything is stored."""

import time
from dataclasses import dataclass, field

import httpx
from cryptography import x509

from rmsd import pki, transport
from rmsd.errors import RmsdError
from rmsd.keys import ClusterKey
from rmsd.schema import utcnow

TIMEOUT = 30.0
# A root cluster that is busy (429) says when to ask again: waited for this many times, each at most so long.
BUSY_RETRIES, BUSY_WAIT_SECONDS = 5, 30


@dataclass
class RootSlc:
    """What the root cluster publishes at GET /slc."""

    cluster: str
    state: str
    cert: x509.Certificate
    revoked_key_ids: list[str] = field(default_factory=list)  # root keys revoked as compromised

    @property
    def key_id(self) -> str:
        return pki.cert_key_id(self.cert)


def check_url(url: str) -> None:
    """RmsdError when `url` would carry the enrollment credential in clear, or let anyone on the way hand
    this cluster a root SLC to trust: plain http is for a root cluster on this machine's loopback only."""
    try:
        transport.refuse_clear_url(url, "the enrollment credential, and the root SLC this cluster then trusts,",
                                   "enrollment_url")
    except RmsdError as err:
        raise RmsdError(f"{err} Nothing was changed.") from None


def _client(url: str, ca_path: str | None) -> httpx.Client:
    return httpx.Client(base_url=url.rstrip("/"), timeout=TIMEOUT, verify=ca_path or True)


def _call(url: str, ca_path: str | None, method: str, path: str, body: dict | None = None) -> dict:
    check_url(url)
    try:
        with _client(url, ca_path) as http:
            response = http.request(method, path, json=body)
            for _ in range(BUSY_RETRIES):
                if response.status_code != 429:
                    break
                time.sleep(_retry_after(response))
                response = http.request(method, path, json=body)
    except httpx.HTTPError as err:
        raise RmsdError(
            f"cannot reach the root cluster at {url}: {type(err).__name__}: {err}. Check enrollment_url "
            "(and enrollment_ca_path for https) and that the root cluster is running. Nothing was changed."
        ) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:200]
        if response.status_code == 401:
            raise RmsdError(
                f"the root cluster at {url} refused the enrollment credential: {detail}. Create a fresh enrollment "
                "credential on the root cluster (scope = this cluster's name). Nothing was changed."
            )
        raise RmsdError(f"the root cluster at {url} answered {response.status_code}: {detail}. Nothing was changed.")
    return response.json()


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "1")), 0.0), BUSY_WAIT_SECONDS)
    except ValueError:
        return 1.0


def fetch_root_slc(url: str, ca_path: str | None) -> RootSlc:
    answer = _call(url, ca_path, "GET", "/slc")
    if answer.get("role") != "root":
        raise RmsdError(
            f"{url} is cluster {answer.get('cluster')!r} with role {answer.get('role')!r}; enrollment_url must "
            "point to the root cluster"
        )
    return RootSlc(answer["cluster"], answer["state"], pki.load_pem(answer["chain"][0]),
                   list(answer.get("revoked_key_ids") or []))


def enroll(
    url: str, ca_path: str | None, *, cluster: str, key: ClusterKey, intranet_url: str, extranet_url: str | None,
    credential: str | None, expected_root: RootSlc, revocations: dict[str, str] | None = None,
) -> tuple[x509.Certificate, x509.Certificate]:
    """(licensing SLC, root SLC): the root cluster certifies `key` for licensing cluster `cluster`.
    `revocations`: this cluster's keys revoked as compromised (which the root never certifies again), each
    with its revocation statement (rmsd.revocation)."""
    if not credential:
        raise RmsdError(
            f"licensing cluster {cluster!r} must enroll with the root cluster at {url}, which needs an "
            "enrollment_credential: create an enrollment credential on the root cluster "
            f"(scope: {cluster}) and pass its secret. Nothing was changed."
        )
    body = {
        "cluster": cluster,
        "csr": pki.cluster_csr(key, cluster),
        "intranet_url": intranet_url,
        "extranet_url": extranet_url,
        "credential": credential,
        "revoked_key_ids": sorted(revocations or {}),
        "revocations": [statement for _key_id, statement in sorted((revocations or {}).items())],
    }
    answer = _call(url, ca_path, "POST", "/enrollment", body)
    try:
        slc, root = pki.load_pem(answer["slc"]), pki.load_pem(answer["chain"][0])
    except (KeyError, IndexError, ValueError):
        raise RmsdError(f"the root cluster at {url} answered the enrollment with no usable SLC") from None
    # Store nothing the root did not really issue for this very key.
    if pki.cert_key_id(slc) != key.key_id:
        raise RmsdError("the SLC the root cluster returned certifies another key than this cluster's")
    if pki.cert_key_id(root) != expected_root.key_id or not pki.verify_issued_by(slc, root, utcnow()):
        raise RmsdError("the SLC the root cluster returned does not chain to the root cluster's active key")
    return slc, root
