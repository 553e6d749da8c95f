"""One node's work, whatever carries the requests: what it knows of its cluster (read from the
configuration database, refreshed after rotations), and its operations: certification (RAC), enrollment
of licensing clusters, publishing (PL) and licensing (UL). The HTTP layer is rmsd.service."""

import base64
import binascii
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import RSAKey

from rmsd import caches, clusters, db, keys, licenses, pki, revocation, throttle
from rmsd.config import NodeConfig, load_secrets
from rmsd.errors import (
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    KeyUnavailableError,
    NotFoundError,
    RevokedError,
    RmsdError,
)
from rmsd.identity import Principal, TokenVerifier
from rmsd.keys import ClusterKey, TokenSettings, provider_for
from rmsd.schema import utcnow

log = logging.getLogger("rmsd")
PRIMARY_RECHECK_SECONDS = 1.0  # how long licensing reads from a standby before asking the primary again
ACTIVE_KEY_TTL = 5.0  # seconds a node trusts its view of the active key before reading it again
SNAPSHOT_SECONDS = 1.0  # how old the cluster state that anyone may ask for (health, SLC) may be
# A PL has no expiry of its own; a verified one is kept at most this long (and while the LRU keeps it).
PL_CACHE_SECONDS = 3600.0
# Enrollment before authentication, per worker process: requests per client address (a burst, then one every
# so many seconds), and credential checks at once (each holds scrypt's 16 MiB and a core for about 0.1 s).
ENROLLMENT_BURST, ENROLLMENT_EVERY_SECONDS = 10, 2.0
ENROLLMENT_CHECKS_AT_ONCE = 2


@dataclass(frozen=True)
class VerifiedRac:
    cert: x509.Certificate
    subject: str
    serial: str
    issuer_key_id: str  # the key of the root SLC it chains to
    jose_key: RSAKey  # its public key, to wrap content keys to


@dataclass(frozen=True)
class VerifiedPl:
    claims: dict


class ClusterState:
    """What a node knows about its cluster, read from the configuration database."""

    def __init__(self, row, active: ClusterKey, slc_pem: str, chain: list[str], trusted_slcs: list,
                 revoked: dict[str, datetime], schema_revision: str | None = None):
        self.row, self.active, self.slc_pem, self.trusted_slcs = row, active, slc_pem, trusted_slcs
        self.schema_revision = schema_revision  # the configuration database's, as read with the rest
        self.chain = chain  # the SLC, then (licensing clusters) the root SLC it chains to
        # (key id, root SLC) whose RACs this cluster accepts
        self.revoked = revoked  # this cluster's keys revoked as compromised -> when
        self.read_at = time.monotonic()

    @property
    def revoked_key_ids(self) -> list[str]:
        return sorted(self.revoked)


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        secrets = load_secrets(config.secret_path)
        self.engine = db.make_engine(config.database_url, secrets.database_password)
        self.reader = db.make_reader(self.engine)  # the per-request reads, which need no transaction
        # Licensing's reads while no host accepts writes (a database URL naming several hosts), see read_only().
        self.standby = db.make_standby_reader(self.engine)
        self._primary_lost_until = 0.0
        self._key_passwords = secrets.key_passwords
        self._token = TokenSettings.for_node(config, secrets)
        self.started_at = utcnow()
        self.verifier = (
            TokenVerifier(config.identity_issuer, config.identity_audience, config.identity_jwks_uri,
                          config.identity_jwks_ttl_seconds)
            if config.identity_issuer
            else None
        )
        self._keys: dict[str, ClusterKey] = {}
        self._state: ClusterState | None = None
        self._lock = threading.Lock()
        self.snapshot_seconds = SNAPSHOT_SECONDS
        self._snapshot: ClusterState | None = None
        self._snapshot_failed: tuple[float, Exception] | None = None
        self._snapshot_reading = threading.Lock()
        self._stop = threading.Event()
        self.racs = caches.VerifiedCache("rac")
        self.pls = caches.VerifiedCache("pl")
        self.enrollment_sources = throttle.SourceLimiter(ENROLLMENT_BURST, ENROLLMENT_EVERY_SECONDS,
                                                         "enrollment requests")
        self.credential_checks = throttle.Slots(ENROLLMENT_CHECKS_AT_ONCE, "enrollment credential checks")

    def cache_stats(self) -> list[str]:
        caches_ = [self.racs, self.pls] + ([self.verifier.tokens] if self.verifier else [])
        return [cache.stats() for cache in caches_]

    # --- cluster state -----------------------------------------------------------------------------

    def load_key(self, conn, key_id: str) -> ClusterKey:
        if key_id not in self._keys:
            row = clusters.key_row(conn, key_id)
            if row is None:
                raise NotFoundError(f"cluster key {key_id} is not known to this cluster")
            return self._key_of(row)
        return self._keys[key_id]

    def _key_of(self, row) -> ClusterKey:
        """The key a row stores, opened once per process; never a key revoked as compromised."""
        key_id = row.id
        if key_id not in self._keys:
            if row.status == "compromised":
                raise RevokedError(f"cluster key {key_id} was revoked as compromised; it is never used again")
            try:
                self._keys[key_id] = self._open(row)
            except RmsdError:
                # The cluster key password may have changed since this node started: its secret file
                # holds the new one (and, during the change, the previous one) before it restarts.
                self._key_passwords = load_secrets(self.config.secret_path).key_passwords
                self._keys[key_id] = self._open(row)
        return self._keys[key_id]

    def _open(self, row) -> ClusterKey:
        """Open a stored key with the key password, or with the previous one during a change; a token
        key in the token."""
        if row.protection == "pkcs11":
            return provider_for(row.protection, token=self._token).load(row)
        passwords: list[str | None] = list(self._key_passwords) or [None]
        *first, last = passwords
        for password in first:
            try:
                return provider_for(row.protection, key_password=password).load(row)
            except RmsdError:
                continue
        return provider_for(row.protection, key_password=last).load(row)

    def state(self, refresh: bool = False, max_age: float = ACTIVE_KEY_TTL) -> ClusterState:
        """The cluster as this node knows it: read again when asked to, or when older than `max_age` seconds."""
        with self._lock:
            if refresh or self._state is None or time.monotonic() - self._state.read_at > max_age:
                self._state = self._read_state()
                # The newer read serves GET /slc and /health too: a client that got a PL under a new key
                # finds that key in /slc at once, not up to `snapshot_seconds` later.
                if self._snapshot is None or self._snapshot.read_at < self._state.read_at:
                    self._snapshot, self._snapshot_failed = self._state, None
            return self._state

    def _read_state(self) -> ClusterState:
        return self.read_only(self.engine, self._read_state_on)

    def read_only(self, engine: sa.Engine, work):
        """work(conn), which only reads, on `engine`; while no host of the database accepts connections for
        writes, on a standby that has replayed every change it received (db.read_replayed): content already
        published keeps being licensed through a failover, and a revocation committed before it holds."""
        if self.standby is not None and time.monotonic() < self._primary_lost_until:
            return db.read_replayed(self.standby, work)
        try:
            return db.read(engine, work)
        except sa.exc.OperationalError:
            if self.standby is None:
                raise
            # A host that does not answer costs each connection attempt its connect timeout: for a second,
            # reads go to the standby without asking the primary first.
            self._primary_lost_until = time.monotonic() + PRIMARY_RECHECK_SECONDS
            return db.read_replayed(self.standby, work)

    def _read_state_on(self, conn: sa.Connection) -> ClusterState:
        """One read of the cluster (db.read sends it once more on a new connection if this one breaks)."""
        revision = db.read_schema_revision(conn)
        db.check_schema(conn, revision)  # at start, and should the schema change under a running node
        row = clusters.get_cluster(conn, self.config.cluster)
        if row is None:
            raise RmsdError(f"cluster {self.config.cluster!r} is not in the configuration database")
        # One read of the keys: with two, a rotation committed between them would show the
        # active key of the first as compromised in the second.
        key_rows = clusters.keys_of(conn, row.id)
        key_row = clusters.active_among(key_rows)
        revoked = clusters.compromised_among(key_rows)
        for key_id in revoked:  # never again used by this process
            self._keys.pop(key_id, None)
        active = self._key_of(key_row)
        slc = clusters.current_slc_row(conn, row.id, key_row.id)
        chain = [slc.pem]
        if row.role == "licensing":
            chain.append(clusters.root_slc_row(conn, row.id, slc.issuer_key_id).pem)
        trusted = [(pki.cert_key_id(slc), slc) for slc in clusters.trust_anchors(conn, row)]
        return ClusterState(row, active, slc.pem, chain, trusted, revoked, revision)

    def snapshot(self) -> ClusterState:
        """The cluster as anyone may ask for it (GET /health, GET /slc): read at most about `snapshot_seconds`
        ago. One request at a time reads it again, while the others answer from the previous read (only the
        very first read is waited for), and never under the lock issuing takes: a flood of anonymous requests
        costs the configuration database one read per `snapshot_seconds` and stalls no licensing. A failed
        read is answered as such (e.g. the database is unavailable) for the same time, without trying again."""
        current, failed = self._snapshot, self._snapshot_failed
        if failed is not None and time.monotonic() - failed[0] <= self.snapshot_seconds:
            raise failed[1]
        if current is not None and time.monotonic() - current.read_at <= self.snapshot_seconds:
            return current
        if not self._snapshot_reading.acquire(blocking=current is None):
            return current  # type: ignore[return-value]  # another request reads it now
        try:
            if self._snapshot is not current:  # read by another request while this one waited
                return self._snapshot  # type: ignore[return-value]
            try:
                self._snapshot, self._snapshot_failed = self._read_state(), None
            except Exception as err:
                self._snapshot_failed = (time.monotonic(), err)
                raise
            return self._snapshot
        finally:
            self._snapshot_reading.release()

    def _issuing(self, issue, recorded=None):
        """Run `issue(state, conn)` in a write transaction that holds the active key as active, so
        nothing is signed with a key a rotation has just retired; after a rotation this node had not
        seen yet, read the cluster again and issue with the new key. `recorded(conn, answer)`: whether
        the database holds what `issue` wrote for `answer`, read when the COMMIT was cut off (db.write)."""
        retired = object()  # what the transaction answers when the key it read is no longer active
        for refresh in (False, True):
            state = self.state(refresh=refresh)

            def issue_if_active(conn, state=state):
                return issue(state, conn) if clusters.lock_active_key(conn, state.active.key_id) else retired

            issued = db.write(self.engine, issue_if_active, committed=None if recorded is None else (
                lambda conn, answer: answer is not retired and recorded(conn, answer)))
            if issued is not retired:
                return issued
        raise RmsdError("the cluster key changed while this request was served; send it again")

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
        self.reader.dispose()
        if self.standby is not None:
            self.standby.dispose()

    # --- operations ----------------------------------------------------------------------------

    def authenticate(self, bearer_token: str | None) -> Principal:
        """The user a bearer token (from an `Authorization: Bearer` header, None when there is none) names."""
        if self.verifier is None:
            raise AuthenticationError("this node has no identity issuer configured; it cannot authenticate users")
        if not bearer_token:
            raise AuthenticationError("a bearer token is required")
        return self.verifier.verify(bearer_token)

    def certify(self, user: Principal, csr_pem: str) -> dict:
        state = self.state()
        if state.row.role != "root":
            raise ForbiddenError("certification is done by the root cluster only; ask the root cluster for a RAC")
        self._refuse_if_decommissioned(state, "issue RACs")
        csr = pki.load_csr(csr_pem)

        def issue(state, conn):
            now = utcnow()
            rac = pki.issue_rac(state.active, pki.load_pem(state.slc_pem), user.subject, csr, now, pki.RAC_VALIDITY)
            clusters.record_rac(conn, state.row.id, rac, user.subject, now)
            return {"rac": pki.to_pem(rac), "chain": [state.slc_pem]}

        return self._issuing(issue, lambda conn, answer: clusters.rac_recorded(
            conn, pki.serial_hex(pki.load_pem(answer["rac"]))))

    def enroll(self, cluster: str, credential: str, csr_pem: str, urls: list[str], revoked_key_ids=(),
               revocations=(), source: str = "") -> dict:
        """Certify a licensing cluster's key with the root cluster's active key, for the holder of a usable
        enrollment credential for that cluster; the enrollment spends the credential. What an anonymous
        client can cost is bounded before the credential is checked: so many requests per client address
        (`source`), so many credential checks at once in this process (429 beyond either).
        `revoked_key_ids`: keys of that licensing cluster it revoked as compromised, each proven by its
        revocation statement in `revocations` (rmsd.revocation); the root never certifies them again."""
        state = self.state()
        if state.row.role != "root":
            raise ForbiddenError("enrollment is done by the root cluster only")
        self._refuse_if_decommissioned(state, "enroll licensing clusters")
        if cluster == state.row.name:
            raise ForbiddenError("the root cluster cannot enroll itself")
        # Authenticate before looking at the request; one message for every refusal, and the same work (one
        # KDF run), so that neither tells anyone which scopes exist. The address pays for the KDF runs only:
        # a request refused because every check is taken costs it nothing.
        refused = "no valid enrollment credential for the cluster named (unknown, wrong, used or expired)"
        now = utcnow()
        with self.credential_checks.held():
            self.enrollment_sources.take(source)
            found = db.read(self.reader, lambda conn: clusters.credential_row(conn, state.row.id, cluster))
            accepted = clusters.credential_accepts(found, credential, now)
        if not accepted:
            raise AuthenticationError(refused)
        csr = pki.load_csr(csr_pem)
        key_id = keys.key_id_of(csr.public_key())
        revoked = _proven_revocations(cluster, revoked_key_ids, revocations)

        def issue(state, conn):
            if not clusters.claim_credential(conn, found.id, now):  # another request spent it meanwhile
                raise AuthenticationError(refused)
            clusters.revoke_enrollments(conn, state.row.id, cluster, revoked, now)
            if key_id in revoked or clusters.enrollment_revoked(conn, state.row.id, key_id):
                raise ForbiddenError(
                    f"cluster key {key_id} of licensing cluster {cluster} was revoked as compromised; it is never "
                    "enrolled again. Re-enrollment keeps the key: a compromised key needs a new key pair"
                )
            slc = pki.issue_licensing_slc(state.active, pki.load_pem(state.slc_pem), cluster, csr, urls, now)
            clusters.record_enrollment(conn, state.row.id, cluster, slc, state.active.key_id, now)
            return {"slc": pki.to_pem(slc), "chain": [state.slc_pem]}

        answer = self._issuing(issue)
        log.info("enrolled licensing cluster %s (key %s)", cluster, key_id)
        return answer

    def publish(
        self, user: Principal, content_id: str, content_key_b64: str, rights: dict, template: str | None = None,
        supersedes: str | None = None,
    ) -> dict:
        """A PL for content; with `supersedes`, its owner republishes content under the active key and
        the new PL replaces the old one (the remedy for content under a compromised key)."""
        state = self.state()
        self._refuse_if_decommissioned(state, "publish")
        content_key = _b64url_decode(content_key_b64, "content_key")
        if len(content_key) != 32:
            raise InvalidRequestError("content_key must be 32 bytes (AES-256), base64url encoded")
        if template is not None:
            found = db.read(self.engine, lambda conn: clusters.template_row(conn, state.row.id, template))
            if found is None:
                raise NotFoundError(f"cluster {state.row.name} has no rights policy template {template!r}")
            rights = _merge_rights(found.rights, rights)
        rights = licenses.normalize_rights(rights)

        def issue(state, conn):
            if supersedes is not None:
                _check_republishing(conn, state, user, content_id, supersedes)
            now = utcnow()
            pl, claims = licenses.issue_pl(
                state.active, state.row.name, content_id, user.subject, rights, content_key, now, template=template,
            )
            clusters.record_content(conn, state.row.id, claims, now, supersedes=supersedes)
            return {"pl": pl, "pl_id": claims["pl_id"], "content_id": content_id, "key_id": claims["key_id"],
                    "supersedes": supersedes}

        return self._issuing(issue, lambda conn, answer: clusters.content_row(conn, answer["pl_id"]) is not None)

    def license(self, user: Principal, pl_token: str, rac_pem: str) -> dict:
        try:
            return self._license(user, pl_token, rac_pem)
        except KeyUnavailableError:
            # A rotation settled a compromised key in the token (destroyed or disabled it) after this request
            # read that key as active. Read the cluster again and answer as a request made after the
            # rotation: refused for content under that key, signed with the new active key otherwise.
            self.state(refresh=True)
            return self._license(user, pl_token, rac_pem)

    def _license(self, user: Principal, pl_token: str, rac_pem: str) -> dict:
        state = self.state()
        now = utcnow()
        rac = self._trusted_rac(state, rac_pem, now)
        if rac.subject != user.subject:
            raise ForbiddenError("the RAC belongs to another user than the bearer token's subject")
        pl = self._verified_pl(state, pl_token)
        key_id = pl.claims["key_id"]
        # Everything a revocation or rotation changes is read here, on every request, in one round trip:
        # the PL's key (compromised?), the key this node signs with (still active?), the RAC's root SLC.
        def checks(conn):
            statuses, rac_trusted = clusters.license_checks(
                conn, state.row.id, state.row.role, {key_id, state.active.key_id}, rac.issuer_key_id)
            if statuses.get(key_id) == "compromised":
                raise RevokedError(_revoked_content_message(clusters.content_row(conn, pl.claims["pl_id"]),
                                                            clusters.key_row(conn, key_id)))
            return statuses, rac_trusted

        statuses, rac_trusted = self.read_only(self.reader, checks)
        if statuses.get(state.active.key_id) != "active":  # a rotation retired it since this node read the cluster
            state = self.state(refresh=True)
        if not rac_trusted:
            raise ForbiddenError("the RAC was not issued by this deployment's root cluster or has expired")
        rights = licenses.granted_rights(pl.claims, user.subject, list(user.groups))
        if not rights:
            raise ForbiddenError(f"{user.subject} holds no rights to content {pl.claims['content_id']}")
        content_key = licenses.unwrap_content_key(pl.claims["wrapped_key"], self._key(key_id))
        ul = licenses.issue_ul(
            state.active, state.row.name, pl.claims, user.subject, rights, rac.jose_key, rac.serial, content_key, now,
        )
        return {"ul": ul, "content_id": pl.claims["content_id"], "rights": rights}

    def _key(self, key_id: str) -> ClusterKey:
        found = self._keys.get(key_id)
        if found is not None:
            return found
        return self.read_only(self.engine, lambda conn: self.load_key(conn, key_id))

    def _verified_pl(self, state: ClusterState, pl_token: str) -> "VerifiedPl":
        """A PL of this cluster with a valid signature and in the content registry: checked once per PL
        (its bytes never change, nor does a key's public half or a registry entry); what can change, its
        key's status, the caller reads on every request."""
        digest = caches.digest(pl_token)
        found = self.pls.get(digest)
        if found is not None:
            return found
        key_id = licenses.header_of(pl_token).get("kid")

        def check(conn):
            key_row = clusters.key_row(conn, key_id) if isinstance(key_id, str) else None
            if key_row is None or key_row.cluster_id != state.row.id:
                raise InvalidRequestError("the publishing license was not issued by this cluster")
            public_key = serialization.load_pem_public_key(key_row.public_key_pem.encode())
            claims = licenses.verify(pl_token, public_key, licenses.PL_TYPE)
            recorded = clusters.content_row(conn, claims["pl_id"])
            if recorded is None:
                raise NotFoundError(f"publishing license {claims['pl_id']} is not in this cluster's content registry")
            if claims["key_id"] != key_id:
                raise InvalidRequestError("the publishing license wraps its content key to another key than its signer")
            if key_row.status == "compromised":
                raise RevokedError(_revoked_content_message(recorded, key_row))
            return claims

        claims = self.read_only(self.engine, check)
        verified = VerifiedPl(claims)
        self.pls.put(digest, verified, time.time() + PL_CACHE_SECONDS)
        return verified

    def _trusted_rac(self, state: ClusterState, rac_pem: str, now: datetime) -> "VerifiedRac":
        """A RAC issued by a root SLC this cluster trusts, valid now: its signature and subject checked once
        per RAC, until it expires; whether its root SLC is still trusted the caller reads on every request."""
        digest = caches.digest(rac_pem)
        found = self.racs.get(digest)
        if found is not None:
            return found
        try:
            rac = pki.load_pem(rac_pem)
        except ValueError:
            raise InvalidRequestError("rac is not a PEM certificate") from None

        def issuer(anchors):
            return next((key_id for key_id, slc in anchors if pki.verify_issued_by(rac, slc, now)), None)

        # Not trusted by what this node read a moment ago: read again (at most once a second, however
        # many untrusted RACs arrive), an import may have added trust.
        issuer_key_id = issuer(state.trusted_slcs) or issuer(self.state(max_age=1.0).trusted_slcs)
        if issuer_key_id is None:
            raise ForbiddenError("the RAC was not issued by this deployment's root cluster or has expired")
        verified = VerifiedRac(rac, pki.rac_subject(rac), pki.serial_hex(rac), issuer_key_id,
                               RSAKey.import_key(rac.public_key()))  # type: ignore[arg-type]  # RSA: its issuer checked
        self.racs.put(digest, verified, rac.not_valid_after_utc.timestamp())
        return verified

    @staticmethod
    def _refuse_if_decommissioned(state: ClusterState, what: str) -> None:
        if state.row.state != "provisioned":
            raise ForbiddenError(f"cluster {state.row.name} is {state.row.state}: it no longer may {what}")


def _proven_revocations(cluster: str, claimed, statements) -> list[str]:
    """The keys of licensing cluster `cluster` its revocation statements revoke; InvalidRequestError when it
    claims a key revoked without the statement signed by that key."""
    proven = {revocation.verify(statement, cluster) for statement in statements}
    unproven = sorted(set(claimed) - proven)
    if unproven:
        raise InvalidRequestError(
            f"revoked_key_ids names {', '.join(unproven)} without its revocation statement in revocations: the root "
            "cluster takes a key's revocation only signed by that key (rmsd on the licensing cluster makes it when "
            "it revokes the key). Nothing was changed."
        )
    return sorted(proven)


def _check_republishing(conn, state: ClusterState, user: Principal, content_id: str, old_pl_id: str) -> None:
    old = clusters.content_row(conn, old_pl_id)
    if old is None or old.cluster_id != state.row.id:
        raise NotFoundError(f"publishing license {old_pl_id} is not in this cluster's content registry")
    if old.owner != user.subject:
        raise ForbiddenError(f"only the owner of content {old.content_id!r} ({old.owner}) may republish it")
    if old.content_id != content_id:
        raise InvalidRequestError(
            f"publishing license {old_pl_id} is for content {old.content_id!r}, not {content_id!r}"
        )
    if old.superseded_by is not None:
        raise InvalidRequestError(
            f"publishing license {old_pl_id} was already republished as {old.superseded_by}; supersede that one"
        )


def _revoked_content_message(recorded, key_row) -> str:
    message = (
        f"content {recorded.content_id!r} (publishing license {recorded.pl_id}, owner {recorded.owner}) is protected "
        f"by cluster key {key_row.id}, revoked as compromised on {key_row.status_changed_at:%Y-%m-%d}: it can no "
        "longer be opened and must be republished by its owner under the new key"
    )
    if recorded.superseded_by:
        message += f"; it was republished as publishing license {recorded.superseded_by}: use that one"
    return message


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
