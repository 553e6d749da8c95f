"""Check mode never lies: inject each kind of drift, then compare what --check reports with what a real run changes.

The cases file (YAML) is a list of rounds. A round is one drift, {kind, host, inject: [Ansible tasks]}, or
{together: [drift, ...]} for drifts on different hosts that a single run corrects. For each round, in order:
  1. run each drift's tasks on its host;
  2. run the playbook with --check --diff;
  3. run it for real;
  4. run it again.
The collection's drift callback (rmsops.rms.drift) writes each run's changed tasks. A drift holds when the
check run lists exactly the tasks the real run changes on its host (task name and how often, handlers and
restarts included; a task delegated elsewhere counts for the host it runs for), no other host of the round
changes, and the rerun changes nothing. Prints one row per drift and the changed tasks under it; exits 1 if a
row does not hold.

usage: check_fidelity.py --inventory INV [--inventory INV2] --playbook PLAYBOOK --cases CASES --workdir DIR
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def run_playbook(args, playbook: Path, report: Path, *extra: str) -> tuple[int, dict, str]:
    enabled = [c for c in os.environ.get("ANSIBLE_CALLBACKS_ENABLED", "").split(",") if c]
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", RMSOPS_DRIFT_PATH=str(report),
               ANSIBLE_CALLBACKS_ENABLED=",".join([*enabled, "rmsops.rms.drift"]))
    report.unlink(missing_ok=True)
    cmd = [str(ANSIBLE_PLAYBOOK), *(f"--inventory={inv}" for inv in args.inventory), str(playbook), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    drift = json.loads(report.read_text()) if report.exists() else {}
    return proc.returncode, drift, proc.stdout + proc.stderr


def changed_tasks(drift: dict) -> collections.Counter:
    return collections.Counter(f"{c['host']}: {c['task']}" for c in drift.get("changes", []))


def only(tasks: collections.Counter, prefix: str) -> collections.Counter:
    return collections.Counter({name: n for name, n in tasks.items() if name.startswith(prefix)})


def show(tasks: collections.Counter) -> list[str]:
    return [f"{name} (x{count})" if count > 1 else name for name, count in sorted(tasks.items())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inventory", action="append", required=True)
    parser.add_argument("--playbook", required=True, type=Path)
    parser.add_argument("--cases", required=True, type=Path)
    parser.add_argument("--workdir", required=True, type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cases = yaml.safe_load(args.cases.read_text())

    rows, details, holds = [], [], True
    for number, case in enumerate(cases, 1):
        drifts = case.get("together", [case])
        inject = args.workdir / f"inject-{number}.yml"
        inject.write_text(json.dumps([
            {"name": f"Drift: {d['kind']}", "hosts": d["host"], "gather_facts": False, "tasks": d["inject"]}
            for d in drifts
        ]))
        rc, _drift, output = run_playbook(args, inject, args.workdir / f"inject-{number}.json")
        if rc != 0:
            print(f"could not inject round {number}:\n{output}", file=sys.stderr)
            return 1
        runs = {}
        for name, flags in (("check", ["--check", "--diff"]), ("real", ["--diff"]), ("rerun", [])):
            rc, drift, output = run_playbook(args, args.playbook, args.workdir / f"{number}-{name}.json", *flags)
            if rc != 0 or drift.get("failures"):
                print(f"round {number}: the {name} run failed (rc={rc}):\n{output[-6000:]}", file=sys.stderr)
                return 1
            runs[name] = (changed_tasks(drift), drift)
        check, real, rerun = (runs[name][0] for name in ("check", "real", "rerun"))
        drifted = {d["host"] for d in drifts}
        for d in drifts:
            on_host = f"{d['host']}: "
            check_here, real_here = (only(tasks, on_host) for tasks in (check, real))
            holds_here = check_here == real_here and bool(real_here) and not rerun
            holds = holds and holds_here
            rows.append((d["kind"], d["host"], sum(check_here.values()), sum(real_here.values()),
                         sum(rerun.values()), "yes" if holds_here else "NO"))
            details.append((d["kind"], real_here, check_here, rerun, runs["check"][1]))
        elsewhere = [t for t in (check + real) if t.split(": ", 1)[0] not in drifted]
        if elsewhere:
            holds = False
            rows.append((f"(round {number}: hosts without drift)", "-", 0, 0, 0, "NO"))
            details.append((f"round {number}: hosts without drift changed", collections.Counter(elsewhere),
                            collections.Counter(), collections.Counter(), {}))

    widths = [max(len(str(row[i])) for row in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells):
        return " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True))

    print(line(HEADER))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
    for kind, real, check, rerun, check_drift in details:
        print(f"{kind}:")
        for task in show(real):
            print(f"    changed: {task}")
        reasons = {f"{c['host']}: {c['task']}": c.get("reason") for c in check_drift.get("changes", [])}
        for task, reason in sorted(reasons.items()):
            if reason and task in check:
                print(f"    check mode says for '{task}': {reason}")
        if check != real:
            print(f"    only in check: {show(check - real)}; only in the real run: {show(real - check)}")
        if not real and check_drift:
            print("    the drift changed nothing: the case does not test what it names")
        if rerun:
            print(f"    the rerun changed: {show(rerun)}")
    return 0 if holds else 1


HEADER = ("drift kind", "host", "check changed", "real changed", "rerun changed", "match")

if __name__ == "__main__":
    sys.exit(main())
