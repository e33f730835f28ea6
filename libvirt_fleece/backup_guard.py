# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backup guard process: ``python -m libvirt_fleece.backup_guard DIR LOCK_FD DIR_FD``.

Started by :class:`.backup.guard.Guard` (every version uses this command
line). It waits on its stdin: ``done`` means the backup cleaned up itself;
the pipe closing without it means the backup died, and the guard runs
:func:`.backup.recover` on the directory (by its descriptor), holding the
directory's lock the backup passed down.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Wait for the backup; recover its directory if it died. Returns the exit status."""
    directory = argv[0]
    data = sys.stdin.buffer.read()      # until the backup process says done or dies
    if b"done" in data:
        return 0
    logging.basicConfig(level=logging.INFO)
    # only now: every backup starts a guard and waits for it to exit, and importing the
    # backup client costs 0.3 s (the guard of 0.3.0 and before did the same)
    from .backup.dir import BackupDir
    from .backup.recovery import recover
    try:
        recover(BackupDir(directory, int(argv[2])))     # the directory the run used
    except Exception:  # noqa: BLE001 - the next backup run retries
        log.exception("cleaning up the interrupted backup in %s failed", directory)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
