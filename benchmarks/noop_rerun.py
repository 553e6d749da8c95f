"""Cost of a no-op run of the collection's playbooks: a rerun on converged nodes that changes nothing, as a
GitOps pipeline runs on every merge. Beside it, a "ping floor" against the same inventory: one
`ansible.builtin.ping` per host, and as many pings per host as the no-op rerun executes tasks.

Two deployments on this machine, each converged first (that run is timed but is not the figure):

  demo   playbooks/demo.yml with playbooks/inventories/demo (what `make demo` runs): one node on
         127.0.0.1:18080, its state in .demo/ of this tree
  multi  playbooks/site.yml with an inventory written into a temporary folder: root cluster `corp` of two
         nodes and licensing cluster `dept` of one, each node on its own address in 127.0.9.0/24 on a free
         port, SQLite configuration databases, supervisord, running as the current user, no balancer

Counts come from the collection's drift callback (rmsops.rms.drift, its per-host `stats`); a rerun that
changes anything is reported and the script exits 1. A small callback of the script's own records each
task's status and time too (listed with --tasks). Every node it started is stopped and every folder it
made is removed at the end, also on Ctrl-C or failure (unless --keep). Prints figures; asserts nothing
about time.

    make venv collection                       # once
    python3 benchmarks/noop_rerun.py [--reruns 3] [--skip-demo] [--skip-multi] [--tasks] [--keep]
"""

import argparse
import contextlib
import json
import os
import platform
import pwd
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from processes import stop_group

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
COLLECTIONS = REPO / "build" / "collections"
COLLECTION_LINK = COLLECTIONS / "ansible_collections" / "rmsops" / "rms"

DEMO_DIR = REPO / ".demo"
DEMO_ADDRESS, DEMO_PORT = "127.0.0.1", 18080  # playbooks/inventories/demo/hosts.yml
MULTI_NODES = (  # inventory name, group, address (127.0.9.0/24)
    ("rms-root-1", "rms_root", "127.0.9.1"),
    ("rms-root-2", "rms_root", "127.0.9.2"),
    ("rms-dept-1", "rms_licensing", "127.0.9.11"),
)

# Records every task result of a run (host, task, status, seconds since the task started) for --tasks.
RECORDER = '''\
import json
import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "noop_tasks"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._rows = []
        self._started = {}

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._started[task._uuid] = time.perf_counter()

    def v2_playbook_on_handler_task_start(self, task):
        self._started[task._uuid] = time.perf_counter()

    def _add(self, result, status):
        task = result._task
        started = self._started.get(task._uuid)
        self._rows.append({
            "host": result._host.get_name(),
            "task": task.get_name(),
            "action": task.action,
            "status": status,
            "seconds": round(time.perf_counter() - started, 3) if started else None,
        })

    def v2_runner_on_ok(self, result):
        self._add(result, "changed" if result._result.get("changed") else "ok")

    def v2_runner_on_skipped(self, result):
        self._add(result, "skipped")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._add(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_unreachable(self, result):
        self._add(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        with open(os.environ["RMS_NOOP_TASKS_PATH"], "w") as out:
            json.dump(self._rows, out, indent=1)
'''


# --- running ansible-playbook ---------------------------------------------------------------------------


class PlaybookFailed(RuntimeError):
    pass


def ansible_env(work: Path) -> dict[str, str]:
    """What `make demo` sets (collection and Ansible state from this tree's build/), plus the callbacks."""
    env = dict(os.environ)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_HOME": str(REPO / "build" / "ansible-home"),
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "ANSIBLE_CALLBACK_PLUGINS": str(work / "callback_plugins"),
        "ANSIBLE_NOCOLOR": "1",
    })
    env.pop("VIRTUAL_ENV", None)
    return env


def run_playbook(playbook: Path, inventory: Path, log: Path, env: dict, drift: Path | None = None,
                 tasks: Path | None = None) -> float:
    """Run ansible-playbook from the tree's root (as make does); its output goes to `log`. Returns the wall
    time in seconds. The process runs in its own session and is stopped if this script is interrupted."""
    env = dict(env)
    callbacks = []
    if drift is not None:
        callbacks.append("rmsops.rms.drift")
        env["RMSOPS_DRIFT_PATH"] = str(drift)
    if tasks is not None:
        callbacks.append("noop_tasks")
        env["RMS_NOOP_TASKS_PATH"] = str(tasks)
    if callbacks:
        env["ANSIBLE_CALLBACKS_ENABLED"] = ",".join(callbacks)
    else:
        env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(playbook)]
    with open(log, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = process.wait()
        except BaseException:
            stop_group(process)
            raise
        seconds = time.perf_counter() - started
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise PlaybookFailed(f"{' '.join(argv)} exited {rc}; the end of its output:\n{tail}")
    return seconds




# Actions Ansible carries out on the controller without running a module on the host.
CONTROLLER_ACTIONS = {f"{prefix}{name}" for prefix in ("", "ansible.builtin.", "ansible.legacy.") for name in (
    "set_fact", "assert", "debug", "fail", "include_role", "include_tasks", "import_role", "import_tasks",
    "validate_argument_spec", "meta", "add_host", "group_by", "include_vars", "set_stats", "pause")}


def task_kinds(rows: list[dict], host: str) -> dict[str, int]:
    """A host's task results of one run: skipped, run by Ansible itself on the controller, or a module run."""
    kinds = {"skipped": 0, "controller": 0, "module": 0}
    for row in rows:
        if row["host"] != host:
            continue
        if row["status"] == "skipped":
            kinds["skipped"] += 1
        elif row["action"] in CONTROLLER_ACTIONS:
            kinds["controller"] += 1
        else:
            kinds["module"] += 1
    return kinds


def task_executions(stats: dict) -> int:
    """Tasks a host ran: ok (which includes changed and ignored errors), skipped, failed, unreachable,
    rescued. Loops count once; meta tasks (flush_handlers) not at all."""
    return sum(stats.get(key, 0) for key in ("ok", "skipped", "failures", "unreachable", "rescued"))


# --- the deployments ------------------------------------------------------------------------------------


@dataclass
class Node:
    host: str
    address: str
    port: int
    supervisorctl: Path
    conf: Path
    running_before: bool = False


@dataclass
class Scenario:
    name: str
    playbook: Path
    inventory: Path
    description: str
    work: Path
    plays: list  # (host pattern, its hosts) in the order the playbook runs them: the ping-equivalent's plays
    nodes: list = field(default_factory=list)
    made: list = field(default_factory=list)  # folders this script created (removed at the end)
    converge_s: float = 0.0
    converge_changed: int = 0
    noop_s: list = field(default_factory=list)
    ping1_s: list = field(default_factory=list)
    pingk_s: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # host -> drift stats of the last rerun
    changed: list = field(default_factory=list)  # changed count of each rerun
    changes: list = field(default_factory=list)  # drift's entries of reruns that changed something
    task_rows: list = field(default_factory=list)

    def tasks_per_host(self) -> dict[str, int]:
        return {host: task_executions(stats) for host, stats in self.stats.items()}


def supervisord_running(supervisorctl: Path, conf: Path) -> bool:
    if not (supervisorctl.exists() and conf.exists()):
        return False
    answer = subprocess.run([str(supervisorctl), "-c", str(conf), "pid"], capture_output=True, text=True,
                            check=False, timeout=30)
    return answer.returncode == 0 and answer.stdout.strip().isdigit()


def port_taken(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the nodes do: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError:
            return True
    return False


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def demo_nodes() -> list[Node]:
    return [Node(conf.parent.name, DEMO_ADDRESS, DEMO_PORT, DEMO_DIR / "venv" / "bin" / "supervisorctl", conf)
            for conf in sorted(DEMO_DIR.glob("nodes/*/supervisord.conf"))]


def demo_scenario(work: Path) -> Scenario:
    scenario = Scenario(
        name="demo", playbook=REPO / "playbooks" / "demo.yml", inventory=REPO / "playbooks" / "inventories" / "demo",
        description=f"playbooks/demo.yml -i playbooks/inventories/demo: root cluster demo, 1 node on "
                    f"{DEMO_ADDRESS}:{DEMO_PORT} (SQLite, supervisord), state in .demo/",
        work=work / "demo", plays=[("rms_demo", ["rms-demo"])],
    )
    scenario.work.mkdir()
    if DEMO_DIR.exists():
        # A demo made before (make demo): measured as it is, left in place; its node keeps running if it ran.
        scenario.nodes = demo_nodes()
        for node in scenario.nodes:
            node.running_before = supervisord_running(node.supervisorctl, node.conf)
    else:
        scenario.made.append(DEMO_DIR)
    if port_taken(DEMO_ADDRESS, DEMO_PORT) and not any(node.running_before for node in scenario.nodes):
        raise SystemExit(f"{DEMO_ADDRESS}:{DEMO_PORT} is in use, and not by this tree's demo ({DEMO_DIR}); "
                         "stop what listens there (another tree's demo: its `make clean`) or use --skip-demo")
    return scenario


def multi_scenario(work: Path) -> Scenario:
    """root cluster corp (2 nodes), licensing cluster dept (1 node), all local, SQLite, supervisord."""
    folder = work / "multi"
    folder.mkdir()
    user = pwd.getpwuid(os.getuid()).pw_name
    ports = {host: free_port(address) for host, _group, address in MULTI_NODES}
    address = {host: address for host, _group, address in MULTI_NODES}
    url = {host: f"http://{address[host]}:{ports[host]}" for host, _group, _address in MULTI_NODES}
    root_db = f"sqlite:///{folder}/db/corp.db"

    def host_vars(host):
        return {"server_listen_address": address[host], "server_port": ports[host]}

    inventory = {"all": {
        "vars": {
            "ansible_connection": "local",
            # As a pipeline runs them (docs/examples/ansible.cfg): modules reach python on stdin.
            "ansible_pipelining": True,
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            # rmsd's virtualenv is made by the python that runs Ansible; one per host, as on separate machines.
            "server_python": "{{ ansible_playbook_python }}",
            "server_venv_dir": f"{folder}/hosts/{{{{ inventory_hostname }}}}/venv",
            "server_base_dir": f"{folder}/nodes",
            "server_user": user,
            "server_packages": [],
            "server_service_manager": "supervisord",
        },
        "children": {
            "rms_root": {
                "hosts": {host: host_vars(host) for host, group, _a in MULTI_NODES if group == "rms_root"},
                "vars": {
                    "root_cluster_name": "corp",
                    "root_cluster_database_url": root_db,
                    "root_cluster_key_password": secrets.token_urlsafe(24),
                    "root_cluster_intranet_url": url["rms-root-1"],
                },
            },
            "rms_licensing": {
                "children": {"rms_licensing_dept": {
                    "hosts": {host: host_vars(host) for host, group, _a in MULTI_NODES if group == "rms_licensing"},
                    "vars": {"licensing_cluster_name": "dept", "licensing_cluster_intranet_url": url["rms-dept-1"]},
                }},
                "vars": {
                    "licensing_cluster_database_url": f"sqlite:///{folder}/db/{{{{ licensing_cluster_name }}}}.db",
                    "licensing_cluster_key_password": secrets.token_urlsafe(24),
                    # No balancer: enrollment goes straight to the first root node.
                    "licensing_cluster_root_host": "rms-root-1",
                    "licensing_cluster_root_url": url["rms-root-1"],
                    "licensing_cluster_root_name": "corp",
                    "licensing_cluster_root_database_url": root_db,
                },
            },
        },
    }}
    path = folder / "hosts.yml"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # it holds the key passwords
    with os.fdopen(fd, "w") as out:
        out.write("---\n# Written by benchmarks/noop_rerun.py (JSON is YAML).\n")
        json.dump(inventory, out, indent=2)
        out.write("\n")
    nodes_text = ", ".join(f"{host} {address[host]}:{ports[host]}" for host, _g, _a in MULTI_NODES)
    return Scenario(
        name="multi", playbook=REPO / "playbooks" / "site.yml", inventory=path, work=folder,
        description=f"playbooks/site.yml -i {path}: root cluster corp (2 nodes) and licensing cluster dept "
                    f"(1 node), SQLite, supervisord, no balancer: {nodes_text}",
        plays=[(group, [host for host, g, _a in MULTI_NODES if g == group]) for group in ("rms_root", "rms_licensing")],
        nodes=[Node(host, address[host], ports[host], folder / "hosts" / host / "venv" / "bin" / "supervisorctl",
                    folder / "nodes" / host / "supervisord.conf") for host, _g, _a in MULTI_NODES],
        made=[folder],
    )


def stop_nodes(scenario: Scenario) -> list[str]:
    """Shut down the supervisord (and so rmsd) of every node this script started; returns what failed."""
    if scenario.name == "demo":  # the node folders exist only after the first converge
        running_before = {node.host for node in scenario.nodes if node.running_before}
        scenario.nodes = [Node(node.host, node.address, node.port, node.supervisorctl, node.conf,
                               node.host in running_before) for node in demo_nodes()]
    problems = []
    for node in scenario.nodes:
        if node.running_before or not node.conf.exists():
            continue
        pid_file = node.conf.parent / "supervisord.pid"
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([str(node.supervisorctl), "-c", str(node.conf), "shutdown"], capture_output=True,
                           check=False, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (pid_file.exists() or port_taken(node.address, node.port)):
            time.sleep(0.2)
        if pid_file.exists() or port_taken(node.address, node.port):
            problems.append(f"{node.host}: supervisord ({node.conf}) or {node.address}:{node.port} still up")
    return problems


# --- the ping floor ----------------------------------------------------------------------------------------


def write_ping_playbook(path: Path, plays: list) -> None:
    """plays: (host pattern, number of ansible.builtin.ping tasks)."""
    lines = ["---"]
    for pattern, count in plays:
        lines += [f"- name: Ping floor, {count} task(s) per host", f"  hosts: {pattern}", "  gather_facts: false",
                  "  tasks:"]
        for index in range(1, count + 1):
            lines += [f"    - name: Ping {index}", "      ansible.builtin.ping:"]
    path.write_text("\n".join(lines) + "\n")


# --- the measurement --------------------------------------------------------------------------------------


def measure(scenario: Scenario, args, env: dict) -> None:
    work = scenario.work
    say(f"{scenario.name}: converging ({scenario.playbook.relative_to(REPO)})")
    scenario.converge_s = run_playbook(scenario.playbook, scenario.inventory, work / "converge.log", env,
                                       drift=work / "converge-drift.json")
    scenario.converge_changed = json.loads((work / "converge-drift.json").read_text())["changed_tasks"]
    ping1 = work / "ping-1.yml"
    write_ping_playbook(ping1, [("all", 1)])
    pingk = work / "ping-k.yml"
    for run in range(1, args.reruns + 1):
        say(f"{scenario.name}: no-op rerun {run}/{args.reruns}")
        drift = work / f"noop-{run}-drift.json"
        tasks = work / f"noop-{run}-tasks.json"
        scenario.noop_s.append(run_playbook(scenario.playbook, scenario.inventory, work / f"noop-{run}.log", env,
                                            drift=drift, tasks=tasks))
        report = json.loads(drift.read_text())
        scenario.stats = report["stats"]
        scenario.changed.append(report["changed_tasks"])
        scenario.changes += report["changes"]
        scenario.task_rows = json.loads(tasks.read_text())
        if run == 1:  # as many pings per host as the rerun ran tasks (the most of any host of each play)
            per_host = scenario.tasks_per_host()
            write_ping_playbook(pingk, [(pattern, max(per_host.get(host, 0) for host in hosts))
                                        for pattern, hosts in scenario.plays])
        say(f"{scenario.name}: ping floor {run}/{args.reruns}")
        scenario.ping1_s.append(run_playbook(ping1, scenario.inventory, work / f"ping-1-{run}.log", env))
        scenario.pingk_s.append(run_playbook(pingk, scenario.inventory, work / f"ping-k-{run}.log", env))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the report ----------------------------------------------------------------------------------------


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_percent(seconds: float) -> float:
    before = machine_busy()
    time.sleep(seconds)
    after = machine_busy()
    return 100 * (after[0] - before[0]) / max(after[1] - before[1], 1)


def tree_revision() -> str:
    def git(*argv):
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, check=False).stdout
    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown commit"
    changed = [line[3:] for line in git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
               .splitlines()]
    if not changed:
        return commit
    return f"{commit} with changes to {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"


def ansible_version() -> str:
    out = subprocess.run([str(VENV_BIN / "ansible-playbook"), "--version"], capture_output=True, text=True,
                         check=False).stdout
    first = out.splitlines()[0] if out else "ansible-playbook ?"
    return first.replace("ansible-playbook ", "ansible-").replace("[", "").replace("]", "")


def median(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(scenarios: list[Scenario], args, busy: float) -> str:
    lines = [
        "No-op rerun of the rmsops.rms playbooks: converged nodes, nothing to change (a GitOps pipeline's run per merge)",
        (f"tree: {REPO} at {tree_revision()}; {ansible_version()}, Python {platform.python_version()}, "
         f"{os.cpu_count()} cores"),
        f"machine busy before the run: {busy:.0f}% of all cores"
        + (" -- other work is running; it skews every figure below" if busy > 10 else ""),
        "",
    ]
    for s in scenarios:
        lines.append(f"{s.name:<6} {s.description}")
        lines.append(f"{'':<6} converge before the reruns (not a figure): {s.converge_s:.1f} s, "
                     f"{s.converge_changed} changed task(s)")
    lines += ["", "Task executions per host in the no-op rerun (drift callback stats; ok includes changed), and what",
              "the ok ones were: a module run on the host, or an action Ansible carries out on the controller:"]
    header = (f"{'':<2}{'scenario':<9}{'host':<13}{'tasks':>6}{'ok':>6}{'skipped':>9}{'changed':>9}"
              f"{'module runs':>13}{'controller':>12}")
    lines += [header, "  " + "-" * (len(header) - 2)]
    for s in scenarios:
        for host, stats in s.stats.items():
            kinds = task_kinds(s.task_rows, host)
            lines.append(f"{'':<2}{s.name:<9}{host:<13}{task_executions(stats):>6}{stats['ok']:>6}"
                         f"{stats['skipped']:>9}{stats['changed']:>9}{kinds['module']:>13}{kinds['controller']:>12}")
    lines += ["", f"Wall time in seconds, median of {args.reruns} run(s) (min-max):"]
    header = (f"{'':<2}{'scenario':<9}{'hosts':>5}{'tasks/host':>11}{'changed':>8}  {'no-op rerun':<18}"
              f"{'1 ping/host':<17}{'K pings/host':<18}{'s/task':>7}{'K pings/no-op':>14}{'modules x s/task':>18}")
    lines += [header, "  " + "-" * (len(header) - 2)]
    for s in scenarios:
        counts = sorted(set(s.tasks_per_host().values()))
        k = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        noop, ping1, pingk = (statistics.median(v) if v else 0.0 for v in (s.noop_s, s.ping1_s, s.pingk_s))
        kmax = max(counts) if counts else 0
        per_task = (pingk - ping1) / (kmax - 1) if kmax > 1 else 0.0
        share = f"{100 * pingk / noop:.0f}%" if noop else "-"
        # Module runs one after the other: each play's hosts run side by side, the plays one after the other.
        modules = sum(max((task_kinds(s.task_rows, host)["module"] for host in hosts), default=0)
                      for _pattern, hosts in s.plays)
        estimate = f"{modules} x {per_task:.2f} = {modules * per_task:.1f}"
        lines.append(f"{'':<2}{s.name:<9}{len(s.stats):>5}{k:>11}{max(s.changed, default=0):>8}  "
                     f"{median(s.noop_s):<18}{median(s.ping1_s):<17}{median(s.pingk_s):<18}{per_task:>7.2f}{share:>14}"
                     f"{estimate:>18}")
    lines += [
        "",
        "tasks/host: tasks each host ran in the rerun (ok + skipped + failed; a loop counts once, includes and the",
        "  roles' argument validation count, meta tasks do not). changed: the most any rerun changed (must be 0).",
        "1 ping/host: a playbook of one ansible.builtin.ping per host against the same inventory: start-up,",
        "  inventory and one task. K pings/host: as many pings per host as the rerun ran tasks, one play per play",
        "  of the playbook (the most of its hosts). s/task: (K pings - 1 ping) / (K - 1), what one task costs",
        "  here whatever it does. K pings/no-op: the share of the no-op rerun that per-task overhead explains;",
        "  above 100% where many of the rerun's tasks are skipped or controller-side, which cost less than a ping.",
        "  modules x s/task: the module runs one after the other (the most of any host of each play, summed over",
        "  the plays) times s/task: the part of the no-op rerun that running that many modules costs at all.",
    ]
    for s in scenarios:
        if any(s.changed):
            lines.append(f"NOT A NO-OP: {s.name} reruns changed {s.changed} task(s):")
            seen = set()
            for change in s.changes:
                key = (change["host"], change["task"])
                if key not in seen:
                    seen.add(key)
                    lines.append(f"  {change['host']}: {change['task']} ({change['action']})")
    if args.tasks:
        for s in scenarios:
            lines += ["", (f"{s.name}: tasks of the last no-op rerun, per host (seconds from the task's start "
                           "to the host's result)")]
            for host in sorted({row["host"] for row in s.task_rows}):
                rows = [row for row in s.task_rows if row["host"] == host]
                lines.append(f"  {host}: {len(rows)} tasks")
                for index, row in enumerate(rows, 1):
                    seconds = f"{row['seconds']:.2f}" if row["seconds"] is not None else "-"
                    lines.append(f"  {index:>4}  {row['status']:<8}{seconds:>6}  {row['task']}")
                by_status: dict[str, list[float]] = {}
                for row in rows:
                    by_status.setdefault(row["status"], []).append(row["seconds"] or 0.0)
                lines.append("        " + ", ".join(f"{status} {len(v)} ({sum(v):.1f} s)"
                                                    for status, v in sorted(by_status.items())))
    return "\n".join(lines)


def as_json(scenarios: list[Scenario], busy: float) -> dict:
    return {
        "tree": str(REPO), "revision": tree_revision(), "ansible": ansible_version(),
        "python": platform.python_version(), "cores": os.cpu_count(), "busy_before_pct": round(busy, 1),
        "scenarios": [{
            "name": s.name, "description": s.description, "converge_s": s.converge_s,
            "converge_changed": s.converge_changed, "noop_s": s.noop_s, "ping1_s": s.ping1_s, "pingk_s": s.pingk_s,
            "stats": s.stats, "changed": s.changed, "changes": s.changes, "tasks": s.task_rows,
        } for s in scenarios],
    }


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reruns", type=int, default=3, help="no-op reruns (and ping runs) per deployment (default 3)")
    p.add_argument("--skip-demo", action="store_true", help="leave out the demo")
    p.add_argument("--skip-multi", action="store_true", help="leave out the multi-node inventory")
    p.add_argument("--tasks", action="store_true",
                   help="also list the tasks of the last no-op rerun per host, with status and seconds")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument("--keep", action="store_true",
                   help="leave the nodes running and keep what was made (.demo/, the multi-node folder)")
    args = p.parse_args(argv)
    if args.reruns < 1:
        p.error("--reruns must be at least 1")
    if args.skip_demo and args.skip_multi:
        p.error("--skip-demo and --skip-multi leave nothing to measure")
    return args


def check_tree() -> None:
    if not (VENV_BIN / "ansible-playbook").exists():
        raise SystemExit(f"{VENV_BIN}/ansible-playbook is missing: run `make venv collection` in {REPO} first")
    if not COLLECTION_LINK.exists() or COLLECTION_LINK.resolve() != REPO:
        raise SystemExit(f"{COLLECTION_LINK} does not lead to {REPO}: run `make venv collection` in {REPO} first")


def interrupt(_signum, _frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    check_tree()
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    started = time.perf_counter()
    busy = busy_percent(2.0)
    work = Path(tempfile.mkdtemp(prefix="rms-noop-"))
    (work / "callback_plugins").mkdir()
    (work / "callback_plugins" / "noop_tasks.py").write_text(RECORDER)
    env = ansible_env(work)
    scenarios: list[Scenario] = []
    failure = None
    try:
        if not args.skip_demo:
            scenarios.append(demo_scenario(work))
        if not args.skip_multi:
            scenarios.append(multi_scenario(work))
        for scenario in scenarios:
            measure(scenario, args, env)
    except KeyboardInterrupt:
        failure = "interrupted"
    except PlaybookFailed as err:
        failure = str(err)
    finally:
        if args.keep:
            stop_commands = [f"{node.supervisorctl} -c {node.conf} shutdown"
                             for s in scenarios for node in (demo_nodes() if s.name == "demo" else s.nodes)]
            kept = [str(work)] + [str(folder) for s in scenarios for folder in s.made if folder != s.work]
            print(f"kept: {', '.join(kept)} (logs, playbooks, inventory, nodes); the nodes run on. Stop them with:\n  "
                  + "\n  ".join(stop_commands), file=sys.stderr)
        else:
            problems = [problem for s in scenarios for problem in stop_nodes(s)]
            for s in scenarios:
                for folder in s.made:
                    shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            for problem in problems:
                print(f"could not stop {problem}", file=sys.stderr)
    if failure is not None:
        print(f"{failure}\neverything started was stopped" if not args.keep else failure, file=sys.stderr)
        return 130 if failure == "interrupted" else 1
    print(report(scenarios, args, busy))
    print(f"\nthe whole script took {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(scenarios, busy), indent=2) + "\n")
    return 1 if any(any(s.changed) for s in scenarios) else 0


if __name__ == "__main__":
    sys.exit(main())
