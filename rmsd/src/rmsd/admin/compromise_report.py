"""Content under compromised keys: the per-owner report, and one notice per owner and compromised key."""

from typing import Any

from rmsd import clusters, compromise
from rmsd.admin.common import Result, check_absolute, check_name, file_mode
from rmsd.admin.store import opened
from rmsd.config import read_text_or_none, write_atomic
from rmsd.errors import RmsdError
from rmsd.schema import utcnow


def ensure_compromise_report(
    *, cluster, database_url, database_password=None, json_path=None, csv_path=None, notify=False,
    sender=None, outbox_dir=None, smtp_host=None, smtp_port=25, smtp_starttls=False, smtp_username=None,
    smtp_password=None, template_dir=None, check_mode=False,
) -> Result:
    """The per-owner report of content under compromised keys, written to `json_path` / `csv_path`
    when it changed; with `notify`, every owner with content still to republish is sent one notice per
    compromised key (over SMTP at `smtp_host`, or into `outbox_dir`), never twice."""
    check_name("cluster", cluster)
    for what, value in (("json_path", json_path), ("csv_path", csv_path), ("outbox_dir", outbox_dir),
                        ("template_dir", template_dir)):
        check_absolute(what, value, required=False)
    smtp = None
    if notify:
        if not sender or "@" not in sender:
            raise RmsdError("notify needs sender, the address the notices come from (e.g. rms-admins@example.com)")
        if bool(smtp_host) == bool(outbox_dir):
            raise RmsdError("notify needs exactly one of smtp_host (send the notices) or outbox_dir (keep them there)")
        if smtp_host:
            smtp = compromise.Smtp(smtp_host, int(smtp_port), bool(smtp_starttls), smtp_username, smtp_password)
    with opened(database_url, database_password) as store:
        def current(conn):
            row = clusters.get_cluster(conn, cluster)
            if row is None:
                return None
            keys = [k for k in clusters.keys_of(conn, row.id) if k.status == "compromised"]
            return row, keys, clusters.affected_content(conn, row.id), clusters.notices_sent(conn, row.id)

        found = store.read(current)
        if found is None:
            raise store.missing(cluster)
        row, keys, items, sent = found
        compromised = [{"id": k.id, "compromised_at": k.status_changed_at.isoformat()} for k in keys]
        data = compromise.report(cluster, compromised, items)
        files = {p: text for p, text in ((json_path, compromise.render_json(data)),
                                         (csv_path, compromise.render_csv(items))) if p}
        stale = [p for p, text in files.items() if read_text_or_none(p) != text or file_mode(p) != 0o640]
        due = compromise.due_notices(items, sent) if notify else {}
        notices = []
        for (owner, key_id), pending in sorted(due.items()):
            context = {
                "owner": owner, "items": pending,
                "cluster": {"name": row.name, "intranet_url": row.intranet_url, "extranet_url": row.extranet_url},
                "key": next(k for k in compromised if k["id"] == key_id),
            }
            subject, body = compromise.render_notice(template_dir, context)  # a bad template fails before sending
            notices.append((owner, key_id, len(pending), compromise.message(sender, owner, subject, body)))
        summary = {k: data[k] for k in ("cluster", "compromised_keys", "pending", "republished")}
        summary["owners"] = [{k: o[k] for k in ("owner", "pending", "republished")} for o in data["owners"]]
        facts = {"report": summary, "notified": [n[0] for n in notices]}
        if not stale and not notices:
            return Result(changed=False, facts=facts)
        diff: dict[str, dict[str, Any]] = {"before": {"files": {}, "notices": []}, "after": {
            "files": {p: "(rewritten)" for p in stale}, "notices": [f"{n[0]} (key {n[1]})" for n in notices],
        }}
        if not check_mode:
            for p in stale:
                write_atomic(p, files[p], 0o640)
            for owner, key_id, count, msg in notices:
                # Recorded in the same transaction as the sending: a notice that did not go out is not
                # recorded and goes out on the next run.
                with store.writing(cluster) as conn:
                    channel = compromise.deliver(msg, smtp, outbox_dir)
                    clusters.record_notice(conn, row.id, owner, key_id, count, channel, utcnow())
        return Result(changed=True, diff=diff, facts=facts)
