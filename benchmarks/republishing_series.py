"""What the republishing series costs cluster_info (playbooks/fleet_state.yml, the key_rotation role and
rotate_compromised_key.yml call it): N publishing licenses under a compromised key, a share of them
republished, on SQLite and PostgreSQL. Prints the time of clusters.republishing_progress alone and of the
whole cluster_info beside content_counts (the scan cluster_info already made before the series). Asserts
nothing about speed. A throwaway PostgreSQL comes from scripts/pgserver.py.

    .venv/bin/python benchmarks/republishing_series.py [--sizes 100000,1000000] [--backends sqlite,postgresql]
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from rmsd.schema import cluster_keys, content

from rmsd import admin, clusters, db

REPO = Path(__file__).resolve().parents[1]
KEY_PASSWORD = "Bench-Key-Pass-5d1c0e2a"
CLUSTER = "corp"
COMPROMISED_AT = datetime(2026, 3, 1, tzinfo=UTC)


def _pgserver():
    spec = importlib.util.spec_from_file_location("pgserver", REPO / "scripts" / "pgserver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed(url: str, password: str | None, size: int, republished_share: float = 0.7, batch: int = 20000) -> None:
    """`size` licenses under the first key, which is then compromised; a share of them superseded by licenses
    under the new key over the 20 days after the compromise (rows written straight into rmsd's content table)."""
    admin.ensure_cluster(name=CLUSTER, key_password=KEY_PASSWORD, intranet_url="https://rms.example.com",
                         database_url=url, database_password=password)
    first = admin.cluster_info(name=CLUSTER, database_url=url, database_password=password)["cluster"]["active_key_id"]
    engine = db.make_engine(url, password)
    with engine.begin() as conn:
        cluster_id = conn.execute(sa.select(cluster_keys.c.cluster_id).where(cluster_keys.c.id == first)).scalar_one()
        for start in range(0, size, batch):
            conn.execute(content.insert(), [
                {"pl_id": f"pl{i:012d}", "cluster_id": cluster_id, "content_id": f"doc-{i}", "owner": f"u{i % 5000}",
                 "key_id": first, "rights": {}, "created_at": COMPROMISED_AT - timedelta(minutes=i % 100000 + 1)}
                for i in range(start, min(start + batch, size))])
    admin.ensure_cluster_key(cluster=CLUSTER, key_password=KEY_PASSWORD, compromised_keys=[first], database_url=url,
                             database_password=password)
    second = admin.cluster_info(name=CLUSTER, database_url=url, database_password=password)["cluster"]["active_key_id"]
    again = int(size * republished_share)
    with engine.begin() as conn:
        conn.execute(cluster_keys.update().where(cluster_keys.c.id == first).values(status_changed_at=COMPROMISED_AT))
        for start in range(0, again, batch):
            rows = [(i, COMPROMISED_AT + timedelta(seconds=(i * 7919) % (20 * 86400))) for i in
                    range(start, min(start + batch, again))]
            conn.execute(content.insert(), [
                {"pl_id": f"nw{i:012d}", "cluster_id": cluster_id, "content_id": f"doc-{i}", "owner": f"u{i % 5000}",
                 "key_id": second, "rights": {}, "created_at": at, "supersedes": f"pl{i:012d}"} for i, at in rows])
            conn.execute(content.update().where(content.c.pl_id == sa.bindparam("old")).values(
                superseded_by=sa.bindparam("new"), superseded_at=sa.bindparam("at")),
                [{"old": f"pl{i:012d}", "new": f"nw{i:012d}", "at": at} for i, at in rows])
    engine.dispose()


def timed(function) -> tuple[float, object]:
    began = time.perf_counter()
    value = function()
    return time.perf_counter() - began, value


def measure(kind: str, url: str, password: str | None, size: int) -> None:
    seed(url, password, size)
    engine = db.make_engine(url, password)
    with engine.connect() as conn:
        cluster_id = conn.execute(sa.select(cluster_keys.c.cluster_id).limit(1)).scalar_one()
        series_s, progress = timed(lambda: clusters.republishing_progress(conn, cluster_id))
        counts_s, _ = timed(lambda: clusters.content_counts(conn, cluster_id))
    engine.dispose()
    info_s, _ = timed(lambda: admin.cluster_info(name=CLUSTER, database_url=url, database_password=password))
    (key,) = progress
    print(f"{kind:10} {size:>9} rows  series {series_s:6.2f} s  content_counts {counts_s:6.2f} s  "
          f"cluster_info {info_s:6.2f} s  points {len(key['series'])}  pending {key['pending']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "sqlite" in opts.backends:
            for size in sizes:
                measure("sqlite", f"sqlite:///{tmp}/s{size}.db", None, size)
        if "postgresql" in opts.backends:
            with _pgserver().PostgresServer() as server:
                for size in sizes:
                    measure("postgresql", server.create_database(f"b{size}"), server.password, size)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
