#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Run the whole test suite against the real libvirtd (as root): sets up the
# host, then runs the parallel-safe tests and, alone afterwards, the serial
# tier (tests that install hooks or restart libvirtd). Extra arguments go to pytest.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/tests/host-setup.sh"
"$top/tests/guest/build-guest.sh" >/dev/null
cd "$top"
export LIBVIRT_FLEECE_REQUIRE_LIBVIRT=1
.venv/bin/python -m pytest -m "not serial" "$@"
rc=0
.venv/bin/python -m pytest -m serial "$@" || rc=$?
# exit 5: no serial tests selected
[ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"
