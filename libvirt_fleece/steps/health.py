# SPDX-License-Identifier: LGPL-2.1-or-later
"""Is each snapshot still the disk at its instant? Break it cleanly when not.

A snapshot breaks when its fleece image cannot take the old data a guest
write displaces. On the snapshot-access read path the copy-before-write
filter (on-cbw-error=break-snapshot) then keeps the guest writing and makes
every read of the snapshot fail. On the overlay read path (QEMU 7.2, see
:mod:`..qemu.readpath`) nothing could make the reads fail, so the filter fails the
guest's write instead; every such snapshot has a size limit well below the
free space, and breaking it at the limit takes the filter off before the
storage fills. qemu has no query for a broken snapshot, so the plugin judges
it from outside,
whenever it looks at a domain (every API call, and the watcher process on
qemu's BLOCK_WRITE_THRESHOLD event):

- a size limit (``<sizeLimit>`` or ``fleece_size_limit``): qemu's write
  threshold on the fleece image's file node fires when the image grows past
  it; the highest offset written (``query-blockstats``) shows it afterwards;
- a full filesystem: less than ``fleece_min_free`` bytes free where the
  fleece image lives means copies may have failed.

Breaking stops the snapshot's exports (clients are cut off), removes its
nodes and fleece image where the graph allows, and keeps the record with
state ``broken`` and the reason until the user deletes it.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..qemu import blockgraph, names, readpath
from .. import metadata
from . import export as exports, snapshot as snapshots
from ..metadata import SnapshotRecord
from ..session import Session

log = logging.getLogger(__name__)


def _problem(sess: Session, rec: SnapshotRecord, offsets: dict[str, int]) -> Optional[str]:
    for d in rec.disks:
        if rec.limit and offsets.get(names.protocol_node(d.fleece_node), 0) > rec.limit:
            return (f"the fleece image of disk {d.name!r} outgrew the snapshot's size limit "
                    f"of {rec.limit} bytes; delete the snapshot and take a new one")
        try:
            st = os.statvfs(os.path.dirname(d.file))
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < sess.cfg.fleece_min_free:
            return (f"the filesystem holding the fleece image of disk {d.name!r} "
                    f"({os.path.dirname(d.file)}) is full, so the snapshot may have lost old "
                    f"data: its reads are refused; free space, delete it and take a new one")
    return None


def break_snapshot(sess: Session, rec: SnapshotRecord, reason: str) -> None:
    """Stop a snapshot that can no longer be trusted; keep its record as broken."""
    log.error("domain %s: snapshot %s is broken: %s", sess.dom.name(), rec.name, reason)
    users = [e for e in sess.state.exports() if e.snapshot == rec.name]
    exports.stop_exports(sess, users, force=True)
    above = [s for s in sess.state.snapshots if s is not rec and s.state != metadata.BROKEN
             and any(d.below == mine.filter_node for d in s.disks for mine in rec.disks)]
    if above and rec.readpath == readpath.OVERLAY:
        # its filter must come off, or it keeps copying (and would fail guest writes
        # once the storage is full): the newer snapshots sitting on it go first
        for newer in reversed(above):
            break_snapshot(sess, newer, f"snapshot {rec.name!r} below it broke ({reason}); "
                                        f"on this QEMU the snapshots above a broken one "
                                        f"are removed with it")
    nodes = blockgraph.node_names(sess.dom)
    stacked = any(d.below == mine.filter_node and d.filter_node in nodes
                  for s in sess.state.snapshots if s is not rec
                  for d in s.disks for mine in rec.disks)
    if stacked:
        # a newer snapshot's filter sits on ours: only the access node can go now
        for d in rec.disks:
            blockgraph.remove_node(sess.dom, d.access_node, nodes)
    else:
        snapshots.teardown(sess, rec)
    rec.state, rec.reason = metadata.BROKEN, reason
    sess.save()


def check(sess: Session) -> list[str]:
    """Break every ready snapshot that outgrew its limit or lost its storage."""
    ready = [s for s in sess.state.snapshots if s.state == metadata.READY]
    if not ready:
        return []
    offsets = blockgraph.highest_offsets(sess.dom)
    done = []
    for rec in ready:
        reason = _problem(sess, rec, offsets)
        if reason:
            break_snapshot(sess, rec, reason)
            done.append(f"snapshot {rec.name} broke: {reason}")
    return done
