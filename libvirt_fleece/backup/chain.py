# SPDX-License-Identifier: LGPL-2.1-or-later
"""The chains qemu opens are the chains the manifest names, never a header's.

A qcow2 header names its backing file, and qemu follows it: a host file, a
``json:`` address, an NBD server anywhere. So no backup file is ever given to
qemu-img or qemu-nbd by its name. :class:`OpenChain` opens the files of a
chain through the directory's descriptor (:mod:`.dir`), checks each
header against the manifest (magic, virtual size, backing file name, no
external data file), and gives qemu a ``json:`` address naming every layer
as ``/proc/PID/fd/N`` with an explicit ``backing`` (``null`` at the bottom).
Chains come from :meth:`Manifest.chain` (acyclic: a backing file belongs to an
earlier point) and their length is bounded by the manifest's rules.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from typing import Optional

from .dir import BackupDir, UnsafeFile, fd_path
from .manifest import BackupCorrupt, DiskEntry

log = logging.getLogger(__name__)

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQIIQQIIQ")    # the qcow2 header up to snapshots_offset
V3 = struct.Struct(">QQQII")                 # incompatible .. header_length
INCOMPAT_DATA_FILE = 1 << 2                  # an external data file: refused
INCOMPAT_KNOWN = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4)   # dirty, corrupt, compression,
#                                                              extended L2


@dataclasses.dataclass(frozen=True)
class Header:
    size: int
    backing: Optional[str]


def read_header(fd: int, path: str) -> Header:
    """The virtual size and backing file name of the qcow2 file ``fd``.
    Raises BackupCorrupt naming ``path`` for anything else than a plain qcow2
    (an external data file, unknown incompatible features, a bad backing name)."""
    head = os.pread(fd, 4096, 0)
    if len(head) < HEADER.size or head[:4] != MAGIC:
        raise BackupCorrupt(f"{path} is not a qcow2 file")
    (_, version, backing_off, backing_len, _cbits, size, *_rest) = HEADER.unpack_from(head)
    if version not in (2, 3):
        raise BackupCorrupt(f"{path} is qcow2 version {version}; not a file of this tool")
    if version == 3:
        incompat = V3.unpack_from(head, HEADER.size)[0]
        if incompat & INCOMPAT_DATA_FILE:
            raise BackupCorrupt(f"{path} names an external data file; refused (a backup "
                                f"file holds its own data)")
        if incompat & ~INCOMPAT_KNOWN:
            raise BackupCorrupt(f"{path} has unknown incompatible features "
                                f"{incompat:#x}; refused")
    backing = None
    if backing_off:
        if backing_len > 1023 or backing_off > 1 << 20:
            raise BackupCorrupt(f"{path} has a malformed backing file name")
        raw = os.pread(fd, backing_len, backing_off)
        try:
            backing = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BackupCorrupt(f"{path} has a malformed backing file name") from e
    return Header(size=size, backing=backing)


def check_header(header: Header, entry: DiskEntry, path: str, max_size: int) -> None:
    """The header agrees with the manifest's entry. Raises BackupCorrupt."""
    if header.size != entry.size:
        raise BackupCorrupt(f"{path} is a disk of {header.size} bytes, the manifest says "
                            f"{entry.size}; refused")
    if header.size > max_size:
        raise BackupCorrupt(f"{path} claims {header.size} bytes, more than "
                            f"backup_max_virtual_size ({max_size}); refused")
    if header.backing != entry.backing:
        raise BackupCorrupt(f"{path} names backing file {_quote(header.backing)}, the "
                            f"manifest says {_quote(entry.backing)}; refused")


def _quote(value: Optional[str]) -> str:
    if value is None:
        return "none"
    text = "".join(c if c.isprintable() else "?" for c in repr(value))
    return text if len(text) <= 120 else text[:117] + "..."


def spec(paths: list[str]) -> str:
    """A ``json:`` address of the qcow2 chain ``paths`` (base first), each layer
    with an explicit ``backing`` and ``null`` at the bottom."""
    node: Optional[dict] = None
    for p in paths:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": p},
                "backing": node}
    return "json:" + json.dumps(node, separators=(",", ":"))


class OpenChain:
    """The files of ``chain`` (base first) opened safely in ``bdir``, each header
    checked; ``address`` is the ``json:`` address for qemu, ``fds[i]`` the
    descriptor of ``chain[i]``. With ``top_fd`` the top of the address is that
    descriptor (a ``.part`` file being written) on top of ``chain``.
    Raises BackupCorrupt naming the offending file, FileNotFoundError."""

    def __init__(self, bdir: BackupDir, chain: list[DiskEntry], max_size: int,
                 top_fd: Optional[int] = None) -> None:
        self.fds: list[int] = []
        try:
            for entry in chain:
                path = bdir.show(entry.file)
                try:
                    fd = bdir.open(entry.file)
                except UnsafeFile as e:
                    raise BackupCorrupt(str(e)) from e
                self.fds.append(fd)
                check_header(read_header(fd, path), entry, path, max_size)
        except BaseException:
            self.close()
            raise
        paths = [fd_path(fd) for fd in self.fds]
        if top_fd is not None:
            paths.append(fd_path(top_fd))
        self.address = spec(paths)

    def __enter__(self) -> "OpenChain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
