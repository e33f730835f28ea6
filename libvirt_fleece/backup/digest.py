# SPDX-License-Identifier: LGPL-2.1-or-later
"""The checksum of a backup file: what its qcow2 layer holds of the disk, as one SHA-256.

A point's file is a qcow2 layer. Some of its clusters hold data, some are
zero clusters (an incremental's ranges that were written and now read as
zero), the rest is not in the layer (holes, or the backing file showing
through). The layer digest is the SHA-256 of one record per range, in
offset order::

    data:  b"D" + offset + length + SHA-256 of the bytes   (offset, length:
    zero:  b"Z" + offset + length                           8 bytes, big-endian)

where the data ranges are maximal runs of data cut at every multiple of
:data:`PIECE`, and adjacent zero ranges are merged.

The backup computes it from the bytes it reads from the export, as they pass
(no second read of the file it wrote); :func:`digest_file` computes it from
what qemu reads from the file now. So a match proves the file yields, through
qemu, exactly what was read from the disk at the snapshot's instant, which a
checksum of the file's bytes would not. Its metadata is checked by ``qemu-img
check``. (``sha256sum`` cannot check it; backups written before this scheme
carry a checksum of the file instead, and are verified that way.)
"""

from __future__ import annotations

import hashlib
import struct
import threading
from typing import Union

from . import copy as bc
from .. import errors

PIECE = bc.REQUEST_SIZE     # 4 MiB: the copy's requests are the pieces
ALGORITHM = "sha256-layer"      # the manifest's name for this scheme
DEPTH = "qemu:allocation-depth"


class LayerDigest:
    """Collects the records of one layer, in any order, from any thread."""

    def __init__(self, piece: int = PIECE) -> None:
        self.piece = piece
        self._data: dict[int, tuple[int, bytes]] = {}
        self._zero: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    @staticmethod
    def hash_piece(data: Union[bytes, bytearray, memoryview]) -> bytes:
        """The SHA-256 of one piece (bytes-like; hashlib drops the GIL while hashing)."""
        return hashlib.sha256(data).digest()

    def add_data(self, offset: int, length: int, digest: bytes) -> None:
        """One piece of data: it must not cross a multiple of ``piece``.
        Raises InternalError."""
        if length <= 0 or offset // self.piece != (offset + length - 1) // self.piece:
            raise errors.InternalError(f"data piece at {offset}+{length} crosses a "
                                       f"{self.piece}-byte boundary")
        with self._lock:
            self._data[offset] = (length, digest)

    def add_zero(self, offset: int, length: int) -> None:
        with self._lock:
            self._zero.append((offset, length))

    def hexdigest(self) -> str:
        """The layer digest. Raises InternalError when records overlap."""
        zeros: list[tuple[int, int]] = []
        for offset, length in sorted(self._zero):
            if zeros and sum(zeros[-1]) == offset:
                zeros[-1] = (zeros[-1][0], zeros[-1][1] + length)
            else:
                zeros.append((offset, length))
        records = sorted([(o, n, b"D", d) for o, (n, d) in self._data.items()] +
                         [(o, n, b"Z", b"") for o, n in zeros])
        h = hashlib.sha256()
        end = 0
        for offset, length, kind, digest in records:
            if offset < end:
                raise errors.InternalError(f"layer records overlap at offset {offset}")
            end = offset + length
            h.update(kind + struct.pack(">QQ", offset, length) + digest)
        return h.hexdigest()


def digest_file(path: str) -> str:
    """The layer digest of a qcow2 file, read through ``qemu-nbd``. ``path``: the
    ``json:`` address of its chain (:class:`.chain.OpenChain`, as backups,
    verify and restore give it), or for a trusted file a plain path (qemu then
    follows its header). Raises CopyError."""
    h = bc.connect_reader(path, (DEPTH,))
    try:
        size = h.get_size()
        layer = []
        for offset, length, depth in bc.block_status(h, DEPTH, 0, size):
            if depth != 1:          # 0: nowhere in the chain, 2 and more: a backing file
                continue
            for off, n, flags in bc.block_status(h, bc.ALLOCATION, offset, offset + length):
                layer.append(bc.Extent(off, n, zero=bool(flags & bc.nbd.STATE_HOLE)))
        digest = LayerDigest()
        bc.copy(h, None, bc.merge(layer), digest=digest)
        return digest.hexdigest()
    finally:
        bc.close(h)
