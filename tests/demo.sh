#!/usr/bin/env bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The main job on an embedded default: set up the host, then create a
# throwaway demo domain with data on its disk, snapshot it, export the
# snapshot over NBD, copy the export to a file, prove the copy equals the
# disk at snapshot time, and clean up. As root.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/tests/host-setup.sh"
exec "$top/.venv/bin/virsh-fleece" demo "$@"
