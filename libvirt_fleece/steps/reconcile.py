# SPDX-License-Identifier: LGPL-2.1-or-later
"""Clean up after interrupted calls.

A call records what it is about to do (state ``creating`` or ``deleting``)
before it touches qemu or the disk. If it dies half-way, the next call on
the domain finds those records here and undoes them: snapshots being
created or deleted are torn down, exports being added or removed are
removed, and a server left without exports is stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import libvirt

from ..qemu import bitmaps, names
from .. import errors, metadata, pauseguard, virt
from . import (checkpoint as checkpoints, export as exports, health, orphans,
               snapshot as snapshots, unplug)
from ..session import Session

log = logging.getLogger(__name__)


def finish_interrupted(sess: Session) -> list[str]:
    """Undo every record left in progress, remove orphans, save the state when it
    changed, and rebuild the checkpoint list. Returns what was repaired."""
    state = sess.state
    changed = sess.repaired
    _resume_if_left_paused(sess)
    server = state.server
    if server is not None:
        for exp in [e for e in server.exports if e.state in metadata.IN_PROGRESS]:
            log.warning("domain %s: removing export %s left behind by an interrupted call",
                        sess.dom.name(), exp.name)
            exports.remove_export(sess, exp, force=True)
            changed = True
        if server.state != metadata.READY or not server.exports:
            log.warning("domain %s: stopping an NBD server left behind by an interrupted call",
                        sess.dom.name())
            exports.stop_server(sess)
            changed = True
    blocked: list[str] = []
    for snap in [s for s in state.snapshots if s.state in metadata.IN_PROGRESS]:
        log.warning("domain %s: removing snapshot %s left %s by an interrupted call",
                    sess.dom.name(), snap.name, snap.state)
        try:
            snapshots.teardown(sess, snap)
        except errors.QMPError as e:
            # qemu refuses now (a job of libvirt's holds the disk, say): keep the record,
            # the next call tries again; listing and looking up must go on working
            log.error("domain %s: cannot finish removing snapshot %s yet: %s",
                      sess.dom.name(), snap.name, e)
            blocked.append(f"snapshot {snap.name} is still '{snap.state}': qemu refused to "
                           f"remove it ({e.desc}); the next call tries again")
            continue
        state.snapshots.remove(snap)
        changed = True
    done = blocked + unplug.follow(sess)
    done += orphans.sweep(sess)
    done += health.check(sess)
    if changed or done:
        sess.save()
    _remove_orphan_bitmaps(sess)
    checkpoints.reconcile(sess)
    return done


def _resume_if_left_paused(sess: Session) -> None:
    """A plugin process died with the guest paused and its guard could not resume it
    (libvirtd was restarting, say): the marker it left says so. Resume."""
    marker = pauseguard.marker_path(sess.cfg.state_dir, sess.uuid)
    if not os.path.exists(marker):
        return
    state, reason = sess.dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER:
        log.warning("domain %s: resuming the guest a dead libvirt-fleece call left paused",
                    sess.dom.name())
        try:
            virt.resume(sess.dom)
        except errors.OperationInvalid:
            if sess.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                raise
            log.info("domain %s: the pause guard resumed the guest first", sess.dom.name())
    os.unlink(marker)


def _remove_orphan_bitmaps(sess: Session) -> None:
    """Temporary bitmaps of ours that no snapshot or export references (a crash)."""
    wanted: set[tuple[Optional[str], str]] = {
        (d.base, name) for s in sess.state.snapshots for d in s.disks
        for name in checkpoints.frozen_bitmaps(d)}
    wanted |= {(e.node, e.bitmap) for e in sess.state.exports() if e.bitmap}
    actions = [bitmaps.remove(b.node, b.name)
               for bs in bitmaps.by_node(sess.dom).values() for b in bs
               if b.name.startswith(names.TEMP_BITMAP_PREFIX) and not b.persistent
               and not b.name.startswith(names.CHECKPOINT_PREFIX)
               and (b.node, b.name) not in wanted]
    if actions:
        log.warning("domain %s: removing %d orphaned temporary bitmap(s)",
                    sess.dom.name(), len(actions))
        bitmaps.run(sess.dom, actions)
