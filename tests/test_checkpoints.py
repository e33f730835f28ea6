# SPDX-License-Identifier: LGPL-2.1-or-later
"""Checkpoints on real domains: exact bitmaps, rebuilt from the images, crashes reported."""

from __future__ import annotations

import os
import re
import signal
import time

import libvirt
import pytest

import libvirt_fleece as lf
from libvirt_fleece import metadata
from libvirt_fleece.steps import checkpoint as checkpoints
from conftest import plugin_leftovers
from vm import MiB, clusters, dirty_clusters, expected_image, read_export

pytestmark = pytest.mark.integration

CP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT
STOP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS
SIZE = 64 * MiB


def snap(dom, name, disks=("vda",), flags=CP):
    body = "".join(f"<disk name='{d}'/>" for d in disks)
    return lf.blockSnapshotCreateXML(
        dom, f"<domainblocksnapshot><name>{name}</name>{body}</domainblocksnapshot>", flags)


def export(dom, snapshot, checkpoint=None, disk="vda"):
    """Export and return (socket, export name, bitmap name)."""
    name = f"{disk}-{snapshot}-{checkpoint or 'full'}"
    cp = f" checkpoint='{checkpoint}'" if checkpoint else ""
    lf.blockExportStart(dom, f"<domainblockexport type='nbd'><disk name='{disk}' "
                             f"snapshot='{snapshot}' exportname='{name}'{cp}/></domainblockexport>")
    doc = lf.blockExportList(dom)[0]
    sock = re.search(r'socket="([^"]+)"', doc).group(1)
    m = re.search(rf'exportname="{re.escape(name)}"[^>]*bitmap="([^"]+)"', doc) or \
        re.search(rf'bitmap="([^"]+)"[^>]*exportname="{re.escape(name)}"', doc)
    return sock, name, m.group(1) if m else None


def changed(dom, snapshot, checkpoint, disk="vda"):
    sock, name, bitmap = export(dom, snapshot, checkpoint, disk)
    try:
        return dirty_clusters(sock, name, bitmap)
    finally:
        lf.blockExportStop(dom, f"<domainblockexport type='nbd'><disk name='{disk}' "
                                f"snapshot='{snapshot}' exportname='{name}'/></domainblockexport>")


def writes(t, ws, disk="vda"):
    for w in ws:
        t.write(disk, *w)
    return ws


def names(dom):
    return [c.getName() for c in lf.blockCheckpointList(dom)]


def delete_everything(dom):
    for s in reversed(lf.blockSnapshotList(dom)):
        s.delete(STOP)
    for c in reversed(lf.blockCheckpointList(dom)):
        c.delete()


def test_chain_of_checkpoints_gives_exactly_the_blocks_written_between(vm):
    dom = vm.dom
    snap(dom, "c1")
    w1 = writes(vm, [(0x11, 0, 64 * 1024), (0x12, 3 * MiB + 100, 10)])
    snap(dom, "c2")
    w2 = writes(vm, [(0x21, 8 * MiB, MiB), (0x22, 0, 4096)])
    snap(dom, "c3")
    w3 = writes(vm, [(0x31, 40 * MiB, 128 * 1024), (0x32, 8 * MiB, 4096)])
    assert names(dom) == ["c1", "c2", "c3"]
    assert changed(dom, "c3", "c1") == clusters(w1 + w2)
    assert changed(dom, "c3", "c2") == clusters(w2)
    assert changed(dom, "c3", "c3") == set()
    assert changed(dom, "c2", "c1") == clusters(w1)    # none of w2, w3 (after c2)
    # the data of the newest snapshot is exact too
    sock, name, _ = export(dom, "c3", "c1")
    assert read_export(sock, name) == expected_image(SIZE, w1 + w2)
    # checkpoint newer than the snapshot
    with pytest.raises(lf.InvalidArgument, match="newer than snapshot 'c2'"):
        export(dom, "c2", "c3")
    # bytes changed since, per disk
    desc = lf.blockCheckpointLookupByName(dom, "c2").getXMLDesc()
    assert int(re.search(r'changed="(\d+)"', desc).group(1)) == \
        len(clusters(w2 + w3)) * 64 * 1024
    assert "<valid>yes</valid>" in desc
    # visible in the domain XML, per disk
    xml = dom.XMLDesc(0)
    assert re.search(r"<fleececp:disk name=.vda.>\s*<fleececp:checkpoint name=.c1.", xml)
    delete_everything(dom)
    assert plugin_leftovers(dom) == {}


def test_deleting_checkpoints_keeps_every_other_range_exact(vm):
    dom = vm.dom
    snap(dom, "a")
    wa = writes(vm, [(1, 0, MiB)])
    snap(dom, "b")
    wb = writes(vm, [(2, 2 * MiB, MiB)])
    snap(dom, "c")
    wc = writes(vm, [(3, 4 * MiB, MiB)])
    s = snap(dom, "s", flags=0)                     # anchored on c
    after = writes(vm, [(4, 6 * MiB, MiB), (5, 0, 4096)])
    lf.blockCheckpointLookupByName(dom, "b").delete()          # middle
    assert names(dom) == ["a", "c"]
    assert changed(dom, "s", "a") == clusters(wa + wb + wc)
    assert changed(dom, "s", "c") == clusters(wc)
    lf.blockCheckpointLookupByName(dom, "c").delete()          # the snapshot's anchor, newest
    assert changed(dom, "s", "a") == clusters(wa + wb + wc)    # none of `after`
    # the predecessor records again: changes after the deletion are tracked
    w_late = writes(vm, [(6, 10 * MiB, MiB)])
    for name in ("s", "c", "b"):        # snapshots of one disk go newest first
        lf.blockSnapshotLookupByName(dom, name).delete(STOP)
    snap(dom, "n", flags=0)
    assert changed(dom, "n", "a") == clusters(wa + wb + wc + after + w_late)
    delete_everything(dom)
    assert s  # the handle stays a value object
    assert plugin_leftovers(dom) == {}


def _disable_top_copy(dom, checkpoint):
    """Stop a checkpoint's bitmap, as 0.1/0.2 did to all but the newest checkpoint."""
    import json
    import libvirt_qemu
    bitmap = next(b.name for bs in checkpoints.bitmaps.by_node(dom).values() for b in bs
                  if b.name.endswith("." + checkpoint) and b.name.startswith("fleece-cp."))
    node = next(n for n, bs in checkpoints.bitmaps.by_node(dom).items()
                if any(b.name == bitmap for b in bs))
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(
        {"execute": "block-dirty-bitmap-disable",
         "arguments": {"node": node, "name": bitmap}}), 0))
    assert "error" not in reply, reply


@pytest.mark.parametrize("made_by,order", [("0.3", "bca"), ("0.3", "cab"), ("0.2", "cab"),
                                           ("0.2", "bca")])
def test_deleting_checkpoints_in_any_order_keeps_stacked_snapshots_exact(make_vm, made_by,
                                                                         order):
    """Checkpoints a, b, c, then snapshots s1 and s2 with writes between every step; the
    checkpoints are deleted one by one, and after each deletion every remaining
    checkpoint's map in each snapshot is checked against the model. "0.2": the older
    checkpoints were stopped as 0.2 did (only the newest recorded)."""
    t = make_vm(disks=1)
    dom = t.dom
    log = []                                    # (event, writes since the previous)
    for i, name in enumerate("abc"):
        snap(dom, name)
        if made_by == "0.2" and i:
            _disable_top_copy(dom, "abc"[i - 1])
        log.append((name, writes(t, [(0x10 + i, i * 2 * MiB + 512, MiB)])))
    snap(dom, "s1", flags=0)
    log.append(("s1", writes(t, [(0x20, 8 * MiB, MiB), (0x21, 0, 4096)])))
    snap(dom, "s2", flags=0)
    log.append(("s2", writes(t, [(0x30, 12 * MiB, 3 * 4096)])))

    def model(cp, snapshot):
        names_ = [n for n, _ in log]
        return clusters([w for n, ws in log[names_.index(cp):names_.index(snapshot)]
                         for w in ws])

    remaining = ["a", "b", "c"]
    for victim in order:
        lf.blockCheckpointLookupByName(dom, victim).delete()
        remaining.remove(victim)
        assert names(dom) == remaining
        for cp in remaining:
            for snapshot in ("s1", "s2"):
                assert changed(dom, snapshot, cp) == model(cp, snapshot), (victim, cp, snapshot)
    for name in ("s2", "s1", "c", "b", "a"):
        lf.blockSnapshotLookupByName(dom, name).delete(STOP)
    assert plugin_leftovers(dom) == {}


def test_checkpoint_outlives_its_snapshot_and_covers_only_its_disks(vm):
    dom = vm.dom
    snap(dom, "only-a", disks=("vda",)).delete()
    assert names(dom) == ["only-a"]
    writes(vm, [(7, 0, MiB)], disk="vdb")
    snap(dom, "both", disks=("vda", "vdb"), flags=0)
    with pytest.raises(lf.InvalidArgument, match="does not cover disk 'vdb'"):
        export(dom, "both", "only-a", disk="vdb")
    with pytest.raises(lf.NotFound, match="no checkpoint 'nope'"):
        export(dom, "both", "nope")
    with pytest.raises(lf.AlreadyExists, match="checkpoint 'only-a'"):
        snap(dom, "only-a")
    sock, name, _ = export(dom, "both", "only-a")
    with pytest.raises(lf.OperationInvalid, match="used by export"):
        lf.blockCheckpointLookupByName(dom, "only-a").delete()
    assert lf.blockExportList(dom)
    delete_everything(dom)
    assert plugin_leftovers(dom) == {}


def test_metadata_lost_then_checkpoints_come_back_from_the_images(vm):
    dom = vm.dom
    snap(dom, "x1").delete()
    w = writes(vm, [(9, MiB, MiB)])
    snap(dom, "x2").delete()
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, metadata.CHECKPOINTS_NS_URI,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert names(dom) == ["x1", "x2"]
    assert all(c.getXMLDesc().count("<valid>yes</valid>") for c in lf.blockCheckpointList(dom))
    snap(dom, "s", flags=0)
    assert changed(dom, "s", "x1") == clusters(w)
    delete_everything(dom)


def restart_transient(conn, t):
    t.destroy()
    for _ in range(100):
        try:
            conn.lookupByName(t.name)
            time.sleep(0.1)
        except libvirt.libvirtError:
            break
    t.start()


def test_clean_restart_keeps_checkpoints_valid(conn, make_vm):
    t = make_vm(disks=1)
    snap(t.dom, "r1").delete()
    w = writes(t, [(1, 0, MiB)])
    restart_transient(conn, t)                 # virsh destroy: qemu closes the images
    assert names(t.dom) == ["r1"]
    w2 = writes(t, [(2, 5 * MiB, MiB)])
    snap(t.dom, "after", flags=0)
    assert changed(t.dom, "after", "r1") == clusters(w + w2)
    delete_everything(t.dom)


def kill_qemu(conn, t):
    with open(f"/run/libvirt/qemu/{t.name}.pid") as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            if t.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                break
        except libvirt.libvirtError:
            break
        time.sleep(0.1)


def test_crash_is_reported_never_hidden_and_new_checkpoints_work(conn, make_vm):
    t = make_vm(disks=1, persistent=True)
    snap(t.dom, "before").delete()
    t.destroy()                              # clean stop: "before" is stored in the image
    t.dom.create()
    snap(t.dom, "during").delete()           # made in the run that will crash
    writes(t, [(3, 0, MiB)])
    kill_qemu(conn, t)
    t.dom.create()
    cps = {c.getName(): c.getXMLDesc() for c in lf.blockCheckpointList(t.dom)}
    assert set(cps) == {"before", "during"}
    assert "<valid>no</valid>" in cps["before"] and "uncleanly" in cps["before"]
    assert "<valid>no</valid>" in cps["during"] and "missing" in cps["during"]
    snap(t.dom, "s", flags=0)
    with pytest.raises(lf.OperationInvalid, match="full backup"):
        export(t.dom, "s", "before")
    lf.blockSnapshotLookupByName(t.dom, "s").delete()
    # new checkpoints work again
    snap(t.dom, "fresh").delete()
    w = writes(t, [(4, 2 * MiB, MiB)])
    snap(t.dom, "s2", flags=0)
    assert changed(t.dom, "s2", "fresh") == clusters(w)
    delete_everything(t.dom)
    assert names(t.dom) == []


def test_foreign_libvirt_checkpoint_is_left_intact(make_vm):
    t = make_vm(disks=1)
    t.dom.checkpointCreateXML("<domaincheckpoint><name>theirs</name><disks>"
                              "<disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>")
    snap(t.dom, "ours").delete()
    w = writes(t, [(5, 0, MiB)])
    snap(t.dom, "s", flags=0)
    assert changed(t.dom, "s", "ours") == clusters(w)
    delete_everything(t.dom)
    assert names(t.dom) == []
    assert [c.getName() for c in t.dom.listAllCheckpoints()] == ["theirs"]
    t.dom.checkpointLookupByName("theirs").getXMLDesc()


def test_resize_invalidates_older_checkpoints_with_a_reason(make_vm):
    t = make_vm(disks=1)
    snap(t.dom, "small").delete()
    t.dom.blockResize("vda", 128 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    desc = lf.blockCheckpointLookupByName(t.dom, "small").getXMLDesc()
    assert "<valid>no</valid>" in desc and "resized" in desc
    snap(t.dom, "s", flags=0)
    with pytest.raises(lf.OperationInvalid, match="resized"):
        export(t.dom, "s", "small")
    lf.blockSnapshotLookupByName(t.dom, "s").delete()
    snap(t.dom, "big").delete()
    w = writes(t, [(6, 100 * MiB, MiB)])
    snap(t.dom, "s", flags=0)
    assert changed(t.dom, "s", "big") == clusters(w)
    delete_everything(t.dom)


def test_raw_disk_refuses_a_checkpoint_clearly(make_vm):
    t = make_vm(disks=1, fmt="raw")
    with pytest.raises(lf.InvalidArgument, match="checkpoints need qcow2"):
        snap(t.dom, "c")
    assert names(t.dom) == [] and plugin_leftovers(t.dom) == {}
    snap(t.dom, "plain", flags=0).delete()


def test_export_from_the_oldest_of_100_checkpoints_starts_fast(make_vm):
    t = make_vm(disks=1)
    for i in range(100):
        snap(t.dom, f"n{i:03d}").delete()
        if i % 10 == 0:
            t.write("vda", i, i * MiB // 2, 4096)
    snap(t.dom, "s", flags=0)
    started = time.monotonic()
    sock, name, bitmap = export(t.dom, "s", "n000")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"export took {elapsed:.2f} s"
    assert dirty_clusters(sock, name, bitmap) == clusters(
        [(0, i * MiB // 2, 4096) for i in range(0, 100, 10)])
    delete_everything(t.dom)


def test_undefined_and_redefined_domain_gets_its_checkpoints_back(conn, make_vm):
    t = make_vm(disks=1, persistent=True)
    snap(t.dom, "u1").delete()
    w = writes(t, [(8, 3 * MiB, MiB)])
    original = t.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    t.destroy()
    t.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    from vm import domain_xml
    t.dom = conn.defineXML(domain_xml(t.name, t.disks))     # the XML it was made from
    assert "fleececp" not in t.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "fleececp" in original
    t.dom.create()
    assert names(t.dom) == ["u1"]
    assert "<valid>yes</valid>" in lf.blockCheckpointLookupByName(t.dom, "u1").getXMLDesc()
    snap(t.dom, "s", flags=0)
    assert changed(t.dom, "s", "u1") == clusters(w)
    delete_everything(t.dom)
