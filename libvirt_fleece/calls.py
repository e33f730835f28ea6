# SPDX-License-Identifier: LGPL-2.1-or-later
"""How every public call begins: the session, after interrupted work is finished.

A call records what it is about to do before it touches qemu or a file; if it
dies half-way, the next call on the domain finds the record and finishes or
undoes the work (:func:`.steps.reconcile.finish_interrupted`) before doing its own.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import libvirt

from .session import Session, open_session
from .steps import reconcile, watching

log = logging.getLogger(__name__)


@contextlib.contextmanager
def session(dom: libvirt.virDomain) -> Iterator[Session]:
    """The locked session of a public call, the domain reconciled first.

    Raises InvalidArgument, ConnectionError, OperationInvalid (see
    :func:`.virt.check_domain`) and the errors of reading the metadata.
    """
    with open_session(dom) as sess:
        sess.report += reconcile.finish_interrupted(sess)
        if watching.needed(sess.state):
            try:                # a watcher that died, or one of an older version
                watching.ensure_running(sess)
            except OSError as e:
                log.warning("domain %s: cannot start the watcher: %s", dom.name(), e)
        yield sess


def repair(dom: libvirt.virDomain) -> list[str]:
    """Make the domain's plugin state agree with qemu and the images; report what changed.

    Finishes or undoes interrupted calls, drops records that match nothing,
    removes the plugin's orphaned nodes, exports, fdsets, bitmaps and files,
    and rebuilds the checkpoint list. Every API call does the same first;
    this runs it on demand (``virsh-fleece repair DOMAIN``).
    Raises the errors of :func:`session`.
    """
    with session(dom) as sess:
        return list(sess.report)
