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
from typing import Any

import jinja2

from rmsd.config import write_atomic
from rmsd.errors import RmsdError

CSV_FIELDS = (
    "owner", "content_id", "pl_id", "key_id", "key_compromised_at", "published_at", "status", "republished_as",
    "republished_at",
)
TEMPLATES = Path(__file__).parent / "templates"
NOTICE_TEMPLATES = ("owner_notice.subject.j2", "owner_notice.txt.j2")


def report(cluster: str, compromised: list[dict], items: list[dict]) -> dict:
    """The report: compromised keys, then per owner what is still pending and what was republished."""
    owners: dict[str, dict[str, Any]] = {}
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


def due_notices(items: list[dict], sent: set[tuple[str, str]]) -> dict[tuple[str, str], list[dict]]:
    """(owner, key id) -> pending items, for the owners not yet told about that key."""
    due: dict[tuple[str, str], list[dict]] = {}
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
        if outbox_dir is None:
            raise RmsdError("notify needs exactly one of smtp_host (send the notices) or outbox_dir (keep them there)")
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
