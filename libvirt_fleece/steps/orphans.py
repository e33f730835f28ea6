# SPDX-License-Identifier: LGPL-2.1-or-later
"""Find and remove what is ours but recorded nowhere, and records that match nothing.

The metadata is only a record: it can be lost, hand-edited, from an older
version or another host. After the in-progress records are handled, this
module compares it with qemu and the fleece directory:

- ready records whose nodes or exports no longer exist in qemu are dropped;
- nodes, exports and fdsets carrying the plugin's prefix (or fdset range)
  that no record references are removed (a guest device still pointing at
  such a filter is first pointed back at the node below it);
- files in ``fleece_dir`` marked as this domain's (xattr) that no record
  references are deleted.
Anything without the plugin's name is never touched.
"""

from __future__ import annotations

import logging
import os

import libvirt

from ..qemu import blockgraph, names, readpath
from .. import errors, fleecefile, metadata
from . import snapshot as snapshots
from .export import default_socket_path
from ..session import Session

log = logging.getLogger(__name__)


def _drop_stale_records(sess: Session, nodes: set[str], export_ids: set[str]) -> list[str]:
    done = []
    state = sess.state
    if state.server is not None:
        for e in [e for e in state.server.exports
                  if e.state == metadata.READY and e.id not in export_ids]:
            state.server.exports.remove(e)
            done.append(f"dropped record of export {e.name} (not in qemu)")
    for snap in [s for s in state.snapshots if s.state == metadata.READY]:
        if snap.needed_nodes() <= nodes:
            continue
        snapshots.teardown(sess, snap)
        state.snapshots.remove(snap)
        if state.server is not None:
            state.server.exports = [e for e in state.server.exports if e.snapshot != snap.name]
        done.append(f"dropped record of snapshot {snap.name} (its nodes are not in qemu)")
    return done


def _delete_what_can_go(dom: libvirt.virDomain, remaining: set[str], done: list[str]) -> None:
    """blockdev-del every node not (or no longer) in use, until nothing moves."""
    progress = True
    while progress and remaining:
        progress = False
        for node in sorted(remaining):
            try:
                blockgraph.delete_node(dom, node)
            except errors.QMPError:
                continue
            remaining.discard(node)
            done.append(f"removed orphaned node {node}")
            progress = True


def _remove_orphan_nodes(sess: Session, orphans: set[str]) -> list[str]:
    dom = sess.dom
    done: list[str] = []
    remaining = set(orphans)
    _delete_what_can_go(dom, remaining, done)      # access nodes first: they pin the filters
    children = blockgraph.file_children(sess.dom)
    for qdev, dev in blockgraph.devices(dom).items():
        top = dev["inserted"]["node-name"]
        below = top
        while below in orphans and below in children:
            below = children[below]
        if below != top:
            blockgraph.set_drive(dom, qdev, below)
    _delete_what_can_go(dom, remaining, done)
    for node in remaining:
        # implicit children (the image's protocol node) go with their parent
        if node in blockgraph.node_names(dom):
            log.error("domain %s: cannot remove orphaned node %s", dom.name(), node)
    return done


def sweep(sess: Session) -> list[str]:
    """Make the record and reality agree. Returns what was done (also logged)."""
    dom = sess.dom
    state = sess.state
    nodes = blockgraph.node_names(dom)
    # an export holds its node: with no node of ours there is no export of ours
    maybe_exports = state.server is not None or any(
        n.startswith(names.PREFIX) for n in nodes)
    export_ids = blockgraph.export_ids(dom) if maybe_exports else set()
    done = _drop_stale_records(sess, nodes, export_ids)
    wanted_nodes = {n for s in state.snapshots for d in s.disks
                    for n in (d.access_node, d.filter_node, d.fleece_node,
                              names.protocol_node(d.fleece_node))}
    wanted_exports = {e.id for e in state.exports()}
    for eid in sorted(export_ids):
        if eid.startswith(names.PREFIX) and eid not in wanted_exports:
            blockgraph.export_del(dom, eid, force=True)
            done.append(f"removed orphaned export {eid}")
    done += _stop_orphan_server(sess, removed_exports=any("export" in d for d in done))
    orphans = {n for n in blockgraph.node_names(dom)
               if n.startswith(names.PREFIX) and n not in wanted_nodes}
    if any(n.startswith(names.SCRATCH_PREFIX) for n in orphans):
        done += readpath.remove_leftover_jobs(dom)   # a killed self-test's job holds them
    if orphans:
        done += _remove_orphan_nodes(sess, orphans)
    wanted_fdsets = {d.fdset for s in state.snapshots for d in s.disks}
    for fid in sorted(blockgraph.fdset_ids(dom)):
        if names.is_own_fdset(fid) and fid not in wanted_fdsets:
            blockgraph.remove_fdset(dom, fid)
            done.append(f"removed orphaned fdset {fid}")
    done += _remove_orphan_files(sess)
    for line in done:
        log.warning("domain %s: repair: %s", dom.name(), line)
    return done


def _stop_orphan_server(sess: Session, removed_exports: bool) -> list[str]:
    """Stop an NBD server of ours that no record knows (its exports were orphans)."""
    if sess.state.server is not None:
        return []
    path = default_socket_path(sess.cfg, sess.dom.name())
    is_ours = fleecefile.socket_problem(path, sess.uuid) == ""
    if not (removed_exports or is_ours):
        return []
    if any(not e.startswith(names.PREFIX) for e in blockgraph.export_ids(sess.dom)):
        return []          # someone else's server (libvirt backup, migration)
    blockgraph.nbd_server_stop(sess.dom)
    if is_ours:
        os.unlink(path)
    return ["stopped an orphaned NBD server"]


def _remove_orphan_files(sess: Session) -> list[str]:
    """Remove the images in ``fleece_dir`` marked for this domain that no record names.
    Unlike the hook's sweep it looks at every entry (no cap): repair runs in a call."""
    wanted = {d.file for s in sess.state.snapshots for d in s.disks}
    done: list[str] = []
    try:
        marked = fleecefile.marked_files(sess.cfg.fleece_dir, sess.uuid)
    except OSError:
        return done
    for path, tag in marked:
        if path not in wanted and fleecefile.remove(path, tag):
            done.append(f"removed orphaned fleece image {path}")
    return done
