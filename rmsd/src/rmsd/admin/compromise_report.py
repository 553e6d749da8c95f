"""Content under compromised keys: the per-owner report, and one notice per owner and compromised key.

Sized for millions of documents: the report is streamed from one ordered query into its files (memory
bounded whatever the row count) and a rerun compares a digest of the rows instead of rendering the report;
the notices go out over one SMTP connection, each recorded as soon as the server accepted it."""

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

from rmsd import clusters, compromise, rotation
from rmsd.admin.common import Result, check_absolute, check_name, file_mode
from rmsd.admin.store import Store, opened
from rmsd.errors import RmsdError
from rmsd.schema import utcnow

REPORT_MODE = 0o640
OWNERS_PER_BATCH = 200  # owners whose pending items are read at once while notifying
NAMED = 10  # owners named in the returned facts and the diff; the counts cover them all


def ensure_compromise_report(
    *, cluster, database_url, database_password=None, json_path=None, csv_path=None, notify=False,
    sender=None, outbox_dir=None, smtp_host=None, smtp_port=25, smtp_starttls=False, smtp_username=None,
    smtp_password=None, template_dir=None, notify_rate=0, notify_dry_run=False, progress_path=None,
    expected_compromised_keys=(),
    progress: Callable[[dict], None] | None = None, check_mode=False,
) -> Result:
    """The per-owner report of content under compromised keys, written when it changed: with `json_path` a
    summary (JSON) and the per-owner file beside it (JSON Lines, one owner a line), with `csv_path` one line
    per item. With `notify`, every owner with content still to republish is sent one notice per compromised
    key (over SMTP at `smtp_host`, or into `outbox_dir`), at most `notify_rate` a second, never twice;
    `notify_dry_run` renders every notice due and sends nothing. The progress of the long steps (rows of the
    report read, notices sent) goes to `progress` and, as JSON Lines an operator can follow, to `progress_path`
    (not in check mode). `expected_compromised_keys` (check mode): keys an earlier step of the same run
    declares compromised; the report and notices cover them as the real run's will. A real run reads the keys'
    status only."""
    check_name("cluster", cluster)
    expected = rotation.check_key_ids(expected_compromised_keys) if check_mode else []
    for what, value in (("json_path", json_path), ("csv_path", csv_path), ("outbox_dir", outbox_dir),
                        ("template_dir", template_dir), ("progress_path", progress_path)):
        check_absolute(what, value, required=False)
    if json_path and csv_path and json_path in (csv_path, compromise.owners_path(json_path)):
        raise RmsdError("json_path and csv_path must name different files")
    if progress_path and progress_path in compromise.report_files(json_path, csv_path):
        raise RmsdError("progress_path must name a file of its own, not one of the report's")
    try:
        rate = float(notify_rate or 0)
    except (TypeError, ValueError):
        rate = -1.0
    if rate < 0:
        raise RmsdError(f"notify_rate must be a number of notices a second, 0 for no limit, not {notify_rate!r}")
    channel: compromise.Outbox | compromise.SmtpConnection | None = None
    if notify:
        if not sender or "@" not in sender:
            raise RmsdError("notify needs sender, the address the notices come from (e.g. rms-admins@example.com)")
        if bool(smtp_host) == bool(outbox_dir):
            raise RmsdError("notify needs exactly one of smtp_host (send the notices) or outbox_dir (keep them there)")
        channel = (compromise.SmtpConnection(compromise.Smtp(smtp_host, int(smtp_port), bool(smtp_starttls),
                                                             smtp_username, smtp_password))
                   if smtp_host else compromise.Outbox(outbox_dir))
    steps = compromise.ProgressFile(progress_path) if progress_path and not check_mode else None
    if steps is not None:
        steps({"step": "started", "cluster": cluster, "notify": bool(notify), "dry_run": bool(notify_dry_run)})
    try:
        result = _ensure(cluster, database_url, database_password, json_path, csv_path, notify, sender, channel,
                         template_dir, rate, notify_dry_run, _fan_out(progress, steps), check_mode, expected)
    except Exception as err:
        if steps is not None:
            steps({"step": "failed", "error": str(err)})
        raise
    finally:
        if steps is not None:
            steps.close()
    return result


def _fan_out(*receivers) -> Callable[[dict], None] | None:
    found = [r for r in receivers if r is not None]
    if not found:
        return None

    def report(state: dict) -> None:
        for receiver in found:
            receiver(state)

    return report


def _ensure(cluster, database_url, database_password, json_path, csv_path, notify, sender, channel, template_dir,
            rate, notify_dry_run, progress, check_mode, expected: list[str]) -> Result:
    with opened(database_url, database_password) as store:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            keys = [k for k in clusters.keys_of(conn, row.id) if k.status == "compromised" or k.id in expected]
            also = [k.id for k in keys if k.status != "compromised"]
            return row, keys, also, (clusters.due_notices(conn, row.id, also) if notify else [])

        found = store.read(current)
        if found is None:
            raise store.missing(cluster)
        row, keys, also, due = found  # the notices due: (owner, key id), memory in proportion to owners, not items
        now = utcnow()
        compromised = [{"id": k.id, "compromised_at": (k.status_changed_at if k.status == "compromised" else now)
                        .isoformat()} for k in keys]
        summary, stale = _report(store, row.id, cluster, compromised, json_path, csv_path, check_mode,
                                 None if check_mode else progress, also)
        notices = {"notified": 0, "owners": []}
        if notify and due and (not check_mode or notify_dry_run):
            notices = _notify(store, row, compromised, sender, template_dir, channel, rate, notify_dry_run, due,
                              progress, check_mode)
        elif notify and due:  # check mode: the first notices are rendered (a bad template fails), the rest counted
            notices = _notify(store, row, compromised, sender, template_dir, channel, rate, True, due, None,
                              check_mode, limit=NAMED)
            notices["notified"] = len(due)
        facts = {"report": summary, "notified": notices["notified"], "notified_owners": notices["owners"],
                 "notify_dry_run": bool(notify and notify_dry_run)}
        sends = notices["notified"] if notify and not notify_dry_run else 0
        if progress is not None:
            progress({"step": "done", "report_rewritten": bool(stale), "notified": notices["notified"]})
        if not stale and not sends:
            return Result(changed=False, facts=facts)
        diff: dict[str, dict[str, Any]] = {"before": {"files": {}, "notices": 0}, "after": {
            "files": {p: "(rewritten)" for p in stale}, "notices": sends,
            "owners_notified": notices["owners"] if sends else [],
        }}
        return Result(changed=True, diff=diff, facts=facts)


SUMMARY_FIELDS = ("cluster", "compromised_keys", "pending", "republished", "owner_count", "owners_pending",
                  "top_owners", "rows_sha256")


def _report(store: Store, cluster_id: int, cluster: str, compromised: list[dict], json_path: str | None,
            csv_path: str | None, check_mode: bool, progress=None,
            also: Sequence[str] = ()) -> tuple[dict, list[str]]:
    """(summary, files rewritten). A rerun asks the database only for the rows' revision (a count and a sum,
    clusters.affected_revision): when the summary kept beside the report was written at that revision, for
    these compromised keys, and every file is there with its mode, nothing is read or written and the kept
    summary is the answer. Otherwise the rows are streamed into the files once. `also`: keys counted as
    compromised (check mode)."""
    files = compromise.report_files(json_path, csv_path)

    total: int | None = None

    def rows(conn) -> compromise.Rows:
        streamed = clusters.affected_rows(conn, cluster_id, also=also)
        return compromise.Rows(cluster, compromised, compromise.counting(streamed, progress, total))

    def counted(conn) -> dict:
        found = rows(conn)
        found.drain()
        return found.summary(cluster, compromised)

    if not files:
        summary = store.read(counted)
        assert summary is not None
        return summary, []
    revision = store.read(partial(clusters.affected_revision, cluster_id=cluster_id, also=also))
    total = int(revision.split(":")[0]) if revision else None
    kept = compromise.stored_summary(json_path, csv_path)
    if (kept is not None and kept.get("rows_revision") == revision and kept.get("cluster") == cluster
            and kept.get("compromised_keys") == compromised and all(file_mode(p) == REPORT_MODE for p in files)):
        return {k: kept.get(k) for k in SUMMARY_FIELDS}, []
    if check_mode:
        summary = store.read(counted)
        assert summary is not None
        return summary, files

    def written(conn) -> dict:
        return compromise.write_report(rows(conn), cluster, compromised, json_path, csv_path, REPORT_MODE, revision)

    summary = store.read(written)
    assert summary is not None
    return summary, files


def _notify(store: Store, row, compromised: list[dict], sender: str, template_dir: str | None, channel,
            rate: float, dry_run: bool, due: list[tuple[str, str]], progress, check_mode: bool,
            limit: int | None = None) -> dict:
    """Render the notices due, owner after owner, and (unless `dry_run`) send each over `channel` and record
    it in its own transaction, committed as soon as it was accepted: a run killed in the middle leaves at most
    the notice in flight unrecorded, sent again by the next run."""
    keys = {k["id"]: k for k in compromised}
    cluster_view = {"name": row.name, "intranet_url": row.intranet_url, "extranet_url": row.extranet_url}
    render = compromise.NoticeTemplates(template_dir).render
    pace = compromise.Pace(0 if dry_run else rate)
    todo = due if limit is None else due[:limit]
    counter = compromise.Progress(len(todo), None if check_mode else progress)
    named: list[str] = []
    with store.short_writes(row.name, lock=False) if not dry_run else nullcontext() as transaction:
        try:
            for start in range(0, len(todo), OWNERS_PER_BATCH):
                pairs = todo[start:start + OWNERS_PER_BATCH]
                wanted = set(pairs)
                found = store.read(partial(clusters.content_of_owners, cluster_id=row.id,
                                           owners=sorted({owner for owner, _ in pairs})))
                items: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
                for r in found or []:
                    if (r.owner, r.key_id) in wanted and r.superseded_by is None:
                        items[(r.owner, r.key_id)].append({"content_id": r.content_id, "pl_id": r.pl_id,
                                                           "published_at": r.created_at.isoformat()})
                for (owner, key_id), pending in items.items():
                    if not pending:  # republished since the notices due were listed
                        continue
                    context = {"owner": owner, "items": pending, "cluster": cluster_view, "key": keys[key_id]}
                    subject, body = render(context)
                    msg = compromise.message(sender, owner, subject, body)
                    if not dry_run:
                        pace.wait()
                        assert transaction is not None and channel is not None
                        # The record goes in first and is committed only once the server accepted the notice: a
                        # failed or killed send rolls it back. A concurrent run recording the same owner and key
                        # waits on the unique index, then finds it there and sends nothing.
                        with transaction() as conn:
                            if not clusters.record_notice(conn, row.id, owner, key_id, len(pending),
                                                          channel.channel, utcnow()):
                                continue  # a concurrent run told them
                            channel.send(msg)
                    if len(named) < NAMED and owner not in named:
                        named.append(owner)
                    counter.step()
        finally:
            if channel is not None:
                channel.close()
    counter.finish()
    return {"notified": counter.done, "owners": named}
