#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Runs INSIDE the Debian 13 root (started by tests/trixie/run.sh, which see), with the
# checkout at /src: venv, test guest, demo, then pytest. Extra arguments go to pytest.
set -uo pipefail
cd /src
export LIBVIRT_FLEECE_REQUIRE_LIBVIRT=1
export PYTHONDONTWRITEBYTECODE=1          # the checkout is the host's: no cpython-313 caches
VENV=/opt/fleece-venv                     # inside the root, never the host's /work/.../.venv

log() { echo "trixie: $*" >&2; }

# The venv: Debian's own python3 and its python3-libvirt/-libnbd/-lxml/-yaml
# (--system-site-packages), the checkout installed editable. --no-index: nothing from
# PyPI (setuptools and wheel are Debian's), so no certificate trouble inside the root.
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv --system-site-packages "$VENV" || exit 1
fi
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ $(cat "$VENV/.fleece-installed" 2>/dev/null) != "$want" ]]; then
    "$VENV/bin/python" -m pip install -q --no-index --no-build-isolation --no-deps -e /src \
        || exit 1
    echo "$want" >"$VENV/.fleece-installed"
fi

tests/guest/build-guest.sh >/dev/null || exit 1

rc=0
t=$SECONDS
if "$VENV/bin/virsh-fleece" demo; then
    log "demo passed ($((SECONDS - t)) s)"
else
    rc=$?
    log "demo FAILED: exit $rc"
fi

pytest() { "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"; }

# The exactness tier (tests marked exactness, wherever they are). "No tests collected"
# (exit 5) is all right only while tests/test_exactness.py does not exist yet, or when
# the caller narrowed the selection with arguments of its own.
t=$SECONDS
r=0
pytest -m exactness "$@" || r=$?
if [[ $r == 5 && ( ! -e tests/test_exactness.py || $# -gt 0 ) ]]; then
    log "exactness tier: no tests selected (tests/test_exactness.py $( [[ -e tests/test_exactness.py ]] && echo exists || echo 'does not exist yet'))"
    r=0
fi
log "exactness tier: exit $r ($((SECONDS - t)) s)"
[[ $r == 0 ]] || rc=$r

# The same tier on the overlay read path (QEMU 7.2's), forced by the configuration:
# both read paths are exact on this QEMU too.
t=$SECONDS
r=0
overlay_cfg=$(mktemp /tmp/fleece-overlay.XXXXXX.yaml)
echo "read_path: overlay" > "$overlay_cfg"
LIBVIRT_FLEECE_CONFIG=$overlay_cfg pytest -m exactness "$@" || r=$?
rm -f "$overlay_cfg"
[[ $r == 5 && $# -gt 0 ]] && r=0
log "exactness tier on the overlay read path: exit $r ($((SECONDS - t)) s)"
[[ $r == 0 ]] || rc=$r

t=$SECONDS
r=0
pytest tests/test_snapshot_export.py tests/test_checkpoints.py tests/test_checkpoint_chain.py \
    tests/test_readpath.py tests/test_fleece_full.py "$@" || r=$?
[[ $r == 5 && $# -gt 0 ]] && r=0
log "snapshot/export, checkpoint, read-path and full-fleece tests: exit $r ($((SECONDS - t)) s)"
[[ $r == 0 ]] || rc=$r

# The coexistence tier (libvirt's own block work beside the plugin) on QEMU 10's read path,
# snapshot-access (the Debian 12 host runs it on QEMU 7.2's, the overlay path). Its serial
# part (libvirtd restarts) runs on the host only.
t=$SECONDS
r=0
pytest -m "coexistence and not serial" "$@" || r=$?
[[ $r == 5 && $# -gt 0 ]] && r=0
log "coexistence tier (snapshot-access read path): exit $r ($((SECONDS - t)) s)"
[[ $r == 0 ]] || rc=$r
exit "$rc"
