#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The Debian 13 tier: run the demo and the snapshot/export, checkpoint and exactness
# tests on Debian 13 (trixie: libvirt 11.x, QEMU 10.x, Python 3.13) from this
# Debian 12 host, as root. Extra arguments go to pytest.
#
# - Builds once, then reuses, a debootstrap root of trixie (tests/trixie/build-root.sh,
#   cached in $FLEECE_TRIXIE_CACHE, default /var/cache/libvirt-fleece/trixie-root).
# - Starts virtlogd and libvirtd in a PRIVATE MOUNT NAMESPACE whose root is that dir
#   (unshare -m; /proc, /sys, /dev and the checkout, at /src, bound in; a fresh tmpfs
#   on /run; pivot_root). A plain chroot cannot run domains (libvirt's per-domain mount
#   namespace needs a real root mount). The daemon is the monolithic libvirtd, as on the
#   host: Debian 13's packages (libvirt 11.3.0-3) ship no modular daemons (no virtqemud
#   in libvirt-daemon-driver-qemu), and one daemon means one pidfile to stop.
#   Everything shares the host's network namespace, cgroups, /dev/kvm and CPU, but not
#   the host's libvirtd: it is a separate daemon with its own /run, /etc and /var.
# - Runs tests/trixie/inside.sh in there (nsenter): a venv /opt/fleece-venv inside the
#   root with the checkout installed editable, the test guest, `virsh-fleece demo`, pytest.
# - Always tears down what it started: every domain of ITS libvirtd, then the daemons
#   and every other process of the namespace, by the pids it recorded. The mounts live
#   only in that namespace and vanish with it; nothing is mounted on the host.
# - Exits with the tests' status.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${FLEECE_TRIXIE_CACHE:-/var/cache/libvirt-fleece}
ROOT=$CACHE/trixie-root
HOLDER_NAME=fleece-trixie-holder
PIDFILE=$CACHE/trixie-holder.pid
IN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "trixie: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (it runs its own libvirtd in a mount namespace)"
mkdir -p "$CACHE"

# One trixie run at a time on this machine (they would share the root's /var/lib/libvirt).
# (Children that may outlive this script get fd 9 closed: see in_ns and unshare below.)
exec 9>"$CACHE/trixie.lock"
if ! flock -n 9; then
    log "waiting for another tests/trixie/run.sh (lock $CACHE/trixie.lock)"
    flock -w 1800 9 || die "another tests/trixie/run.sh holds $CACHE/trixie.lock"
fi

# --- the namespace ---------------------------------------------------------------
is_holder() {  # PID: is it a namespace holder of ours (argv[0] fleece-trixie-holder)?
    [[ -n ${1:-} && -r /proc/$1/cmdline ]] &&
        [[ $(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) == "$HOLDER_NAME "* ]]
}
in_ns() {  # PID CMD...: run CMD inside the namespace held by PID, clean environment
    local h=$1
    shift
    # 9>&-: the lock's fd must not live on in the daemons (it would outlive this script)
    nsenter -t "$h" -m -r -w -- env -i PATH="$IN_PATH" HOME=/root LANG=C.UTF-8 \
        ${CI:+CI="$CI"} ${TERM:+TERM="$TERM"} "$@" 9>&-
}
ns_id() { stat -L -c %i "/proc/$1/ns/mnt" 2>/dev/null; }
stop_pids() {  # PIDS...: SIGTERM, wait up to 15 s, then SIGKILL
    local p alive n
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    for n in $(seq 1 75); do
        alive=()
        for p in "$@"; do [[ -d /proc/$p ]] && alive+=("$p"); done
        [[ ${#alive[@]} == 0 ]] && return 0
        sleep 0.2
    done
    log "SIGKILL ${alive[*]}"
    kill -KILL "${alive[@]}" 2>/dev/null || true
}

ns_pids() {  # MNT-NS-ID EXCLUDED-PIDS...: the processes in that mount namespace
    local mnt=$1 p
    shift
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ " $* " != *" $p "* && $(ns_id "$p") == "$mnt" ]] && echo "$p"
    done
    return 0
}
teardown_ns() {  # PID of a holder: stop everything that runs in its namespace
    local h=$1 d p f mnt t0=$SECONDS daemons=() pids=() qemu=()
    is_holder "$h" || return 0
    mnt=$(ns_id "$h")
    for f in libvirtd virtlogd; do
        p=$(in_ns "$h" cat "/run/$f.pid" 2>/dev/null || true)
        [[ $p =~ ^[0-9]+$ && -d /proc/$p ]] && daemons+=("$p")
    done
    # 1. the tests (anything in the namespace but the holder and the daemons), so that
    #    nothing makes new domains while we remove them
    mapfile -t pids < <(ns_pids "$mnt" "$h" "${daemons[@]}")
    [[ ${#pids[@]} == 0 ]] || { log "teardown: stopping ${pids[*]}"; stop_pids "${pids[@]}"; }
    # 2. every domain of this libvirtd is ours: destroy, and forget the persistent ones
    if in_ns "$h" timeout 20 virsh -c qemu:///system version >/dev/null 2>&1; then
        for d in $(in_ns "$h" timeout 30 virsh -c qemu:///system list --all --name 2>/dev/null); do
            log "teardown: removing domain $d"
            in_ns "$h" timeout 60 virsh -q -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
            in_ns "$h" timeout 60 virsh -q -c qemu:///system undefine "$d" \
                --snapshots-metadata --checkpoints-metadata --managed-save --nvram \
                >/dev/null 2>&1 || true
        done
    fi
    # 3. qemu processes (each in a mount namespace of its own) libvirt still knows of
    #    (driver.pid there is libvirtd's own: keep only pids whose program is qemu)
    for p in $(in_ns "$h" sh -c 'cat /run/libvirt/qemu/*.pid 2>/dev/null' || true); do
        [[ $p =~ ^[0-9]+$ && -d /proc/$p && $(readlink "/proc/$p/exe" 2>/dev/null) == */qemu-system-* ]] &&
            qemu+=("$p")
    done
    [[ ${#qemu[@]} == 0 ]] || { log "teardown: stopping qemu ${qemu[*]}"; stop_pids "${qemu[@]}"; }
    # 4. the daemons, 5. anything left (nbdkit, qemu-nbd, ...), 6. the holder: the
    #    namespace and its mounts go with the last of them
    [[ ${#daemons[@]} == 0 ]] || stop_pids "${daemons[@]}"
    mapfile -t pids < <(ns_pids "$mnt" "$h")
    [[ ${#pids[@]} == 0 ]] || { log "teardown: stopping ${pids[*]}"; stop_pids "${pids[@]}"; }
    stop_pids "$h"
    log "teardown done ($((SECONDS - t0)) s)"
}

# A namespace left by a run that was killed (SIGKILL, host reboot excepted).
if [[ -f $PIDFILE ]]; then
    old=$(cat "$PIDFILE")
    if is_holder "$old"; then
        log "tearing down the namespace of an earlier run (holder $old)"
        teardown_ns "$old"
    fi
    rm -f "$PIDFILE"
fi

# --- the root --------------------------------------------------------------------
t_start=$SECONDS
"$top/tests/trixie/build-root.sh" "$ROOT"
t_built=$SECONDS

# /dev/kvm is the host's (group kvm, gid from the host's /etc/group): qemu runs as the
# root's libvirt-qemu, which must be in a group of that gid inside the root.
if [[ -c /dev/kvm ]]; then
    kgid=$(stat -c %g /dev/kvm)
    if [[ $kgid != 0 ]]; then
        kgroup=$(chroot "$ROOT" getent group "$kgid" | cut -d: -f1 || true)
        if [[ -z $kgroup ]]; then
            kgroup=kvm-host
            chroot "$ROOT" groupadd -r -g "$kgid" "$kgroup"
        fi
        if ! chroot "$ROOT" id -nG libvirt-qemu | tr ' ' '\n' | grep -qx "$kgroup"; then
            chroot "$ROOT" usermod -a -G "$kgroup" libvirt-qemu
        fi
    fi
fi
# Leftovers of killed runs in the cached root: test domains' directories, fleece files.
rm -rf --one-file-system "$ROOT"/var/lib/libvirt/images/fleecetest-* \
    "$ROOT"/var/lib/libvirt/images/fleece-demo-* "$ROOT"/tmp/* 2>/dev/null || true

# shellcheck disable=SC2016
ns_init='
set -euo pipefail
R=$1 SRC=$2 NAME=$3
mount --bind "$R" "$R"                     # pivot_root wants a mount point
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=0755 tmpfs "$R/run"
mkdir -p "$R/src"
mount --bind "$SRC" "$R/src"
cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true
mkdir -p /run/lock /run/fleece-trixie
touch /run/fleece-trixie/ready
exec -a "$NAME" sleep infinity
'
unshare -m --propagation private -- /bin/bash -c "$ns_init" trixie-ns "$ROOT" "$top" \
    "$HOLDER_NAME" </dev/null >"$CACHE/trixie-ns.log" 2>&1 9>&- &
holder=$!
echo "$holder" >"$PIDFILE"
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    teardown_ns "$holder"
    rm -f "$PIDFILE"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for _ in $(seq 1 100); do
    is_holder "$holder" && in_ns "$holder" test -e /run/fleece-trixie/ready 2>/dev/null && break
    [[ -d /proc/$holder ]] || { cat "$CACHE/trixie-ns.log" >&2; die "the namespace did not come up"; }
    sleep 0.1
done
in_ns "$holder" test -e /run/fleece-trixie/ready || die "the namespace did not come up"

# --- the daemons -------------------------------------------------------------------
in_ns "$holder" virtlogd -d
in_ns "$holder" libvirtd -d
for _ in $(seq 1 150); do
    in_ns "$holder" virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
done
versions=$(in_ns "$holder" virsh -c qemu:///system version) ||
    die "libvirtd inside the trixie root does not answer"
lv=$(sed -n 's/^Using library: libvirt //p' <<<"$versions")
qv=$(sed -n 's/^Running hypervisor: QEMU //p' <<<"$versions")
dv=$(in_ns "$holder" cat /etc/debian_version)
pv=$(in_ns "$holder" python3 -c 'import platform; print(platform.python_version())')
# Domains of a run that was killed before its teardown (persistent ones survive in the root)
for d in $(in_ns "$holder" virsh -c qemu:///system list --all --name); do
    in_ns "$holder" virsh -q -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
    in_ns "$holder" virsh -q -c qemu:///system undefine "$d" --snapshots-metadata \
        --checkpoints-metadata --managed-save --nvram >/dev/null 2>&1 || true
done

echo "=== Debian 13 tier: Debian $dv (trixie), libvirt $lv, QEMU $qv, Python $pv;" \
    "root $ROOT, libvirtd pid $(in_ns "$holder" cat /run/libvirtd.pid)" \
    "(ready in $((SECONDS - t_start)) s, root build $((t_built - t_start)) s) ==="

# In the background and waited for, so that SIGTERM/SIGINT reach the trap (teardown) at
# once instead of after the tests: the teardown stops the tests too.
rc=0
# (exec 9>&- in the subshell: a subshell that outlived a SIGKILLed run.sh must not hold the lock)
(exec 9>&-; in_ns "$holder" /bin/bash /src/tests/trixie/inside.sh "$@" </dev/null) &
wait $! || rc=$?
log "Debian 13 tier finished in $((SECONDS - t_start)) s: exit $rc"
exit "$rc"
