#!/usr/bin/env bash
# Run molecule scenarios in lanes side by side: each argument is a lane, its scenarios separated by
# commas and run one after the other; a lane stops at its first failure. Each scenario's output goes
# to MOLECULE_LOGS/<scenario>.log and is printed whole when it ends. The last lines printed are a
# recap of every scenario and, for a failed one, the lines that say why: a long run's output is
# often read from its end only.
set -euo pipefail

logs=${MOLECULE_LOGS:?MOLECULE_LOGS names the folder for the scenario logs}
mkdir -p "$logs"
rm -f "$logs"/*.result

run_lane() {
    local scenario start result
    for scenario in ${1//,/ }; do
        start=$(date +%s)
        if molecule test -s "$scenario" >"$logs/$scenario.log" 2>&1; then result=passed; else result=failed; fi
        echo "$result in $(($(date +%s) - start))s" >"$logs/$scenario.result"
        flock "$logs/.print" sh -c 'echo "--- molecule test -s $1"; cat "$2"; echo "--- molecule test -s $1 $3"' \
            _ "$scenario" "$logs/$scenario.log" "$(cat "$logs/$scenario.result")"
        [ "$result" = passed ] || return 1
    done
}

pids=()
for lane in "$@"; do
    run_lane "$lane" &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done

strip_colours() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

failed_scenarios=()
for lane in "$@"; do
    for scenario in ${lane//,/ }; do
        grep -q '^failed' "$logs/$scenario.result" 2>/dev/null && failed_scenarios+=("$scenario")
    done
done
for scenario in "${failed_scenarios[@]}"; do
    echo "=== why $scenario failed (the full output is above and in $logs/$scenario.log)"
    # The first of Ansible's failures and molecule's errors, with the lines that lead up to it (where a
    # verify task shows what it is about to check).
    strip_colours "$logs/$scenario.log" \
        | grep -E -B 30 -A 25 'fatal:|FAILED!|failed=[1-9]|ERROR|Traceback' | head -n 150 || true
done

# Last, because a long run's output is often read from its end only: every scenario's result, then each
# failed scenario's first failing task and its message.
echo "=== molecule recap"
for lane in "$@"; do
    for scenario in ${lane//,/ }; do
        echo "$scenario: $(cat "$logs/$scenario.result" 2>/dev/null || echo 'not run (an earlier scenario of its lane failed)')"
    done
done
for scenario in "${failed_scenarios[@]}"; do
    echo "=== $scenario: its first failure"
    # Molecule frames Ansible's output ("  │ TASK [...]") and spreads a failure's message over the lines after it.
    strip_colours "$logs/$scenario.log" | awk '
        found && shown < 20 { print substr($0, 1, 500); shown++; next }
        found { exit }
        /TASK \[/ { task = $0 }
        /fatal:|FAILED!|\[ERROR\]|^ERROR|Traceback/ { print task; print substr($0, 1, 500); found = 1 }
        END { if (!found) print "(no failing task found: see the log)" }' || true
done
exit "$failed"
