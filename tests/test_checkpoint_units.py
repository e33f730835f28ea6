# SPDX-License-Identifier: LGPL-2.1-or-later
"""The checkpoint bitmap logic without qemu: which bitmaps make up "changed since",
which frozen copy of a snapshot stands for which checkpoint, and what a deletion merges."""

from __future__ import annotations

from libvirt_fleece.qemu import bitmaps, names
from libvirt_fleece.steps import checkpoint as checkpoints
from libvirt_fleece.steps.checkpoint import Checkpoint, CheckpointDisk
from libvirt_fleece.metadata import DiskRecord, SnapshotRecord

TOP = "libvirt-1-format"


def entry(seq: int, recording: bool) -> CheckpointDisk:
    name = names.checkpoint_bitmap(seq, 1 << 26, f"c{seq}")
    return CheckpointDisk(disk="vda", bitmap=name, seq=seq, size=1 << 26, node=TOP,
                          recording=recording, top=TOP)


def cps(*entries: CheckpointDisk) -> list[Checkpoint]:
    return [Checkpoint(name=f"c{e.seq}", seq=e.seq, disks=[e]) for e in entries]


def disk(anchor: int, older: list[int]) -> DiskRecord:
    return DiskRecord(name="vda", file="/x", qdev="q", base=TOP, below=TOP,
                      **names.disk_node_names("1", 0), fdset=1, capacity=1 << 26,
                      anchor_seq=anchor, frozen="fleece-1-0-frz",
                      frozen_seqs=" ".join(f"{s:x}" for s in older) or None)


def test_frozen_copies_keep_the_0_2_anchor_and_add_the_older_ones():
    assert checkpoints.frozen_copies(disk(3, [])) == {3: "fleece-1-0-frz"}
    assert checkpoints.frozen_copies(disk(0x30, [0x10, 0x20])) == {
        0x30: "fleece-1-0-frz", 0x10: "fleece-1-0-frz.10", 0x20: "fleece-1-0-frz.20"}
    d = disk(3, [])
    d.frozen = None
    assert checkpoints.frozen_copies(d) == {}


def test_a_deleted_checkpoints_copy_serves_the_newest_older_one_without_a_copy():
    copies = {1: "f1", 3: "f3"}
    assert checkpoints.serving_copies(copies, [1, 3]) == {1: "f1", 3: "f3"}
    assert checkpoints.serving_copies(copies, [1, 2]) == {1: "f1", 2: "f3"}   # 2 had none
    assert checkpoints.serving_copies({3: "f3"}, [1, 2]) == {2: "f3"}
    # two deleted ones above the same survivor: the lower one took it in
    assert checkpoints.serving_copies({3: "f3", 5: "f5"}, [1]) == {1: "f3"}


def test_changed_since_stops_at_the_first_recording_bitmap():
    a, b, c = entry(1, False), entry(2, False), entry(3, True)      # made by 0.2
    assert checkpoints.union_sources([a, b, c], 1) == [a.bitmap, b.bitmap, c.bitmap]
    a, b, c = entry(1, True), entry(2, True), entry(3, True)         # made by 0.3
    assert checkpoints.union_sources([c, b, a], 1) == [a.bitmap]
    assert checkpoints.union_sources([a, b, c], 2) == [b.bitmap]
    # in a snapshot, the frozen copy stands for the bitmap
    assert checkpoints.union_sources([a, b, c], 2, {2: "f2", 3: "f3"}) == ["f2"]
    a = entry(1, False)
    assert checkpoints.union_sources([a, b, c], 1, {2: "f2"}) == [a.bitmap, "f2"]


def snapshot(d: DiskRecord) -> SnapshotRecord:
    return SnapshotRecord(name="s", id="1", state="ready", created=0, disks=[d])


def test_deleting_a_recording_checkpoint_whose_predecessor_records_only_removes_it():
    a, b = entry(1, True), entry(2, True)
    s = snapshot(disk(2, [1]))
    actions = checkpoints.delete_actions([s], cps(a, b), cps(a, b)[1])
    assert actions == [bitmaps.remove(TOP, b.bitmap)]


def test_deleting_the_anchor_above_a_stopped_predecessor_hands_the_copy_down():
    """0.2's scheme: a stopped, b the anchor (recording, frozen in s). The copy first
    takes in a (so it stands for a), then b goes into a, which records again."""
    a, b = entry(1, False), entry(2, True)
    s = snapshot(disk(2, []))
    actions = checkpoints.delete_actions([s], cps(a, b), cps(a, b)[1])
    assert actions == [bitmaps.merge(TOP, "fleece-1-0-frz", [a.bitmap]),
                       bitmaps.merge(TOP, a.bitmap, [b.bitmap]),
                       bitmaps.enable(TOP, a.bitmap),
                       bitmaps.remove(TOP, b.bitmap)]


def test_deleting_a_checkpoint_newer_than_the_snapshot_leaves_its_copies_alone():
    a, b = entry(1, True), entry(5, True)
    s = snapshot(disk(1, []))
    assert checkpoints.delete_actions([s], cps(a, b), cps(a, b)[1]) == [
        bitmaps.remove(TOP, b.bitmap)]


def test_a_frozen_copy_is_completed_by_the_snapshots_delta():
    """0.3 copies the bitmaps before the instant; the delta holds the writes from the
    copies to the instant, so it joins whichever frozen copy stands for the checkpoint."""
    a, b = entry(1, True), entry(2, True)
    assert checkpoints.union_sources([a, b], 1, {1: "f1", 2: "f2"}, "d") == ["f1", "d"]
    assert checkpoints.union_sources([a, b], 1, {}, "d") == [a.bitmap]     # no copy, no delta
    d = disk(2, [1])
    d.frozen_delta = "fleece-1-0-frz.d"
    assert checkpoints.frozen_bitmaps(d) == [
        "fleece-1-0-frz", "fleece-1-0-frz.1", "fleece-1-0-frz.d"]


def live(fmt: str = "qcow2"):
    from libvirt_fleece.disks import DomainDisk
    from libvirt_fleece.steps.livedisks import LiveDisk
    d = DomainDisk(target="vda", alias="virtio-disk0", type="file", device="disk",
                   format=fmt, source="/x", readonly=False, shareable=False)
    return {"vda": LiveDisk(disk=d, qdev="q", top=TOP, base=TOP, capacity=1 << 26)}


def planned(name: str = "s") -> SnapshotRecord:
    return SnapshotRecord(name=name, id="1", state="creating", created=0,
                          disks=[disk(0, [])])


def test_a_snapshot_without_checkpoints_plans_no_bitmap_work():
    rec = planned()
    rec.disks[0].frozen = None
    assert checkpoints.plan_snapshot("d", rec, live(), [], False) == ([], [])
    assert rec.disks[0].frozen is None


def test_the_copies_are_made_before_the_instant_and_only_the_delta_stops_at_it():
    a, b = entry(1, True), entry(2, True)
    rec = planned()
    before, instant = checkpoints.plan_snapshot("d", rec, live(), cps(a, b), True)
    d = rec.disks[0]
    assert (d.anchor_seq, d.frozen, d.frozen_seqs) == (2, "fleece-1-0-frz", "1")
    assert before[0] == bitmaps.add(TOP, "fleece-1-0-frz.d")              # delta first
    assert before[1:] == [bitmaps.add(TOP, "fleece-1-0-frz.1", disabled=True),
                          bitmaps.merge(TOP, "fleece-1-0-frz.1", [a.bitmap]),
                          bitmaps.add(TOP, "fleece-1-0-frz", disabled=True),
                          bitmaps.merge(TOP, "fleece-1-0-frz", [b.bitmap])]
    assert instant[0] == bitmaps.disable(TOP, "fleece-1-0-frz.d")
    assert instant[1]["type"] == "block-dirty-bitmap-add" and \
        instant[1]["data"]["name"].endswith(".s") and instant[1]["data"]["persistent"]
    assert len(instant) == 2                                 # nothing else in the pause


def test_checkpoints_0_2_stopped_get_no_copy():
    a, b = entry(1, False), entry(2, True)
    rec = planned()
    before, _ = checkpoints.plan_snapshot("d", rec, live(), cps(a, b), False)
    assert rec.disks[0].frozen_seqs is None
    assert [x["data"]["name"] for x in before if x["type"] == "block-dirty-bitmap-add"] == \
        ["fleece-1-0-frz.d", "fleece-1-0-frz"]


def test_a_checkpoint_on_a_raw_disk_or_a_taken_name_is_refused_clearly():
    import pytest
    from libvirt_fleece import errors
    with pytest.raises(errors.InvalidArgument, match="raw.*qcow2"):
        checkpoints.plan_snapshot("d", planned(), live("raw"), [], True)
    with pytest.raises(errors.AlreadyExists, match="already has a checkpoint 'c1'"):
        checkpoints.plan_snapshot("d", planned("c1"), live(), cps(entry(1, True)), True)


def test_judging_validity_newest_first():
    a, b = entry(1, True), entry(2, True)
    checkpoints._judge([a, b], 1 << 26)
    assert a.valid and b.valid
    b.inconsistent = True
    checkpoints._judge([a, b], 1 << 26)
    assert not b.valid and "uncleanly" in b.reason
    assert not a.valid and "newer checkpoint 'c2'" in a.reason
    a, b = entry(1, True), entry(2, True)
    checkpoints._judge([a, b], 2 << 26)
    assert not b.valid and "resized" in b.reason


# --- export bitmap actions: which bitmaps make up "changed since X" for a snapshot -----

def snapshot_on(d: DiskRecord, checkpoint: str = None) -> SnapshotRecord:
    return SnapshotRecord(name="s", id="1", state="ready", created=0, disks=[d],
                          checkpoint=checkpoint)


def test_an_export_since_the_snapshots_own_checkpoint_is_an_empty_bitmap():
    a = entry(1, True)
    d = disk(1, [])
    assert checkpoints.export_actions("d", cps(a), snapshot_on(d, "c1"), d, "c1", "t") == [
        bitmaps.add(TOP, "t", disabled=True)]


def test_an_export_since_an_older_checkpoint_reads_the_frozen_copies_and_the_delta():
    a, b = entry(1, True), entry(2, True)
    d = disk(2, [1])
    d.frozen_delta = "fleece-1-0-frz.d"
    actions = checkpoints.export_actions("d", cps(a, b), snapshot_on(d), d, "c1", "t")
    # c1's copy holds every write since c1 (it records): with the delta, up to the instant
    assert actions == [bitmaps.add(TOP, "t", disabled=True),
                       bitmaps.merge(TOP, "t", ["fleece-1-0-frz.1", "fleece-1-0-frz.d"])]
    actions = checkpoints.export_actions("d", cps(a, b), snapshot_on(d), d, "c2", "t")
    assert actions[1] == bitmaps.merge(TOP, "t", ["fleece-1-0-frz", "fleece-1-0-frz.d"])


def test_an_export_since_a_0_2_checkpoint_unions_the_stopped_bitmaps_up_to_the_copy():
    a, b = entry(1, False), entry(2, True)      # 0.2: only the newest records
    d = disk(2, [])
    actions = checkpoints.export_actions("d", cps(a, b), snapshot_on(d), d, "c1", "t")
    assert actions[1] == bitmaps.merge(TOP, "t", [a.bitmap, "fleece-1-0-frz"])


def test_an_export_is_refused_with_the_reason_for_unknown_newer_or_invalid_checkpoints():
    import pytest
    from libvirt_fleece import errors
    a, b = entry(1, True), entry(2, True)
    d = disk(1, [])
    with pytest.raises(errors.NotFound, match="no checkpoint 'c9' in domain 'd'"):
        checkpoints.export_actions("d", cps(a), snapshot_on(d), d, "c9", "t")
    with pytest.raises(errors.InvalidArgument, match="newer than snapshot 's'"):
        checkpoints.export_actions("d", cps(a, b), snapshot_on(d), d, "c2", "t")
    a.valid, a.reason = False, "its bitmap is missing"
    with pytest.raises(errors.OperationInvalid, match="c1.*'vda': its bitmap is missing"):
        checkpoints.export_actions("d", cps(a), snapshot_on(d), d, "c1", "t")
    other = DiskRecord(**{**d.__dict__, "name": "vdb"})
    with pytest.raises(errors.InvalidArgument, match="does not cover disk 'vdb'"):
        checkpoints.export_actions("d", cps(a), snapshot_on(other), other, "c1", "t")
