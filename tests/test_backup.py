# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backups end to end on real domains: full and incremental points restored byte for byte,
crash detection, a killed client, bad targets, and the benchmark's smoke run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import libvirt
import libvirt_qemu
import pytest

import libvirt_fleece as lf
from libvirt_fleece import backup as bk
from libvirt_fleece.backup import recovery
from libvirt_fleece.backup import manifest as mf
from libvirt_fleece.backup.dir import BackupDir
from conftest import plugin_leftovers
from vm import expected_image

pytestmark = pytest.mark.integration

MiB = 1 << 20
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(TOP, ".venv", "bin", "virsh-fleece")


@pytest.fixture
def target(tmp_path):
    d = tmp_path / "backup"
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


def write_zeroes(t, dev, offset, length):
    """A guest write-zeroes request (the disk then reports the range as zero)."""
    cmd = f'qemu-io -d {t.qdev(dev)} "write -z {offset} {length}"'
    out = libvirt_qemu.qemuMonitorCommand(t.dom, cmd,
                                          libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    assert not out.strip(), out


def assert_clean(dom):
    """No snapshot, export or qemu node of the plugin is left on the domain."""
    assert lf.blockSnapshotList(dom) == []
    assert lf.blockExportList(dom) == []
    assert plugin_leftovers(dom) == {}


def read_raw(path):
    with open(path, "rb") as f:
        return f.read()


def qemu_img_raw(src, out):
    """qemu-img alone, without this tool, reads a point (following the backing chain)."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", src, out], check=True)
    return read_raw(out)


def test_full_then_incrementals_restore_every_point_byte_for_byte(make_vm, target, tmp_path):
    size = 64 * MiB
    t = make_vm(disks=2, size_mib=64)
    writes = {"vda": [], "vdb": []}

    def w(dev, pattern, off, length):
        t.write(dev, pattern, off, length)
        writes[dev].append((pattern, off, length))

    def z(dev, off, length):
        write_zeroes(t, dev, off, length)
        writes[dev].append((0, off, length))

    w("vda", 0x11, 0, 2 * MiB)
    w("vdb", 0x22, 10 * MiB, 3 * MiB)
    expected = []
    r0 = bk.backup(t.dom, target)
    expected.append({d: expected_image(size, list(ws)) for d, ws in writes.items()})
    assert (r0.mode, r0.point.index) == ("full", 0) and "no backup yet" in r0.reason
    assert r0.copied == 5 * MiB                       # holes stay holes

    w("vda", 0x33, 1 * MiB, 64 * 1024)
    z("vda", 0, 256 * 1024)                           # zeroes over old data
    w("vdb", 0x44, 63 * MiB, 1 * MiB)
    r1 = bk.backup(t.dom, target, mode="auto")
    expected.append({d: expected_image(size, list(ws)) for d, ws in writes.items()})
    assert r1.mode == "incremental" and r0.point.checkpoint in r1.reason
    assert r1.copied == 64 * 1024 + MiB               # zeroes are written, not copied

    w("vdb", 0x55, 10 * MiB + 4096, 4096)             # unaligned: whole cluster
    r2 = bk.backup(t.dom, target, mode="incremental")
    expected.append({d: expected_image(size, list(ws)) for d, ws in writes.items()})
    assert r2.mode == "incremental" and r2.copied == 64 * 1024
    assert_clean(t.dom)
    assert [c.getName() for c in lf.blockCheckpointList(t.dom)] == \
        [r0.point.checkpoint, r1.point.checkpoint, r2.point.checkpoint]

    m = bk.info(target)
    assert m.domain_uuid == t.dom.UUIDString()
    assert [p.mode for p in m.points] == ["full", "incremental", "incremental"]
    assert m.points[2].disk("vda").backing == "vda.0001.qcow2"
    assert bk.verify(target).ok
    for p in range(3):
        for dev in ("vda", "vdb"):
            out = str(tmp_path / f"{dev}.{p}.raw")
            bk.restore(target, dev, out, point=p)
            assert read_raw(out) == expected[p][dev], f"point {p} disk {dev}"
            alone = qemu_img_raw(os.path.join(target, f"{dev}.{p:04d}.qcow2"),
                                 str(tmp_path / f"alone.{dev}.{p}.raw"))
            assert alone == expected[p][dev]
    newest = str(tmp_path / "newest.qcow2")
    bk.restore(target, "vda", newest)                 # qcow2 by extension, newest point
    assert json.loads(subprocess.run(["qemu-img", "info", "--output=json", newest],
                                     capture_output=True, check=True).stdout)["format"] == "qcow2"
    assert qemu_img_raw(newest, str(tmp_path / "n.raw")) == expected[2]["vda"]
    with pytest.raises(lf.AlreadyExists, match="never overwrites"):
        bk.restore(target, "vda", newest)

    # a byte flipped in a data cluster is found by verify and refused by restore
    victim = os.path.join(target, "vdb.0001.qcow2")
    flip(victim, data_cluster_offset(victim, 63 * MiB) + 4097)
    report = bk.verify(target)
    assert not report.ok and "vdb.0001.qcow2 does not match its checksum" in \
        report.problems[0], report.problems
    with pytest.raises(bk.BackupCorrupt):
        bk.restore(target, "vdb", str(tmp_path / "bad.raw"), point=2)
    assert not os.path.exists(tmp_path / "bad.raw")
    # damaged qcow2 metadata is found too
    flip(os.path.join(target, "vda.0000.qcow2"), 0)             # the header's magic
    problems = bk.verify(target).problems
    assert any("vda.0000.qcow2 is not a qcow2 file" in p for p in problems), problems
    with pytest.raises(bk.BackupCorrupt):
        bk.restore(target, "vda", str(tmp_path / "bad.raw"), point=0)


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xff]))


def data_cluster_offset(path, guest_offset):
    """Where the data cluster holding ``guest_offset`` of the file's own layer lies."""
    out = subprocess.run(["qemu-img", "map", "--output=json", "-U", path],
                         capture_output=True, check=True).stdout
    m = next(m for m in json.loads(out) if m["start"] <= guest_offset < m["start"] + m["length"]
             and m["depth"] == 0 and m["data"])
    return m["offset"] + guest_offset - m["start"]


def test_backups_of_the_first_format_still_verify_and_restore(make_vm, target, tmp_path):
    """Format /1 manifests carry a SHA-256 of each file's bytes instead of the layer digest."""
    t = make_vm(disks=1, size_mib=64)
    t.write("vda", 0x31, 0, MiB)
    bk.backup(t.dom, target)
    t.write("vda", 0x32, 8 * MiB, MiB)
    bk.backup(t.dom, target)
    path = os.path.join(target, mf.MANIFEST)
    with open(path) as f:
        data = json.load(f)
    data["format"] = "libvirt-fleece-backup/1"
    for p in data["points"]:
        for d in p["disks"]:
            del d["layer_sha256"]
            d["sha256"] = mf.sha256_file(os.path.join(target, d["file"]))
    with open(path, "w") as f:
        json.dump(data, f)
    assert bk.verify(target).ok
    out = str(tmp_path / "old.raw")
    bk.restore(target, "vda", out, point=1)
    assert read_raw(out) == expected_image(64 * MiB, [(0x31, 0, MiB), (0x32, 8 * MiB, MiB)])
    t.write("vda", 0x33, 16 * MiB, MiB)
    assert bk.backup(t.dom, target).mode == "incremental"     # the chain goes on, as /2
    m = bk.info(target)
    assert m.points[1].disks[0].sha256 and m.points[2].disks[0].layer_sha256
    assert bk.verify(target).ok
    flip(os.path.join(target, "vda.0001.qcow2"),
         os.path.getsize(os.path.join(target, "vda.0001.qcow2")) // 2)
    assert not bk.verify(target).ok


def test_crash_between_backups_makes_auto_take_a_full_one(conn, make_vm, target, tmp_path):
    t = make_vm(disks=1, size_mib=64, persistent=True)
    t.write("vda", 0x61, 0, MiB)
    t.destroy()             # a clean stop stores nothing new, but lets the images settle
    t.dom.create()
    assert bk.backup(t.dom, target).mode == "full"
    t.write("vda", 0x62, 4 * MiB, MiB)
    libvirt_qemu.qemuMonitorCommand(t.dom, f'qemu-io -d {t.qdev("vda")} "flush"',
                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    with open(f"/run/libvirt/qemu/{t.name}.pid") as f:
        os.kill(int(f.read()), signal.SIGKILL)
    for _ in range(100):
        if t.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            break
        time.sleep(0.1)
    t.dom.create()
    with pytest.raises(bk.NoValidChain, match="take a full one"):
        bk.backup(t.dom, target, mode="incremental")
    assert_clean(t.dom)
    r = bk.backup(t.dom, target)
    assert r.mode == "full" and ("invalid" in r.reason or "no longer exists" in r.reason), r.reason
    out = str(tmp_path / "after.raw")
    bk.restore(target, "vda", out)
    assert read_raw(out) == expected_image(64 * MiB, [(0x61, 0, MiB), (0x62, 4 * MiB, MiB)])
    t2 = bk.backup(t.dom, target)
    assert t2.mode == "incremental"


def test_killed_client_leaves_no_snapshot_export_or_backup_lookalike(make_vm, target):
    t = make_vm(disks=1, size_mib=1536)
    for i in range(12):                     # 768 MiB of data: long enough to kill mid-copy
        t.write("vda", 0x70 + i, i * 128 * MiB, 64 * MiB)
    proc = subprocess.Popen([CLI, "backup", t.name, "--target", target],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = os.path.join(target, "vda.0000.qcow2.part")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(part) and os.path.getsize(part) > 32 * MiB:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    else:
        pytest.fail("no data flowed")
    proc.kill()
    proc.wait()
    # the guard cleans up at once; the next plugin call finds nothing of ours
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (os.path.exists(part) or lf.blockSnapshotList(t.dom)):
        time.sleep(0.2)
    assert_clean(t.dom)
    assert lf.blockCheckpointList(t.dom) == []          # the unused checkpoint went too
    assert not any(n.endswith(".part") or mf.FILE_RE.match(n) for n in os.listdir(target))
    assert not os.path.exists(os.path.join(target, mf.MANIFEST))
    with pytest.raises(bk.BackupTargetError, match="holds no backup"):
        bk.verify(target)
    r = subprocess.run([CLI, "backup", t.name, "--target", target, "--disk", "vda"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "full backup" in r.stderr and "no backup yet" in r.stderr
    assert "progress:" in r.stderr and "Backup point 0 (full)" in r.stdout
    assert_clean(t.dom)


def test_next_run_cleans_up_when_the_guard_died_too(make_vm, target):
    """The journal path: a run killed together with its guard, then the next run."""
    t = make_vm(disks=1, size_mib=64)
    bk.backup(t.dom, target, mode="full")
    name = "backup-19700101T000000Z"
    lf.blockSnapshotCreateXML(t.dom, f"<domainblocksnapshot><name>{name}</name>"
                                     f"</domainblocksnapshot>",
                              lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT)
    lf.blockExportStart(t.dom, f"<domainblockexport type='nbd'><disk name='vda' "
                               f"snapshot='{name}'/></domainblockexport>")
    journal = mf.Journal(uri="qemu:///system", domain_uuid=t.dom.UUIDString(), snapshot=name,
                         checkpoint=name, parts=["vda.0001.qcow2.part"])
    with BackupDir(target) as bdir:     # as the run did: the root-only record, then the hint
        recovery.save_journal(bdir, journal)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    os.path.join(target, "vda.0001.qcow2.part"), "64M"], check=True)
    t.write("vda", 0x77, 0, MiB)
    r = bk.backup(t.dom, target)
    assert r.mode == "incremental" and r.point.index == 1 and r.copied == MiB
    assert_clean(t.dom)
    assert name not in [c.getName() for c in lf.blockCheckpointList(t.dom)]
    assert bk.verify(target).ok


def test_bad_targets_are_refused_clearly_and_change_nothing(make_vm, target, tmp_path):
    a = make_vm(disks=1, size_mib=64)
    with pytest.raises(bk.BackupTargetError, match="parent .* does not exist"):
        bk.backup(a.dom, str(tmp_path / "no" / "such"))
    with pytest.raises(bk.BackupTargetError, match="cannot create"):
        bk.backup(a.dom, "/proc/fleece-backup")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(bk.BackupTargetError, match="not a directory"):
        bk.backup(a.dom, str(afile))
    ro = tmp_path / "readonly"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0:
        try:
            with pytest.raises(bk.BackupTargetError, match="not writable"):
                bk.backup(a.dom, str(ro))
        finally:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(bk.BackupTargetError, match="not part of a backup .*notes.txt"):
        bk.backup(a.dom, str(foreign))
    assert sorted(os.listdir(foreign)) == [".libvirt-fleece-backup.lock", "notes.txt"]

    bk.backup(a.dom, target)
    b = make_vm(disks=1, size_mib=64)
    with pytest.raises(bk.BackupTargetError, match=f"backups of domain '{a.name}'"):
        bk.backup(b.dom, target)
    with pytest.raises(bk.NoValidChain):
        bk.backup(b.dom, str(tmp_path / "fresh"), mode="incremental")
    with pytest.raises(lf.NotFound, match="vdz"):
        bk.backup(b.dom, str(tmp_path / "fresh"), disks=["vdz"])
    with pytest.raises(lf.InvalidArgument, match="mode"):
        bk.backup(b.dom, target, mode="differential")
    for d in (a, b):
        assert_clean(d.dom)
    assert lf.blockCheckpointList(b.dom) == []
    assert len(bk.info(target).points) == 1
    r = subprocess.run([CLI, "backup", b.name, "--target", target], capture_output=True,
                       text=True)
    assert r.returncode == 1 and r.stderr.startswith("virsh-fleece: error: ") \
        and "one directory per domain" in r.stderr


def test_bench_smoke_runs():
    r = subprocess.run([sys.executable, os.path.join(TOP, "bench", "run_bench.py"), "--smoke"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "full backup" in r.stdout and "ratio" in r.stdout


def qemu_version(dom):
    """The domain's qemu version, asked here without the plugin."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-version"}', 0))
    v = reply["return"]["qemu"]
    return f"{v['major']}.{v['minor']}.{v['micro']}"


def cli_lines(*args):
    r = subprocess.run([CLI, *args], capture_output=True, text=True)
    return r.returncode, r.stdout, [line for line in r.stdout.splitlines()
                                    if line.startswith("WARNING:")]


def test_points_record_their_writer_and_old_ones_are_warned_about(make_vm, target, tmp_path):
    """Issue #10: points of 0.1.x may be wrong on QEMU < 8.0; info and verify say so."""
    t = make_vm(disks=1, size_mib=64)
    t.write("vda", 0x81, 0, MiB)
    bk.backup(t.dom, target)
    t.write("vda", 0x82, 4 * MiB, MiB)
    assert bk.backup(t.dom, target).mode == "incremental"
    path = os.path.join(target, mf.MANIFEST)
    with open(path) as f:
        data = json.load(f)
    assert data["format"] == "libvirt-fleece-backup/2"
    for p in data["points"]:
        writer = p["writer"]
        assert set(writer) == {"libvirt_fleece", "qemu", "read_path"}
        assert writer["libvirt_fleece"] == lf.__version__ == "0.3.0"
        assert writer["qemu"] == qemu_version(t.dom)
        assert writer["read_path"] in ("overlay", "snapshot-access"), writer    # readPath
    assert bk.point_warnings(bk.info(target)) == []
    report = bk.verify(target)
    assert report.ok and report.warnings == []
    for cmd in ("info", "verify"):
        rc, out, warned = cli_lines(cmd, target)
        assert rc == 0 and warned == [], out

    # point 0 as 0.1.0 wrote it: no writer record
    del data["points"][0]["writer"]
    with open(path, "w") as f:
        json.dump(data, f)
    warnings = bk.point_warnings(bk.info(target))
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("WARNING: point 0 (vda, ") and \
        "written by libvirt-fleece 0.1.x on an unknown QEMU" in warnings[0]
    assert warnings[1].startswith("WARNING: point 1 (vda, ") and "builds on point 0" in warnings[1]
    report = bk.verify(target)
    assert report.ok and report.warnings == warnings
    rc, out, warned = cli_lines("info", target)
    assert rc == 0 and warned == warnings, out
    rc, out, warned = cli_lines("verify", target)
    assert rc == 0 and warned == warnings, out
    assert "point(s) cannot be proven right" in out

    # auto does not build on it: a fresh full point, which has no warning
    t.write("vda", 0x83, 8 * MiB, MiB)
    r = bk.backup(t.dom, target)
    assert r.mode == "full" and "point 1 builds on point 0" in r.reason, r.reason
    assert r.point.writer == mf.Writer("0.3.0", qemu_version(t.dom), r.point.writer.read_path)
    rc, out, warned = cli_lines("verify", target)
    assert rc == 0 and [w.split(" (")[0] for w in warned] == \
        ["WARNING: point 0", "WARNING: point 1"], out
    out_raw = str(tmp_path / "p2.raw")
    bk.restore(target, "vda", out_raw, point=2)
    assert read_raw(out_raw) == expected_image(
        64 * MiB, [(0x81, 0, MiB), (0x82, 4 * MiB, MiB), (0x83, 8 * MiB, MiB)])
