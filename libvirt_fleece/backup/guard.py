# SPDX-License-Identifier: LGPL-2.1-or-later
"""Clean up after a backup whose process was killed (SIGKILL, OOM, lost session).

A running backup starts a detached guard process (:mod:`libvirt_fleece.backup_guard`,
the command line every version starts it with) with a pipe on its stdin, the
backup directory's lock fd and a descriptor of the directory itself (so a
directory renamed or replaced meanwhile does not redirect it). The backup
writes ``done`` when it has finished (successfully or after cleaning up an
error itself). If the pipe closes without ``done``, the backup died: the
guard, still holding the directory's lock, runs :func:`.recovery.recover`, which
deletes the snapshot (and its export) and the unused checkpoint named in the
journal, and removes the ``.part`` files. Should the guard die too, the next
backup into the directory does the same before anything else.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from .. import detached

log = logging.getLogger(__name__)


class Guard:
    """The backup's side of the guard: start it, then say ``done``."""

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
