# SPDX-License-Identifier: LGPL-2.1-or-later
"""NBD exports of snapshots: the public calls (the steps are :mod:`.steps.export`).

qemu's one NBD server starts lazily with the first export and stops with the last.
"""

from __future__ import annotations

import libvirt

from . import calls, documents
from .flags import check_flags
from .steps import export

VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE = 1 << 0


def start(dom: libvirt.virDomain, xmlDesc: str, flags: int = 0) -> None:
    """Export snapshot disks read-only over NBD, with a checkpoint's dirty bitmap if asked.

    Raises InvalidArgument, NotFound, AlreadyExists, OperationInvalid, QMPError;
    on any failure the exports started by this call are removed again."""
    check_flags(flags, 0, "blockExportStart")
    spec = documents.parse_export(xmlDesc)
    with calls.session(dom) as sess:
        export.start(sess, spec)


def stop(dom: libvirt.virDomain, xmlDesc: str, flags: int = 0) -> None:
    """Stop exports (``VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE``: even with clients attached).

    Raises InvalidArgument, NotFound."""
    check_flags(flags, VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE, "blockExportStop")
    spec = documents.parse_export(xmlDesc)
    with calls.session(dom) as sess:
        export.stop(sess, spec, force=bool(flags & VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE))


def list_all(dom: libvirt.virDomain, flags: int = 0) -> list[str]:
    """The <domainblockexportlist> of the domain's server (an empty list without one)."""
    check_flags(flags, 0, "blockExportList")
    with calls.session(dom) as sess:
        return export.list_documents(sess)
