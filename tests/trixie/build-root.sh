#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Build (once) the Debian 13 "trixie" root that tests/trixie/run.sh runs libvirtd in.
#
# Usage: build-root.sh ROOT     (as root; the caller holds the lock, see run.sh)
#
# Does nothing when ROOT/.fleece-trixie-stamp holds STAMP below. Otherwise builds into
# ROOT.build.<pid> (debootstrap --variant=minbase, then apt-get inside with a policy-rc.d
# that exits 101) and renames it to ROOT only when complete, so a killed build is never
# reused. Every mount it needs lives in a private mount namespace (unshare -m) and goes
# away with it: nothing is mounted on the host.
set -euo pipefail

ROOT=${1:?usage: build-root.sh ROOT}
MIRROR=${FLEECE_TRIXIE_MIRROR:-http://deb.debian.org/debian}

# What the tests need, as in tests/host-setup.sh (keep both lists in step).
packages=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
          qemu-system-x86 qemu-utils libnbd-bin python3-libnbd nbdkit
          python3-libvirt python3-lxml python3-yaml python3-venv python3-pytest
          python3-setuptools python3-wheel attr busybox-static cpio xz-utils zstd
          e2fsprogs virtnbdbackup)

# Bump the number when the recipe changes: the next run rebuilds the root.
STAMP="fleece-trixie-root 1: ${packages[*]}"

log() { echo "trixie-root: $*" >&2; }

if [[ -f $ROOT/.fleece-trixie-stamp && $(cat "$ROOT/.fleece-trixie-stamp") == "$STAMP" ]]; then
    exit 0
fi
[[ $(id -u) == 0 ]] || { log "run as root"; exit 1; }

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap on the host"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap \
        >/dev/null || { apt-get update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap \
        >/dev/null; }
fi

parent=$(dirname "$ROOT")
mkdir -p "$parent"
# Partial builds of earlier, killed runs (the caller's lock means none is in progress).
rm -rf --one-file-system "$ROOT".build.* "$ROOT".old.*
tmp=$ROOT.build.$$
trap 'rm -rf --one-file-system "$tmp"' EXIT
t0=$SECONDS
log "building $ROOT (debootstrap --variant=minbase trixie from $MIRROR)"
debootstrap --variant=minbase trixie "$tmp" "$MIRROR" >"$parent/debootstrap.log" 2>&1 || {
    tail -n 20 "$parent/debootstrap.log" >&2
    log "debootstrap failed (log: $parent/debootstrap.log)"
    exit 1
}
log "debootstrap done ($((SECONDS - t0)) s); installing ${#packages[@]} packages"

# No service may start inside while we install.
printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
chmod 0755 "$tmp/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
echo "deb $MIRROR trixie main" >"$tmp/etc/apt/sources.list"

# apt-get in the root, in a private mount namespace (proc and dev only while it runs).
unshare -m --propagation private -- /bin/bash -euo pipefail -c '
    R=$1; shift
    mount -t proc proc "$R/proc"
    # a /dev of its own: package scripts must not chgrp the host'"'"'s /dev/kvm (qemu'"'"'s
    # postinst gives it the root'"'"'s kvm gid, which breaks the host'"'"'s libvirt-qemu)
    mount -t tmpfs -o mode=0755 dev "$R/dev"
    for n in null zero full random urandom tty; do
        touch "$R/dev/$n"
        mount --bind "/dev/$n" "$R/dev/$n"
    done
    mkdir -p "$R/dev/pts" "$R/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
    ln -s pts/ptmx "$R/dev/ptmx"
    exec chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive /bin/sh -ec "
        apt-get update -q
        apt-get install -y -q --no-install-recommends $*
        apt-get clean"
' trixie-build "$tmp" "${packages[@]}" >"$parent/apt.log" 2>&1 || {
    tail -n 30 "$parent/apt.log" >&2
    log "apt-get inside the root failed (log: $parent/apt.log)"
    exit 1
}

# Nothing of libvirt's may touch the host's network namespace (shared with the root):
# no autostarted default network.
rm -f "$tmp"/etc/libvirt/qemu/networks/autostart/*.xml

echo "$STAMP" >"$tmp/.fleece-trixie-stamp"
if [[ -e $ROOT ]]; then
    mv "$ROOT" "$ROOT.old.$$"
fi
mv "$tmp" "$ROOT"
trap - EXIT
rm -rf --one-file-system "$ROOT.old.$$"
log "built $ROOT in $((SECONDS - t0)) s"
