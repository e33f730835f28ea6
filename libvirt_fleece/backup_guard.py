# SPDX-License-Identifier: LGPL-2.1-or-later
"""Clean up after a backup whose process was killed (SIGKILL, OOM, lost session).

A running backup starts this as a detached process with a pipe on its
stdin, the backup directory's lock fd and a descriptor of the directory itself
(so a directory renamed or replaced meanwhile does not redirect it). The backup writes ``done`` when
it has finished (successfully or after cleaning up an error itself). If
the pipe closes without ``done``, the backup died: the guard, still holding
the directory's lock, runs :func:`libvirt_fleece.backup.recover`, which
deletes the snapshot (and its export) and the unused checkpoint named in
the journal, and removes the ``.part`` files. Should the guard die too, the
next backup into the directory does the same before anything else.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from . import detached

log = logging.getLogger(__name__)


class Guard:
    def __init__(self, directory: str, lock_fd: int, dir_fd: int) -> None:
        # the command line a guard of any version is started with: keep it
        self._proc = detached.start(
            [sys.executable, "-m", "libvirt_fleece.backup_guard", directory, str(lock_fd),
             str(dir_fd)],
            stdin=subprocess.PIPE, pass_fds=(lock_fd, dir_fd))

    def done(self) -> None:
        """The backup cleaned up after itself: let the guard go without doing anything."""
        stdin = self._proc.stdin
        assert stdin is not None        # stdin=PIPE
        try:
            stdin.write(b"done\n")
            stdin.close()
        except OSError:
            log.warning("the backup's guard process is gone")
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("the backup's guard process did not exit")


def main(argv: list[str]) -> int:
    directory = argv[0]
    data = sys.stdin.buffer.read()      # until the backup process says done or dies
    if b"done" in data:
        return 0
    logging.basicConfig(level=logging.INFO)
    from . import backup
    from .backup_dir import BackupDir
    try:
        backup.recover(BackupDir(directory, int(argv[2])))     # the directory the run used
    except Exception:  # noqa: BLE001 - the next backup run retries
        log.exception("cleaning up the interrupted backup in %s failed", directory)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
