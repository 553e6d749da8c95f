#!/usr/bin/env bash
# Check that the Debian packages named as arguments are installed, by what the tests use of each
# (a command or a file). When any is missing, print the apt-get command that installs them and exit 1,
# before a test fails (or skips) for want of one. CHECK_PACKAGES_ROOT prefixes the files looked at.
set -euo pipefail

root=${CHECK_PACKAGES_ROOT:-}

has_command() { command -v "$1" >/dev/null 2>&1; }
has_file() { compgen -G "$root$1" >/dev/null; }

installed() {
    case $1 in
        # scripts/pgserver.py: initdb and pg_ctl from PATH, PG_BINDIR or Debian's versioned folder.
        postgresql) has_command initdb || has_file '/usr/lib/postgresql/*/bin/initdb' ;;
        haproxy) has_file /usr/sbin/haproxy ;;
        softhsm2) has_file /usr/lib/softhsm/libsofthsm2.so && has_command softhsm2-util ;;
        openssh-client) has_command ssh && has_command ssh-keygen ;;
        podman | runc | mmdebstrap | openssl | git | chromium) has_command "$1" ;;
        *) echo "check-packages.sh: no check for package $1" >&2; exit 2 ;;
    esac
}

missing=()
for package in "$@"; do
    installed "$package" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$EUID" -eq 0 ] || sudo="sudo "
echo "Missing Debian packages: ${missing[*]}. Install them, then run make again:"
for package in "${missing[@]}"; do
    if [ "$package" = postgresql ]; then
        # As .ci/run does: the tests start their own servers, the package need not make one.
        echo "  ${sudo}mkdir -p /etc/postgresql-common"
        echo "  echo 'create_main_cluster = false' | ${sudo}tee /etc/postgresql-common/createcluster.conf"
    fi
done
echo "  ${sudo}apt-get install --no-install-recommends ${missing[*]}"
exit 1
