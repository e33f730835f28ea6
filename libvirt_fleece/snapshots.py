# SPDX-License-Identifier: LGPL-2.1-or-later
"""Temporary block snapshots: the public calls (how they work: :mod:`.steps.snapshot`).

A snapshot is a consistent point-in-time view of a running domain's disks,
kept in temporary fleece images while the guest writes on; exports
(:mod:`.exports`) serve it over NBD.
"""

from __future__ import annotations

import libvirt

from . import calls, documents, errors
from .flags import check_flags
from .handle import NamedHandle
from .steps import snapshot, watching

VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT = 1 << 0
VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS = 1 << 0

_CREATE_FLAGS = VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT
_DELETE_FLAGS = VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS


class BlockSnapshot(NamedHandle):
    """A temporary block snapshot of a running domain (a handle by name)."""

    def getXMLDesc(self, flags: int = 0) -> str:
        """The filled-in <domainblocksnapshot>. Raises NotFound once deleted."""
        check_flags(flags, 0, "getXMLDesc")
        with calls.session(self._dom) as sess:
            return snapshot.document(snapshot.lookup(sess, self._name))

    def delete(self, flags: int = 0) -> None:
        """Remove the snapshot's nodes, fleece files and record.

        Raises OperationInvalid while it is exported (unless
        VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS is given) or while a
        newer snapshot of one of its disks exists (it names that one).
        """
        check_flags(flags, _DELETE_FLAGS, "delete")
        with calls.session(self._dom) as sess:
            stop_exports = bool(flags & VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
            snapshot.delete(sess, snapshot.lookup(sess, self._name), stop_exports)


def create(dom: libvirt.virDomain, xmlDesc: str, flags: int = 0) -> BlockSnapshot:
    """Take a temporary block snapshot (and with the CHECKPOINT flag, a checkpoint).

    Raises InvalidArgument, NotFound, AlreadyExists, OperationInvalid, QMPError;
    on any failure everything done so far is undone.
    """
    check_flags(flags, _CREATE_FLAGS, "blockSnapshotCreateXML")
    spec = documents.parse_snapshot(xmlDesc)
    with calls.session(dom) as sess:
        rec = snapshot.create(sess, spec,
                              bool(flags & VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT))
        if rec.limit:
            watching.ensure_running(sess)
        return BlockSnapshot(dom, rec.name)


def list_all(dom: libvirt.virDomain, flags: int = 0) -> list[BlockSnapshot]:
    """The domain's snapshots, oldest first."""
    check_flags(flags, 0, "blockSnapshotList")
    with calls.session(dom) as sess:
        return [BlockSnapshot(dom, s.name) for s in sess.state.snapshots]


def lookup(dom: libvirt.virDomain, name: str, flags: int = 0) -> BlockSnapshot:
    """The snapshot ``name``. Raises InvalidArgument, NotFound."""
    check_flags(flags, 0, "blockSnapshotLookupByName")
    if not isinstance(name, str):
        raise errors.InvalidArgument("snapshot name must be a string")
    with calls.session(dom) as sess:
        return BlockSnapshot(dom, snapshot.lookup(sess, name).name)
