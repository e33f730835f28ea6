# SPDX-License-Identifier: LGPL-2.1-or-later
"""When the fleece storage fills up, the guest writes on and the snapshot reads fail."""

from __future__ import annotations

import os
import re
import subprocess
import time

import libvirt
import nbd
import pytest

import libvirt_fleece as lf
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


def test_full_fleece_breaks_the_snapshot_not_the_guest(small_fs):
    t, mnt = small_fs
    t.write("vda", 0xA1, 0, 8 * MiB)
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
