# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fleece images on disk: created without ever overwriting, removed only when provably ours.

A fleece image is created as an anonymous file (``O_TMPFILE``) in the target
directory, marked with the extended attribute ``trusted.libvirt-fleece``
(which only root can write) naming the domain, snapshot and disk, formatted
as qcow2, and only then linked under its name, with ``linkat``, which fails
if the name exists. A process killed before the link leaves nothing behind.
The open descriptor is what qemu gets (``add-fd``), so qemu never needs to
open the path itself: no DAC, namespace or label trouble.

:func:`remove` unlinks a path only when it is a regular file that still
carries the mark this snapshot wrote; anything else is left alone and logged.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Optional

from . import errors
from .qemu import tools

log = logging.getLogger(__name__)

XATTR = "trusted.libvirt-fleece"
MAX_PATH = 4095


def owner_tag(domain_uuid: str, snapshot_id: str, disk: str) -> bytes:
    """The mark a fleece image carries: which domain, snapshot and disk it serves."""
    return f"{domain_uuid}/{snapshot_id}/{disk}".encode()


def socket_tag(domain_uuid: str) -> bytes:
    """The mark of a domain's export socket (the same root-only xattr as images)."""
    return f"{domain_uuid}/socket".encode()


def mark_socket(path: str, domain_uuid: str) -> None:
    """Mark the unix socket the plugin just bound (``trusted.*``: only root can set
    it, so an owner cannot forge it); never raises: an unmarked socket is only
    left behind, never someone else's removed."""
    try:
        os.setxattr(path, XATTR, socket_tag(domain_uuid), follow_symlinks=False)
    except OSError as e:
        log.warning("cannot mark socket %s (%s): it will not be removed automatically",
                    path, e.strerror)


def socket_problem(path: str, domain_uuid: str) -> str:
    """Why ``path`` is not a socket this plugin bound for the domain ("" when it is;
    "gone" when it does not exist). Metadata naming a path proves nothing."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "gone"
    except OSError as e:
        return f"cannot inspect it: {e.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return "it is not a socket"
    try:
        mark = os.getxattr(path, XATTR, follow_symlinks=False)
    except OSError:
        return "it has no libvirt-fleece mark: the plugin did not bind it"
    if mark != socket_tag(domain_uuid):
        return "its libvirt-fleece mark names another domain"
    return ""


def image_problem(path: str, tag: bytes) -> str:
    """Why ``path`` is not a fleece image carrying ``tag`` ("" when it is, or is gone).

    The diagnosis behind a refusal, for the log (the hook's cleanup); it decides
    nothing: :func:`remove` proves a file ours again on the descriptor it unlinks."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    except OSError as e:
        return f"cannot inspect it: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    try:
        mark = os.getxattr(path, XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return "it has no libvirt-fleece mark: the plugin did not create it"
        return f"cannot read its mark: {e.strerror}"
    if mark != tag:
        shown = "".join(c if c.isprintable() else "?"
                        for c in mark.decode("utf-8", "replace")[:120]) or "-"
        return (f"its mark {shown!r} is not {tag.decode()!r}: it belongs to another domain, "
                f"snapshot or disk")
    return ""


def path_problem(path: object) -> str:
    """Why ``path``, named by metadata someone else may have written, is not a path
    the plugin could have made a fleece image or socket at ("" when it could).
    :func:`check_path` applies the same rules to a path a caller asks for,
    raising with a message for that caller."""
    if not isinstance(path, str) or not path:
        return "no path"
    if not path.startswith("/") or os.path.normpath(path) != path:
        return "not an absolute, normalized path"
    if len(path) > MAX_PATH or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "too long or has control characters"
    return ""


def marked_files(directory: str, domain_uuid: str,
                 limit: Optional[int] = None) -> list[tuple[str, bytes]]:
    """(path, mark) of the regular files (not links) directly in ``directory`` whose
    mark names the domain: images whose records may be lost. Candidates only:
    remove each with :func:`remove` and its mark.

    ``limit``: look at no more than that many directory entries (logged when hit);
    the hook, which must never block, passes one; repair looks at all of them.
    Raises OSError when the directory cannot be listed (FileNotFoundError when absent)."""
    prefix = f"{domain_uuid}/".encode()
    found = []
    with os.scandir(directory) as entries:
        for i, entry in enumerate(entries):
            if limit is not None and i >= limit:
                log.warning("%s has more than %d entries; stopped looking", directory, limit)
                break
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                mark = os.getxattr(entry.path, XATTR, follow_symlinks=False)
            except OSError:
                continue
            if mark.startswith(prefix):
                found.append((entry.path, mark))
    return found


def check_path(path: str) -> None:
    """Check a requested fleece path before anything is created.

    Raises InvalidArgument for a relative, non-normalized or odd path or a
    missing parent directory, AlreadyExists when the name is taken (by a
    file, a symlink, a device, anything).
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise errors.InvalidArgument(f"fleece file {path!r} must be an absolute path")
    if len(path) > MAX_PATH or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise errors.InvalidArgument(f"fleece file {path!r} is too long or has control characters")
    if os.path.normpath(path) != path or path.endswith("/"):
        raise errors.InvalidArgument(
            f"fleece file {path!r} is not a normalized path (no '..', '.', '//' or trailing '/')")
    parent = os.path.dirname(path)
    try:
        st = os.stat(parent)
    except OSError as e:
        raise errors.InvalidArgument(
            f"fleece file {path!r}: directory {parent} is not usable: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise errors.InvalidArgument(f"fleece file {path!r}: {parent} is not a directory")
    try:
        os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise errors.InvalidArgument(f"fleece file {path!r} is not usable: {e.strerror}") from e
    raise errors.AlreadyExists(
        f"fleece file {path!r} already exists; libvirt-fleece never overwrites a file, "
        f"choose another path or remove it yourself")


def _anonymous(path: str, tag: bytes) -> int:
    """An unnamed, marked file in the directory of ``path`` (gone if we die)."""
    parent = os.path.dirname(path)
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise errors.InvalidArgument(
            f"cannot create fleece file in {parent}: {e.strerror} (the directory's "
            f"filesystem must support O_TMPFILE and root must be able to write there)") from e
    try:
        os.setxattr(fd, XATTR, tag)
    except OSError as e:
        os.close(fd)
        raise errors.InvalidArgument(
            f"cannot mark fleece file in {parent}: {e.strerror} (the filesystem "
            f"must support trusted.* extended attributes)") from e
    return fd


# An empty qcow2 image depends only on its size (qcow2 v3 headers hold no
# random or time fields), so the bytes qemu-img made once are reused for
# images of that size: a long-running caller saves a qemu-img run per disk.
_EMPTY_QCOW2: dict[int, bytes] = {}
_MAX_TEMPLATE = 4 << 20


def _qemu_img_create(jobs: list[tuple[int, int]]) -> None:
    """Run qemu-img create on every (fd, capacity) at once. Raises ToolError."""
    tools.qemu_img_many([(["create", "-q", "-f", "qcow2", f"/dev/fd/{fd}", str(capacity)],
                          [fd]) for fd, capacity in jobs])


def _format_qcow2(jobs: list[tuple[int, int]]) -> None:
    """Make each (fd, capacity) an empty qcow2 image. Raises InternalError."""
    todo = [(fd, capacity) for fd, capacity in jobs if capacity not in _EMPTY_QCOW2]
    _qemu_img_create(todo)
    for fd, capacity in todo:
        size = os.fstat(fd).st_size
        if size <= _MAX_TEMPLATE:
            _EMPTY_QCOW2[capacity] = os.pread(fd, size, 0)
    done = {fd for fd, _ in todo}
    for fd, capacity in jobs:
        if fd not in done:
            data = _EMPTY_QCOW2[capacity]
            if os.pwrite(fd, data, 0) != len(data):
                raise errors.InternalError("short write of a fleece image header")


def _link(fd: int, path: str) -> None:
    dirfd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), path, src_dir_fd=dirfd, follow_symlinks=True)
    except FileExistsError as e:
        raise errors.AlreadyExists(
            f"fleece file {path!r} appeared while it was being created; not overwritten") from e
    except OSError as e:
        raise errors.InvalidArgument(f"cannot create fleece file {path!r}: {e.strerror}") from e
    finally:
        os.close(dirfd)


def create_many(files: list[tuple[str, int, bytes]]) -> list[int]:
    """Create qcow2 fleece images (path, capacity, tag) at once; return O_RDWR fds.

    All or nothing: on failure the ones already linked are removed again.
    Raises AlreadyExists when a path exists, InvalidArgument when it cannot be
    created there (the message says why), ToolError when qemu-img fails.
    """
    for path, _capacity, _tag in files:
        check_path(path)
    fds: list[int] = []
    linked: list[tuple[str, bytes]] = []
    try:
        for path, _capacity, tag in files:
            fds.append(_anonymous(path, tag))
        _format_qcow2([(fd, capacity) for fd, (_p, capacity, _t) in zip(fds, files)])
        for fd, (path, capacity, tag) in zip(fds, files):
            _link(fd, path)
            linked.append((path, tag))
            log.info("created fleece image %s (%d bytes)", path, capacity)
    except BaseException:
        for fd in fds:
            os.close(fd)
        for path, tag in linked:
            remove(path, tag)
        raise
    return fds


def create(path: str, capacity: int, tag: bytes) -> int:
    """Create one qcow2 fleece image; see :func:`create_many`."""
    return create_many([(path, capacity, tag)])[0]


def _open_regular(dirfd: int, name: str) -> int:
    """Open ``name`` in ``dirfd`` read-only if it is a regular file (never a device,
    FIFO or symlink: opening those as root can have effects). Returns -1 otherwise."""
    try:
        if not stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            return -1
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dirfd)
    except OSError:
        return -1
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return -1
    return fd


def _carries(fd: int, tag: bytes) -> bool:
    try:
        return os.getxattr(fd, XATTR) == tag
    except OSError:
        return False


def remove(path: str, tag: bytes) -> bool:
    """Unlink ``path`` if it is our fleece image; return whether it was removed.

    The file is opened relative to its directory, proven ours by its mark,
    and unlinked there only if the name still refers to that very inode.
    A missing file is fine (False); a file that is not provably ours is left
    alone and logged.
    """
    name = os.path.basename(path)
    try:
        dirfd = os.open(os.path.dirname(path) or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError:
            pass
        fd = _open_regular(dirfd, name)
        if fd < 0 or not _carries(fd, tag):
            if fd >= 0:
                os.close(fd)
            log.warning("not removing %s: it is not a regular file carrying this snapshot's "
                        "mark", path)
            return False
        try:
            mine = os.fstat(fd)
            now = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                log.warning("not removing %s: it was replaced while being checked", path)
                return False
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise errors.InternalError(f"cannot remove fleece file {path}: {e.strerror}") from e
        finally:
            os.close(fd)
    finally:
        os.close(dirfd)
    log.info("removed fleece image %s", path)
    return True


def allocation(path: str) -> int:
    """Bytes the image occupies on the host (0 when it is gone)."""
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0
