"""Content protected by compromised cluster keys: the per-owner report, and the notices that tell each
owner what to republish (rendered from Jinja2 templates; kept in an outbox folder or sent over SMTP)."""

import csv
import hashlib
import heapq
import io
import json
import logging
import os
import re
import smtplib
import ssl
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email import quoprimime
from email.header import Header
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


FORMAT = 2  # the report's layout: a summary JSON, one JSON line per owner, the CSV
TOP_OWNERS = 10  # the owners with most content pending, named in the summary


def owners_path(json_path: str) -> str:
    """The per-owner file beside the summary: REPORT.json -> REPORT.owners.jsonl."""
    return (json_path[:-5] if json_path.endswith(".json") else json_path) + ".owners.jsonl"


def _iso(value) -> str:
    return value.isoformat() if value is not None else ""


class Rows:
    """The report's rows as they come from the database (in owner order), each turned into its CSV fields
    once; a sha256 of those fields (and of the compromised keys) tells whether anything changed since the
    report was written, without rendering it."""

    def __init__(self, cluster: str, compromised: list[dict], rows: Iterable):
        self.rows = rows
        self.compromised_at = {k["id"]: k["compromised_at"] for k in compromised}
        self.digest = hashlib.sha256(json.dumps([FORMAT, cluster, compromised], sort_keys=True).encode())
        self.pending = self.republished = self.owner_count = self.owners_pending = 0
        self._top: list[tuple[int, int, str, int]] = []  # a heap of the owners with most content pending

    def __iter__(self) -> Iterator[tuple[tuple[str, ...], str]]:
        """(fields, CSV line) of every row; the line is what the digest covers."""
        update, compromised_at = self.digest.update, self.compromised_at
        for owner, content_id, pl_id, key_id, published_at, republished_as, republished_at in self.rows:
            fields = (owner, content_id, pl_id, key_id, compromised_at[key_id], published_at,
                      "republished" if republished_as else "pending", republished_as or "", republished_at or "")
            line = ",".join(fields)
            if line.count(",") != 8 or '"' in line or "\n" in line or "\r" in line:  # a field needs quoting
                line = _csv_line(fields)
            update(line.encode() + b"\n")
            yield fields, line

    def owners(self) -> Iterator[tuple[dict, list[str]]]:
        """Per owner (in owner order): (owner, pending, republished and the content items; the CSV lines),
        counting as it goes."""
        entry: dict[str, Any] | None = None
        lines: list[str] = []
        for fields, line in self:
            if entry is None or entry["owner"] != fields[0]:
                if entry is not None:
                    yield self._counted(entry), lines
                entry, lines = {"owner": fields[0], "pending": 0, "republished": 0, "content": []}, []
            entry[fields[6]] += 1
            entry["content"].append({"content_id": fields[1], "pl_id": fields[2], "key_id": fields[3],
                                     "key_compromised_at": fields[4], "published_at": fields[5], "status": fields[6],
                                     "republished_as": fields[7] or None, "republished_at": fields[8] or None})
            lines.append(line)
        if entry is not None:
            yield self._counted(entry), lines

    def _counted(self, entry: dict) -> dict:
        self._count(entry["owner"], entry["pending"], entry["republished"])
        return entry

    def _count(self, owner: str, pending: int, republished: int) -> None:
        self.owner_count += 1
        self.pending += pending
        self.republished += republished
        if pending:
            self.owners_pending += 1
            # among equal counts the owner first in order ranks higher
            top = (pending, -self.owner_count, owner, republished)
            if len(self._top) < TOP_OWNERS:
                heapq.heappush(self._top, top)
            else:
                heapq.heappushpop(self._top, top)

    def drain(self) -> str:
        """Read every row only to digest and count them (no item is built); the hex digest."""
        owner, pending, republished = None, 0, 0
        for fields, _line in self:
            if fields[0] != owner:
                if owner is not None:
                    self._count(owner, pending, republished)
                owner, pending, republished = fields[0], 0, 0
            if fields[7]:
                republished += 1
            else:
                pending += 1
        if owner is not None:
            self._count(owner, pending, republished)
        return self.digest.hexdigest()

    def summary(self, cluster: str, compromised: list[dict]) -> dict:
        return {
            "cluster": cluster, "compromised_keys": compromised, "pending": self.pending,
            "republished": self.republished, "owner_count": self.owner_count, "owners_pending": self.owners_pending,
            "top_owners": [{"owner": owner, "pending": pending, "republished": republished}
                           for pending, _, owner, republished in sorted(self._top, reverse=True)],
            "rows_sha256": self.digest.hexdigest(),
        }


def _csv_line(fields: tuple[str, ...]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(fields)
    return out.getvalue()[:-1]


class _Temp:
    """A file written beside `path` (mode from the first byte on) that replaces it atomically on commit."""

    def __init__(self, path: str, mode: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        os.fchmod(fd, mode)
        self.file = os.fdopen(fd, "w", encoding="utf-8", newline="", buffering=1 << 20)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def write_report(rows: Rows, cluster: str, compromised: list[dict], json_path: str | None, csv_path: str | None,
                 mode: int = 0o640) -> dict:
    """Stream `rows` into the report files, then replace them together: the CSV (one line per item), and with
    `json_path` the per-owner JSON Lines and last the summary holding the rows' digest. Returns the summary."""
    temps: list[_Temp] = []
    try:
        csv_out = jsonl_out = None
        if csv_path:
            temps.append(csv_out := _Temp(csv_path, mode))
            csv_out.file.write(",".join(CSV_FIELDS) + "\n")
        if json_path:
            temps.append(jsonl_out := _Temp(owners_path(json_path), mode))
        for entry, lines in rows.owners():
            if csv_out is not None:
                csv_out.file.write("\n".join(lines) + "\n")
            if jsonl_out is not None:
                jsonl_out.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        summary = rows.summary(cluster, compromised)
        if json_path:
            temps.append(summary_out := _Temp(json_path, mode))
            summary_out.file.write(render_json({"format": FORMAT, **summary,
                                                "owners_file": Path(owners_path(json_path)).name}))
        elif csv_path:  # no summary to keep the digest in: a file beside the CSV
            temps.append(digest_out := _Temp(csv_path + ".sha256", mode))
            digest_out.file.write(summary["rows_sha256"] + "\n")
        for temp in temps:
            temp.finish()
        for temp in temps:  # the summary (or the digest) last: until it is replaced, a rerun rewrites them all
            temp.commit()
        return summary
    finally:
        for temp in temps:
            temp.discard()


def stored_digest(json_path: str | None, csv_path: str | None) -> str | None:
    """The rows' digest the report files were written with, if they are all there; None otherwise."""
    try:
        if json_path:
            data = json.loads(Path(json_path).read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                return None
            digest = data.get("rows_sha256")
        elif csv_path:
            digest = Path(csv_path + ".sha256").read_text().strip()
        else:
            return None
    except (OSError, ValueError):
        return None
    return digest if isinstance(digest, str) else None


def report_files(json_path: str | None, csv_path: str | None) -> list[str]:
    files = [p for p in (csv_path, json_path and owners_path(json_path), json_path) if p]
    return files + ([csv_path + ".sha256"] if csv_path and not json_path else [])


def render_json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# --- notices --------------------------------------------------------------------------------------


def _environment(template_dir: str | None) -> jinja2.Environment:
    loaders = [jinja2.FileSystemLoader(str(TEMPLATES))]
    if template_dir:
        if not Path(template_dir).is_dir():
            raise RmsdError(f"template_dir {template_dir!r} is not a folder")
        loaders.insert(0, jinja2.FileSystemLoader(template_dir))
    # Plain text mail: no HTML escaping; an unknown variable in a template is an error, not a blank.
    return jinja2.Environment(loader=jinja2.ChoiceLoader(loaders), undefined=jinja2.StrictUndefined,
                              autoescape=False, keep_trailing_newline=True)


class NoticeTemplates:
    """The notice templates, loaded once for many notices; those in `template_dir` override the built-in ones."""

    def __init__(self, template_dir: str | None):
        env = _environment(template_dir)
        try:
            self.templates = [env.get_template(name) for name in NOTICE_TEMPLATES]
        except jinja2.TemplateError as err:
            raise RmsdError(f"the owner notice template does not render: {type(err).__name__}: {err}") from None

    def render(self, context: dict) -> tuple[str, str]:
        """(subject, body) of one owner's notice."""
        try:
            subject, body = (template.render(**context) for template in self.templates)
        except jinja2.TemplateError as err:
            raise RmsdError(f"the owner notice template does not render: {type(err).__name__}: {err}") from None
        return " ".join(subject.split()), body


def render_notice(template_dir: str | None, context: dict) -> tuple[str, str]:
    """(subject, body) of one owner's notice; templates in `template_dir` override the built-in ones."""
    return NoticeTemplates(template_dir).render(context)


@dataclass
class Smtp:
    host: str
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0


@dataclass
class Notice:
    """One notice, ready to send: its envelope and the message as RFC 5322 text ("\\n" line ends; smtplib
    sends CRLF)."""

    sender: str
    to: str
    message_id: str
    text: str

    @property
    def international(self) -> bool:
        """Non-ASCII addresses: the message travels as UTF-8 (SMTPUTF8)."""
        return not self.text.isascii()

    def wire(self) -> bytes:
        """The message as SMTP's DATA carries it: CRLF line ends (smtplib adds the dot stuffing)."""
        return _EOL.sub("\r\n", self.text).encode()


_EOL = re.compile(r"\r\n|\n|\r")


def _header(name: str, value: str) -> str:
    """`name: value`, RFC 2047 encoded and folded when it is not short ASCII."""
    if value.isascii() and len(name) + len(value) < 76:
        return f"{name}: {value}"
    return f"{name}: " + Header(value, "us-ascii" if value.isascii() else "utf-8", header_name=name).encode()


def message(sender: str, owner: str, subject: str, body: str) -> Notice:
    """A plain text message, written out directly: tens of thousands are built a run, and the email
    package's generator and address parsing cost more than the rest of a notice."""
    for what, value in (("sender", sender), ("owner", owner), ("subject", subject)):
        if "\r" in value or "\n" in value:
            raise RmsdError(f"the notice's {what} {value!r} holds a line break")
    message_id = make_msgid(domain=sender.rpartition("@")[2] or None)
    if body.isascii():
        encoding = 'Content-Type: text/plain; charset="us-ascii"\nContent-Transfer-Encoding: 7bit'
    else:  # quoted-printable keeps the body readable as it travels
        encoding = 'Content-Type: text/plain; charset="utf-8"\nContent-Transfer-Encoding: quoted-printable'
        body = quoprimime.body_encode(body.encode().decode("latin-1"))
    headers = (f"From: {sender}", f"To: {owner}", _header("Subject", subject), f"Date: {formatdate(localtime=False)}",
               f"Message-ID: {message_id}", "MIME-Version: 1.0", encoding)
    return Notice(sender, owner, message_id, "\n".join(headers) + "\n\n" + body)


class Outbox:
    """Notices kept as .eml files (0600) in a folder, for the operator to send by other means."""

    channel = "outbox"

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def send(self, notice: Notice) -> None:
        name = notice.to.replace("/", "_") + "-" + notice.message_id.strip("<>").split("@")[0] + ".eml"
        write_atomic(self.folder / name, notice.text, 0o600)

    def close(self) -> None:
        pass


class SmtpConnection:
    """One SMTP connection for many notices; a connection lost is opened again once per notice, then the
    notice fails with a message that says what to do."""

    channel = "smtp"

    def __init__(self, smtp: Smtp):
        self.smtp = smtp
        self.server: smtplib.SMTP | None = None
        self.connections = 0

    def _open(self) -> smtplib.SMTP:
        server = smtplib.SMTP(self.smtp.host, self.smtp.port, timeout=self.smtp.timeout)
        try:
            if self.smtp.starttls:
                server.starttls(context=ssl.create_default_context())
            if self.smtp.username:
                server.login(self.smtp.username, self.smtp.password or "")
        except BaseException:
            server.close()
            raise
        self.connections += 1
        return server

    def send(self, notice: Notice) -> None:
        for attempt in (1, 2):
            try:
                if self.server is None:
                    self.server = self._open()
                self.server.sendmail(notice.sender, [notice.to], notice.wire(),
                                     mail_options=["SMTPUTF8"] if notice.international else ())
                return
            except (smtplib.SMTPServerDisconnected, OSError) as err:
                self._drop()
                if attempt == 2:
                    raise self._error(notice, err) from None
            except smtplib.SMTPResponseException as err:
                self._drop()
                if err.smtp_code != 421 or attempt == 2:  # 421: the server closes the connection; open another
                    raise self._error(notice, err) from None
            except smtplib.SMTPException as err:
                self._drop()
                raise self._error(notice, err) from None

    def _error(self, notice: Notice, err: Exception) -> RmsdError:
        return RmsdError(
            f"cannot send the notice to {notice.to} through SMTP server {self.smtp.host}:{self.smtp.port}: "
            f"{type(err).__name__}: {err}. The owners not reached yet are notified on the next run."
        )

    def _drop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            try:
                server.close()
            except OSError:
                pass

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            try:
                server.quit()
            except (OSError, smtplib.SMTPException):
                server.close()


class Pace:
    """At most `rate` notices a second (0: as fast as they go)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate if rate else 0.0
        self.clock, self.sleep = clock, sleep
        self.next = clock()

    def wait(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        if self.next > now:
            self.sleep(self.next - now)
            now = self.next
        self.next = now + self.interval


class Progress:
    """Reports (done, due, rate) every `every` notices or `seconds`, and at the end."""

    def __init__(self, due: int, report: Callable[[dict], None] | None, every: int = 1000, seconds: float = 10.0):
        self.due, self.report = due, report or _log_progress
        self.every, self.seconds = every, seconds
        self.done = 0
        self.started = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done % self.every == 0 or now - self.last >= self.seconds:
            self.last = now
            self.report(self.state(now))

    def state(self, now: float | None = None) -> dict:
        elapsed = (now or time.monotonic()) - self.started
        return {"done": self.done, "due": self.due, "seconds": round(elapsed, 3),
                "per_second": round(self.done / elapsed, 1) if elapsed > 0 else 0.0}

    def finish(self) -> dict:
        state = self.state()
        self.report(state)
        return state


def _log_progress(state: dict) -> None:
    logging.getLogger("rmsd.compromise").info("owner notices: %(done)d of %(due)d (%(per_second)s a second)", state)
