# SPDX-License-Identifier: LGPL-2.1-or-later
"""Follow a disk that libvirt hot-unplugged from under a snapshot.

qemu cannot refuse a hot-unplug: the guest device goes, libvirt's
``blockdev-del`` of its own nodes then fails because the snapshot's filter
and fleece image still hold them, and the image stays locked. When the
plugin next looks (any call, or the watcher on qemu's DEVICE_DELETED event)
it finds the snapshot disk's device gone from qemu and its target gone from
the live domain XML. It then stops that disk's exports, removes its own nodes,
fdset and fleece image, and deletes the two libvirt nodes its filter held when
the disk went away: the one exception to "never touch libvirt's nodes", and
only for a node that the record names, that its filter held, that no disk of
the live XML uses (by its ``index``), and that has no parent left.
"""

from __future__ import annotations

import logging
import re

from lxml import etree

from ..qemu import blockgraph
from .. import fleecefile, virt
from . import export as exports
from ..metadata import DiskRecord, SnapshotRecord
from ..session import Session

log = logging.getLogger(__name__)

_LIBVIRT_NODE = re.compile(r"libvirt-(\d+)-(format|storage)")


def _live_targets_and_indexes(sess: Session) -> tuple[set[str], set[str]]:
    root = etree.fromstring(virt.domain_xml(sess.dom).encode())
    targets = {dev for t in root.findall("./devices/disk/target")
               if (dev := t.get("dev")) is not None}
    indexes = {index for s in root.iter("source") if (index := s.get("index"))}
    return targets, indexes


def _remove_disk(sess: Session, snap: SnapshotRecord, d: DiskRecord) -> list[str]:
    """Remove one disk's exports, nodes, fdset and file; then libvirt's stranded nodes."""
    dom = sess.dom
    done = []
    held = blockgraph.file_children(dom).get(d.filter_node)
    users = [e for e in sess.state.exports() if e.snapshot == snap.name and e.disk == d.name]
    for e in users:
        exports.remove_export(sess, e, force=True)
        done.append(f"stopped export {e.name} of unplugged disk {d.name}")
    if sess.state.server is not None and not sess.state.server.exports:
        exports.stop_server(sess)
    nodes = blockgraph.node_names(dom)
    for node in (d.access_node, d.filter_node, d.fleece_node):
        blockgraph.remove_node(dom, node, nodes)
    blockgraph.remove_fdset(dom, d.fdset)
    fleecefile.remove(d.file, fleecefile.owner_tag(sess.uuid, snap.id, d.name))
    done.append(f"removed disk {d.name} of snapshot {snap.name}: libvirt unplugged it")
    if held == d.base:
        done += _delete_stranded(sess, d.base)
    return done


def _delete_stranded(sess: Session, format_node: str) -> list[str]:
    """Delete libvirt's format node and its storage node if nothing holds them now."""
    dom = sess.dom
    match = _LIBVIRT_NODE.fullmatch(format_node)
    if not match or match.group(2) != "format":
        return []
    _targets, indexes = _live_targets_and_indexes(sess)
    if match.group(1) in indexes:
        return []                     # a disk of the live XML still uses it
    storage = blockgraph.file_children(dom).get(format_node)
    done = []
    for node in (format_node, storage):
        same = _LIBVIRT_NODE.fullmatch(node) if node is not None else None
        if node is None or same is None or same.group(1) != match.group(1):
            break
        if blockgraph.parents(dom).get(node):
            break
        blockgraph.delete_node(dom, node)
        done.append(f"deleted node {node} that libvirt could not delete while the "
                    f"snapshot held it")
    return done


def follow(sess: Session) -> list[str]:
    """Remove what the plugin holds of disks libvirt unplugged; returns what was done."""
    devices = blockgraph.devices(sess.dom)
    # newest snapshot first: a newer filter sits on an older one of the same disk
    gone = [(s, d) for s in reversed(sess.state.snapshots) for d in s.disks
            if d.qdev not in devices]
    if not gone:
        return []
    targets, _indexes = _live_targets_and_indexes(sess)
    done = []
    for snap, d in gone:
        if d.name in targets:
            continue                  # still in the domain: not an unplug
        done += _remove_disk(sess, snap, d)
        snap.disks.remove(d)
        if not snap.disks:
            sess.state.snapshots.remove(snap)
            done.append(f"dropped snapshot {snap.name}: it had no disk left")
    if done:
        sess.save()
        for line in done:
            log.warning("domain %s: %s", sess.dom.name(), line)
    return done
