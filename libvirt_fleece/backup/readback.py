# SPDX-License-Identifier: LGPL-2.1-or-later
"""Reading a backup back: its manifest (``info``), ``verify`` and ``restore``."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from typing import Optional

from .. import errors, faults
from ..qemu import tools
from . import files, manifest as mf
from .chain import OpenChain, spec as chain_spec
from .copy import CopyError
from .digest import digest_file
from .dir import BackupDir, UnsafeFile, fd_path
from .manifest import BackupCorrupt, BackupTargetError, DiskEntry, Manifest, Point
from .writer import point_warnings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class VerifyReport:
    """``problems``: files that do not match the manifest (``ok`` is False).
    ``warnings``: points whose files match but that an affected version wrote
    (:func:`point_warnings`); they do not make the report fail."""
    checked: list[str]
    problems: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def info(target_dir: str) -> Manifest:
    """The manifest of a backup directory. Raises BackupTargetError, BackupCorrupt."""
    directory = mf.check_target(target_dir, create=False)
    with BackupDir(directory) as bdir:
        return read_manifest(bdir)


def read_manifest(bdir: BackupDir) -> Manifest:
    manifest = mf.load(bdir)
    if manifest is None:
        raise BackupTargetError(f"{bdir.path} holds no backup (no {mf.MANIFEST})")
    return manifest


def verify(target_dir: str) -> VerifyReport:
    """Check every file of every point against the manifest (header, checksum, size,
    backing; each file opened through the directory's descriptor, its chain given to
    qemu as the manifest names it), and warn about the points an affected version
    wrote and about images readable by others. Raises BackupTargetError, BackupCorrupt."""
    directory = mf.check_target(target_dir, create=False)
    with BackupDir(directory) as bdir:
        manifest = read_manifest(bdir)
        checked, problems = [], []
        warnings = point_warnings(manifest)
        for p in manifest.points:
            for d in p.disks:
                checked.append(d.file)
                problems += _verify_one(bdir, manifest, p, d)
                st = bdir.lstat(d.file)
                if st is not None and st.st_mode & 0o777 & ~files.image_mode():
                    warnings.append(f"WARNING: {d.file} is mode {stat.S_IMODE(st.st_mode):o}: "
                                    f"readable by others; the next backup makes it private")
    return VerifyReport(checked=checked, problems=problems, warnings=warnings)


def _verify_one(bdir: BackupDir, manifest: Manifest, p: Point, d: DiskEntry) -> list[str]:
    """What is wrong with one file of one point (its chain opened as the manifest says)."""
    where = f"point {p.index} disk {d.name}"
    try:
        chain = manifest.chain(p, d.name)
        with OpenChain(bdir, chain, files.max_size()) as opened:
            found = _check_image(where, d, opened)
            if not found:
                found = _check_content(where, d, opened)
            return found
    except FileNotFoundError as e:
        return [f"{where}: {d.file} is missing ({os.path.basename(e.filename or '')})"]
    except (BackupCorrupt, errors.NotFound) as e:
        return [f"{where}: {e}"]


def _matches(d: DiskEntry, opened: OpenChain) -> bool:
    """Whether the top of ``opened`` holds what the manifest says (its layer digest,
    or for format /1 entries the SHA-256 of its bytes). Raises CopyError."""
    if d.sha256:
        return mf.sha256_file(fd_path(opened.fds[-1])) == d.sha256
    return digest_file(opened.address) == d.layer_sha256


def _check_content(where: str, d: DiskEntry, opened: OpenChain) -> list[str]:
    try:
        if _matches(d, opened):
            return []
    except (CopyError, OSError) as e:
        return [f"{where}: cannot read {d.file}: {e}"]
    return [f"{where}: {d.file} does not match its checksum"]


def _check_image(where: str, d: DiskEntry, opened: OpenChain) -> list[str]:
    """What ``qemu-img check`` finds wrong with the top layer alone (``backing: null``;
    its header was checked against the manifest by OpenChain)."""
    try:        # exit status 3: leaked clusters only, the data is intact
        tools.qemu_img(["check", "-U", "-q", "-f", "qcow2",
                        chain_spec([fd_path(opened.fds[-1])])], ok=(0, 3), timeout=3600)
    except errors.ToolError as e:
        if e.returncode is None:            # it did not run: no verdict on the image
            raise
        return [f"{where}: qemu-img check finds {d.file} damaged: {e.reason[:500]}"]
    return []


def restore(target_dir: str, disk: str, to_path: str, point: Optional[int] = None,
            check: bool = True) -> str:
    """Write the image of ``disk`` at backup ``point`` (default: the newest) to
    ``to_path``: qcow2 when it ends in ``.qcow2``, raw otherwise, mode 0600 (0640
    with ``backup_group``). Never overwrites, never follows a link at ``to_path``.

    The chain is opened through the backup directory's descriptor, each header
    checked against the manifest, and given to qemu-img as the manifest names it.
    With ``check`` the chain's checksums are verified first. Raises NotFound,
    AlreadyExists, BackupCorrupt, BackupTargetError."""
    directory = mf.check_target(target_dir, create=False)
    to_path = os.path.abspath(to_path)
    if os.path.lexists(to_path):
        raise errors.AlreadyExists(f"{to_path} already exists; restore never overwrites a "
                                   f"file: remove it or choose another path")
    if not os.path.isdir(os.path.dirname(to_path)):
        raise errors.InvalidArgument(f"directory {os.path.dirname(to_path)} does not exist")
    with BackupDir(directory) as bdir:
        manifest = read_manifest(bdir)
        chosen = manifest.point(point)
        chain = manifest.chain(chosen, disk)
        try:
            opened = OpenChain(bdir, chain, files.max_size())
        except FileNotFoundError as e:
            raise BackupCorrupt(f"{bdir.path}/{os.path.basename(e.filename or '?')} is "
                                f"missing; point {chosen.index} cannot be restored") from e
        with opened:
            if check:
                _check_chain(bdir, chain, opened, chosen)
            with BackupDir(os.path.dirname(to_path)) as out:
                _convert(opened, out, os.path.basename(to_path))
    return to_path


def _check_chain(bdir: BackupDir, chain: list[DiskEntry], opened: OpenChain,
                 chosen: Point) -> None:
    """Every layer's checksum. Raises BackupCorrupt naming the file."""
    paths = [fd_path(fd) for fd in opened.fds]
    for i, e in enumerate(chain):
        layer = OpenChain.__new__(OpenChain)
        layer.fds, layer.address = opened.fds[:i + 1], chain_spec(paths[:i + 1])
        try:
            intact = _matches(e, layer)
        except (CopyError, OSError) as err:
            raise BackupCorrupt(f"{bdir.show(e.file)} cannot be read ({err}); point "
                                f"{chosen.index} cannot be restored") from err
        if not intact:
            raise BackupCorrupt(f"{bdir.show(e.file)} does not match its checksum in the "
                                f"manifest; point {chosen.index} cannot be restored")


def _convert(opened: OpenChain, out: BackupDir, name: str) -> None:
    """qemu-img convert of the chain into a new file ``name`` of ``out``: written
    through the descriptor of a file without a name (O_TMPFILE; where the
    filesystem lacks it, a new name created with O_EXCL), then that very inode is
    linked to ``name`` (never over an existing name, never through a link).
    Raises AlreadyExists, ToolError, UnsafeFile (the temporary name was swapped)."""
    fmt = "qcow2" if name.endswith(".qcow2") else "raw"
    fd, tmp = _new_file(out, name)
    try:
        files.own_image(fd)
        faults.stoppoint("restore:target-created")
        tools.qemu_img(["convert", "-f", "qcow2", "-O", fmt, "-W", "-m", "8",
                        opened.address, fd_path(fd)])
        os.fsync(fd)
        try:        # the inode behind fd, whatever its temporary name points to now
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=out.fd, follow_symlinks=True)
        except FileExistsError as e:
            raise errors.AlreadyExists(f"{out.show(name)} already exists; restore never "
                                       f"overwrites a file") from e
        except FileNotFoundError as e:      # a named temporary was unlinked or replaced
            raise UnsafeFile(out.show(tmp or name), "was removed or replaced while the "
                             "restore wrote it (nothing was written elsewhere); restore "
                             "again into a directory only you can write to") from e
    finally:
        os.close(fd)
        if tmp is not None:
            st = out.lstat(tmp)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                out.unlink(tmp)


def _new_file(out: BackupDir, name: str) -> tuple[int, Optional[str]]:
    """(descriptor, temporary name or None) of a new empty private file in ``out``."""
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, files.image_mode(),
                     dir_fd=out.fd)
        os.fchmod(fd, files.image_mode())
        return fd, None
    except OSError:
        return _new_named_file(out, name)


def _new_named_file(out: BackupDir, name: str) -> tuple[int, str]:
    """A new private file under a fresh temporary name (O_EXCL, never a link), for
    filesystems without O_TMPFILE (NFS). Raises UnsafeFile, OSError."""
    tmp = f".{name}.{os.urandom(6).hex()}.restoring"
    return out.create(tmp, files.image_mode()), tmp
