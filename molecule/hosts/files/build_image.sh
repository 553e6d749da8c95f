#!/usr/bin/env bash
# Builds the base image of the `hosts` scenario once and prints its tag on stdout (progress goes
# to stderr): a Debian 12 machine with systemd as PID 1, sshd, sudo, Python, HAProxy, PostgreSQL,
# Patroni, etcd and pgBackRest installed but not started, and git and make (a newcomer clones the repository and runs
# `make demo` on one). The tag is localhost/rmsops-hosts:<first 16 hex digits of
# the sha256 of this file>, so any change to the package list or the hooks below builds a new
# image, and an existing tag is reused at once. Needs root, mmdebstrap and podman.
#
# The package index comes from this machine's own apt sources; the image itself keeps none (a
# managed host installs nothing from a mirror), and its pip points at a dead index.
#
# mmdebstrap runs this same file as its hooks: `build_image.sh --setup-hook|--customize-hook ROOT`.
set -euo pipefail

readonly packages=(
    systemd systemd-sysv dbus openssh-server sudo
    python3 python3-venv python3-apt
    git make
    procps iproute2 openssl ca-certificates
    haproxy postgresql
    patroni etcd-server etcd-client pgbackrest
)
readonly login_user=rmsadmin

log() { printf 'build_image: %s\n' "$*" >&2; }

# Before any package is unpacked: a Debian postgresql install creates a "main" cluster unless
# told not to; the scenario creates its own clusters.
setup_hook() {
    local root=$1
    mkdir -p "$root/etc/postgresql-common"
    printf 'create_main_cluster = false\n' >"$root/etc/postgresql-common/createcluster.conf"
}

customize_hook() {
    local root=$1

    # No package index on a managed host; the dpkg state stays, so "present" on an installed
    # package still holds.
    rm -f "$root/etc/apt/sources.list"
    find "$root/etc/apt/sources.list.d" -mindepth 1 -delete
    find "$root/var/lib/apt/lists" -type f -delete
    find "$root/var/cache/apt" -type f -name '*.bin' -delete

    # mmdebstrap leaves the build machine's resolv.conf and hostname behind. The containers run
    # with --dns=none and find the scenario's names in /etc/hosts; any other lookup goes to a
    # loopback address where nothing answers.
    printf '# rmsops molecule "hosts": no DNS server; names resolve through /etc/hosts.\nnameserver 127.0.0.1\noptions attempts:1 timeout:1\n' \
        >"$root/etc/resolv.conf"
    chmod 0644 "$root/etc/resolv.conf"
    printf 'localhost\n' >"$root/etc/hostname"

    # Any use of a package index by pip fails at once (nothing listens on that loopback port).
    printf '[global]\nindex-url = http://127.0.6.254:9/simple/\n' >"$root/etc/pip.conf"
    chmod 0644 "$root/etc/pip.conf"

    # The roles and the tests start what they need (every container shares the host's network:
    # Debian's etcd would listen on 127.0.0.1:2379 in each of them).
    local unit
    for unit in haproxy postgresql etcd patroni; do
        chroot "$root" systemctl disable "$unit.service"
        if compgen -G "$root/etc/systemd/system/*.wants/$unit.service" >/dev/null; then
            log "$unit is still enabled"; return 1
        fi
    done
    if compgen -G "$root/etc/postgresql/*/main" >/dev/null; then
        log "a PostgreSQL main cluster was created despite createcluster.conf"; return 1
    fi
    # ucf kept the setup hook's one-line createcluster.conf; Debian's defaults (ssl, cluster_name,
    # log_line_prefix, conf.d) come back, with no main cluster.
    sed -E 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
        "$root/usr/share/postgresql-common/createcluster.conf" \
        >"$root/etc/postgresql-common/createcluster.conf"
    grep -qx 'create_main_cluster = false' "$root/etc/postgresql-common/createcluster.conf"

    # sshd: keys only, port 2222, no root login. ListenAddress lives in listen.conf, written into
    # each container before its first start; without it ssh.service does not start at all, so no
    # sshd ever listens on a wildcard address.
    install -d -m 0755 "$root/etc/ssh/sshd_config.d" "$root/etc/ssh/authorized_keys"
    cat >"$root/etc/ssh/sshd_config.d/rmsops.conf" <<'CONF'
# rmsops molecule "hosts" image; the per-container ListenAddress is in listen.conf.
Port 2222
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AuthorizedKeysFile /etc/ssh/authorized_keys/%u
CONF
    chmod 0644 "$root/etc/ssh/sshd_config.d/rmsops.conf"

    # Every container makes its own host keys at its first boot: the empty ExecStartPre= resets
    # Debian's list so that ssh-keygen -A runs before its `sshd -t`.
    rm -f "$root"/etc/ssh/ssh_host_*
    install -d -m 0755 "$root/etc/systemd/system/ssh.service.d"
    cat >"$root/etc/systemd/system/ssh.service.d/rmsops.conf" <<'CONF'
[Unit]
ConditionPathExists=/etc/ssh/sshd_config.d/listen.conf

[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
CONF
    chmod 0644 "$root/etc/systemd/system/ssh.service.d/rmsops.conf"
    if ! grep -qx 'ExecStartPre=/usr/sbin/sshd -t' "$root/lib/systemd/system/ssh.service"; then
        log "Debian's ssh.service no longer runs 'sshd -t' first; review the drop-in"; return 1
    fi

    # The login user: key only (password "*": no password, but not a locked account), sudo
    # without a password.
    chroot "$root" useradd --create-home --home-dir "/home/$login_user" --shell /bin/bash \
        --user-group "$login_user"
    chroot "$root" usermod --password '*' "$login_user"
    printf '%s ALL=(ALL) NOPASSWD: ALL\n' "$login_user" >"$root/etc/sudoers.d/$login_user"
    chmod 0440 "$root/etc/sudoers.d/$login_user"
    chroot "$root" visudo --check --quiet --file "/etc/sudoers.d/$login_user"
}

case "${1:-}" in
    --setup-hook) setup_hook "$2"; exit 0 ;;
    --customize-hook) customize_hook "$2"; exit 0 ;;
    "") ;;
    *) echo "usage: $0" >&2; exit 2 ;;
esac

self=$(readlink -f "${BASH_SOURCE[0]}")
hash=$(sha256sum "$self" | cut -c1-16)
tag="localhost/rmsops-hosts:$hash"

if podman image exists "$tag"; then
    log "reusing $tag"
    printf '%s\n' "$tag"
    exit 0
fi

# Two scenario runs at once build the image once.
exec 9>"/tmp/rmsops-hosts-image-$hash.lock"
flock 9
if podman image exists "$tag"; then
    log "reusing $tag"
    printf '%s\n' "$tag"
    exit 0
fi

sources=
for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [[ -s $candidate ]]; then sources=$candidate; break; fi
done

workdir=$(mktemp -d /var/tmp/rmsops-hosts-image.XXXXXX)
trap 'rm -rf "$workdir"' EXIT

log "building $tag (sources: ${sources:-mmdebstrap default})"
package_list=$(IFS=,; printf '%s' "${packages[*]}")
printf -v hook_cmd 'bash %q' "$self"
mmdebstrap --variant=apt --include="$package_list" \
    --setup-hook="$hook_cmd --setup-hook \"\$1\"" \
    --customize-hook="$hook_cmd --customize-hook \"\$1\"" \
    bookworm "$workdir/rootfs.tar" ${sources:+"$sources"} >&2

log "importing $tag"
podman import --change 'CMD ["/sbin/init"]' "$workdir/rootfs.tar" "$tag" >/dev/null
rm -f "$workdir/rootfs.tar"
log "built $tag"
printf '%s\n' "$tag"
