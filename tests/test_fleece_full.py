# SPDX-License-Identifier: LGPL-2.1-or-later
"""When the fleece storage fills up, the guest writes on and the snapshot reads fail."""

from __future__ import annotations

import os
import re
import subprocess

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
    t.write("vda", 0xB2, 0, 8 * MiB)          # 8 MiB of old data cannot fit in 2 MiB
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                               "<disk name='vda' snapshot='full'/></domainblockexport>")
    sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
    h = nbd.NBD()
    h.set_export_name("vda-full")
    h.connect_unix(sock)
    with pytest.raises(nbd.Error):
        for off in range(0, 8 * MiB, MiB):
            h.pread(MiB, off)
    h.shutdown()
    lf.blockSnapshotLookupByName(t.dom, "full").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    # the guest's writes all landed: the disk holds the new data
    t.destroy()
    out = subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={t.disks[0]['path']}",
                          f"of={t.dir}/check.raw", "bs=1M", "count=8"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(f"{t.dir}/check.raw", "rb") as f:
        assert f.read() == b"\xb2" * (8 * MiB)
