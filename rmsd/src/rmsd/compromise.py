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
from datetime import UTC, datetime
from email import quoprimime
from email.header import Header
from email.utils import formatdate, make_msgid
from pathlib import Path

import jinja2

from rmsd.config import write_atomic
from rmsd.errors import RmsdError

CSV_FIELDS = (
    "owner", "content_id", "pl_id", "key_id", "key_compromised_at", "published_at", "status", "republished_as",
    "republished_at",
)
# A spreadsheet reads a cell starting with one of these as a formula ("=HYPERLINK(...)" in a content id a
# publisher chose): such a cell is written with a single quote before it, as OWASP's CSV injection advice says.
# The JSON files keep every value exact.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_AFTER_COMMA = re.compile(r",[=+\-@\t\r]")  # a literal first: the quick search over millions of lines
TEMPLATES = Path(__file__).parent / "templates"
NOTICE_TEMPLATES = ("owner_notice.subject.j2", "owner_notice.txt.j2")


FORMAT = 3  # the report's layout: a summary JSON (with the rows' revision), one JSON line per owner, the CSV
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
            if line.startswith(FORMULA_START) or _FORMULA_AFTER_COMMA.search(line):  # (or a comma in a field)
                line = _csv_line(tuple("'" + f if f.startswith(FORMULA_START) else f for f in fields))
            elif line.count(",") != 8 or '"' in line or "\n" in line or "\r" in line:  # a field needs quoting
                line = _csv_line(fields)
            update(line.encode() + b"\n")
            yield fields, line

    def owners(self) -> Iterator[tuple[str, list[str]]]:
        """Per owner (in owner order): (its JSON line: owner, pending, republished and the content items; its
        CSV lines), counting as it goes. One loop over millions of rows: an item's JSON is written out
        directly when no field needs escaping, which is the rule (json.dumps otherwise)."""
        owner: str | None = None
        items: list[str] = []
        lines: list[str] = []
        pending = republished = 0
        for fields, line in self:
            if fields[0] != owner:
                if owner is not None:
                    yield self._owner_line(owner, pending, republished, items), lines
                owner, pending, republished, items, lines = fields[0], 0, 0, [], []
            _, content_id, pl_id, key_id, compromised_at, published_at, status, republished_as, republished_at = fields
            if republished_as:
                republished += 1
                again = f'"{republished_as}","republished_at":"{republished_at}"'
            else:
                pending += 1
                again = 'null,"republished_at":null'
            if "\\" in line or '"' in line or not line.isprintable():
                items.append(_item_json(fields))
            else:
                items.append(f'{{"content_id":"{content_id}","pl_id":"{pl_id}","key_id":"{key_id}",'
                             f'"key_compromised_at":"{compromised_at}","published_at":"{published_at}",'
                             f'"status":"{status}","republished_as":{again}}}')
            lines.append(line)
        if owner is not None:
            yield self._owner_line(owner, pending, republished, items), lines

    def _owner_line(self, owner: str, pending: int, republished: int, items: list[str]) -> str:
        self._count(owner, pending, republished)
        return (f'{{"owner":{json.dumps(owner, ensure_ascii=False)},"pending":{pending},'
                f'"republished":{republished},"content":[{",".join(items)}]}}')

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


def _item_json(fields: tuple[str, ...]) -> str:
    """One item of the per-owner file, through json.dumps (fields that need escaping)."""
    return json.dumps({"content_id": fields[1], "pl_id": fields[2], "key_id": fields[3],
                       "key_compromised_at": fields[4], "published_at": fields[5], "status": fields[6],
                       "republished_as": fields[7] or None, "republished_at": fields[8] or None},
                      ensure_ascii=False, separators=(",", ":"))


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


def summary_path(json_path: str | None, csv_path: str | None) -> str | None:
    """Where the summary is kept: `json_path`, or without it a file beside the CSV (CSV.summary.json)."""
    return json_path or (csv_path + ".summary.json" if csv_path else None)


def write_report(rows: Rows, cluster: str, compromised: list[dict], json_path: str | None, csv_path: str | None,
                 mode: int = 0o640, revision: str | None = None) -> dict:
    """Stream `rows` into the report files, then replace them together: the CSV (one line per item), with
    `json_path` the per-owner JSON Lines, and last the summary (`summary_path`) holding the rows' digest and
    `revision` (what clusters.affected_revision said before the rows were read). Returns the summary."""
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
                jsonl_out.file.write(entry + "\n")
        summary = rows.summary(cluster, compromised)
        kept = summary_path(json_path, csv_path)
        if kept:
            temps.append(summary_out := _Temp(kept, mode))
            summary_out.file.write(render_json({
                "format": FORMAT, **summary, "rows_revision": revision,
                **({"owners_file": Path(owners_path(json_path)).name} if json_path else {})}))
        for temp in temps:
            temp.finish()
        for temp in temps:  # the summary last: until it is replaced, a rerun rewrites them all
            temp.commit()
        return summary
    finally:
        for temp in temps:
            temp.discard()


def stored_summary(json_path: str | None, csv_path: str | None) -> dict | None:
    """The summary the report files were last written with (this FORMAT), None if there is none."""
    kept = summary_path(json_path, csv_path)
    if not kept:
        return None
    try:
        data = json.loads(Path(kept).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def report_files(json_path: str | None, csv_path: str | None) -> list[str]:
    files = [p for p in (csv_path, json_path and owners_path(json_path), json_path) if p]
    return files + ([csv_path + ".summary.json"] if csv_path and not json_path else [])


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
    """Notices kept as .eml files (0600) in a folder, for the operator to send by other means. A file is named
    by the SHA-256 of its owner and its Message-ID, whatever the owner id holds (up to 256 characters of any
    script, slashes, dots): the owner is in the file, on its To: line. Which owners were told is recorded in
    the configuration database, as for SMTP: a rerun writes no file for them."""

    channel = "outbox"

    def __init__(self, folder: str):
        self.folder = Path(folder)

    @staticmethod
    def file_name(notice: Notice) -> str:
        """SHA256_OF_OWNER-MESSAGE_ID_LOCAL_PART.eml, about 110 characters (make_msgid: digits and dots)."""
        owner = hashlib.sha256(notice.to.encode()).hexdigest()
        return f"{owner}-{notice.message_id.strip('<>').split('@')[0]}.eml"

    def send(self, notice: Notice) -> None:
        try:
            write_atomic(self.folder / self.file_name(notice), notice.text, 0o600)
        except OSError as err:
            raise RmsdError(
                f"cannot write the notice to {notice.to} into outbox_dir {self.folder}: {type(err).__name__}: "
                f"{err.strerror or err}. Check the folder exists and is writable; the owners not reached yet are "
                "notified on the next run."
            ) from None

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


def counting(rows: Iterable, progress: Callable[[dict], None] | None, total: int | None,
             every: int = 100_000) -> Iterator:
    """`rows`, telling `progress` every `every` rows how many were read (of `total`)."""
    if progress is None:
        yield from rows
        return
    started, done = time.monotonic(), 0
    for row in rows:
        done += 1
        if done % every == 0:
            progress({"step": "report", "rows": done, "rows_total": total,
                      "seconds": round(time.monotonic() - started, 1)})
        yield row
    progress({"step": "report", "rows": done, "rows_total": total, "seconds": round(time.monotonic() - started, 1)})


class Progress:
    """Reports the notices' progress (done, due, rate, seconds left) every `every` notices or `seconds`, and at
    the end."""

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
        rate = self.done / elapsed if elapsed > 0 else 0.0
        return {"step": "notices", "done": self.done, "due": self.due, "seconds": round(elapsed, 1),
                "per_second": round(rate, 1),
                "seconds_left": round((self.due - self.done) / rate) if rate else None}

    def finish(self) -> dict:
        state = self.state()
        self.report(state)
        return state


def _log_progress(state: dict) -> None:
    logging.getLogger("rmsd.compromise").info("owner notices: %(done)d of %(due)d (%(per_second)s a second)", state)


class ProgressFile:
    """Progress an operator can follow while the task runs (`tail -f PATH`): JSON Lines, one line a step, each
    with the time; the file (0640) is emptied when a run starts and its last line says how the run ended."""

    def __init__(self, path: str, mode: int = 0o640):
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)
        self.file = os.fdopen(fd, "w", encoding="utf-8", buffering=1)  # a line at a time

    def __call__(self, state: dict) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        self.file.write(json.dumps({"time": stamp, **state}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.file.close()
