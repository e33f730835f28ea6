# SPDX-License-Identifier: LGPL-2.1-or-later
"""Checkpoints: changed-block tracking kept in persistent dirty bitmaps of the qcow2 images.

Per disk, checkpoint X_i owns one persistent bitmap B_i that records every
write since X_i, until the checkpoint is deleted (as libvirt's own checkpoints
do, so that libvirt's blockpull, blockcopy and commit carry it). Versions 0.1
and 0.2 kept only the newest bitmap recording: such a disabled B_i holds the
writes from X_i until X_i+1 was made. The changes since X_k are therefore
``B_k | B_k+1 | ...`` (a recording B_j holds every newer one, so the union
stops at the first recording bitmap), right for both kinds.

The images are the truth: the chain, names, creation times and disk sizes
are all in the bitmap names (:mod:`..qemu.names`), so they can be
rebuilt after the domain's metadata is lost. The metadata holds a mirror
(visible in the domain XML, per disk as the RFC shows) that also remembers
checkpoints whose bitmaps vanished, so a crash is reported, never hidden.

A snapshot S taken while X_a is the newest checkpoint freezes a private
copy of every recording checkpoint bitmap at S's instant (:func:`frozen_copies`;
F_S of B_a, the anchor, and one per older recording bitmap). The changes
X_k -> S are then the union walk above with each recording bitmap replaced by
its frozen copy, exact whatever is created or deleted later: deleting X_j
merges B_j into a predecessor that no longer records (and enables it when B_j
recorded), and a snapshot's frozen copy of X_j first takes in that
predecessor when the snapshot has no copy of its own of it; the copy then
serves the predecessor (:func:`serving_copies`).

Across libvirt's external snapshots, commits, pulls and copies (see
:mod:`..qemu.chains`), B_i may be spread over several layers of the disk's backing
chain, one same-named copy per layer from the layer where X_i was made up to
the layer that was the top when it stopped recording (the top itself for the
newest): B_i is then the union of those copies, and every merge reads them
all. Only the top image is writable: qemu refuses to change a bitmap in a
read-only backing image, so a checkpoint with copies below the top cannot be
deleted until a commit or pull has merged them.

A checkpoint is invalid on a disk when its bitmap, or that of any newer
checkpoint of the disk, is missing or inconsistent (qemu died), misses a
layer of the chain where it must have a copy, lost a non-empty copy since
the last look while it no longer recorded (libvirt merges only recording
bitmaps when it drops a layer; the mirror remembers how many copies held
data, and a reason found this way is kept), or the disk changed size since
it was made.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

from lxml import etree

from ..qemu import bitmaps, chains, names
from .. import errors, metadata, xmlutil
from ..faults import killpoint
from .livedisks import LiveDisk, live_disks
from ..metadata import DiskRecord, SnapshotRecord
from ..session import Session

log = logging.getLogger(__name__)


CRASHED = ("qemu stopped uncleanly (crash or kill -9) while the bitmap was in use, so it "
           "may miss changes; take a full backup")
MISSING = ("its bitmap is missing from the image (qemu stopped uncleanly before storing it, "
           "the image was replaced, or libvirt's blockcopy or blockpull did not carry it: "
           "they carry only bitmaps that still record, and 0.1/0.2 stopped older ones); "
           "take a full backup")
NOT_RECORDING = "its bitmap no longer records changes; take a full backup"


@dataclasses.dataclass
class CheckpointDisk:
    disk: str
    bitmap: str
    seq: int
    size: int
    node: Optional[str]          # top node, when it holds the bitmap (only it can change)
    present: bool = True         # some layer of the chain holds the bitmap
    inconsistent: bool = False
    recording: bool = False
    valid: bool = True
    reason: str = ""
    deleting: bool = False
    spread: Optional[chains.Spread] = None      # its copies down the backing chain
    chain_reason: str = ""                      # why the chain lost part of its history
    top: Optional[str] = None                   # the disk's top node (below our filters)
    copies: Optional[int] = None                # non-empty copies down the chain (mirror)

    def sources(self) -> list:
        """Merge sources for the whole bitmap (every copy down the chain)."""
        if self.spread is None or [la.node for la in self.spread.layers] == [self.node]:
            return [self.bitmap]            # on the top node, where the merges happen
        return self.spread.sources()

    @property
    def lower_layers(self) -> list[chains.Layer]:
        """The read-only layers below the top that hold a copy."""
        return [] if self.spread is None else [la for la in self.spread.layers
                                               if la.node != self.node]


@dataclasses.dataclass
class Checkpoint:
    name: str
    seq: int
    disks: list[CheckpointDisk]

    @property
    def created(self) -> int:
        return self.seq // 1_000_000_000

    @property
    def valid(self) -> bool:
        return all(d.valid for d in self.disks)

    def disk(self, name: str) -> Optional[CheckpointDisk]:
        return next((d for d in self.disks if d.disk == name), None)


# --- scanning the images ---------------------------------------------------------

def _is_checkpoint(name: str) -> bool:
    return names.parse_checkpoint_bitmap(name) is not None


def _from_spread(disk: str, v: chains.BlockView, chain: list[chains.Layer],
                 s: chains.Spread, reason: str) -> Optional[CheckpointDisk]:
    """One disk's checkpoint entry from the copies of its bitmap down the chain."""
    copies = [v.bitmap_names(la.node)[s.name] for la in s.layers]
    if not all(b.get("persistent", False) for b in copies):
        return None
    seq, size, _name = names.checkpoint_parts(s.name)
    top = copies[0] if s.in_top else None
    return CheckpointDisk(
        disk=disk, bitmap=s.name, seq=seq, size=size, node=chain[0].node if top else None,
        present=True, spread=s, chain_reason=reason, top=chain[0].node,
        inconsistent=any(b.get("inconsistent", False) for b in copies),
        recording=bool(top and top.get("recording", False)))


def disk_entries(v: chains.BlockView, disk: str, top: str) -> list[CheckpointDisk]:
    """The checkpoint bitmaps of one disk whose top node is ``top``, each with its
    copies down the backing chain and why the chain lost its history, if it did
    (validity is judged later, with the metadata's memory)."""
    chain = v.chain(top)
    found = chains.spreads(v, chain, _is_checkpoint).values()
    newest_first = sorted(found, key=lambda s: names.checkpoint_parts(s.name)[0],
                          reverse=True)
    reasons = chains.broken_reasons(disk, chain, newest_first)
    entries = (_from_spread(disk, v, chain, s, reasons[s.name]) for s in newest_first)
    return [e for e in entries if e is not None]


CHAIN_PREFIX = "the backing chain of "


def _sticky(reason: str) -> str:
    """A remembered reason that holds for good (the images no longer show it)."""
    return reason if reason.startswith(CHAIN_PREFIX) else ""


def _dropped_reason(e: CheckpointDisk, copies: Optional[int]) -> str:
    """Why a bitmap that no longer records (made by 0.1/0.2) lost history since the
    last look ("" if it did not): libvirt's commit, pull and copy merge only
    recording bitmaps, so when fewer of its copies hold data than before, a layer
    went with its part. Unless a remaining copy records: a commit into that layer
    dirtied it with every cluster it copied (nothing lost, the map may grow)."""
    if copies is None or e.spread is None or e.recording or e.spread.any_recording \
            or e.spread.nonempty >= copies:
        return ""
    return (f"{CHAIN_PREFIX}{e.disk} changed since the checkpoint: a backing image that held "
            f"part of its bitmap was dropped (libvirt's blockpull, blockcommit and blockcopy "
            f"carry only bitmaps that still record): take a full backup")


def _judge(entries: list[CheckpointDisk], capacity: Optional[int]) -> None:
    """Set valid/reason on one disk's entries (any order): newest first, a broken
    checkpoint breaks every older one."""
    broken = ""
    ordered = sorted(entries, key=lambda e: e.seq, reverse=True)
    for i, e in enumerate(ordered):
        own = ""
        if e.chain_reason:
            own = e.chain_reason
        elif not e.present:
            own = MISSING
        elif e.inconsistent:
            own = CRASHED
        elif i == 0 and not e.recording:
            own = NOT_RECORDING
        elif capacity is None:
            own = "the disk is no longer attached or no longer ours to track"
        elif capacity != e.size:
            own = (f"the disk was resized from {e.size} to {capacity} bytes since; "
                   f"take a full backup")
        e.valid = not own and not broken
        e.reason = own or broken
        if own and not broken:
            name = names.checkpoint_parts(e.bitmap)[2]
            broken = f"newer checkpoint {name!r} of this disk is unusable ({own})"


def _read_mirror(sess: Session) -> list[CheckpointDisk]:
    """The checkpoints recorded in the metadata (LIVE, else CONFIG); absent = none."""
    text = metadata.load_checkpoint_mirror(sess.dom)
    if text is None:
        return []
    try:
        return _parse_mirror(text)
    except errors.InvalidArgument as e:
        log.warning("domain %s: ignoring unusable checkpoint metadata (%s); rebuilding "
                    "it from the images", sess.dom.name(), e)
        return []


def _parse_mirror(text: str) -> list[CheckpointDisk]:
    root = xmlutil.parse(text, "checkpoint metadata")
    xmlutil.strip_namespaces(root)
    xmlutil.validate(root, "checkpoints", "checkpoint metadata")
    result = []
    for d in root.findall("disk"):
        for c in d.findall("checkpoint"):
            bitmap = xmlutil.required(c, "bitmap")
            parsed = names.parse_checkpoint_bitmap(bitmap)
            if parsed is None or parsed[2] != c.get("name"):
                raise errors.InvalidArgument(f"checkpoint metadata: bad bitmap {c.get('bitmap')}")
            copies = c.get("copies")
            result.append(CheckpointDisk(disk=xmlutil.required(d, "name"), bitmap=bitmap,
                                         seq=parsed[0], size=parsed[1], node=None,
                                         present=False, deleting=c.get("deleting") == "yes",
                                         copies=int(copies) if copies else None,
                                         chain_reason=_sticky(c.get("reason") or "")))
    return result


def mirror_document(cps: list[Checkpoint]) -> Optional[str]:
    """The per-disk checkpoint mirror for the domain's metadata (None when empty)."""
    if not cps:
        return None
    root = etree.Element("checkpoints", version="1")
    per_disk: dict[str, etree._Element] = {}
    for cp in cps:
        for d in cp.disks:
            if d.disk not in per_disk:
                per_disk[d.disk] = etree.SubElement(root, "disk", name=d.disk)
            el = etree.SubElement(per_disk[d.disk], "checkpoint", name=cp.name,
                                  created=str(cp.created), bitmap=d.bitmap, size=str(d.size),
                                  valid="yes" if d.valid else "no")
            if d.reason:
                el.set("reason", d.reason)
            if d.deleting:
                el.set("deleting", "yes")
            if d.spread is not None:
                el.set("copies", str(d.spread.nonempty))
    return etree.tostring(root, encoding="unicode")


def scan(sess: Session, live: Optional[list[LiveDisk]] = None) -> list[Checkpoint]:
    """All checkpoints of the domain, oldest first, judged against the images."""
    live = live if live is not None else live_disks(sess)
    v = chains.read(sess.dom)
    capacity = {ld.name: ld.capacity for ld in live if ld.base}
    found: dict[tuple[str, str], CheckpointDisk] = {}
    for ld in live:
        if not ld.base:
            continue
        for entry in disk_entries(v, ld.name, ld.base):
            found[(entry.disk, entry.bitmap)] = entry
    for old in _read_mirror(sess):
        key = (old.disk, old.bitmap)
        if key in found:
            found[key].deleting = old.deleting
            found[key].chain_reason = found[key].chain_reason or old.chain_reason or \
                _dropped_reason(found[key], old.copies)
        elif not old.deleting:
            found[key] = old          # remembered but gone from the image: a crash
    per_disk: dict[str, list[CheckpointDisk]] = {}
    for e in found.values():
        per_disk.setdefault(e.disk, []).append(e)
    for disk, entries in per_disk.items():
        _judge(entries, capacity.get(disk))
    cps: dict[str, Checkpoint] = {}
    for e in found.values():
        name = names.checkpoint_parts(e.bitmap)[2]
        cp = cps.setdefault(name, Checkpoint(name=name, seq=e.seq, disks=[]))
        cp.seq = min(cp.seq, e.seq)
        cp.disks.append(e)
    for cp in cps.values():
        cp.disks.sort(key=lambda d: d.disk)
    return sorted(cps.values(), key=lambda c: (c.seq, c.name))


def sync_mirror(sess: Session, cps: list[Checkpoint]) -> None:
    """Write the mirror into the LIVE (and, for a persistent domain, CONFIG) metadata
    when it differs from what is there."""
    metadata.save_checkpoint_mirror(sess.dom, mirror_document(cps))


def reconcile(sess: Session, live: Optional[list[LiveDisk]] = None) -> list[Checkpoint]:
    """Rebuild the checkpoint list from the images, finish deletions an
    interrupted call left half-done, and update the mirror."""
    cps = scan(sess, live)
    pending = [c for c in cps if any(d.deleting and d.present for d in c.disks)]
    for cp in [c for c in pending if _undeletable_reason(c)]:
        log.warning("domain %s: cannot finish deleting checkpoint %s yet: %s",
                    sess.dom.name(), cp.name, _undeletable_reason(cp))
    pending = [c for c in pending if not _undeletable_reason(c)]
    for cp in pending:
        log.warning("domain %s: finishing the interrupted deletion of checkpoint %s",
                    sess.dom.name(), cp.name)
        bitmaps.run(sess.dom, delete_actions(sess.state.snapshots, cps, cp))
    if pending:
        cps = scan(sess, live)
    sync_mirror(sess, cps)
    return cps


# --- snapshot support --------------------------------------------------------------

def new_seq(cps: list[Checkpoint]) -> int:
    """A creation time in ns, later than every existing checkpoint's."""
    return max([time.time_ns()] + [c.seq + 1 for c in cps])


def plan_snapshot(domain: str, rec: SnapshotRecord, live: dict[str, LiveDisk],
                  cps: list[Checkpoint],
                  make_checkpoint: bool) -> tuple[list[dict], list[dict]]:
    """Fill the bitmap fields of a planned snapshot; return the bitmap actions to run
    just before the snapshot's instant (the guest running) and those that must run at
    the instant. Raises InvalidArgument for a checkpoint on a disk that cannot hold
    one, AlreadyExists for a taken checkpoint name.

    The frozen copies are made before the instant, after a recording "delta" bitmap
    was added: every checkpoint bitmap records, so a copy taken at t plus the writes
    from the delta's start to the instant is the bitmap at the instant, and only the
    delta is stopped at the instant (one action, whatever the number of checkpoints,
    inside the guest's pause)."""
    before: list[dict] = []
    actions: list[dict] = []
    if make_checkpoint:
        if any(c.name == rec.name for c in cps):
            raise errors.AlreadyExists(
                f"domain {domain!r} already has a checkpoint {rec.name!r}")
        rec.checkpoint = rec.name
        rec.checkpoint_seq = new_seq(cps)
    for index, d in enumerate(rec.disks):
        ld = live[d.name]
        entries = sorted((e for c in cps for e in c.disks if e.disk == d.name and e.present),
                         key=lambda e: e.seq)
        if make_checkpoint and ld.disk.format != "qcow2":
            raise errors.InvalidArgument(
                f"disk {d.name!r} is {ld.disk.format}: checkpoints need qcow2 images (their "
                f"bitmaps live in the image); leave the disk out with <disk> elements")
        newest = entries[-1] if entries else None
        if newest is not None and newest.valid and newest.recording:
            d.anchor_seq = newest.seq
            d.frozen = names.frozen_bitmap(rec.id, index)
            older = [e for e in entries[:-1] if e.recording and not e.inconsistent]
            d.frozen_seqs = " ".join(f"{e.seq:x}" for e in older) or None
            d.frozen_delta = names.frozen_delta(d.frozen)
            before.append(bitmaps.add(d.base, d.frozen_delta, persistent=False))
            copies = frozen_copies(d)
            for e in older + [newest]:
                before.append(bitmaps.add(d.base, copies[e.seq], persistent=False,
                                          disabled=True))
                before.append(bitmaps.merge(d.base, copies[e.seq], e.sources()))
            actions.append(bitmaps.disable(d.base, d.frozen_delta))
        if rec.checkpoint:
            actions.append(bitmaps.add(d.base, names.checkpoint_bitmap(
                rec.checkpoint_seq, ld.capacity, rec.checkpoint), persistent=True))
    return before, actions


def frozen_copies(d: DiskRecord) -> dict[int, str]:
    """A snapshot's frozen checkpoint bitmaps on one disk, by the seq of the
    checkpoint each was copied from: the anchor's (the newest at the instant)
    and, since 0.3.0, one per older checkpoint bitmap that recorded then."""
    if not d.frozen:
        return {}
    copies = {d.anchor_seq: d.frozen}
    for s in (d.frozen_seqs or "").split():
        copies[int(s, 16)] = names.frozen_older(d.frozen, s)
    return copies


def frozen_bitmaps(d: DiskRecord) -> list[str]:
    """Every temporary bitmap a snapshot keeps on one disk: its frozen copies and the
    delta (0.3: the writes from the copies to the instant) that completes them."""
    return list(frozen_copies(d).values()) + ([d.frozen_delta] if d.frozen_delta else [])


def serving_copies(copies: dict[int, str], present: list[int]) -> dict[int, str]:
    """Which present checkpoint (by seq) each frozen copy stands for: its own
    checkpoint while that exists; once it was deleted, the newest older one that
    has no copy of its own (the deletion merged that one's bitmap into the copy,
    see :func:`delete_actions`). Lower seqs are taken first, as deletions did."""
    serving = {seq: name for seq, name in copies.items() if seq in present}
    for seq, name in sorted(copies.items()):
        if seq in present:
            continue
        older = [p for p in present if p < seq]
        if older and max(older) not in serving:
            serving[max(older)] = name
    return serving


def union_sources(entries: list[CheckpointDisk], since: int,
                  serving: Optional[dict[int, str]] = None,
                  delta: Optional[str] = None) -> list:
    """Merge sources for the changes since checkpoint ``since`` (seq): the bitmaps
    of it and every newer one (each replaced by a snapshot's frozen copy standing
    for it, from ``serving``), up to the first that records (it holds the rest)."""
    serving = serving or {}
    sources: list = []
    for e in sorted((e for e in entries if e.present and e.seq >= since),
                    key=lambda e: e.seq):
        if e.seq in serving:
            sources.append(serving[e.seq])
            if delta:
                sources.append(delta)           # the writes from the copy to the instant
            break
        sources += e.sources()
        if e.recording:
            break
    return sources


def undo_snapshot_bitmaps(sess: Session, rec: SnapshotRecord, undo_checkpoint: bool) -> None:
    """Remove a snapshot's frozen bitmaps and, for a snapshot that never became
    ready, the checkpoint it was making (re-enabling the one it disabled)."""
    present = {(b.node, b.name) for bs in bitmaps.by_node(sess.dom).values() for b in bs}
    actions = []
    for d in rec.disks:
        actions += [bitmaps.remove(d.base, name) for name in frozen_bitmaps(d)
                    if (d.base, name) in present]
        if undo_checkpoint and rec.checkpoint:
            made = (rec.checkpoint_seq, rec.checkpoint)
            new = next((n for (node, n) in present if node == d.base and
                        (names.parse_checkpoint_bitmap(n) or (0, 0, ""))[::2] == made), None)
            if new:
                actions.append(bitmaps.remove(d.base, new))
                if d.disabled and (d.base, d.disabled) in present:
                    actions.append(bitmaps.enable(d.base, d.disabled))
    bitmaps.run(sess.dom, actions)


# --- export support ------------------------------------------------------------------

def export_bitmap_actions(sess: Session, snap: SnapshotRecord, d: DiskRecord,
                          checkpoint: str, target: str) -> list[dict]:
    """Actions that build ``target``: the blocks written between ``checkpoint`` and
    the snapshot. Raises NotFound, InvalidArgument or OperationInvalid (with what to do)."""
    return export_actions(sess.dom.name(), scan(sess), snap, d, checkpoint, target)


def export_actions(domain: str, cps: list[Checkpoint], snap: SnapshotRecord, d: DiskRecord,
                   checkpoint: str, target: str) -> list[dict]:
    """:func:`export_bitmap_actions` on the checkpoints ``cps`` of domain ``domain``
    (pure: no qemu). Raises NotFound, InvalidArgument or OperationInvalid."""
    cp = next((c for c in cps if c.name == checkpoint), None)
    if cp is None:
        raise errors.NotFound(f"no checkpoint {checkpoint!r} in domain {domain!r}")
    entry = cp.disk(d.name)
    if entry is None:
        raise errors.InvalidArgument(f"checkpoint {checkpoint!r} does not cover disk {d.name!r}")
    if not entry.valid:
        raise errors.OperationInvalid(
            f"checkpoint {checkpoint!r} cannot be used for disk {d.name!r}: {entry.reason}")
    if snap.checkpoint == checkpoint:
        return [bitmaps.add(d.base, target, disabled=True)]
    if entry.seq > d.anchor_seq or not d.frozen:
        raise errors.InvalidArgument(
            f"checkpoint {checkpoint!r} is newer than snapshot {snap.name!r}")
    entries = [e for c in cps for e in c.disks
               if e.disk == d.name and e.present and e.seq <= d.anchor_seq]
    serving = serving_copies(frozen_copies(d), [e.seq for e in entries])
    sources = union_sources(entries, entry.seq, serving, d.frozen_delta)
    return [bitmaps.add(d.base, target, disabled=True), bitmaps.merge(d.base, target, sources)]


def describe(sess: Session, name: str) -> str:
    """<domainblockcheckpoint> with validity and bytes changed since, per disk.

    Raises NotFound."""
    cps = reconcile(sess)
    cp = find(sess, cps, name)
    return checkpoint_document(cp, _changed_bytes(sess, cps, cp))


def delete(sess: Session, name: str) -> None:
    """Delete the checkpoint, keeping every other one exact.

    Raises NotFound; OperationInvalid while an export uses it, or while its
    bitmap also lives in a read-only backing image (after an external snapshot
    by libvirt)."""
    cps = reconcile(sess)
    cp = find(sess, cps, name)
    reason = _undeletable_reason(cp)
    if reason:
        raise errors.OperationInvalid(f"checkpoint {cp.name!r} cannot be deleted now: "
                                      f"{reason}")
    users = [e.name for e in sess.state.exports() if e.checkpoint == cp.name]
    if users:
        raise errors.OperationInvalid(
            f"checkpoint {cp.name!r} is used by export(s) {', '.join(users)}; "
            f"stop them first")
    for d in cp.disks:
        d.deleting = True
    sync_mirror(sess, cps)
    killpoint("checkpoint-delete:recorded")
    bitmaps.run(sess.dom, delete_actions(sess.state.snapshots, cps, cp))
    killpoint("checkpoint-delete:bitmaps-merged")
    reconcile(sess)
    log.info("domain %s: deleted checkpoint %s", sess.dom.name(), cp.name)


def find(sess: Session, cps: list[Checkpoint], name: str) -> Checkpoint:
    """The checkpoint named ``name``. Raises NotFound."""
    cp = next((c for c in cps if c.name == name), None) if isinstance(name, str) else None
    if cp is None:
        raise errors.NotFound(f"no checkpoint {name!r} in domain {sess.dom.name()!r} "
                              f"(blockCheckpointList shows the existing ones)")
    return cp


def _undeletable_reason(cp: Checkpoint) -> str:
    """Why a checkpoint cannot be deleted now ("" when it can): qemu refuses to
    change a bitmap in a read-only backing image ("is readonly and cannot be
    modified"), and a copy left behind there would come back, stale, when libvirt
    commits or pulls that layer into the top."""
    for d in cp.disks:
        if d.present and (d.lower_layers or d.node is None):
            files = ", ".join(la.file or la.node for la in d.lower_layers)
            return (f"its bitmap on disk {d.disk!r} also lives in the read-only backing "
                    f"image(s) {files} (libvirt's external snapshots keep it there); delete "
                    f"it after a blockcommit or blockpull has merged the backing chain")
    return ""


def delete_actions(snapshots: list[SnapshotRecord], cps: list[Checkpoint],
                   cp: Checkpoint) -> list[dict]:
    """The bitmap actions (one transaction) that delete ``cp`` and keep every
    other checkpoint, and every snapshot's view of them, exact."""
    actions: list[dict] = []
    for entry in cp.disks:
        if not entry.present:
            continue
        node = entry.node
        if node is None:        # only in read-only layers: _undeletable_reason refuses it
            raise errors.InternalError(f"checkpoint {cp.name!r} has no copy in the top image "
                                       f"of disk {entry.disk!r}")
        disk = [e for c in cps for e in c.disks if e.disk == entry.disk and e.present]
        older = [e for e in disk if e.seq < entry.seq]
        pred = max(older, key=lambda e: e.seq) if older else None
        usable = pred is not None and not pred.inconsistent and not entry.inconsistent \
            and pred.node == entry.node
        for snap in snapshots:
            d = snap.disk(entry.disk)
            if pred is None or not usable or d is None or not d.frozen \
                    or d.anchor_seq < entry.seq:
                continue
            serving = serving_copies(frozen_copies(d),
                                     [e.seq for e in disk if e.seq <= d.anchor_seq])
            if entry.seq in serving and pred.seq not in serving:
                actions.append(bitmaps.merge(d.base, serving[entry.seq], pred.sources()))
        if usable and pred is not None and not pred.recording:
            actions.append(bitmaps.merge(node, pred.bitmap, entry.sources()))
            if entry.recording:
                actions.append(bitmaps.enable(node, pred.bitmap))
        actions.append(bitmaps.remove(node, entry.bitmap))
    return actions


def _changed_bytes(sess: Session, cps: list[Checkpoint], cp: Checkpoint) -> dict[str, int]:
    """Bytes written since the checkpoint, per valid disk (one temporary bitmap each)."""
    result = {}
    for entry in cp.disks:
        if not entry.valid or entry.top is None:
            continue
        top = entry.top
        chain = union_sources([e for c in cps for e in c.disks if e.disk == entry.disk],
                              entry.seq)
        if chain == [entry.bitmap]:          # one copy, in the top image
            result[entry.disk] = next(b.count for b in bitmaps.by_node(sess.dom)[top]
                                      if b.name == entry.bitmap)
            continue
        tmp = names.temp_bitmap()
        bitmaps.run(sess.dom, [bitmaps.add(top, tmp, disabled=True),
                               bitmaps.merge(top, tmp, chain)])
        try:
            result[entry.disk] = next(b.count for b in bitmaps.by_node(sess.dom)[top]
                                      if b.name == tmp)
        finally:
            bitmaps.run(sess.dom, [bitmaps.remove(top, tmp)])
    return result


def checkpoint_document(cp: Checkpoint, changed: dict[str, int]) -> str:
    root = etree.Element("domainblockcheckpoint")
    etree.SubElement(root, "name").text = cp.name
    etree.SubElement(root, "creationTime").text = str(cp.created)
    etree.SubElement(root, "valid").text = "yes" if cp.valid else "no"
    for d in cp.disks:
        el = etree.SubElement(root, "disk", name=d.disk, bitmap=d.bitmap, size=str(d.size),
                              valid="yes" if d.valid else "no")
        if d.disk in changed:
            el.set("changed", str(changed[d.disk]))
        if d.reason:
            el.set("reason", d.reason)
    return xmlutil.tostring(root)
