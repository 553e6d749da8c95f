#!/usr/bin/env bash
# A newcomer's first minutes, as the README has them, on a fresh Debian 12 machine with systemd as PID 1:
# `git clone`, `make demo` (twice: the second changes nothing), `make clean`, as the login user (not root,
# with sudo) and then as root. After each `make clean`: no process, no listening port, no systemd unit and no
# file outside the checkout is left, and the checkout holds nothing git does not know.
#
#   newcomer.sh BUNDLE        (BUNDLE: a git bundle of the tree under test, with its branch "main")
#
# Runs on the machine under test as the login user; becomes root with sudo for the second round. Prints
# what it finds and ends with "newcomer: OK" (exit 0), or with what is wrong (exit 1). Its own logs go to
# /var/tmp/newcomer/, which the checks leave out.
set -uo pipefail

bundle=$1
logs=/var/tmp/newcomer
mkdir -p "$logs"
problems=()

# Everything a demo run may legitimately touch outside the checkout is the machine's own bookkeeping: logs,
# runtime state, sudo's lecture file; and this script's logs.
leftovers() {
    local marker=$1 checkout=$2
    sudo find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /var/log \
        -o -path /var/lib/systemd -o -path /var/lib/sudo -o -path /var/cache/private -o -path "$logs" \
        -o -path "$checkout" \) -prune -o -newer "$marker" ! -type d -print
}

round() {
    local who=$1 home
    local -a as=()
    if [[ $who == root ]]; then as=(sudo -H); home=/root; else home=$HOME; fi
    local checkout=$home/rmsops.rms marker
    marker=$(mktemp "$logs/marker.XXXXXX")

    "${as[@]}" git clone --quiet --branch main "$bundle" "$checkout" || { problems+=("$who: git clone failed"); return; }
    if ! "${as[@]}" make -C "$checkout" demo >"$logs/$who-demo-1.log" 2>&1; then
        problems+=("$who: make demo failed: $(tail -n 30 "$logs/$who-demo-1.log")"); return
    fi
    grep -q 'round trip OK' "$logs/$who-demo-1.log" || problems+=("$who: no 'round trip OK' in make demo's output")
    "${as[@]}" make -C "$checkout" demo >"$logs/$who-demo-2.log" 2>&1 || problems+=("$who: the second make demo failed")
    grep -Eq 'rms-demo +: ok=[0-9]+ +changed=0 ' "$logs/$who-demo-2.log" \
        || problems+=("$who: the second make demo changed something: $(grep -E 'rms-demo +:' "$logs/$who-demo-2.log")")
    echo "$who: $(grep -E 'rms-demo +:' "$logs/$who-demo-1.log" | tr -s ' ') / second run: $(grep -E 'rms-demo +:' "$logs/$who-demo-2.log" | tr -s ' ')"
    "${as[@]}" make -C "$checkout" clean >"$logs/$who-clean.log" 2>&1 || problems+=("$who: make clean failed")

    local found
    found=$(pgrep -a -f 'supervisord|rmsd serve' | grep -v pgrep)
    [[ -z $found ]] || problems+=("$who: processes left: $found")
    found=$(ss -Hltn 'sport = :18080')
    [[ -z $found ]] || problems+=("$who: still listening on port 18080: $found")
    found=$(systemctl list-unit-files --no-legend 'rmsd*'; systemctl list-units --all --no-legend 'rmsd*')
    [[ -z $found ]] || problems+=("$who: systemd units left: $found")
    found=$("${as[@]}" git -C "$checkout" status --porcelain --ignored)
    [[ -z $found ]] || problems+=("$who: files left in the checkout: $(head -n 20 <<<"$found")")
    found=$(leftovers "$marker" "$checkout")
    [[ -z $found ]] || problems+=("$who: files left outside the checkout: $(head -n 20 <<<"$found")")
    "${as[@]}" rm -rf "$checkout"
}

round "$(id -un)"
round root

if ((${#problems[@]})); then
    printf 'newcomer: %s\n' "${problems[@]}"
    exit 1
fi
echo "newcomer: OK"
