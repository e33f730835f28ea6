# SPDX-License-Identifier: LGPL-2.1-or-later
"""When the fleece storage fills up, the snapshot never serves wrong data.

On the snapshot-access read path (QEMU 8.0+) the guest writes on and the
snapshot's reads fail. On the overlay read path (QEMU 7.2, see
libvirt_fleece/qemu/readpath.py) every snapshot has a size limit that fits in the
free space, the watcher breaks it at the limit, and a guest write fails only
when something else fills the filesystem first. The overlay tests force that
path with ``read_path: overlay``, so they run on every QEMU.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import libvirt
import libvirt_qemu
import nbd
import pytest

import libvirt_fleece as lf
from libvirt_fleece import config
from libvirt_fleece.qemu import readpath
from conftest import plugin_leftovers
from vm import MiB

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(make_vm):
    t = make_vm(disks=1)
    mnt = os.path.join(t.dir, "small")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", mnt], check=True)
    yield t, mnt
    t.destroy()
    subprocess.run(["umount", "-l", mnt], check=False)


def read_path(t) -> str:
    return readpath.verdict(t.dom, config.load().state_dir).readpath


@pytest.fixture
def overlay_config(tmp_path, monkeypatch):
    """``read_path: overlay`` for this process and the watcher it starts."""
    path = tmp_path / "config.yaml"
    path.write_text("read_path: overlay\n")
    monkeypatch.setenv(config.ENV_PATH, str(path))


def mount_tmpfs(t, size: str) -> str:
    mnt = os.path.join(t.dir, "fs" + size)
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", mnt],
                   check=True)
    return mnt


@pytest.fixture
def tmpfs_vm(make_vm):
    t = make_vm(disks=1)
    mounts: list[str] = []
    yield t, lambda size: mounts.append(mount_tmpfs(t, size)) or mounts[-1]
    t.destroy()
    for mnt in mounts:
        subprocess.run(["umount", "-l", mnt], check=False)


def guest_write(t, pattern: int, offset: int, length: int) -> str:
    """A guest write; returns its error ("" when it succeeded). qemu-io reports a
    failed write in the domain's log, not in the monitor's reply."""
    log = f"/var/log/libvirt/qemu/{t.name}.log"
    before = os.path.getsize(log)
    reply = libvirt_qemu.qemuMonitorCommand(
        t.dom, f'qemu-io -d {t.qdev("vda")} "write -P 0x{pattern:02x} {offset} {length}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP).strip()
    if reply:
        return reply
    deadline = time.monotonic() + 10      # virtlogd writes qemu's output a little later
    while True:
        with open(log, errors="replace") as f:
            f.seek(before)
            lines = f.read().splitlines()
        failed = [line for line in lines if "write failed" in line]
        if failed or any(line.startswith("wrote ") for line in lines):
            return "\n".join(failed)
        assert time.monotonic() < deadline, "qemu-io reported nothing in the domain log"
        time.sleep(0.05)


def snapshot_state(t, name: str) -> str:
    return re.search(r"<state>(\w+)</state>",
                     lf.blockSnapshotLookupByName(t.dom, name).getXMLDesc()).group(1)


def test_full_fleece_breaks_the_snapshot_not_the_guest(small_fs):
    t, mnt = small_fs
    t.write("vda", 0xA1, 0, 8 * MiB)
    if read_path(t) == readpath.OVERLAY:
        # this QEMU cannot make a broken snapshot's reads fail: a fleece that cannot
        # hold its size limit above fleece_min_free is refused, and nothing is left
        with pytest.raises(lf.OperationInvalid, match="free"):
            lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>full</name><disk "
                                             f"name='vda'><fleece file='{mnt}/f.qcow2'/></disk>"
                                             "</domainblocksnapshot>")
        assert lf.blockSnapshotList(t.dom) == [] and plugin_leftovers(t.dom) == {}
        assert os.listdir(mnt) == []
        return
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>full</name><disk name='vda'>"
                                     f"<fleece file='{mnt}/f.qcow2'/></disk></domainblocksnapshot>")
    lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                               "<disk name='vda' snapshot='full'/></domainblockexport>")
    sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
    h = nbd.NBD()
    h.set_export_name("vda-full")
    h.connect_unix(sock)
    assert h.pread(4096, 0) == b"\xa1" * 4096
    t.write("vda", 0xB2, 0, 8 * MiB)          # 8 MiB of old data cannot fit in 2 MiB
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    with pytest.raises(nbd.Error):
        for off in range(0, 8 * MiB, MiB):
            h.pread(MiB, off)
    h.shutdown()
    # the next look marks it broken with the reason; its exports are refused
    desc = lf.blockSnapshotLookupByName(t.dom, "full").getXMLDesc()
    assert "<state>broken</state>" in desc and "is full" in desc
    assert lf.blockExportList(t.dom) == []
    with pytest.raises(lf.OperationInvalid, match="broken"):
        lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                                   "<disk name='vda' snapshot='full'/></domainblockexport>")
    lf.blockSnapshotLookupByName(t.dom, "full").delete()
    assert lf.blockSnapshotList(t.dom) == []
    # the guest's writes all landed: the disk holds the new data
    t.destroy()
    out = subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={t.disks[0]['path']}",
                          f"of={t.dir}/check.raw", "bs=1M", "count=8"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(f"{t.dir}/check.raw", "rb") as f:
        assert f.read() == b"\xb2" * (8 * MiB)


def test_size_limit_stops_the_snapshot_cleanly_without_any_caller(make_vm):
    t = make_vm(disks=1)
    t.write("vda", 0xC1, 0, 16 * MiB)
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>lim</name>"
                                     "<sizeLimit>4194304</sizeLimit></domainblocksnapshot>")
    desc = lf.blockSnapshotLookupByName(t.dom, "lim").getXMLDesc()
    fleece = re.search(r'file="([^"]+)"', desc).group(1)
    assert "<sizeLimit>4194304</sizeLimit>" in desc
    t.write("vda", 0xD2, 0, 16 * MiB)      # 16 MiB of old data: past the 4 MiB limit
    # the watcher acts on qemu's write-threshold event: no API call here
    deadline = time.monotonic() + 15
    while "state=\"broken\"" not in t.dom.XMLDesc(0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "state=\"broken\"" in t.dom.XMLDesc(0)
    assert not os.path.exists(fleece), "breaking frees the fleece image"
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    desc = lf.blockSnapshotLookupByName(t.dom, "lim").getXMLDesc()
    assert "<state>broken</state>" in desc and "size limit" in desc
    with pytest.raises(lf.OperationInvalid, match="broken"):
        lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                                   "<disk name='vda' snapshot='lim'/></domainblockexport>")
    lf.blockSnapshotLookupByName(t.dom, "lim").delete()
    assert lf.blockSnapshotList(t.dom) == []


def test_overlay_snapshot_breaks_at_its_limit_before_the_storage_fills(tmpfs_vm, overlay_config):
    t, mount = tmpfs_vm
    mnt = mount("16m")
    t.write("vda", 0xA1, 0, 24 * MiB)
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>auto</name><disk name='vda'>"
                                     f"<fleece file='{mnt}/f.qcow2'/></disk></domainblocksnapshot>")
    desc = lf.blockSnapshotLookupByName(t.dom, "auto").getXMLDesc()
    limit = int(re.search(r"<sizeLimit>(\d+)</sizeLimit>", desc).group(1))
    assert 4 * MiB < limit <= 8 * MiB, "without a limit: half the free space"
    lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                               "<disk name='vda' snapshot='auto'/></domainblockexport>")
    sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
    h = nbd.NBD()
    h.set_export_name("vda-auto")
    h.connect_unix(sock)
    written = 0
    while written + 2 * MiB <= limit:         # below the limit (qcow2 metadata counts too)
        assert guest_write(t, 0xB2, written, MiB) == ""
        written += MiB
        assert h.pread(written, 0) == b"\xa1" * written, "the export serves the old data"
    while written <= limit + MiB:             # past it: the guest's writes go on
        assert guest_write(t, 0xB2, written, MiB) == ""
        written += MiB
    # the watcher acts on qemu's write-threshold event, before the storage fills
    deadline = time.monotonic() + 15
    while 'state="broken"' not in t.dom.XMLDesc(0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert snapshot_state(t, "auto") == "broken"
    assert "size limit" in lf.blockSnapshotLookupByName(t.dom, "auto").getXMLDesc()
    with pytest.raises(nbd.Error):
        h.pread(MiB, 0)                       # its clients were cut off
    # the filter is off: the rest of the guest's writes land, none fails
    for off in range(written, 24 * MiB, MiB):
        assert guest_write(t, 0xB2, off, MiB) == ""
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert os.listdir(mnt) == [], "breaking frees the fleece image"
    lf.blockSnapshotLookupByName(t.dom, "auto").delete()
    assert plugin_leftovers(t.dom) == {}


def test_overlay_guest_write_fails_only_when_something_else_fills_the_storage(
        tmpfs_vm, overlay_config):
    t, mount = tmpfs_vm
    mnt = mount("16m")
    t.write("vda", 0xA1, 0, 8 * MiB)
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>crowded</name><sizeLimit>"
                                     f"{4 * MiB}</sizeLimit><disk name='vda'><fleece file="
                                     f"'{mnt}/f.qcow2'/></disk></domainblocksnapshot>")
    # someone else fills the filesystem faster than any watcher could react
    subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/filler", "bs=1M"], capture_output=True)
    error = guest_write(t, 0xB2, 0, MiB)
    assert "No space left" in error, "the overlay path fails the write it cannot protect"
    # the snapshot never held wrong data; the next look breaks it for the full filesystem
    assert snapshot_state(t, "crowded") == "broken"
    assert "is full" in lf.blockSnapshotLookupByName(t.dom, "crowded").getXMLDesc()
    assert guest_write(t, 0xB2, 0, MiB) == "", "once broken, the guest writes on"
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    os.unlink(f"{mnt}/filler")
    lf.blockSnapshotLookupByName(t.dom, "crowded").delete()
    assert plugin_leftovers(t.dom) == {}


def test_any_call_restarts_a_dead_watcher_even_beside_an_old_versions_lock(make_vm):
    """The watcher is the only thing that breaks a limited snapshot while nobody calls:
    one that died (or one of 0.3.0 and before, holding the old lock and running the
    old package's steps) is replaced by the next call of any kind."""
    import fcntl
    from conftest import stop_watcher
    t = make_vm(disks=1)
    cfg = config.load()
    os.makedirs(cfg.state_dir, exist_ok=True)
    old = os.open(os.path.join(cfg.state_dir, f"{t.dom.UUIDString()}.watcher"),
                  os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)       # as an old version's watcher does
    try:
        t.write("vda", 0xC1, 0, 16 * MiB)           # old data the snapshot must keep
        lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>lim</name>"
                                         "<sizeLimit>4194304</sizeLimit></domainblocksnapshot>")
        stop_watcher(t.dom)
        assert lf.blockSnapshotList(t.dom)          # any call: a listing
        t.write("vda", 0xD2, 0, 16 * MiB)           # past the 4 MiB limit
        deadline = time.monotonic() + 15            # the new watcher acts, no call here
        while 'state="broken"' not in t.dom.XMLDesc(0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert 'state="broken"' in t.dom.XMLDesc(0)
        lf.blockSnapshotLookupByName(t.dom, "lim").delete()
    finally:
        os.close(old)
