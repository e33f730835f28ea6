#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Run the whole test suite against the real libvirtd (as root): sets up the
# host, checks the code (flake8 over libvirt_fleece/, tests/ and bench/, mypy over
# libvirt_fleece/; setup.cfg configures both; any finding fails the run before a test
# starts), then runs the parallel-safe tests and, alone afterwards, the serial
# tier (tests that install hooks or restart libvirtd), then the Debian 13 tier
# (tests/trixie/run.sh: demo, snapshot/export, checkpoint and exactness tests in a
# debootstrap root of trixie with its own libvirtd). Extra arguments go to pytest.
# FLEECE_SKIP_TRIXIE=1 skips the Debian 13 tier locally; under CI (CI set, as conftest.py
# reads it) it always runs.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/tests/host-setup.sh" --lint
cd "$top"
echo "run.sh: flake8 and mypy" >&2
.venv/bin/python -m flake8 libvirt_fleece tests bench
.venv/bin/python -m mypy libvirt_fleece
"$top/tests/guest/build-guest.sh" >/dev/null
export LIBVIRT_FLEECE_REQUIRE_LIBVIRT=1
rc=0
.venv/bin/python -m pytest -m "not serial" "$@" || rc=$?
if [ "$rc" = 0 ]; then
    .venv/bin/python -m pytest -m serial "$@" || rc=$?
    # exit 5: no serial tests selected
    [ "$rc" != 5 ] || rc=0
fi
if [ "${FLEECE_SKIP_TRIXIE:-0}" = 1 ] && [ -z "${CI:-}" ]; then
    echo "run.sh: Debian 13 tier skipped (FLEECE_SKIP_TRIXIE=1)" >&2
    exit "$rc"
fi
# The Debian 13 tier runs even when a Debian 12 tier failed (a separate libvirt and
# QEMU: its result is news either way); the first failure gives the exit status.
trc=0
"$top/tests/trixie/run.sh" "$@" || trc=$?
[ "$rc" != 0 ] || rc=$trc
exit "$rc"
