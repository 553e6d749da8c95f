"""Cluster, key, certificate and node records in the configuration database.
Every function takes a connection inside the caller's transaction."""

import hashlib
import hmac
import os
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from rmsd import pki
from rmsd.errors import RmsdError
from rmsd.keys import ClusterKey, KeyProvider, NewKey
from rmsd.schema import (
    certificates,
    cluster_keys,
    clusters,
    content,
    enrollment_credentials,
    enrollments,
    owner_notices,
    racs,
    rights_templates,
    servers,
)


def get_cluster(conn: sa.Connection, name: str):
    return conn.execute(sa.select(clusters).where(clusters.c.name == name)).first()


def other_cluster(conn: sa.Connection, name: str):
    return conn.execute(sa.select(clusters).where(clusters.c.name != name)).first()


def keys_of(conn: sa.Connection, cluster_id: int) -> list:
    query = sa.select(cluster_keys).where(cluster_keys.c.cluster_id == cluster_id)
    return list(conn.execute(query.order_by(cluster_keys.c.created_at)))


def key_row(conn: sa.Connection, key_id: str):
    return conn.execute(sa.select(cluster_keys).where(cluster_keys.c.id == key_id)).first()


def active_key_row(conn: sa.Connection, cluster_id: int):
    return active_among(keys_of(conn, cluster_id))


def active_among(key_rows: list):
    """The active key among a cluster's key rows (read together, so they agree with each other)."""
    rows = [k for k in key_rows if k.status == "active"]
    if len(rows) != 1:
        raise RmsdError(f"cluster has {len(rows)} active keys instead of exactly one; the database is damaged")
    return rows[0]


def key_statuses(conn: sa.Connection, key_ids) -> dict[str, str]:
    query = sa.select(cluster_keys.c.id, cluster_keys.c.status).where(cluster_keys.c.id.in_(list(key_ids)))
    return dict(conn.execute(query).all())


def license_checks(conn: sa.Connection, cluster_id: int, role: str, key_ids, rac_issuer_key_id: str):
    """What a revocation or rotation can change for one licensing request, in one round trip: the
    status of each of `key_ids` (this cluster's keys), and whether the root SLC of `rac_issuer_key_id`
    is still trusted (root cluster: that key of its own is not compromised; licensing cluster: its copy
    of the root SLC is not revoked)."""
    ids = sorted(set(key_ids) | ({rac_issuer_key_id} if role == "root" else set()))
    keys = sa.select(cluster_keys.c.id, cluster_keys.c.status, sa.literal("key").label("what")).where(
        cluster_keys.c.id.in_(ids), cluster_keys.c.cluster_id == cluster_id
    )
    query: sa.Executable = keys
    if role != "root":
        anchor = sa.select(certificates.c.key_id, sa.literal("trusted"), sa.literal("anchor")).where(
            certificates.c.cluster_id == cluster_id, certificates.c.kind == "root",
            certificates.c.key_id == rac_issuer_key_id, certificates.c.revoked_at.is_(None),
        )
        query = sa.union_all(keys, anchor)
    statuses, anchored = {}, False
    for key_id, status, what in conn.execute(query):
        if what == "key":
            statuses[key_id] = status
        else:
            anchored = True
    if role == "root":
        anchored = statuses.get(rac_issuer_key_id) not in (None, "compromised")
    return statuses, anchored


def lock_active_key(conn: sa.Connection, key_id: str) -> bool:
    """True when `key_id` is still the active key; holds it so (FOR SHARE on PostgreSQL, the write
    lock on SQLite) until the caller's transaction ends, so a rotation cannot commit in between."""
    query = sa.select(cluster_keys.c.status).where(cluster_keys.c.id == key_id).with_for_update(read=True)
    return conn.execute(query).scalar_one_or_none() == "active"


def set_key_status(conn: sa.Connection, key_id: str, status: str, now: datetime) -> None:
    conn.execute(cluster_keys.update().where(cluster_keys.c.id == key_id).values(status=status, status_changed_at=now))


def set_key_ciphertext(conn: sa.Connection, key_id: str, encrypted_private_key: bytes) -> None:
    conn.execute(
        cluster_keys.update().where(cluster_keys.c.id == key_id).values(encrypted_private_key=encrypted_private_key)
    )


def compromised_keys(conn: sa.Connection, cluster_id: int) -> dict[str, datetime]:
    """Key id -> when it was revoked, for the cluster's keys revoked as compromised."""
    return compromised_among(keys_of(conn, cluster_id))


def compromised_among(key_rows: list) -> dict[str, datetime]:
    return {k.id: k.status_changed_at for k in key_rows if k.status == "compromised"}


def compromised_key_ids(conn: sa.Connection, cluster_id: int) -> list[str]:
    return list(compromised_keys(conn, cluster_id))


def save_revocations(conn: sa.Connection, statements: dict[str, str]) -> None:
    """Keep each compromised key's revocation statement (rmsd.revocation) with it, unless it has one."""
    for key_id, statement in statements.items():
        conn.execute(
            cluster_keys.update()
            .where(cluster_keys.c.id == key_id, cluster_keys.c.status == "compromised",
                   cluster_keys.c.revocation.is_(None))
            .values(revocation=statement)
        )


def current_slc_row(conn: sa.Connection, cluster_id: int, key_id: str):
    query = (
        sa.select(certificates)
        .where(certificates.c.cluster_id == cluster_id, certificates.c.key_id == key_id, certificates.c.kind == "slc")
        .order_by(certificates.c.not_after.desc(), certificates.c.created_at.desc())
    )
    return conn.execute(query).first()


def insert_key(
    conn: sa.Connection, cluster_id: int, provider: KeyProvider, new: NewKey, now: datetime, status: str = "active",
    imported_from: str | None = None,
) -> None:
    conn.execute(
        cluster_keys.insert().values(
            id=new.key_id,
            cluster_id=cluster_id,
            status=status,
            imported_from=imported_from,
            protection=provider.protection,
            size=new.size,
            public_key_pem=new.public_key_pem,
            encrypted_private_key=new.encrypted_private_key,
            token_label=new.token_label,
            key_label=new.key_label,
            wrap_alg=new.wrap_alg,
            sign_alg=new.sign_alg,
            created_at=now,
            status_changed_at=now,
        )
    )


def insert_slc(
    conn: sa.Connection, cluster_id: int, cert, issuer_key_id: str, key_id: str, now: datetime, kind: str = "slc",
) -> None:
    conn.execute(
        certificates.insert().values(
            serial=pki.serial_hex(cert),
            cluster_id=cluster_id,
            kind=kind,
            key_id=key_id,
            issuer_key_id=issuer_key_id,
            pem=pki.to_pem(cert),
            fingerprint_sha256=pki.fingerprint(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            created_at=now,
        )
    )


def _insert_cluster(conn, *, name, role, intranet_url, extranet_url, provider, new_key, now) -> int:
    cluster_id = conn.execute(
        clusters.insert().values(
            name=name,
            role=role,
            state="provisioned",
            intranet_url=intranet_url,
            extranet_url=extranet_url,
            key_protection=provider.protection,
            key_size=new_key.size,
            created_at=now,
            updated_at=now,
        )
    ).inserted_primary_key[0]
    insert_key(conn, cluster_id, provider, new_key, now)
    return cluster_id


def provision_root(
    conn: sa.Connection, *, name: str, intranet_url: str, extranet_url: str | None,
    provider: KeyProvider, new_key: NewKey, now: datetime,
) -> None:
    """Cluster row, its first active key and its self-issued SLC, in the caller's transaction."""
    cluster_id = _insert_cluster(
        conn, name=name, role="root", intranet_url=intranet_url, extranet_url=extranet_url, provider=provider,
        new_key=new_key, now=now,
    )
    key: ClusterKey = new_key.cluster_key()
    slc = pki.issue_root_slc(key, name, [u for u in (intranet_url, extranet_url) if u], now)
    insert_slc(conn, cluster_id, slc, key.key_id, key.key_id, now)


def provision_licensing(
    conn: sa.Connection, *, name: str, intranet_url: str, extranet_url: str | None,
    provider: KeyProvider, new_key: NewKey, slc, root_slc, now: datetime,
) -> None:
    """Cluster row, its first active key, the SLC the root cluster issued for it and the root SLC it
    chains to, in the caller's transaction."""
    cluster_id = _insert_cluster(
        conn, name=name, role="licensing", intranet_url=intranet_url, extranet_url=extranet_url, provider=provider,
        new_key=new_key, now=now,
    )
    save_enrollment(conn, cluster_id, slc, root_slc, now)


def save_enrollment(conn: sa.Connection, cluster_id: int, slc, root_slc, now: datetime) -> None:
    """Keep an SLC the root cluster issued to this licensing cluster, and the root SLC it chains to."""
    root_key_id = pki.cert_key_id(root_slc)
    insert_slc(conn, cluster_id, slc, root_key_id, pki.cert_key_id(slc), now)
    known = conn.execute(
        sa.select(certificates.c.serial).where(
            certificates.c.cluster_id == cluster_id, certificates.c.serial == pki.serial_hex(root_slc)
        )
    ).first()
    if known is None:
        insert_slc(conn, cluster_id, root_slc, root_key_id, root_key_id, now, kind="root")


def trust_anchors(conn: sa.Connection, row) -> list:
    """The root SLCs whose RACs this cluster accepts: on the root cluster its own SLCs, except those
    of compromised keys; on a licensing cluster the root cluster's SLCs, except revoked ones."""
    if row.role == "root":
        query = (
            sa.select(certificates.c.pem)
            .join(cluster_keys, cluster_keys.c.id == certificates.c.key_id)
            .where(certificates.c.cluster_id == row.id, certificates.c.kind == "slc",
                   cluster_keys.c.status != "compromised")
        )
    else:
        query = sa.select(certificates.c.pem).where(
            certificates.c.cluster_id == row.id, certificates.c.kind == "root", certificates.c.revoked_at.is_(None)
        )
    return [pki.load_pem(pem) for (pem,) in conn.execute(query)]


def revoke_root_slcs(conn: sa.Connection, cluster_id: int, key_ids, now: datetime) -> list[str]:
    """A licensing cluster stops trusting the root SLCs of root keys revoked as compromised; returns
    the key ids it newly stopped trusting."""
    query = sa.select(certificates.c.key_id).where(
        certificates.c.cluster_id == cluster_id, certificates.c.kind == "root",
        certificates.c.key_id.in_(list(key_ids)), certificates.c.revoked_at.is_(None),
    )
    newly = sorted({key_id for (key_id,) in conn.execute(query)})
    if newly:
        conn.execute(
            certificates.update()
            .where(certificates.c.cluster_id == cluster_id, certificates.c.kind == "root",
                   certificates.c.key_id.in_(newly))
            .values(revoked_at=now)
        )
    return newly


def untrusted_root_key_ids(conn: sa.Connection, cluster_id: int) -> list[str]:
    query = sa.select(certificates.c.key_id).where(
        certificates.c.cluster_id == cluster_id, certificates.c.kind == "root", certificates.c.revoked_at.is_not(None)
    )
    return sorted({key_id for (key_id,) in conn.execute(query)})


def root_slc_row(conn: sa.Connection, cluster_id: int, key_id: str):
    """A licensing cluster's copy of the root SLC for the root key `key_id`."""
    query = sa.select(certificates).where(
        certificates.c.cluster_id == cluster_id, certificates.c.kind == "root", certificates.c.key_id == key_id
    )
    return conn.execute(query.order_by(certificates.c.not_after.desc(), certificates.c.created_at.desc())).first()


def update_cluster(conn: sa.Connection, cluster_id: int, now: datetime, **values) -> None:
    conn.execute(clusters.update().where(clusters.c.id == cluster_id).values(updated_at=now, **values))


def delete_cluster(conn: sa.Connection, cluster_id: int) -> None:
    for table in (
        racs, content, servers, certificates, rights_templates, enrollment_credentials, enrollments, owner_notices,
        cluster_keys,
    ):
        conn.execute(table.delete().where(table.c.cluster_id == cluster_id))
    conn.execute(clusters.delete().where(clusters.c.id == cluster_id))


def servers_of(conn: sa.Connection, cluster_id: int) -> list:
    return list(conn.execute(sa.select(servers).where(servers.c.cluster_id == cluster_id).order_by(servers.c.name)))


def server_row(conn: sa.Connection, cluster_id: int, name: str):
    query = sa.select(servers).where(servers.c.cluster_id == cluster_id, servers.c.name == name)
    return conn.execute(query).first()


def save_server(conn, cluster_id: int, name: str, listen_address: str, port: int, now: datetime,
                tls: bool = False) -> None:
    if server_row(conn, cluster_id, name) is None:
        conn.execute(
            servers.insert().values(
                cluster_id=cluster_id, name=name, listen_address=listen_address, port=port, tls=tls, joined_at=now
            )
        )
    else:
        conn.execute(
            servers.update()
            .where(servers.c.cluster_id == cluster_id, servers.c.name == name)
            .values(listen_address=listen_address, port=port, tls=tls)
        )


def delete_server(conn: sa.Connection, cluster_id: int, name: str) -> None:
    conn.execute(servers.delete().where(servers.c.cluster_id == cluster_id, servers.c.name == name))


def heartbeat(conn: sa.Connection, cluster_id: int, name: str, now: datetime) -> None:
    conn.execute(
        servers.update().where(servers.c.cluster_id == cluster_id, servers.c.name == name).values(last_heartbeat=now)
    )


def content_counts(conn: sa.Connection, cluster_id: int) -> dict[str, int]:
    query = (
        sa.select(content.c.key_id, sa.func.count())
        .where(content.c.cluster_id == cluster_id)
        .group_by(content.c.key_id)
    )
    return {key_id: count for key_id, count in conn.execute(query)}


SERIES_POINTS = 25  # points of a republishing series, however many items and however long it took


def republishing_progress(conn: sa.Connection, cluster_id: int, points: int = SERIES_POINTS) -> list[dict]:
    """Per compromised key of the cluster (in the order they were compromised): its publishing licenses, how
    many are republished and still pending, and a series of at most `points` (time, still pending) from the
    key's compromise to the latest republishing of its content, evenly spaced. Every time comes from the
    data, none from the clock, so the series changes only when the content does. Two aggregate queries,
    whatever the row count: the bounds, then each row placed once among the points."""
    bounds = conn.execute(
        sa.select(cluster_keys.c.id, cluster_keys.c.status_changed_at, sa.func.count(content.c.pl_id),
                  sa.func.count(content.c.superseded_by), sa.func.max(content.c.superseded_at))
        .select_from(cluster_keys.outerjoin(
            content, sa.and_(content.c.key_id == cluster_keys.c.id, content.c.cluster_id == cluster_id)))
        .where(cluster_keys.c.cluster_id == cluster_id, cluster_keys.c.status == "compromised")
        .group_by(cluster_keys.c.id, cluster_keys.c.status_changed_at)
        .order_by(cluster_keys.c.status_changed_at, cluster_keys.c.id)
    ).all()
    edges: dict[str, list[datetime]] = {}
    for key_id, compromised_at, _items, _republished, last in bounds:
        end = max(last, compromised_at) if last is not None else compromised_at
        steps = points - 1 if end > compromised_at else 0
        edges[key_id] = [compromised_at + (end - compromised_at) * i / steps for i in range(steps)] + [end]
    # Each row is placed once: the first point at or after its publishing and at or after its republishing
    # (none: after the last point, or never republished). Most rows match the first branch or two, so a row
    # costs a few comparisons instead of one per point; still to be republished at a point is then what was
    # published by it less what was republished by it (a row is republished only after it was published).
    def placed(column):
        return sa.case(*((sa.and_(content.c.key_id == key_id, column <= at), i)
                         for key_id, times in edges.items() for i, at in enumerate(times)))

    published_by: dict[str, list[int]] = {key_id: [0] * len(times) for key_id, times in edges.items()}
    republished_by = {key_id: [0] * len(times) for key_id, times in edges.items()}
    if edges:
        published, republished = placed(content.c.created_at), placed(content.c.superseded_at)
        rows = conn.execute(
            sa.select(content.c.key_id, published, republished, sa.func.count())
            .where(content.c.cluster_id == cluster_id, content.c.key_id.in_(list(edges)))
            .group_by(content.c.key_id, published, republished)
        )
        for key_id, published_at, republished_at, count in rows:
            if published_at is not None:
                published_by[key_id][published_at] += count
            if republished_at is not None:
                republished_by[key_id][republished_at] += count

    def series(key_id: str) -> list[dict]:
        points, published_sum, republished_sum = [], 0, 0
        for i, at in enumerate(edges[key_id]):
            published_sum += published_by[key_id][i]
            republished_sum += republished_by[key_id][i]
            points.append({"at": at.isoformat(), "pending": published_sum - republished_sum})
        return points

    return [
        {
            "key_id": key_id, "compromised_at": compromised_at.isoformat(), "published": items,
            "republished": republished_count, "pending": items - republished_count, "series": series(key_id),
        }
        for key_id, compromised_at, items, republished_count, _last in bounds
    ]


def record_content(conn, cluster_id: int, pl: dict, now: datetime, supersedes: str | None = None) -> None:
    conn.execute(
        content.insert().values(
            pl_id=pl["pl_id"],
            cluster_id=cluster_id,
            content_id=pl["content_id"],
            owner=pl["owner"],
            key_id=pl["key_id"],
            rights=pl["rights"],
            created_at=now,
            supersedes=supersedes,
        )
    )
    if supersedes is not None:
        conn.execute(
            content.update().where(content.c.pl_id == supersedes).values(superseded_by=pl["pl_id"], superseded_at=now)
        )


def content_row(conn: sa.Connection, pl_id: str):
    return conn.execute(sa.select(content).where(content.c.pl_id == pl_id)).first()


def rac_recorded(conn, serial: str) -> bool:
    return conn.execute(sa.select(racs.c.serial).where(racs.c.serial == serial)).first() is not None


def record_rac(conn, cluster_id: int, cert, subject: str, now: datetime) -> None:
    conn.execute(
        racs.insert().values(
            serial=pki.serial_hex(cert), cluster_id=cluster_id, subject=subject,
            not_after=cert.not_valid_after_utc, created_at=now,
        )
    )



# --- rights policy templates ----------------------------------------------------------------------


def templates_of(conn: sa.Connection, cluster_id: int) -> list:
    query = sa.select(rights_templates).where(rights_templates.c.cluster_id == cluster_id)
    return list(conn.execute(query.order_by(rights_templates.c.name)))


def template_row(conn: sa.Connection, cluster_id: int, name: str):
    query = sa.select(rights_templates).where(
        rights_templates.c.cluster_id == cluster_id, rights_templates.c.name == name
    )
    return conn.execute(query).first()


def save_template(conn, cluster_id: int, name: str, description: str, rights: dict, now: datetime) -> None:
    if template_row(conn, cluster_id, name) is None:
        conn.execute(rights_templates.insert().values(
            cluster_id=cluster_id, name=name, description=description, rights=rights, created_at=now, updated_at=now,
        ))
    else:
        conn.execute(
            rights_templates.update()
            .where(rights_templates.c.cluster_id == cluster_id, rights_templates.c.name == name)
            .values(description=description, rights=rights, updated_at=now)
        )


def delete_template(conn: sa.Connection, cluster_id: int, name: str) -> None:
    conn.execute(
        rights_templates.delete().where(rights_templates.c.cluster_id == cluster_id, rights_templates.c.name == name)
    )


# --- enrollment (on the root cluster) ------------------------------------------------------------

# scrypt: a leaked configuration database does not hand out enrollment secrets.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
# What a request naming no usable credential is hashed with: every request costs one KDF run, so its answer
# takes as long whatever the scope, and timing tells no one which scopes exist.
_NO_CREDENTIAL = (os.urandom(16), bytes(_SCRYPT["dklen"]))


def hash_secret(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def credential_row(conn: sa.Connection, cluster_id: int, scope: str):
    query = sa.select(enrollment_credentials).where(
        enrollment_credentials.c.cluster_id == cluster_id, enrollment_credentials.c.scope == scope
    )
    return conn.execute(query).first()


def credentials_of(conn: sa.Connection, cluster_id: int) -> list:
    query = sa.select(enrollment_credentials).where(enrollment_credentials.c.cluster_id == cluster_id)
    return list(conn.execute(query.order_by(enrollment_credentials.c.scope)))


def secret_matches(row, secret: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, row.salt), row.secret_hash)


def credential_usable(row, now: datetime) -> bool:
    """Not expired and never used: a credential enrolls once."""
    return row.last_used_at is None and row.expires_at > now


def credential_accepts(row, secret: str, now: datetime) -> bool:
    """Whether `secret` is the secret of credential `row` (None: there is none for the scope asked), and the
    credential usable. Exactly one KDF run, whatever the row: unknown, used and expired scopes cost as much
    as a wrong secret."""
    salt, expected = (row.salt, row.secret_hash) if row is not None else _NO_CREDENTIAL
    matches = hmac.compare_digest(hash_secret(secret, salt), expected)
    return row is not None and matches and credential_usable(row, now)


def save_credential(conn, cluster_id: int, scope: str, secret: str, expires_at: datetime, now: datetime) -> None:
    delete_credential(conn, cluster_id, scope)
    salt = os.urandom(16)
    conn.execute(enrollment_credentials.insert().values(
        cluster_id=cluster_id, scope=scope, secret_hash=hash_secret(secret, salt), salt=salt,
        expires_at=expires_at, created_at=now,
    ))


def delete_credential(conn: sa.Connection, cluster_id: int, scope: str) -> None:
    conn.execute(enrollment_credentials.delete().where(
        enrollment_credentials.c.cluster_id == cluster_id, enrollment_credentials.c.scope == scope
    ))


def claim_credential(conn: sa.Connection, credential_id: int, now: datetime) -> bool:
    """Spend credential `credential_id` in the caller's transaction: True for the one transaction that finds
    it still usable. A concurrent one waits for that one's end (the row lock on PostgreSQL, BEGIN IMMEDIATE
    on SQLite) and then finds it used."""
    table = enrollment_credentials
    result = conn.execute(
        table.update()
        .where(table.c.id == credential_id, table.c.last_used_at.is_(None), table.c.expires_at > now)
        .values(last_used_at=now)
    )
    return result.rowcount == 1


def revoke_enrollments(conn, cluster_id: int, licensing_cluster: str, key_ids, now: datetime) -> None:
    """The licensing cluster revoked these keys of its own as compromised: the root never certifies them again."""
    conn.execute(
        enrollments.update()
        .where(enrollments.c.cluster_id == cluster_id, enrollments.c.licensing_cluster == licensing_cluster,
               enrollments.c.key_id.in_(list(key_ids)), enrollments.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def enrollment_revoked(conn, cluster_id: int, key_id: str) -> bool:
    query = sa.select(sa.func.count()).where(
        enrollments.c.cluster_id == cluster_id, enrollments.c.key_id == key_id, enrollments.c.revoked_at.is_not(None)
    )
    return conn.execute(query).scalar_one() > 0


def record_enrollment(conn, cluster_id: int, licensing_cluster: str, slc, issuer_key_id: str, now: datetime) -> None:
    conn.execute(enrollments.insert().values(
        serial=pki.serial_hex(slc), cluster_id=cluster_id, licensing_cluster=licensing_cluster,
        key_id=pki.cert_key_id(slc), issuer_key_id=issuer_key_id, fingerprint_sha256=pki.fingerprint(slc),
        not_after=slc.not_valid_after_utc, created_at=now,
    ))


def enrollments_of(conn: sa.Connection, cluster_id: int) -> list:
    query = sa.select(enrollments).where(enrollments.c.cluster_id == cluster_id)
    return list(conn.execute(query.order_by(enrollments.c.created_at)))


# --- what a trusted publishing domain carries -------------------------------------------------------


def certificates_of(conn: sa.Connection, cluster_id: int) -> list:
    query = sa.select(certificates).where(certificates.c.cluster_id == cluster_id)
    return list(conn.execute(query.order_by(certificates.c.created_at, certificates.c.serial)))


def certificate_serials(conn: sa.Connection, cluster_id: int) -> set[str]:
    query = sa.select(certificates.c.serial).where(certificates.c.cluster_id == cluster_id)
    return {serial for (serial,) in conn.execute(query)}


def content_of(conn: sa.Connection, cluster_id: int) -> list:
    query = sa.select(content).where(content.c.cluster_id == cluster_id)
    return list(conn.execute(query.order_by(content.c.pl_id)))


def content_pl_ids(conn: sa.Connection, cluster_id: int) -> set[str]:
    query = sa.select(content.c.pl_id).where(content.c.cluster_id == cluster_id)
    return {pl_id for (pl_id,) in conn.execute(query)}


def insert_content(conn: sa.Connection, cluster_id: int, item: dict) -> None:
    """A content registry entry as a trusted publishing domain carries it."""
    conn.execute(content.insert().values(
        pl_id=item["pl_id"], cluster_id=cluster_id, content_id=item["content_id"], owner=item["owner"],
        key_id=item["key_id"], rights=item["rights"], created_at=datetime.fromisoformat(item["created_at"]),
        supersedes=item["supersedes"], superseded_by=item["superseded_by"],
        superseded_at=datetime.fromisoformat(item["superseded_at"]) if item["superseded_at"] else None,
    ))


# --- content under compromised keys, and the notices to its owners -------------------------------------


def _compromised_key_ids(cluster_id: int, also: Sequence[str] = ()):
    """The cluster's compromised keys; `also`: keys counted as compromised too (those a check run reports it
    would declare so)."""
    compromised = cluster_keys.c.status == "compromised"
    counted = sa.or_(compromised, cluster_keys.c.id.in_(also)) if also else compromised
    return sa.select(cluster_keys.c.id).where(cluster_keys.c.cluster_id == cluster_id, counted)


def _iso_text(conn: sa.Connection, column) -> sa.ColumnElement:
    """A timestamp column as ISO 8601 text in UTC with microseconds (2026-01-31T09:30:00.000000+00:00),
    formatted by the database: millions of rows are not turned into datetimes and back one by one."""
    if conn.dialect.name == "sqlite":  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC
        return sa.func.replace(sa.type_coerce(column, sa.String), " ", "T").concat("+00:00")
    return sa.func.to_char(sa.func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')


def affected_rows(conn: sa.Connection, cluster_id: int, batch: int = 10000,
                  also: Sequence[str] = ()) -> Iterator[tuple]:
    """Every content item published under a compromised key of the cluster, in owner order, streamed
    `batch` rows at a time (a server-side cursor on PostgreSQL): rows of (owner, content_id, pl_id, key_id,
    published_at, republished_as, republished_at), the times as ISO 8601 text; `republished_as` set: its
    owner republished it."""
    query = (
        sa.select(content.c.owner, content.c.content_id, content.c.pl_id, content.c.key_id,
                  _iso_text(conn, content.c.created_at), content.c.superseded_by,
                  _iso_text(conn, content.c.superseded_at))
        .where(content.c.cluster_id == cluster_id, content.c.key_id.in_(_compromised_key_ids(cluster_id, also)))
        .order_by(content.c.owner, content.c.content_id, content.c.created_at, content.c.pl_id)
    )
    if conn.dialect.name == "postgresql":  # the sort of a million rows fits in memory instead of on disk
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
    # On the driver's cursor: plain tuples, a batch at a time, no row object built for each of a million rows.
    # render_postcompile: the IN list of `also` becomes plain parameters the driver takes.
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    driver = conn.connection.dbapi_connection
    assert driver is not None
    if conn.dialect.name == "postgresql":  # a server-side cursor, in the transaction the connection began
        cursor = driver.cursor(name="rmsd_affected_rows")
        params: Any = compiled.params
    else:
        cursor = driver.cursor()
        params = tuple(compiled.params[name] for name in compiled.positiontup or ())
    try:
        cursor.execute(str(compiled), params)
        while rows := cursor.fetchmany(batch):
            yield from rows
    finally:
        cursor.close()


def affected_revision(conn: sa.Connection, cluster_id: int, also: Sequence[str] = ()) -> str:
    """What the rows `affected_rows` streams are at, in one aggregate read (no row leaves the database):
    their count, how many carry a revision, and the sum and highest of those revisions. The database gives a
    row a new, higher revision on every insert and update (migration 0005), so an insert or a change of any
    of these rows changes the count or the sum, and a row deleted the count or the sum."""
    revision = content.c.revision
    query = sa.select(sa.func.count(), sa.func.count(revision), sa.func.coalesce(sa.func.sum(revision), 0),
                      sa.func.coalesce(sa.func.max(revision), 0)).where(
        content.c.cluster_id == cluster_id, content.c.key_id.in_(_compromised_key_ids(cluster_id, also)))
    return ":".join(str(int(value)) for value in conn.execute(query).one())


def _due(cluster_id: int, also: Sequence[str] = ()):
    """Pending content under a compromised key whose owner was not told about that key yet."""
    told = sa.select(owner_notices.c.id).where(
        owner_notices.c.cluster_id == cluster_id, owner_notices.c.owner == content.c.owner,
        owner_notices.c.key_id == content.c.key_id,
    )
    return (content.c.cluster_id == cluster_id, content.c.superseded_by.is_(None),
            content.c.key_id.in_(_compromised_key_ids(cluster_id, also)), ~sa.exists(told))


def due_notices(conn: sa.Connection, cluster_id: int, also: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(owner, compromised key id) of every notice still due, in owner order: one row per owner and key,
    however many items they hold."""
    query = (sa.select(content.c.owner, content.c.key_id).where(*_due(cluster_id, also)).distinct()
             .order_by(content.c.owner, content.c.key_id))
    return [(owner, key_id) for owner, key_id in conn.execute(query)]


def content_of_owners(conn: sa.Connection, cluster_id: int, owners: list[str]) -> list[sa.Row]:
    """Every content item of these owners (through the owner index, whichever key it is under): rows of
    (owner, key_id, content_id, pl_id, created_at, superseded_by), in owner order."""
    query = (
        sa.select(content.c.owner, content.c.key_id, content.c.content_id, content.c.pl_id, content.c.created_at,
                  content.c.superseded_by)
        .where(content.c.cluster_id == cluster_id, content.c.owner.in_(owners))
        .order_by(content.c.owner, content.c.key_id, content.c.content_id, content.c.created_at, content.c.pl_id)
    )
    return list(conn.execute(query))


# Built once per dialect: it runs once per notice, tens of thousands of times a run.
_RECORD_NOTICE: dict[str, Any] = {}


def record_notice(conn, cluster_id: int, owner: str, key_id: str, items: int, channel: str, now) -> bool:
    """Record that `owner` was told about `key_id`; False (nothing written) when that is recorded already.
    A concurrent transaction recording the same notice makes this one wait for its end (the unique index)."""
    statement = _RECORD_NOTICE.get(conn.dialect.name)
    if statement is None:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        statement = _RECORD_NOTICE[conn.dialect.name] = insert(owner_notices).on_conflict_do_nothing(
            index_elements=["cluster_id", "owner", "key_id"]).returning(owner_notices.c.id)
    result = conn.execute(statement, {"cluster_id": cluster_id, "owner": owner, "key_id": key_id, "items": items,
                                      "channel": channel, "sent_at": now})
    return result.first() is not None
