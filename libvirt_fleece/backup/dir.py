# SPDX-License-Identifier: LGPL-2.1-or-later
"""A backup directory opened once and used only through its descriptor.

A backup directory is untrusted input: whoever can write into it (another
team, an NFS export, an unprivileged user) may plant symlinks, FIFOs, hard
links to host files, or swap the directory itself while root works in it.
:class:`BackupDir` opens the directory once and resolves every name relative
to that descriptor, with ``O_NOFOLLOW``; a name must be a plain file name
(no "/"); files are refused when they are symlinks, not regular files, or
have more than one hard link; files are created with ``O_EXCL``; reads are
bounded and never block (``O_NONBLOCK``, then ``fstat`` before any read).

External tools (qemu-img, qemu-nbd) get such files as ``/proc/PID/fd/N``
(:func:`fd_path`), the descriptor this process opened safely, never a path
inside the directory.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Optional

from .. import errors, fsutil

log = logging.getLogger(__name__)

_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class UnsafeFile(errors.InvalidArgument):
    """A file of a backup directory is a link, not a regular file, or otherwise
    not what the directory's rules allow; ``path`` names it."""

    msg = "{path}: {reason}"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason, path=path)


def fd_path(fd: int) -> str:
    """A path by which another process of ours (qemu-img, qemu-nbd) opens exactly
    the file behind ``fd``, whatever happens to its name meanwhile."""
    return f"/proc/{os.getpid()}/fd/{fd}"


class BackupDir:
    """The directory ``path`` (absolute), opened once. Use as a context manager
    or call :meth:`close`; ``fd``: a descriptor of it opened already (the guard
    process inherits one). Raises OSError when it cannot be opened."""

    def __init__(self, path: str, fd: Optional[int] = None) -> None:
        self.path = path
        self.fd = fd if fd is not None else os.open(
            path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> "BackupDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def show(self, name: str) -> str:
        """``name`` as a path for messages."""
        return os.path.join(self.path, name)

    def _check_name(self, name: str) -> None:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise UnsafeFile(self.show(str(name)), "not a plain file name of the directory")

    def lstat(self, name: str) -> Optional[os.stat_result]:
        """The entry's own status (a link is not followed); None when absent."""
        self._check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def open(self, name: str, write: bool = False) -> int:
        """A descriptor of the regular file ``name`` (read-only, or read-write).
        Raises FileNotFoundError, UnsafeFile (a link, a FIFO or other special
        file, more than one hard link)."""
        self._check_name(name)
        try:
            fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _OPEN, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeFile(self.show(name), "is a symbolic link; refused") from e
            if e.errno == errno.ENXIO:      # a FIFO without writer, a socket
                raise UnsafeFile(self.show(name), "is not a regular file; refused") from e
            raise
        try:
            self._check_fd(name, fd)
        except BaseException:
            os.close(fd)
            raise
        os.set_blocking(fd, True)       # a regular file: reads never block anyway
        return fd

    def _check_fd(self, name: str, fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(self.show(name), "is not a regular file; refused")
        if st.st_nlink > 1:
            raise UnsafeFile(self.show(name), f"has {st.st_nlink} hard links (another name "
                                              f"may be a file outside the directory); refused")

    def read(self, name: str, limit: int) -> Optional[bytes]:
        """The content of the regular file ``name`` (None when absent). Raises
        UnsafeFile, also when it holds more than ``limit`` bytes, OSError."""
        try:
            fd = self.open(name)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size > limit:
                raise UnsafeFile(self.show(name), f"is larger than {limit} bytes; refused")
            data = b""
            while len(data) <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
            if len(data) > limit:
                raise UnsafeFile(self.show(name), f"is larger than {limit} bytes; refused")
            return data
        finally:
            os.close(fd)

    def create(self, name: str, mode: int = 0o600) -> int:
        """A new empty regular file ``name`` opened read-write (``O_EXCL``: never
        an existing file or link). Raises UnsafeFile when the name exists, OSError."""
        self._check_name(name)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN, mode,
                         dir_fd=self.fd)
        except FileExistsError as e:
            raise UnsafeFile(self.show(name), "exists already (a leftover or a planted "
                                              "file or link); refused") from e
        os.set_blocking(fd, True)
        os.fchmod(fd, mode)
        return fd

    def open_or_create(self, name: str, mode: int = 0o600) -> int:
        """The regular file ``name``, created when missing (the lock file).
        Raises UnsafeFile, OSError."""
        try:
            return self.create(name, mode)
        except UnsafeFile:
            return self.open(name, write=True)

    def unlink(self, name: str) -> bool:
        """Remove the entry ``name`` of this directory (a link itself, never its
        target); False when it was absent. Raises UnsafeFile for a directory."""
        st = self.lstat(name)
        if st is None:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeFile(self.show(name), "is a directory; not removed")
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def rename(self, old: str, new: str) -> None:
        """Rename within the directory. Raises OSError."""
        self._check_name(old)
        self._check_name(new)
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def write_atomic(self, name: str, data: bytes, mode: int = 0o600) -> None:
        """Replace ``name`` with ``data``: a new temporary file (O_EXCL), fsync,
        rename over ``name``, fsync the directory. Raises OSError.

        :func:`.fsutil.write_atomic` does the same for a path in a directory
        only root writes; this one stays apart on purpose: the directory is
        untrusted, so every name is resolved against :attr:`fd` (a renamed or
        swapped directory does not redirect it), checked as a plain file name,
        and the temporary file is made with :meth:`create` (``O_EXCL``,
        ``O_NOFOLLOW``). Writing the file's content is shared
        (:func:`.fsutil.write_new_file`)."""
        tmp = f".{name}.{os.urandom(6).hex()}.tmp"
        fd = self.create(tmp, mode)
        try:
            fsutil.write_new_file(fd, data, mode)
            self.rename(tmp, name)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except OSError:
                pass
            raise
        self.fsync()
