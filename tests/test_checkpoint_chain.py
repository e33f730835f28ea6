# SPDX-License-Identifier: LGPL-2.1-or-later
"""Checkpoints across libvirt's own graph changes (external snapshot, commit, pull, copy):
exact to the cluster against a model, invalid with a reason where the chain lost history.

libvirt's graph changes are made while no plugin snapshot exists (qemu refuses an
external snapshot under a plugin snapshot's fleece image on this machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import libvirt
import libvirt_qemu
import pytest

import libvirt_fleece as lf
from libvirt_fleece import backup as bk
from libvirt_fleece import metadata
from conftest import plugin_leftovers
from test_checkpoints import changed, delete_everything, export, names, snap, writes
from vm import MiB, clusters, expected_image, read_export

pytestmark = pytest.mark.integration

SIZE = 64 * MiB


def virsh(*args):
    r = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr.strip()}"
    return r.stdout


def external_snapshot(t, name):
    """libvirt's external disk-only snapshot of vda (the new overlay becomes the top)."""
    virsh("snapshot-create-as", t.name, name, "--disk-only", "--no-metadata", "--atomic",
          "--diskspec", f"vda,file={os.path.join(t.dir, name + '.qcow2')}")


def q(dom, cmd, args=None):
    msg = {"execute": cmd, **({"arguments": args} if args else {})}
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))
    assert "error" not in reply, reply
    return reply["return"]


def top_node(dom):
    return next(b["inserted"]["node-name"] for b in q(dom, "query-block")
                if b.get("qdev", "").startswith("/machine/peripheral/virtio-disk0"))


def layers_holding(dom, bitmap):
    """Files of the images holding a bitmap of that name."""
    return sorted(n["file"] for n in q(dom, "query-named-block-nodes", {"flat": True})
                  if any(b.get("name") == bitmap for b in n.get("dirty-bitmaps") or []))


def bitmap_of(dom, checkpoint):
    desc = lf.blockCheckpointLookupByName(dom, checkpoint).getXMLDesc()
    return next(p for p in desc.split('"') if p.startswith("fleece-cp.") and
                p.endswith("." + checkpoint))


def since(dom, checkpoint, name="s"):
    """Clusters changed since ``checkpoint``, through a new snapshot (deleted after)."""
    snap(dom, name, flags=0)
    try:
        return changed(dom, name, checkpoint)
    finally:
        lf.blockSnapshotLookupByName(dom, name).delete()


def disable_as_0_2_did(dom, checkpoint):
    """Stop a checkpoint's top copy, as 0.1/0.2 did to all but the newest checkpoint."""
    q(dom, "block-dirty-bitmap-disable", {"node": top_node(dom),
                                          "name": bitmap_of(dom, checkpoint)})


def valid(dom, checkpoint):
    return "<valid>yes</valid>" in lf.blockCheckpointLookupByName(dom, checkpoint).getXMLDesc()


def test_external_snapshot_then_active_commit_keep_the_map_exact(make_vm):
    t = make_vm(disks=1)
    dom = t.dom
    w0 = writes(t, [(0x01, 30 * MiB, MiB)])                  # before the checkpoint
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, 64 * 1024), (0x12, 3 * MiB + 100, 10)])
    external_snapshot(t, "ext1")
    w2 = writes(t, [(0x21, 8 * MiB, MiB), (0x22, 0, 4096)])
    assert len(layers_holding(dom, bitmap_of(dom, "c1"))) == 2
    snap(dom, "s2", flags=0)
    assert changed(dom, "s2", "c1") == clusters(w1 + w2)
    sock, name, _ = export(dom, "s2", "c1")
    assert read_export(sock, name) == expected_image(SIZE, w0 + w1 + w2)
    lf.blockSnapshotLookupByName(dom, "s2").delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    desc = lf.blockCheckpointLookupByName(dom, "c1").getXMLDesc()
    assert "<valid>yes</valid>" in desc
    assert f'changed="{len(clusters(w1 + w2)) * 64 * 1024}"' in desc
    with pytest.raises(lf.OperationInvalid, match="read-only backing"):
        lf.blockCheckpointLookupByName(dom, "c1").delete()
    assert names(dom) == ["c1"] and valid(dom, "c1")

    virsh("blockcommit", t.name, "vda", "--active", "--pivot", "--wait")
    w3 = writes(t, [(0x31, 40 * MiB, 128 * 1024)])
    assert since(dom, "c1") == clusters(w1 + w2 + w3)
    delete_everything(dom)                                   # one layer again: deletable
    assert names(dom) == [] and plugin_leftovers(dom) == {}


def test_chain_of_checkpoints_across_snapshots_inactive_commit_and_pull(make_vm):
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    snap(dom, "c2").delete()                 # made in the overlay; c1 records on
    w2 = writes(t, [(0x21, 4 * MiB, MiB), (0x22, 0, 4096)])
    external_snapshot(t, "ext2")             # libvirt copies both (recording) up
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    layers = {c: [os.path.basename(f) for f in layers_holding(dom, bitmap_of(dom, c))]
              for c in ("c1", "c2")}
    assert layers == {"c1": ["ext1.qcow2", "ext2.qcow2", "vda.qcow2"],
                      "c2": ["ext1.qcow2", "ext2.qcow2"]}
    assert since(dom, "c1") == clusters(w1 + w2 + w3)
    assert since(dom, "c2") == clusters(w2 + w3)

    virsh("blockcommit", t.name, "vda", "--top", os.path.join(t.dir, "ext1.qcow2"),
          "--base", t.disks[0]["path"], "--wait")            # inactive commit
    w4 = writes(t, [(0x41, 12 * MiB, MiB)])
    assert since(dom, "c1") == clusters(w1 + w2 + w3 + w4)
    assert since(dom, "c2") == clusters(w2 + w3 + w4)

    # libvirt's pull merges the recording bitmaps of the dropped layers into the top
    virsh("blockpull", t.name, "vda", "--wait")
    w5 = writes(t, [(0x51, 16 * MiB, MiB)])
    for c in ("c1", "c2"):
        assert layers_holding(dom, bitmap_of(dom, c)) == [os.path.join(t.dir, "ext2.qcow2")]
    assert valid(dom, "c1") and valid(dom, "c2")
    assert since(dom, "c1") == clusters(w1 + w2 + w3 + w4 + w5)
    assert since(dom, "c2") == clusters(w2 + w3 + w4 + w5)
    lf.blockCheckpointLookupByName(dom, "c1").delete()
    assert names(dom) == ["c2"]
    assert since(dom, "c2") == clusters(w2 + w3 + w4 + w5)
    delete_everything(dom)
    assert plugin_leftovers(dom) == {}


@pytest.mark.parametrize("made_by", ["0.3", "0.2"])
def test_active_commit_of_an_older_checkpoint_keeps_later_writes_out(make_vm, made_by):
    """After an active commit, the base's copies are the top ones (with 0.2's scheme,
    an older checkpoint's base copy was never disabled: it was read-only when the newer
    one was made, and records again); a snapshot freezes them, so writes after the
    snapshot stay out of the map."""
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    external_snapshot(t, "ext1")
    w1 = writes(t, [(0x11, 0, MiB)])
    snap(dom, "c2").delete()
    if made_by == "0.2":
        disable_as_0_2_did(dom, "c1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    virsh("blockcommit", t.name, "vda", "--active", "--pivot", "--wait")
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    snap(dom, "s", flags=0)
    writes(t, [(0x41, 12 * MiB, MiB)])                       # after the snapshot
    assert changed(dom, "s", "c1") == clusters(w1 + w2 + w3)
    assert changed(dom, "s", "c2") == clusters(w2 + w3)
    lf.blockSnapshotLookupByName(dom, "s").delete()
    assert valid(dom, "c1") and valid(dom, "c2")
    delete_everything(dom)
    assert plugin_leftovers(dom) == {}


@pytest.mark.parametrize("made_by", ["0.3", "0.2"])
def test_commit_of_a_layer_holding_part_of_an_older_checkpoint(make_vm, made_by):
    """c1 holds writes in the base (W0) and in ext1 (W1). With 0.2's scheme its ext1 copy
    was disabled when c2 was made there: libvirt does not merge that copy when it commits
    ext1 into the base, but qemu's commit job dirties the base's (enabled) copy of c1 with
    every cluster it copies: nothing is lost (fewer copies hold data, yet c1 is not called
    lost), and the maps stay exact. With 0.3's, libvirt merges the chains."""
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    w0 = writes(t, [(0x01, 20 * MiB, MiB)])
    external_snapshot(t, "ext1")
    w1 = writes(t, [(0x11, 0, MiB)])
    snap(dom, "c2").delete()
    if made_by == "0.2":
        disable_as_0_2_did(dom, "c1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    external_snapshot(t, "ext2")
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    assert since(dom, "c1") == clusters(w0 + w1 + w2 + w3)
    virsh("blockcommit", t.name, "vda", "--top", os.path.join(t.dir, "ext1.qcow2"),
          "--base", t.disks[0]["path"], "--wait")
    w4 = writes(t, [(0x41, 12 * MiB, MiB)])
    assert valid(dom, "c1") and valid(dom, "c2")
    assert since(dom, "c1") == clusters(w0 + w1 + w2 + w3 + w4)
    assert since(dom, "c2") == clusters(w2 + w3 + w4)


def test_pull_that_drops_the_history_of_a_bitmap_0_2_disabled_is_caught(make_vm):
    """A checkpoint made by 0.2: c1's writes are in the base only; its copy in the
    overlay is empty and was disabled when c2 was made there. libvirt's pull merges only
    recording bitmaps: c1 would be left whole-looking but empty, and the plugin must say
    it lost its history."""
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    snap(dom, "c2").delete()
    disable_as_0_2_did(dom, "c1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    assert valid(dom, "c1") and valid(dom, "c2")             # the plugin looked
    virsh("blockpull", t.name, "vda", "--wait")
    assert layers_holding(dom, bitmap_of(dom, "c1")) == [os.path.join(t.dir, "ext1.qcow2")]
    desc = lf.blockCheckpointLookupByName(dom, "c1").getXMLDesc()
    assert "<valid>no</valid>" in desc and "was dropped" in desc, desc
    assert valid(dom, "c2") and since(dom, "c2") == clusters(w2)
    assert "<valid>no</valid>" in lf.blockCheckpointLookupByName(dom, "c1").getXMLDesc()


@pytest.mark.parametrize("made_by", ["0.3", "0.2"])
def test_pull_right_after_an_external_snapshot_keeps_every_checkpoint(make_vm, made_by):
    """No plugin call comes between the external snapshot and the pull. Every checkpoint
    records, so libvirt carries all of them up and the pull merges them: all stay exact.
    A checkpoint 0.2 had disabled lives only in the backing images (libvirt copies only
    recording bitmaps), so the pull drops it: invalid with a reason, c2 exact."""
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    snap(dom, "c2").delete()
    if made_by == "0.2":
        disable_as_0_2_did(dom, "c1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    external_snapshot(t, "ext2")
    virsh("blockpull", t.name, "vda", "--wait")
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    assert valid(dom, "c2")
    assert since(dom, "c2") == clusters(w2 + w3)
    if made_by == "0.3":
        assert valid(dom, "c1") and since(dom, "c1") == clusters(w1 + w2 + w3)
    else:
        desc = lf.blockCheckpointLookupByName(dom, "c1").getXMLDesc()
        assert "<valid>no</valid>" in desc and "blockpull" in desc and "full backup" in desc
        snap(dom, "s", flags=0)
        with pytest.raises(lf.OperationInvalid, match="missing"):
            export(dom, "s", "c1")
        lf.blockSnapshotLookupByName(dom, "s").delete()
    delete_everything(dom)
    assert names(dom) == []


def test_pull_of_a_disk_with_an_older_chain_and_blockcopy(make_vm):
    t = make_vm(disks=1)
    dom = t.dom
    w0 = writes(t, [(0x01, 20 * MiB, MiB)])                  # in the base image
    external_snapshot(t, "old")
    w0b = writes(t, [(0x02, 24 * MiB, MiB)])                 # in the overlay, before c1
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    assert since(dom, "c1") == clusters(w1 + w2)
    virsh("blockpull", t.name, "vda", "--wait")              # pulled data is not "changed"
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    assert since(dom, "c1") == clusters(w1 + w2 + w3)

    external_snapshot(t, "ext2")
    w4 = writes(t, [(0x41, 12 * MiB, MiB)])
    virsh("blockcopy", t.name, "vda", os.path.join(t.dir, "copy.qcow2"), "--wait", "--pivot",
          "--transient-job")                                 # full copy: one layer again
    w5 = writes(t, [(0x51, 16 * MiB, MiB)])
    assert since(dom, "c1") == clusters(w1 + w2 + w3 + w4 + w5)
    snap(dom, "s", flags=0)
    sock, name, _ = export(dom, "s", "c1")
    assert read_export(sock, name) == expected_image(SIZE, w0 + w0b + w1 + w2 + w3 + w4 + w5)
    delete_everything(dom)
    assert plugin_leftovers(dom) == {}


@pytest.mark.parametrize("made_by", ["0.3", "0.2"])
def test_blockcopy_carries_every_checkpoint(make_vm, made_by):
    """libvirt's blockcopy carries only recording bitmaps: every checkpoint records, so all
    stay exact. An older checkpoint 0.2 had disabled is left behind and said to be lost;
    the newest stays exact."""
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, MiB)])
    snap(dom, "c2").delete()
    if made_by == "0.2":
        disable_as_0_2_did(dom, "c1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    external_snapshot(t, "ext1")
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    virsh("blockcopy", t.name, "vda", os.path.join(t.dir, "copy.qcow2"), "--wait", "--pivot")
    w4 = writes(t, [(0x41, 12 * MiB, MiB)])
    desc = lf.blockCheckpointLookupByName(dom, "c1").getXMLDesc()
    if made_by == "0.3":
        assert valid(dom, "c1") and since(dom, "c1") == clusters(w1 + w2 + w3 + w4)
    else:
        assert "<valid>no</valid>" in desc and "blockcopy" in desc and "full backup" in desc
    assert valid(dom, "c2") and since(dom, "c2") == clusters(w2 + w3 + w4)
    delete_everything(dom)
    assert names(dom) == [] and plugin_leftovers(dom) == {}


def test_shallow_blockcopy_keeps_the_chain_exact(make_vm):
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    path = os.path.join(t.dir, "shallow.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    t.disks[0]["path"], path], check=True)
    virsh("blockcopy", t.name, "vda", path, "--wait", "--pivot", "--transient-job",
          "--shallow", "--reuse-external")
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    assert since(dom, "c1") == clusters(w1 + w2 + w3)
    virsh("blockcommit", t.name, "vda", "--active", "--pivot", "--wait")
    delete_everything(dom)


def test_lost_history_makes_the_checkpoint_invalid_with_a_reason(make_vm):
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    # the overlay's copy is gone (as when an image is replaced by one without bitmaps)
    q(dom, "block-dirty-bitmap-remove", {"node": top_node(dom), "name": bitmap_of(dom, "c1")})
    desc = lf.blockCheckpointLookupByName(dom, "c1").getXMLDesc()
    assert "<valid>no</valid>" in desc
    assert "backing chain of vda changed" in desc and "ext1.qcow2 is missing" in desc
    assert "full backup" in desc
    snap(dom, "s", flags=0)
    with pytest.raises(lf.OperationInvalid, match="backing chain of vda changed"):
        export(dom, "s", "c1")
    lf.blockSnapshotLookupByName(dom, "s").delete()
    # a new checkpoint on top works
    snap(dom, "c2").delete()
    w = writes(t, [(0x21, 2 * MiB, MiB)])
    assert since(dom, "c2") == clusters(w)


def test_checkpoints_of_a_chain_come_back_after_the_metadata_is_lost(make_vm):
    t = make_vm(disks=1)
    dom = t.dom
    snap(dom, "c1").delete()
    w1 = writes(t, [(0x11, 0, MiB)])
    external_snapshot(t, "ext1")
    snap(dom, "c2").delete()
    w2 = writes(t, [(0x21, 4 * MiB, MiB)])
    external_snapshot(t, "ext2")
    w3 = writes(t, [(0x31, 8 * MiB, MiB)])
    for ns in (metadata.CHECKPOINTS_NS_URI, metadata.NS_URI):
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, ns,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
    # (the snapshots' watcher may already be rebuilding them: the same code path)
    assert names(dom) == ["c1", "c2"]
    assert valid(dom, "c1") and valid(dom, "c2")
    assert since(dom, "c1") == clusters(w1 + w2 + w3)
    assert since(dom, "c2") == clusters(w2 + w3)


def test_backup_auto_is_exact_across_an_external_snapshot_and_falls_back_when_lost(
        make_vm, tmp_path):
    t = make_vm(disks=1)
    dom = t.dom
    target = str(tmp_path / "backup")
    w0 = writes(t, [(0x01, 0, MiB)])
    assert bk.backup(dom, target).mode == "full"
    w1 = writes(t, [(0x11, 2 * MiB, MiB)])
    external_snapshot(t, "ext1")
    w2 = writes(t, [(0x21, 6 * MiB, MiB)])
    r = bk.backup(dom, target, mode="auto")
    assert r.mode == "incremental" and r.copied == 2 * MiB
    out = str(tmp_path / "p1.raw")
    bk.restore(target, "vda", out, point=1)
    with open(out, "rb") as f:
        assert f.read() == expected_image(SIZE, w0 + w1 + w2)
    # the newest checkpoint's copy in the top image is lost: auto falls back, saying why
    external_snapshot(t, "ext2")
    q(dom, "block-dirty-bitmap-remove", {"node": top_node(dom),
                                         "name": bitmap_of(dom, r.point.checkpoint)})
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "backup", t.name,
                          "--target", target, "--auto"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr
    assert "full backup" in said and "backing chain of vda changed" in said, said
    assert [p.mode for p in bk.info(target).points] == ["full", "incremental", "full"]
    assert bk.verify(target).ok
