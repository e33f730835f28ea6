# SPDX-License-Identifier: LGPL-2.1-or-later
"""Checkpoints: the public calls (how they work: :mod:`.steps.checkpoint`).

A checkpoint is made with a snapshot (``VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT``);
an export of a later snapshot can then serve the blocks changed since it.
"""

from __future__ import annotations

import libvirt

from . import calls, errors
from .flags import check_flags
from .handle import NamedHandle
from .steps import checkpoint


class BlockCheckpoint(NamedHandle):
    """A checkpoint of a domain (a handle by name)."""

    def getXMLDesc(self, flags: int = 0) -> str:
        """<domainblockcheckpoint> with validity and bytes changed since, per disk.

        Raises NotFound once deleted."""
        check_flags(flags, 0, "getXMLDesc")
        with calls.session(self._dom) as sess:
            return checkpoint.describe(sess, self._name)

    def delete(self, flags: int = 0) -> None:
        """Delete the checkpoint, keeping every other one exact.

        Raises OperationInvalid while an export uses it, or while its bitmap also
        lives in a read-only backing image (after an external snapshot by libvirt)."""
        check_flags(flags, 0, "delete")
        with calls.session(self._dom) as sess:
            checkpoint.delete(sess, self._name)


def list_all(dom: libvirt.virDomain, flags: int = 0) -> list[BlockCheckpoint]:
    """The domain's checkpoints, oldest first."""
    check_flags(flags, 0, "blockCheckpointList")
    with calls.session(dom) as sess:
        return [BlockCheckpoint(dom, c.name) for c in checkpoint.reconcile(sess)]


def lookup(dom: libvirt.virDomain, name: str, flags: int = 0) -> BlockCheckpoint:
    """The checkpoint ``name``. Raises InvalidArgument, NotFound."""
    check_flags(flags, 0, "blockCheckpointLookupByName")
    if not isinstance(name, str):
        raise errors.InvalidArgument("checkpoint name must be a string")
    with calls.session(dom) as sess:
        return BlockCheckpoint(dom, checkpoint.find(sess, checkpoint.reconcile(sess), name).name)
