# SPDX-License-Identifier: LGPL-2.1-or-later
"""Temporary block snapshots (image fleecing) of a running domain's disks.

Per disk, a snapshot is three qemu nodes and one file::

    guest device --drive--> fleece-ID-N-cbw (copy-before-write, on-cbw-error=break-snapshot)
                                 |  file                \\ target
                         disk's format node            fleece-ID-N-img (qcow2, our fd)
    export --> fleece-ID-N-acc (snapshot-access on the filter)

The filter copies old data to the fleece image before a guest write lands;
the access node reads the disk as it was when the filter went in. When the
fleece storage fills up, the snapshot breaks (its reads fail) and the
guest's writes go on. Filters of several snapshots of one disk stack, so
such snapshots are deleted newest first.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib
from typing import Optional

import libvirt

from ..qemu import bitmaps, blockgraph, names, readpath
from .. import documents, errors, fleecefile, metadata, pauseguard, virt
from . import checkpoint as checkpoints, export
from ..faults import killpoint
from .livedisks import live_disks
from ..metadata import DiskRecord, SnapshotRecord
from ..pauseguard import PauseGuard
from ..session import Session

log = logging.getLogger(__name__)


def document(rec: SnapshotRecord) -> str:
    """The filled-in <domainblocksnapshot> of a record."""
    return documents.snapshot_document(rec.name, rec.created, [
        {"name": d.name, "file": d.file, "capacity": d.capacity,
         "allocation": fleecefile.allocation(d.file)} for d in rec.disks],
        state=rec.state, reason=rec.reason, checkpoint=rec.checkpoint,
        size_limit=rec.limit)


def delete(sess: Session, rec: SnapshotRecord, stop_exports: bool) -> None:
    """Remove the snapshot's nodes, fleece files and record.

    Raises OperationInvalid while it is exported (unless ``stop_exports``),
    while a newer snapshot of one of its disks exists (it names that one),
    or when qemu refuses now (the record stays 'deleting').
    """
    check_nothing_above(sess, rec)
    check_no_foreign_job(sess, [(d.name, d.base) for d in rec.disks])
    users = [e for e in sess.state.exports() if e.snapshot == rec.name]
    if users and not stop_exports:
        raise errors.OperationInvalid(
            f"snapshot {rec.name!r} is exported as "
            f"{', '.join(repr(e.name) for e in users)}; stop the export first "
            f"or delete with VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS "
            f"(virsh-fleece blocksnapshot-delete --stop-exports)")
    export.stop_exports(sess, users, force=True)
    rec.state = metadata.DELETING
    sess.save()
    killpoint("snapshot-delete:recorded")
    try:
        teardown(sess, rec, killpoints=True)
    except errors.QMPError as e:
        raise errors.OperationInvalid(
            f"cannot remove snapshot {rec.name!r} now, qemu refused: {e.desc}; it "
            f"stays 'deleting' and the next call on the domain finishes it") from e
    sess.state.snapshots.remove(rec)
    sess.save()
    checkpoints.reconcile(sess)
    log.info("domain %s: deleted snapshot %s", sess.dom.name(), rec.name)


def lookup(sess: Session, name: str) -> SnapshotRecord:
    """The record of snapshot ``name``. Raises NotFound."""
    rec = sess.state.snapshot(name) if isinstance(name, str) else None
    if rec is None:
        raise errors.NotFound(
            f"no snapshot {name!r} in domain {sess.dom.name()!r} "
            f"(blockSnapshotList shows the existing ones)")
    return rec


def check_no_foreign_job(sess: Session, disks: list[tuple[str, Optional[str]]]) -> None:
    """Refuse to change the graph of disks (name, format node) that a job of libvirt's
    (backup, commit, copy, pull) works on now. Raises OperationInvalid."""
    for disk, node in disks:
        jobs = blockgraph.foreign_jobs(sess.dom, disk, {node} if node else set())
        if jobs:
            raise errors.OperationInvalid(
                f"libvirt's job {jobs[0]} is running on disk {disk!r} of domain "
                f"{sess.dom.name()!r}; try again when it ends (virsh domjobinfo; "
                f"virsh domjobabort ends it)")


def check_nothing_above(sess: Session, rec: SnapshotRecord) -> None:
    for other in sess.state.snapshots:
        for d in other.disks:
            if any(d.below == mine.filter_node for mine in rec.disks):
                raise errors.OperationInvalid(
                    f"snapshot {other.name!r} of disk {d.name!r} is newer than "
                    f"{rec.name!r} and sits on top of it; delete {other.name!r} first "
                    f"(snapshots of one disk are deleted newest first)")


# --- creation --------------------------------------------------------------------

def _default_fleece_path(sess: Session, snap: str, disk: str) -> str:
    os.makedirs(sess.cfg.fleece_dir, mode=0o700, exist_ok=True)
    return os.path.join(sess.cfg.fleece_dir, f"{sess.dom.name()}.{snap}.{disk}.qcow2")


def _plan(sess: Session, spec: documents.SnapshotSpec,
          make_checkpoint: bool) -> tuple[SnapshotRecord, tuple[list[dict], list[dict]]]:
    """Check a request against the domain and plan all names and bitmap actions.

    Changes nothing. Raises NotFound, InvalidArgument, AlreadyExists, OperationInvalid.
    """
    dom = sess.dom
    name = spec.name or str(uuidlib.uuid4())
    if sess.state.snapshot(name):
        raise errors.AlreadyExists(f"domain {dom.name()!r} already has a snapshot {name!r}")
    live = live_disks(sess)
    if spec.disks:
        wanted = []
        for ds in spec.disks:
            found = next((ld for ld in live if ld.name == ds.name), None)
            if found is None:
                raise errors.NotFound(
                    f"disk {ds.name!r} not found in domain {dom.name()!r} (its disks: "
                    f"{', '.join(ld.name for ld in live) or 'none'})")
            reason = found.disk.unsupported_reason()
            if reason:
                raise errors.InvalidArgument(f"disk {ds.name!r} cannot be snapshotted: {reason}")
            wanted.append((found, ds.fleece))
    else:
        wanted = [(ld, None) for ld in live if ld.disk.unsupported_reason() is None]
        if not wanted:
            raise errors.OperationInvalid(f"domain {dom.name()!r} has no disk that can be "
                                          f"snapshotted (file or block, qcow2 or raw, writable)")
    nodes = blockgraph.node_names(dom)
    sid = names.new_snapshot_id(nodes)
    used_fdsets = blockgraph.fdset_ids(dom) | {d.fdset for s in sess.state.snapshots
                                               for d in s.disks}
    records = []
    for index, (ld, path) in enumerate(wanted):
        if ld.qdev is None:
            raise errors.OperationInvalid(f"qemu shows no device for disk {ld.name!r}")
        if ld.base is None or ld.top is None:     # (a disk with a device has a top)
            raise errors.OperationInvalid(
                f"disk {ld.name!r} of domain {dom.name()!r} is in use by a block job or "
                f"another tool (its top node is {ld.top!r}); try again when that has finished")
        if virt.block_job_active(dom, ld.name):
            raise errors.OperationInvalid(
                f"disk {ld.name!r} has an active block job; try again when it finished")
        check_no_foreign_job(sess, [(ld.name, ld.base)])
        path = path or _default_fleece_path(sess, name, ld.name)
        fleecefile.check_path(path)
        fdset = names.new_fdset_id(used_fdsets)
        used_fdsets.add(fdset)
        records.append(DiskRecord(
            name=ld.name, file=path, qdev=ld.qdev, base=ld.base, below=ld.top,
            fdset=fdset, capacity=ld.capacity, **names.disk_node_names(sid, index)))
    rec = SnapshotRecord(name=name, id=sid, state=metadata.CREATING,
                         created=int(time.time()), disks=records)
    rec.readpath = readpath.choose(dom, sess.cfg.state_dir, sess.cfg.read_path).readpath
    rec.limit = _size_limit(sess, rec, spec.size_limit or sess.cfg.fleece_size_limit)
    cps = checkpoints.scan(sess, live)
    actions = checkpoints.plan_snapshot(dom.name(), rec, {ld.name: ld for ld in live}, cps,
                                        make_checkpoint)
    return rec, actions


def _size_limit(sess: Session, rec: SnapshotRecord, asked: Optional[int]) -> Optional[int]:
    """The snapshot's size limit; on the overlay read path there always is one.

    Each fleece image may grow to the limit; the images' filesystems must have
    room for all of them above ``fleece_min_free``, or the overlay snapshot is
    refused (a full fleece would fail the guest's writes there). Without a
    configured limit, an overlay snapshot gets ``overlay_size_limit`` or half of
    the free space, shared by its images on each filesystem. Raises
    OperationInvalid when there is not enough room.
    """
    if rec.readpath != readpath.OVERLAY:
        return asked
    by_fs: dict[int, list[str]] = {}
    for d in rec.disks:
        directory = os.path.dirname(d.file)
        by_fs.setdefault(os.stat(directory).st_dev, []).append(directory)
    limit = asked or sess.cfg.overlay_size_limit
    for dirs in by_fs.values():
        st = os.statvfs(dirs[0])
        if st.f_blocks == 0:
            continue        # proc, sysfs: creating the image there fails and says why
        room = st.f_bavail * st.f_frsize - sess.cfg.fleece_min_free
        fit = room // len(dirs)
        if limit is None:
            per_image = fit // 2
            if per_image < 1 << 20:
                raise errors.OperationInvalid(
                    f"only {max(room, 0)} bytes are free for fleece images in {dirs[0]}: on "
                    f"this QEMU a snapshot needs room for its size limit (see "
                    f"overlay_size_limit); free space or choose another fleece directory")
            limit = per_image if limit is None else min(limit, per_image)
        elif limit > fit:
            raise errors.OperationInvalid(
                f"the size limit of {limit} bytes per fleece image does not fit in {dirs[0]} "
                f"({max(room, 0)} bytes free above fleece_min_free for {len(dirs)} image(s)): "
                f"on this QEMU a full fleece would fail the guest's writes; free space, "
                f"lower the limit or choose another fleece directory")
    return limit


def _switch(sess: Session, rec: SnapshotRecord, actions: list[dict]) -> None:
    """The snapshot's instant: bitmap actions, then every device onto its filter."""
    bitmaps.run(sess.dom, actions)
    killpoint("snapshot-create:bitmaps-changed")
    for d in rec.disks:
        blockgraph.set_drive(sess.dom, d.qdev, d.filter_node)
    killpoint("snapshot-create:filter-inserted")


def _insert_filters(sess: Session, rec: SnapshotRecord, actions: list[dict]) -> None:
    """Point every disk's device at its filter, all at one instant.

    With several disks, or bitmaps to freeze with the data, the guest's vCPUs
    are paused for the few ms this takes (unless the user had paused it
    already), under a guard process that resumes the guest should this
    process die meanwhile.
    """
    dom = sess.dom
    if (len(rec.disks) == 1 and not actions) or \
            virt.domain_state(dom) != libvirt.VIR_DOMAIN_RUNNING:
        _switch(sess, rec, actions)
        return
    limit = sess.cfg.pause_guard_timeout
    marker = pauseguard.marker_path(sess.cfg.state_dir, sess.uuid)
    with PauseGuard(dom.connect().getURI(), sess.uuid, limit, marker) as guard:
        with open(marker, "w"):
            pass
        virt.suspend(dom)
        guard.paused()
        started = time.monotonic()
        try:
            killpoint("snapshot-create:guest-paused")
            _switch(sess, rec, actions)
        finally:
            virt.resume(dom)
            guard.resumed()
            os.unlink(marker)
        paused = time.monotonic() - started
    log.debug("domain %s: guest paused %.1f ms for snapshot %s",
              dom.name(), paused * 1000, rec.name)
    if paused > limit:
        raise errors.OperationInvalid(
            f"the guest stayed paused {paused:.1f} s, longer than pause_guard_timeout; "
            f"the disks may not be at one instant, so the snapshot was not kept")


def _build(sess: Session, rec: SnapshotRecord, before: list[dict],
           actions: list[dict]) -> None:
    dom = sess.dom
    fds = fleecefile.create_many([(d.file, d.capacity,
                                   fleecefile.owner_tag(sess.uuid, rec.id, d.name))
                                  for d in rec.disks])
    killpoint("snapshot-create:file-created")
    try:
        for d, fd in zip(rec.disks, fds):
            blockgraph.add_fd(dom, fd, d.fdset, f"libvirt-fleece {rec.name} {d.name}")
    finally:
        for fd in fds:
            os.close(fd)
    killpoint("snapshot-create:fd-added")
    overlay = rec.readpath == readpath.OVERLAY
    for d in rec.disks:
        # the backing link also holds qemu's op blocker on the disk: libvirt's external
        # snapshot, commit, copy and resize are refused before they change anything
        blockgraph.add_fleece_node(dom, d.fleece_node, d.fdset, backing=d.below)
        killpoint("snapshot-create:fleece-node-added")
        blockgraph.add_filter(dom, d.filter_node, d.below, d.fleece_node,
                              break_guest_write=overlay)
        killpoint("snapshot-create:filter-added")
    bitmaps.run(dom, before)          # frozen copies, the guest running (plan_snapshot)
    killpoint("snapshot-create:bitmaps-copied")
    _insert_filters(sess, rec, actions)
    if not overlay:
        for d in rec.disks:
            blockgraph.add_access(dom, d.access_node, d.filter_node)
    killpoint("snapshot-create:read-path-built")


def teardown(sess: Session, rec: SnapshotRecord, killpoints: bool = False) -> None:
    """Remove whatever exists of a snapshot, newest step first; tolerate missing parts."""
    dom = sess.dom
    nodes = blockgraph.node_names(dom)
    devs = blockgraph.devices(dom)
    children = blockgraph.file_children(dom) if any(
        d.filter_node in nodes for d in rec.disks) else {}

    def step(name: str) -> None:
        if killpoints:
            killpoint(f"snapshot-delete:{name}")

    for d in reversed(rec.disks):
        blockgraph.remove_node(dom, d.access_node, nodes)
        step("access-node-removed")
        dev = devs.get(d.qdev)
        if dev is not None and dev["inserted"]["node-name"] == d.filter_node:
            # the node under the filter now, which need not be the one recorded
            blockgraph.set_drive(dom, d.qdev, children.get(d.filter_node, d.below))
        blockgraph.remove_node(dom, d.filter_node, nodes)
        step("filter-removed")
        blockgraph.remove_node(dom, d.fleece_node, nodes)
        blockgraph.remove_fdset(dom, d.fdset)
        step("fleece-node-removed")
        fleecefile.remove(d.file, fleecefile.owner_tag(sess.uuid, rec.id, d.name))
        step("file-removed")
    checkpoints.undo_snapshot_bitmaps(sess, rec, undo_checkpoint=rec.state == metadata.CREATING)


def create(sess: Session, spec: documents.SnapshotSpec, make_checkpoint: bool) -> SnapshotRecord:
    """Take the snapshot ``spec`` asks for (and a checkpoint with it if asked).

    Raises InvalidArgument, NotFound, AlreadyExists, OperationInvalid, QMPError;
    on any failure everything done so far is undone.
    """
    dom = sess.dom
    rec, (before, actions) = _plan(sess, spec, make_checkpoint)
    sess.state.snapshots.append(rec)
    sess.save()
    killpoint("snapshot-create:recorded")
    try:
        _build(sess, rec, before, actions)
        if rec.limit:
            set_limit(sess, rec)
        rec.state = metadata.READY
        sess.save()
    except BaseException:
        log.info("domain %s: creating snapshot %s failed; undoing", dom.name(), rec.name)
        _unwind(sess, rec)
        raise
    killpoint("snapshot-create:ready")
    if rec.checkpoint:
        checkpoints.reconcile(sess)
    log.info("domain %s: created snapshot %s of %s", dom.name(), rec.name,
             ", ".join(d.name for d in rec.disks))
    return rec


def set_limit(sess: Session, rec: SnapshotRecord) -> None:
    """Arm qemu's write threshold on each fleece image of a limited snapshot
    (:mod:`.health` breaks the snapshot when it fires)."""
    assert rec.limit is not None        # a limited snapshot
    for d in rec.disks:
        blockgraph.set_write_threshold(sess.dom, names.protocol_node(d.fleece_node),
                                       rec.limit)


def _unwind(sess: Session, rec: SnapshotRecord) -> None:
    try:
        teardown(sess, rec)
    except errors.Error:
        log.exception("domain %s: undoing snapshot %s failed; the next call retries",
                      sess.dom.name(), rec.name)
        return
    sess.state.snapshots.remove(rec)
    sess.save()
