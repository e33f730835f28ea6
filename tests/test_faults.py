# SPDX-License-Identifier: LGPL-2.1-or-later
"""A process killed after any step, and several processes at once, lose nothing and leak nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import libvirt
import pytest

import libvirt_fleece as lf
from libvirt_fleece.qemu import bitmaps, names
from libvirt_fleece import metadata
from libvirt_fleece.faults import ENV, KILL_POINTS
from conftest import plugin_leftovers
from vm import MiB, TestVM, expected_image, read_export

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
SNAP = "<domainblocksnapshot><name>k</name></domainblocksnapshot>"
EXPORT = "<domainblockexport type='nbd'><disk name='vda' snapshot='k'/></domainblockexport>"
SIZE = 64 * MiB
CP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT


def api(dom_name, *args, kill_at=None, timeout=60):
    env = dict(os.environ)
    if kill_at:
        env[ENV] = kill_at
    return subprocess.run([sys.executable, os.path.join(HERE, "apicall.py"), dom_name, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def victim(conn):
    t = TestVM(conn, disks=2, tag="kill-")
    t.start()
    t.write("vda", 0x5C, 0, MiB)
    yield t
    t.cleanup()


def clean_slate(t):
    for s in reversed(lf.blockSnapshotList(t.dom)):
        s.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    for c in reversed(lf.blockCheckpointList(t.dom)):
        c.delete()
    assert plugin_leftovers(t.dom) == {}
    assert not [b for bs in bitmaps.by_node(t.dom).values() for b in bs]


def assert_bitmaps(t, expected, frozen=0):
    """Our bitmaps on vda: checkpoint name -> recording; no temporary bitmap left."""
    found = {}
    for bs in bitmaps.by_node(t.dom).values():
        for b in bs:
            parsed = names.parse_checkpoint_bitmap(b.name)
            if parsed and parsed[2] in ("base", "k") and b.node.endswith("format"):
                found.setdefault(parsed[2], b.recording)
            elif b.name.startswith("fleece-") and not b.name.startswith("fleece-cp."):
                found[b.name] = "temporary"
    frz = [k for k in found if k.endswith(("-frz", "-frz.d"))]
    assert len(frz) == frozen, "a live snapshot keeps a frozen copy and its delta per disk"
    assert {k: v for k, v in found.items() if k not in frz} == expected


def fleece_files(t):
    d = "/var/lib/libvirt/fleece"
    return sorted(f for f in os.listdir(d) if f.startswith(t.name)) if os.path.isdir(d) else []


def prepare(t, point):
    """Bring the domain to the state the killed operation starts from; return the op."""
    op = point.split(":")[0]
    # an older checkpoint "base" makes every step move bitmaps too
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>base</name>"
                                     "</domainblocksnapshot>", CP).delete()
    if op == "readpath":
        # forget this qemu's read-path verdict, so that the next create runs the self-test
        shutil.rmtree("/run/libvirt-fleece/state/qemu", ignore_errors=True)
    if op in ("snapshot-create", "readpath"):
        return ["create-cp", SNAP]
    if op == "checkpoint-delete":
        lf.blockSnapshotCreateXML(t.dom, SNAP, CP).delete()
        return ["checkpoint-delete", "k"]
    lf.blockSnapshotCreateXML(t.dom, SNAP, CP)
    if op == "snapshot-delete":
        return ["delete", "k"]
    if op == "export-start":
        return ["export-start", EXPORT]
    lf.blockExportStart(t.dom, EXPORT)
    return ["export-stop", EXPORT]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_after_each_step_the_next_call_cleans_up(victim, point):
    t = victim
    clean_slate(t)
    args = prepare(t, point)
    proc = api(t.name, *args, kill_at=point)
    assert proc.returncode == -9, f"kill point {point} not reached: {proc.stderr[-2000:]}"
    # the guest is never left paused (the guard resumes it within a second or two)
    deadline = time.monotonic() + 3
    while t.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    # the next call finishes or undoes the interrupted one
    snaps = [s.getName() for s in lf.blockSnapshotList(t.dom)]
    exports = lf.blockExportList(t.dom)
    left = plugin_leftovers(t.dom)
    cps = [c.getName() for c in lf.blockCheckpointList(t.dom)]
    assert all("<valid>yes</valid>" in c.getXMLDesc() for c in lf.blockCheckpointList(t.dom))
    if point.startswith("checkpoint-delete"):
        assert cps == ["base"] and snaps == [] and left == {}
        assert_bitmaps(t, {"base": True})
        return
    if point == "snapshot-create:ready" or point.startswith("export-"):
        assert cps == ["base", "k"]
        assert_bitmaps(t, {"base": True, "k": True}, frozen=4)
        assert snaps == ["k"]
        assert len(fleece_files(t)) == 2
        assert sorted(left) == ["drives", "fdsets", "nodes"]
        rec = metadata.load(t.dom).snapshot("k")
        assert set(left["nodes"]) == rec.needed_nodes() | {d.fleece_node + "f" for d in rec.disks}
        assert "exports" not in left
        assert exports == []
        # the surviving snapshot still gives exact data
        lf.blockExportStart(t.dom, EXPORT)
        sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
        assert read_export(sock, "vda-k") == expected_image(SIZE, [(0x5C, 0, MiB)])
        lf.blockSnapshotLookupByName(t.dom, "k").delete(
            lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    else:
        assert cps == (["base", "k"] if point.startswith("snapshot-delete") else ["base"])
        assert snaps == [] and exports == []
        assert left == {}
        assert fleece_files(t) == []
        if point.startswith("snapshot-create"):
            assert_bitmaps(t, {"base": True})     # the checkpoint being made was undone
    assert plugin_leftovers(t.dom) == {}
    assert not os.path.exists(f"/run/libvirt-fleece/{t.name}.sock")


def test_concurrent_processes_lose_nothing_and_leak_nothing(make_vm):
    t = make_vm(disks=1)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "apicall.py"), t.name,
                               "loop", "8", f"p{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    total_ok = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        ok, nfail, kinds = out.strip().split(" ", 2)
        total_ok += int(ok)
        assert eval(kinds).keys() <= {"delete-order (retried)"}, err
    assert total_ok >= 4
    assert lf.blockSnapshotList(t.dom) == []
    assert lf.blockExportList(t.dom) == []
    assert plugin_leftovers(t.dom) == {}
    assert fleece_files(t) == []


def test_eight_processes_with_checkpoints_on_two_domains(make_vm):
    """4 processes per domain, 2 domains: snapshots with checkpoints, incremental
    exports, deletes of snapshots and checkpoints. Figures go to tests/.reliability/."""
    import json
    vms = [make_vm(disks=1), make_vm(disks=1)]
    seconds = 10
    procs = [(t, subprocess.Popen([sys.executable, os.path.join(HERE, "apicall.py"), t.name,
                                   "loop-cp", str(seconds), f"q{i}"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
             for t in vms for i in range(4)]
    cycles, kinds = 0, {}
    for _t, p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        ok, _n, failed = out.strip().split(" ", 2)
        cycles += int(ok)
        for k, v in eval(failed).items():
            kinds[k] = kinds.get(k, 0) + v
    assert set(kinds) <= {"delete-order (retried)"}, kinds
    assert cycles >= 8
    for t in vms:
        assert lf.blockSnapshotList(t.dom) == [] and lf.blockExportList(t.dom) == []
        assert lf.blockCheckpointList(t.dom) == []
        assert plugin_leftovers(t.dom) == {}
        assert not [b for bs in bitmaps.by_node(t.dom).values() for b in bs]
        assert fleece_files(t) == []
    os.makedirs(os.path.join(HERE, ".reliability"), exist_ok=True)
    with open(os.path.join(HERE, ".reliability", "concurrency-checkpoints.json"), "w") as f:
        json.dump({"domains": 2, "processes": 8, "seconds": seconds, "cycles_ok": cycles,
                   "operations_ok": cycles * 5, "failures_by_kind": kinds,
                   "left": "nothing"}, f, indent=2)


def test_concurrent_creates_keep_every_record(make_vm):
    t = make_vm(disks=1)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "apicall.py"), t.name, "create",
                               f"<domainblocksnapshot><name>c{i}</name></domainblocksnapshot>"],
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    names = [s.getName() for s in lf.blockSnapshotList(t.dom)]
    assert sorted(names) == [f"c{i}" for i in range(6)]
    for s in reversed(lf.blockSnapshotList(t.dom)):
        s.delete()
    assert plugin_leftovers(t.dom) == {}
