# SPDX-License-Identifier: LGPL-2.1-or-later
"""Writing small files all or nothing."""

from __future__ import annotations

import os
import tempfile


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(fd: int, data: bytes, mode: int) -> None:
    """Fill the new temporary file ``fd`` of an atomic replace and close it: all of
    ``data``, root-owned when we are root, ``mode``, fsync. Closes ``fd`` also
    when it fails. Raises OSError. (:func:`write_atomic` and
    :meth:`.backup.dir.BackupDir.write_atomic` make the file and rename it.)"""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a temp file in the same directory (O_EXCL),
    root-owned when we are root, ``mode``, fsync, rename, fsync the directory.
    A crash leaves the old file or the new one, never a mix. Raises OSError.

    For directories only root writes (the state directory, the hook directory):
    ``path`` is resolved by name, its parent's symlinks followed. A file in a
    directory others can write (a backup directory) is replaced through
    :meth:`.backup.dir.BackupDir.write_atomic` instead, which works on the
    directory's descriptor and refuses links."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        write_new_file(fd, data, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)
