#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Make this Debian 12 host ready for libvirt-fleece: Debian packages, KVM access,
# running virtlogd/libvirtd, and a venv (.venv) with the package installed.
# With --lint also the checkers tests/run.sh runs first (pinned below, from PyPI).
# Idempotent; run as root. Used by tests/demo.sh, tests/run.sh and .ci/run.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
lint=0
[ "${1:-}" != --lint ] || lint=1

# The checkers of tests/run.sh (configured in setup.cfg). A new version may find new
# things: change these pins on purpose, with the fixes.
lint_tools=(flake8==7.5.0 mypy==2.4.1 lxml-stubs==0.5.1 types-PyYAML==6.0.12.20261122)

packages=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
          qemu-system-x86 qemu-utils libnbd-bin python3-libnbd nbdkit
          python3-libvirt python3-lxml python3-yaml python3-venv python3-pytest
          python3-setuptools python3-wheel attr busybox-static cpio xz-utils zstd
          e2fsprogs virtnbdbackup)

if [ "$(id -u)" != 0 ]; then
    echo "host-setup: run as root (it installs packages and starts libvirtd)" >&2
    exit 1
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "host-setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# KVM for the libvirt-qemu user (group kvm); without it domains use TCG.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 660 /dev/kvm || true
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive /run/virtlogd.pid || virtlogd -d
alive /run/libvirtd.pid || libvirtd -d
for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
done
virsh -c qemu:///system version >/dev/null

if [ ! -x "$top/.venv/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$top/.venv"
fi
"$top/.venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$top" \
    >/dev/null
if [ "$lint" = 1 ]; then
    "$top/.venv/bin/python" -m pip install -q "${lint_tools[@]}" >/dev/null
fi
