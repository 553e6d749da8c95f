"""Content protected by compromised cluster keys: the per-owner report, and the notices that tell each
owner what to republish (rendered from Jinja2 templates; kept in an outbox folder or sent over SMTP)."""

import csv
import io
import json
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import jinja2
import sqlalchemy as sa

from rmsd.config import write_atomic
from rmsd.errors import RmsdError
from rmsd.schema import cluster_keys, content, owner_notices

CSV_FIELDS = (
    "owner", "content_id", "pl_id", "key_id", "key_compromised_at", "published_at", "status", "republished_as",
    "republished_at",
)
TEMPLATES = Path(__file__).parent / "templates"
NOTICE_TEMPLATES = ("owner_notice.subject.j2", "owner_notice.txt.j2")


def affected_content(conn: sa.Connection, cluster_id: int) -> list[dict]:
    """Every content item published under a compromised key of the cluster: `pending` until its owner
    republished it (a new publishing license superseding the old one), then `republished`."""
    query = (
        sa.select(content, cluster_keys.c.status_changed_at.label("key_compromised_at"))
        .join(cluster_keys, cluster_keys.c.id == content.c.key_id)
        .where(content.c.cluster_id == cluster_id, cluster_keys.c.status == "compromised")
        .order_by(content.c.owner, content.c.content_id, content.c.created_at)
    )
    return [
        {
            "owner": r.owner, "content_id": r.content_id, "pl_id": r.pl_id, "key_id": r.key_id,
            "key_compromised_at": r.key_compromised_at.isoformat(), "published_at": r.created_at.isoformat(),
            "status": "republished" if r.superseded_by else "pending", "republished_as": r.superseded_by,
            "republished_at": r.superseded_at.isoformat() if r.superseded_at else None,
        }
        for r in conn.execute(query)
    ]


def report(cluster: str, compromised: list[dict], items: list[dict]) -> dict:
    """The report: compromised keys, then per owner what is still pending and what was republished."""
    owners = {}
    for item in items:
        entry = owners.setdefault(item["owner"], {"owner": item["owner"], "pending": 0, "republished": 0,
                                                  "content": []})
        entry[item["status"]] += 1
        entry["content"].append({k: v for k, v in item.items() if k != "owner"})
    return {
        "cluster": cluster,
        "compromised_keys": compromised,
        "pending": sum(o["pending"] for o in owners.values()),
        "republished": sum(o["republished"] for o in owners.values()),
        "owners": list(owners.values()),
    }


def render_json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def render_csv(items: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow({k: "" if item[k] is None else item[k] for k in CSV_FIELDS})
    return out.getvalue()


# --- notices --------------------------------------------------------------------------------------


def notices_sent(conn: sa.Connection, cluster_id: int) -> set[tuple[str, str]]:
    query = sa.select(owner_notices.c.owner, owner_notices.c.key_id).where(owner_notices.c.cluster_id == cluster_id)
    return {(owner, key_id) for owner, key_id in conn.execute(query)}


def record_notice(conn, cluster_id: int, owner: str, key_id: str, items: int, channel: str, now) -> None:
    conn.execute(owner_notices.insert().values(
        cluster_id=cluster_id, owner=owner, key_id=key_id, items=items, channel=channel, sent_at=now,
    ))


def due_notices(items: list[dict], sent: set[tuple[str, str]]) -> dict[tuple[str, str], list[dict]]:
    """(owner, key id) -> pending items, for the owners not yet told about that key."""
    due = {}
    for item in items:
        if item["status"] == "pending" and (item["owner"], item["key_id"]) not in sent:
            due.setdefault((item["owner"], item["key_id"]), []).append(item)
    return due


def _environment(template_dir: str | None) -> jinja2.Environment:
    loaders = [jinja2.FileSystemLoader(str(TEMPLATES))]
    if template_dir:
        if not Path(template_dir).is_dir():
            raise RmsdError(f"template_dir {template_dir!r} is not a folder")
        loaders.insert(0, jinja2.FileSystemLoader(template_dir))
    # Plain text mail: no HTML escaping; an unknown variable in a template is an error, not a blank.
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
                              autoescape=False, keep_trailing_newline=True)


def render_notice(template_dir: str | None, context: dict) -> tuple[str, str]:
    """(subject, body) of one owner's notice; templates in `template_dir` override the built-in ones."""
    env = _environment(template_dir)
    try:
        subject, body = (env.get_template(name).render(**context) for name in NOTICE_TEMPLATES)
    except jinja2.TemplateError as err:
        raise RmsdError(f"the owner notice template does not render: {type(err).__name__}: {err}") from None
    return " ".join(subject.split()), body


@dataclass
class Smtp:
    host: str
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0


def message(sender: str, owner: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, owner, subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg.set_content(body)
    return msg


def deliver(msg: EmailMessage, smtp: Smtp | None, outbox_dir: str | None) -> str:
    """Send `msg` over SMTP, or keep it in the outbox folder for the operator to send; returns the channel."""
    if smtp is None:
        name = msg["To"].replace("/", "_") + "-" + msg["Message-ID"].strip("<>").split("@")[0] + ".eml"
        write_atomic(Path(outbox_dir) / name, msg.as_string(), 0o600)
        return "outbox"
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as server:
            if smtp.starttls:
                server.starttls(context=ssl.create_default_context())
            if smtp.username:
                server.login(smtp.username, smtp.password or "")
            server.send_message(msg)
    except (OSError, smtplib.SMTPException) as err:
        raise RmsdError(
            f"cannot send the notice to {msg['To']} through SMTP server {smtp.host}:{smtp.port}: "
            f"{type(err).__name__}: {err}. The owners not reached yet are notified on the next run."
        ) from None
    return "smtp"
