"""The status page of a deployment: the fleet-state document (what playbooks/fleet_state.yml puts together:
clusters, keys, nodes and their health, content under compromised keys) as one self-contained HTML file,
with inline CSS and an inline SVG chart per compromised key; no script, nothing fetched.

Names come from inventories and databases, so every value goes through Jinja2's autoescape. Only the fields
the page shows are read from the document; anything else in it never reaches the page.

The page says when it was written. That time stays out of the page's digest (a meta element), so a writer
can tell a page that shows the same state from one that does not and leave the file alone."""

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from rmsd.errors import RmsdError

TEMPLATE = "status_page.html.j2"
# Placed by the template only: a value holding these is escaped (&lt;!--), so it can never be taken for them.
GENERATED_MARK = "<!--rmsd:generated-at-->"
DIGEST_MARK = "<!--rmsd:digest-->"
DIGEST = re.compile(r'<meta name="rmsd-report-digest" content="([0-9a-f]{64})">')
KEY_STATUSES = ("active", "archived", "compromised")
CHART = {"width": 640, "height": 220, "left": 56, "right": 24, "top": 16, "bottom": 40}


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("rmsd", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(state, generated_at: datetime | None = None) -> str:
    """The page of fleet-state document `state` (RmsdError, naming the field, when it is not one), stating
    `generated_at` (default: now) as the time it was written."""
    clusters = [_cluster(c, i) for i, c in enumerate(_list(_dict(state, "the fleet state").get("clusters"),
                                                            "clusters"))]
    database = _database(state.get("database"))
    html = _environment().get_template(TEMPLATE).render(
        clusters=clusters, database=database, generated=Markup(GENERATED_MARK), digest=Markup(DIGEST_MARK),
        nodes=sum(len(c["nodes"]) for c in clusters),
        nodes_up=sum(1 for c in clusters for n in c["nodes"] if n["healthy"]),
        compromised=sum(1 for c in clusters for k in c["key_rows"] if k["status"] == "compromised"),
        pending=sum(c["pending"] for c in clusters),
    )
    digest = hashlib.sha256(html.encode()).hexdigest()
    when = (generated_at or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return html.replace(DIGEST_MARK, digest).replace(GENERATED_MARK, str(escape(when)))


def digest(html: str) -> str | None:
    """The digest of a page `render` wrote (None for anything else): equal for two pages of the same state,
    whenever they were written."""
    match = DIGEST.search(html)
    return match.group(1) if match else None


def render_file(state_path: str, output_path: str, generated_at: datetime | None = None) -> bool:
    """Render the fleet-state JSON file at `state_path` to `output_path` (0644, replaced atomically), unless
    that already shows the same state. Returns whether it wrote."""
    from rmsd.config import write_atomic_bytes

    try:
        state = json.loads(Path(state_path).read_text())
    except OSError as err:
        raise RmsdError(f"cannot read the fleet state {state_path}: {err.strerror}") from None
    except ValueError as err:
        raise RmsdError(f"the fleet state {state_path} is not JSON: {err}") from None
    html = render(state, generated_at)
    try:
        if digest(Path(output_path).read_text()) == digest(html):
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic_bytes(output_path, html.encode(), 0o644, folder_mode=0o755)
    return True


# --- reading the document: only the fields shown, each checked ------------------------------------------


def _dict(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise RmsdError(f"{what} must be a mapping (the JSON playbooks/fleet_state.yml writes), not "
                        f"{type(value).__name__}")
    return value


def _list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RmsdError(f"{what} must be a list, not {type(value).__name__}")
    return value


def _text(value) -> str:
    return "" if value is None else str(value)


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise RmsdError(f"{what} must be a whole number, not {value!r:.60}")
    return int(value)


def _time(value, what: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise RmsdError(f"{what} must be an ISO 8601 time, not {value!r:.60}") from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _database(raw) -> dict | None:
    """The configuration database's members as Patroni reports them (GET /cluster), when the fleet has one."""
    if raw is None:
        return None
    database = _dict(raw, "database")
    members = []
    for i, member in enumerate(_list(database.get("members"), "database.members")):
        member = _dict(member, f"database.members[{i}]")
        role = _text(member.get("role"))
        members.append({"name": _text(member.get("name")), "host": _text(member.get("host")), "role": role,
                        "primary": role == "leader", "state": _text(member.get("state")),
                        "running": _text(member.get("state")) in ("running", "streaming"),
                        "timeline": _text(member.get("timeline")), "lag": _text(member.get("lag"))})
    return {"name": _text(database.get("name")), "members": members,
            "healthy": any(m["primary"] and m["running"] for m in members)
            and all(m["running"] for m in members),
            "backup": _backup(database.get("backup"))}


def _backup(raw) -> dict | None:
    """The configuration database's repository as pgBackRest reports it (info), when the fleet has one."""
    if raw is None:
        return None
    backup = _dict(raw, "database.backup")
    last = backup.get("last")
    if last is not None:
        last = _dict(last, "database.backup.last")
        last = {"label": _text(last.get("label")), "type": _text(last.get("type")),
                "stopped_at": _time(last.get("stopped_at"), "database.backup.last.stopped_at")
                .strftime("%Y-%m-%d %H:%M UTC")}
    status = _text(backup.get("status"))
    return {"repository": _text(backup.get("repository")), "status": status,
            "count": _count(backup.get("backups", 0), "database.backup.backups"), "last": last,
            "ok": status == "ok" and last is not None}


def _cluster(raw, index: int) -> dict:
    where = f"clusters[{index}]"
    cluster = _dict(raw, where)
    counts = _dict(cluster.get("content_per_key") or {}, f"{where}.content_per_key")
    keys = []
    for i, key in enumerate(_list(cluster.get("cluster_keys"), f"{where}.cluster_keys")):
        key = _dict(key, f"{where}.cluster_keys[{i}]")
        status = _text(key.get("status"))
        keys.append({
            "id": _text(key.get("id")), "status": status,
            "status_class": status if status in KEY_STATUSES else "other",
            "protection": _text(key.get("protection")), "created": _text(key.get("created_at"))[:10],
            "age_days": _text(key.get("age_days")), "since": _text(key.get("status_changed_at"))[:10],
            "content": _count(counts.get(_text(key.get("id")), 0), f"{where}.content_per_key"),
        })
    active = _text(cluster.get("active_key_id"))
    nodes = []
    for i, node in enumerate(_list(cluster.get("nodes"), f"{where}.nodes")):
        node = _dict(node, f"{where}.nodes[{i}]")
        health = _text(node.get("health"))
        nodes.append({
            "name": _text(node.get("name")), "url": _text(node.get("url")),
            "recorded": _text(node.get("recorded_status")), "health": health, "healthy": health == "ok",
            "version": _text(node.get("version")) if health == "ok" else "",
            "key": _text(node.get("active_key_id")) if health == "ok" else "",
            "other_key": health == "ok" and _text(node.get("active_key_id")) != active,
            "restart_advised": health == "ok" and node.get("restart_advised") is True,
        })
    compromised = _dict(cluster.get("compromised_content") or {}, f"{where}.compromised_content")
    progress = []
    for i, key in enumerate(_list(compromised.get("progress"), f"{where}.compromised_content.progress")):
        key = _dict(key, f"{where}.compromised_content.progress[{i}]")
        progress.append({
            "key_id": _text(key.get("key_id")), "compromised_at": _text(key.get("compromised_at"))[:16],
            "published": _count(key.get("published", 0), f"{where}.compromised_content.progress[{i}].published"),
            "chart": _chart(_list(key.get("series"), f"{where}.compromised_content.progress[{i}].series"),
                            f"{where}.compromised_content.progress[{i}].series"),
        })
    return {
        "name": _text(cluster.get("name")), "exists": cluster.get("exists", True) is not False,
        "role": _text(cluster.get("role")), "state": _text(cluster.get("state")), "active_key_id": active,
        "key_rows": keys, "nodes": nodes, "schema_revision": _text(cluster.get("schema_revision")),
        # Nodes that answered with different rmsd versions: a rollout under way, or one that stopped.
        "versions": sorted({n["version"] for n in nodes if n["version"]}),
        "outside": [_text(n) for n in
                    _list(cluster.get("nodes_outside_inventory"), f"{where}.nodes_outside_inventory")],
        "pending": _count(compromised.get("pending", 0), f"{where}.compromised_content.pending"),
        "republished": _count(compromised.get("republished", 0), f"{where}.compromised_content.republished"),
        "progress": progress,
    }


def _chart(series: list, where: str) -> dict:
    """Geometry of one series' SVG line chart: x is time (first to last point), y what is still pending."""
    points = []
    for i, point in enumerate(series):
        point = _dict(point, f"{where}[{i}]")
        points.append((_time(point.get("at"), f"{where}[{i}].at"),
                       _count(point.get("pending"), f"{where}[{i}].pending")))
    width, height = CHART["width"], CHART["height"]
    left, top = CHART["left"], CHART["top"]
    plot_w, plot_h = width - left - CHART["right"], height - top - CHART["bottom"]
    top_value = max([p for _, p in points] + [1])
    drawn = []
    if points:
        start, end = points[0][0], points[-1][0]
        span = (end - start).total_seconds()
        for at, pending in points:
            x = left + (plot_w * (at - start).total_seconds() / span if span else plot_w / 2)
            y = top + plot_h * (1 - pending / top_value)
            drawn.append({"x": f"{x:.1f}", "y": f"{y:.1f}", "title": f"{at:%Y-%m-%d %H:%M} UTC: {pending} pending"})
    return {
        "width": width, "height": height, "left": left, "top": top, "right": left + plot_w, "bottom": top + plot_h,
        "points": drawn, "line": " ".join(f"{p['x']},{p['y']}" for p in drawn), "top_value": top_value,
        "start": f"{points[0][0]:%Y-%m-%d %H:%M}" if points else "",
        "end": f"{points[-1][0]:%Y-%m-%d %H:%M}" if points else "",
    }
