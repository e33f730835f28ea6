# SPDX-License-Identifier: LGPL-2.1-or-later
"""Every name the plugin gives qemu, built here and nowhere else.

Everything the plugin creates in qemu carries the ``fleece-`` prefix (fdsets:
a number in the plugin's range), so anything else (libvirt's nodes, jobs,
bitmaps and checkpoints) is recognisably not the plugin's and left alone.

Per snapshot ``ID`` (8 hex) and disk index ``N``::

    fleece-ID-N-img      the fleece image (qcow2)        fleece-ID-N-imgf  its file node
    fleece-ID-N-cbw      the copy-before-write filter    fleece-ID-N-acc   snapshot-access
    fleece-ID-N-expS     export S of the disk            fleece-ID-N-bmS   export S's bitmap
    fleece-ID-N-frz      frozen copy of the newest checkpoint bitmap at the instant
    fleece-ID-N-frz.SEQ  frozen copy of an older recording checkpoint bitmap
    fleece-ID-N-frz.d    the writes from the copies to the instant (the "delta")

Checkpoint bitmaps are persistent (stored in the qcow2 image) and named::

    fleece-cp.<creation time, ns, 16 hex>.<disk size, hex>.<checkpoint name>

so the chain (order, names, creation times) and the disk size each covers can
be rebuilt from the images alone.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Optional, TypedDict

from .. import errors

PREFIX = "fleece-"
CHECKPOINT_PREFIX = "fleece-cp."
TEMP_BITMAP_PREFIX = PREFIX              # every non-persistent bitmap of the plugin's
OWN_JOB_PREFIX = PREFIX
SCRATCH_PREFIX = f"{PREFIX}st"           # the read-path self-test's nodes and job
TLS_OBJECT_ID = "fleece-tls"
NBD_FDNAME = "fleece-nbd"                # the listening socket handed to qemu
FDSET_BASE = 0x6C660000                  # "lf": the plugin's fdset ids, far above libvirt's
FDSET_SPAN = 0x10000

_CHECKPOINT = re.compile(r"fleece-cp\.([0-9a-f]{16})\.([0-9a-f]{1,16})\.(.+)\Z")


class DiskNodeNames(TypedDict):
    """The node fields of a metadata.DiskRecord."""
    fleece_node: str
    filter_node: str
    access_node: str


def new_snapshot_id(existing: set[str]) -> str:
    """A random 8-hex id whose node names collide with nothing in ``existing``."""
    while True:
        sid = secrets.token_hex(4)
        if not any(n.startswith(f"{PREFIX}{sid}-") for n in existing):
            return sid


def disk_node_names(sid: str, index: int) -> DiskNodeNames:
    """Node names of one disk of a snapshot (all well under qemu's 31 characters)."""
    base = f"{PREFIX}{sid}-{index}"
    return {"fleece_node": f"{base}-img", "filter_node": f"{base}-cbw",
            "access_node": f"{base}-acc"}


def protocol_node(fleece_node: str) -> str:
    """The file node under a fleece image's qcow2 node (its write threshold and size)."""
    return fleece_node + "f"


def export_id(sid: str, index: int, serial: int) -> str:
    return f"{PREFIX}{sid}-{index}-exp{serial}"


def export_bitmap(sid: str, index: int, serial: int) -> str:
    """The bitmap an export with a checkpoint serves (the changes since it)."""
    return f"{PREFIX}{sid}-{index}-bm{serial}"


def frozen_bitmap(sid: str, index: int) -> str:
    """The frozen copy of a disk's newest checkpoint bitmap at a snapshot's instant."""
    return f"{PREFIX}{sid}-{index}-frz"


def frozen_older(frozen: str, seq_hex: str) -> str:
    """The frozen copy of an older recording checkpoint bitmap (0.3.0)."""
    return f"{frozen}.{seq_hex}"


def frozen_delta(frozen: str) -> str:
    """The bitmap of the writes from the frozen copies to the instant (0.3.0)."""
    return f"{frozen}.d"


def temp_bitmap() -> str:
    """A scratch bitmap for one call (counting a union's bits)."""
    return f"{PREFIX}tmp-{time.time_ns():x}"


def scratch_names(tid: str) -> tuple[dict[str, str], str]:
    """The read-path self-test's node names and job id."""
    return ({n: f"{SCRATCH_PREFIX}{tid}-{n}" for n in ("src", "tgt", "cbw", "acc", "out")},
            f"{SCRATCH_PREFIX}{tid}")


def new_fdset_id(used: set[int]) -> int:
    while True:
        fid = FDSET_BASE + secrets.randbelow(FDSET_SPAN)
        if fid not in used:
            return fid


def is_own_fdset(fid: int) -> bool:
    return FDSET_BASE <= fid < FDSET_BASE + FDSET_SPAN


def checkpoint_bitmap(seq: int, size: int, checkpoint: str) -> str:
    return f"{CHECKPOINT_PREFIX}{seq:016x}.{size:x}.{checkpoint}"


def parse_checkpoint_bitmap(name: str) -> Optional[tuple[int, int, str]]:
    """(seq, size, checkpoint name) of one of our checkpoint bitmaps, else None."""
    m = _CHECKPOINT.match(name)
    return (int(m.group(1), 16), int(m.group(2), 16), m.group(3)) if m else None


def checkpoint_parts(name: str) -> tuple[int, int, str]:
    """(seq, size, checkpoint name) of a name already known to be one of our
    checkpoint bitmaps. Raises InternalError when it is not."""
    parsed = parse_checkpoint_bitmap(name)
    if parsed is None:
        raise errors.InternalError(f"{name!r} is not a checkpoint bitmap of libvirt-fleece")
    return parsed
