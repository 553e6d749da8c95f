"""The HTTP service of one node: health, SLC, certification (RAC), publishing (PL), licensing (UL)."""

import base64
import binascii
import logging
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from rmsd import __version__, clusters, db, licenses, pki
from rmsd.config import NodeConfig, load_secrets
from rmsd.errors import AuthenticationError, ForbiddenError, InvalidRequestError, NotFoundError, RmsdError
from rmsd.identity import Principal, TokenVerifier
from rmsd.keys import ClusterKey, provider_for
from rmsd.schema import utcnow

log = logging.getLogger("rmsd")
ACTIVE_KEY_TTL = 5.0  # seconds a node trusts its view of the active key before reading it again


class ClusterState:
    """What a node knows about its cluster, read from the configuration database."""

    def __init__(self, row, active: ClusterKey, slc_pem: str, chain: list[str], trusted_slcs: list):
        self.row, self.active, self.slc_pem, self.trusted_slcs = row, active, slc_pem, trusted_slcs
        self.chain = chain  # the SLC, then (licensing clusters) the root SLC it chains to
        self.read_at = time.monotonic()


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        secrets = load_secrets(config.secret_path)
        self.engine = db.make_engine(config.database_url, secrets.database_password)
        self._key_password = secrets.key_password
        self.verifier = (
            TokenVerifier(config.identity_issuer, config.identity_audience, config.identity_jwks_uri)
            if config.identity_issuer
            else None
        )
        self._keys: dict[str, ClusterKey] = {}
        self._state: ClusterState | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # --- cluster state -----------------------------------------------------------------------------

    def load_key(self, conn, key_id: str) -> ClusterKey:
        if key_id not in self._keys:
            row = clusters.key_row(conn, key_id)
            if row is None:
                raise NotFoundError(f"cluster key {key_id} is not known to this cluster")
            self._keys[key_id] = provider_for(row.protection, key_password=self._key_password).load(row)
        return self._keys[key_id]

    def state(self, refresh: bool = False) -> ClusterState:
        with self._lock:
            if refresh or self._state is None or time.monotonic() - self._state.read_at > ACTIVE_KEY_TTL:
                with self.engine.connect() as conn:
                    row = clusters.get_cluster(conn, self.config.cluster)
                    if row is None:
                        raise RmsdError(f"cluster {self.config.cluster!r} is not in the configuration database")
                    key_row = clusters.active_key_row(conn, row.id)
                    active = self.load_key(conn, key_row.id)
                    slc = clusters.current_slc_row(conn, row.id, key_row.id)
                    chain = [slc.pem]
                    if row.role == "licensing":
                        chain.append(clusters.root_slc_row(conn, row.id, slc.issuer_key_id).pem)
                    trusted = clusters.trust_anchors(conn, row)
                self._state = ClusterState(row, active, slc.pem, chain, trusted)
            return self._state

    def heartbeat_loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_seconds):
            self.beat()

    def beat(self) -> None:
        try:
            with self.engine.begin() as conn:
                row = clusters.get_cluster(conn, self.config.cluster)
                if row is not None:
                    clusters.heartbeat(conn, row.id, self.config.name, utcnow())
        except sa.exc.SQLAlchemyError as err:
            log.warning("heartbeat failed: %s", type(err).__name__)

    def stop(self) -> None:
        self._stop.set()
        self.engine.dispose()

    # --- operations ----------------------------------------------------------------------------

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None) -> Principal:
        if self.verifier is None:
            raise AuthenticationError("this node has no identity issuer configured; it cannot authenticate users")
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise AuthenticationError("a bearer token is required")
        return self.verifier.verify(credentials.credentials)

    def certify(self, user: Principal, csr_pem: str) -> dict:
        state = self.state()
        if state.row.role != "root":
            raise ForbiddenError("certification is done by the root cluster only; ask the root cluster for a RAC")
        self._refuse_if_decommissioned(state, "issue RACs")
        csr = pki.load_csr(csr_pem)
        now = utcnow()
        rac = pki.issue_rac(state.active, pki.load_pem(state.slc_pem), user.subject, csr, now)
        with self.engine.begin() as conn:
            clusters.record_rac(conn, state.row.id, rac, user.subject, now)
        return {"rac": pki.to_pem(rac), "chain": [state.slc_pem]}

    def enroll(self, cluster: str, credential: str, csr_pem: str, urls: list[str]) -> dict:
        """Certify a licensing cluster's key with the root cluster's active key."""
        state = self.state()
        if state.row.role != "root":
            raise ForbiddenError("enrollment is done by the root cluster only")
        self._refuse_if_decommissioned(state, "enroll licensing clusters")
        if cluster == state.row.name:
            raise ForbiddenError("the root cluster cannot enroll itself")
        now = utcnow()
        with self.engine.connect() as conn:
            found = clusters.credential_row(conn, state.row.id, cluster)
        # Authenticate before looking at the request; one message for every refusal, so it tells no
        # one which scopes exist.
        if found is None or not clusters.secret_matches(found, credential) or found.expires_at <= now:
            raise AuthenticationError(
                f"no valid enrollment credential for cluster {cluster!r} (unknown, wrong or expired)"
            )
        csr = pki.load_csr(csr_pem)
        slc = pki.issue_licensing_slc(state.active, pki.load_pem(state.slc_pem), cluster, csr, urls, now)
        with self.engine.begin() as conn:
            clusters.credential_used(conn, found.id, now)
            clusters.record_enrollment(conn, state.row.id, cluster, slc, state.active.key_id, now)
        log.info("enrolled licensing cluster %s (key %s)", cluster, pki.cert_key_id(slc))
        return {"slc": pki.to_pem(slc), "chain": [state.slc_pem]}

    def publish(
        self, user: Principal, content_id: str, content_key_b64: str, rights: dict, template: str | None = None,
    ) -> dict:
        state = self.state()
        self._refuse_if_decommissioned(state, "publish")
        content_key = _b64url_decode(content_key_b64, "content_key")
        if len(content_key) != 32:
            raise InvalidRequestError("content_key must be 32 bytes (AES-256), base64url encoded")
        if template is not None:
            with self.engine.connect() as conn:
                found = clusters.template_row(conn, state.row.id, template)
            if found is None:
                raise NotFoundError(f"cluster {state.row.name} has no rights policy template {template!r}")
            rights = _merge_rights(found.rights, rights)
        rights = licenses.normalize_rights(rights)
        now = utcnow()
        pl, claims = licenses.issue_pl(
            state.active, state.row.name, content_id, user.subject, rights, content_key, now, template=template,
        )
        with self.engine.begin() as conn:
            clusters.record_content(conn, state.row.id, claims, now)
        return {"pl": pl, "pl_id": claims["pl_id"], "content_id": content_id, "key_id": claims["key_id"]}

    def license(self, user: Principal, pl_token: str, rac_pem: str) -> dict:
        state = self.state()
        now = utcnow()
        rac = self._trusted_rac(state, rac_pem, now)
        if pki.rac_subject(rac) != user.subject:
            raise ForbiddenError("the RAC belongs to another user than the bearer token's subject")
        key_id = licenses.header_of(pl_token).get("kid")
        with self.engine.connect() as conn:
            key_row = clusters.key_row(conn, key_id) if isinstance(key_id, str) else None
            if key_row is None or key_row.cluster_id != state.row.id:
                raise InvalidRequestError("the publishing license was not issued by this cluster")
            pl = licenses.verify(pl_token, self.load_key(conn, key_id).public_key, licenses.PL_TYPE)
            recorded = clusters.content_row(conn, pl["pl_id"])
            if recorded is None:
                raise NotFoundError(f"publishing license {pl['pl_id']} is not in this cluster's content registry")
            pl_key = self.load_key(conn, pl["key_id"])
        rights = licenses.granted_rights(pl, user.subject, list(user.groups))
        if not rights:
            raise ForbiddenError(f"{user.subject} holds no rights to content {pl['content_id']}")
        content_key = licenses.unwrap_content_key(pl["wrapped_key"], pl_key)
        ul = licenses.issue_ul(
            state.active, state.row.name, pl, user.subject, rights, rac.public_key(), pki.serial_hex(rac), content_key,
            now,
        )
        return {"ul": ul, "content_id": pl["content_id"], "rights": rights}

    def _trusted_rac(self, state: ClusterState, rac_pem: str, now: datetime):
        try:
            rac = pki.load_pem(rac_pem)
        except ValueError:
            raise InvalidRequestError("rac is not a PEM certificate") from None
        if not any(pki.verify_issued_by(rac, slc, now) for slc in state.trusted_slcs):
            raise ForbiddenError("the RAC was not issued by this deployment's root cluster or has expired")
        return rac

    @staticmethod
    def _refuse_if_decommissioned(state: ClusterState, what: str) -> None:
        if state.row.state != "provisioned":
            raise ForbiddenError(f"cluster {state.row.name} is {state.row.state}: it no longer may {what}")


def _merge_rights(template: dict, extra: dict) -> dict:
    """A template's rights, plus what the publisher grants on top."""
    merged = {principal: list(granted) for principal, granted in template.items()}
    for principal, granted in extra.items():
        merged[principal] = sorted(set(merged.get(principal, [])) | set(granted))
    return merged


def _b64url_decode(value: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not base64url") from None


# --- HTTP ----------------------------------------------------------------------------------------


class CertificationRequest(BaseModel):
    csr: str = Field(max_length=16384, description="PEM PKCS#10 request with the user's RSA public key")


class PublishingRequest(BaseModel):
    content_id: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
    content_key: str = Field(max_length=128, description="the content's AES-256 key, base64url")
    rights: dict[str, list[str]] = Field(
        default_factory=dict, max_length=256,
        description="principal (user id, or group:NAME) -> rights (VIEW, EDIT, PRINT, ...); added to the template's",
    )
    template: str | None = Field(
        default=None, min_length=1, max_length=64, description="a rights policy template of this cluster"
    )


class EnrollmentRequest(BaseModel):
    cluster: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the licensing cluster")
    csr: str = Field(max_length=16384, description="PEM PKCS#10 request signed by the licensing cluster key")
    intranet_url: str = Field(max_length=512, pattern=r"^https?://")
    extranet_url: str | None = Field(default=None, max_length=512, pattern=r"^https?://")
    credential: str = Field(min_length=1, max_length=512, description="the enrollment credential's secret")


class LicensingRequest(BaseModel):
    pl: str = Field(max_length=65536, description="the publishing license (compact JWS)")
    rac: str = Field(max_length=16384, description="the requester's RAC (PEM)")


class Health(BaseModel):
    status: str
    cluster: str
    node: str
    role: str
    state: str
    active_key_id: str
    version: str


class Slc(BaseModel):
    cluster: str
    role: str
    state: str
    intranet_url: str
    extranet_url: str | None
    key_id: str
    chain: list[str] = Field(description="the cluster's SLC, then the root SLC it chains to (licensing clusters)")


class Enrollment(BaseModel):
    slc: str
    chain: list[str]


class Rac(BaseModel):
    rac: str
    chain: list[str]


class PublishingLicense(BaseModel):
    pl: str
    pl_id: str
    content_id: str
    key_id: str


class UseLicense(BaseModel):
    ul: str
    content_id: str
    rights: list[str]


class Problem(BaseModel):
    error: str
    detail: str


ERRORS = {
    AuthenticationError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    InvalidRequestError: 400,
}
PROBLEMS = {code: {"model": Problem} for code in (400, 401, 403, 404, 503)}


def create_app(config: NodeConfig) -> FastAPI:
    node = Node(config)
    bearer = HTTPBearer(auto_error=False)

    @asynccontextmanager
    async def lifespan(_app):
        node.state()  # fail at start, not at the first request, when the key or database is unusable
        node.beat()
        thread = threading.Thread(target=node.heartbeat_loop, name="heartbeat", daemon=True)
        thread.start()
        yield
        node.stop()

    app = FastAPI(title="rmsd", version=__version__, lifespan=lifespan, responses=PROBLEMS)
    app.state.node = node

    @app.exception_handler(RmsdError)
    async def _rmsd_error(_request: Request, err: RmsdError):
        status = next((code for cls, code in ERRORS.items() if isinstance(err, cls)), 409)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": type(err).__name__, "detail": str(err)}, status, headers=headers)

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def _db_error(_request: Request, err: sa.exc.SQLAlchemyError):
        if isinstance(err, sa.exc.DataError):  # the request's fault, e.g. NUL in PostgreSQL text
            return JSONResponse({"error": "InvalidRequestError", "detail": "the request holds an unstorable value"},
                                400)
        log.error("configuration database error: %s", type(err).__name__)
        return JSONResponse({"error": "Unavailable", "detail": "configuration database unavailable"}, 503)

    def authenticated(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
        return node.authenticate(credentials)

    User = Annotated[Principal, Depends(authenticated)]

    @app.get("/health", response_model=Health, tags=["node"])
    def health():
        state = node.state()
        return Health(
            status="ok", cluster=state.row.name, node=config.name, role=state.row.role, state=state.row.state,
            active_key_id=state.active.key_id, version=__version__,
        )

    @app.get("/slc", response_model=Slc, tags=["node"])
    def slc():
        state = node.state()
        return Slc(
            cluster=state.row.name, role=state.row.role, state=state.row.state, intranet_url=state.row.intranet_url,
            extranet_url=state.row.extranet_url, key_id=state.active.key_id, chain=state.chain,
        )

    @app.post("/certification", response_model=Rac, tags=["certification"])
    def certification(body: CertificationRequest, principal: User):
        return node.certify(principal, body.csr)

    @app.post("/publishing", response_model=PublishingLicense, tags=["publishing"])
    def publishing(body: PublishingRequest, principal: User):
        return node.publish(principal, body.content_id, body.content_key, body.rights, body.template)

    @app.post("/licensing", response_model=UseLicense, tags=["licensing"])
    def licensing(body: LicensingRequest, principal: User):
        return node.license(principal, body.pl, body.rac)

    @app.post("/enrollment", response_model=Enrollment, tags=["enrollment"])
    def enrollment(body: EnrollmentRequest):
        urls = [u for u in (body.intranet_url, body.extranet_url) if u]
        return node.enroll(body.cluster, body.credential, body.csr, urls)

    return app


def serve(config: NodeConfig) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config)
    try:
        # Refuse to start, with the reason, when the key or the database is unusable.
        app.state.node.state()
    except sa.exc.SQLAlchemyError as err:
        raise db.connect_error(err, config.database_url) from None
    uvicorn.run(
        app, host=config.listen_address, port=config.port, log_level="info",
        timeout_graceful_shutdown=10,
    )
