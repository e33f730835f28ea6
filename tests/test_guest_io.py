# SPDX-License-Identifier: LGPL-2.1-or-later
"""With a guest that writes on its own: several disks are caught at one instant."""

from __future__ import annotations

import os
import re
import subprocess
import time

import libvirt
import pytest

import libvirt_fleece as lf
from vm import GUEST_DIR, guest_kernel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def built_guest():
    subprocess.run([os.path.join(HERE, "guest", "build-guest.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    assert os.path.exists(os.path.join(GUEST_DIR, "vmlinuz"))


def counter(data: bytes) -> int:
    text = data[:512].decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def read_sector0(sock: str, name: str) -> bytes:
    import nbd
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    try:
        return h.pread(512, 0)
    finally:
        h.shutdown()


def test_snapshot_of_two_disks_is_one_instant_while_the_guest_writes(built_guest, make_vm):
    t = make_vm(disks=2, size_mib=16, kernel=guest_kernel("counter"))
    deadline = time.monotonic() + 120
    while "first write done" not in t.serial_log():
        assert time.monotonic() < deadline, f"guest did not start writing: {t.serial_log()[-500:]}"
        time.sleep(0.5)
    seen = []
    for i in range(8):
        lf.blockSnapshotCreateXML(t.dom, f"<domainblocksnapshot><name>i{i}</name>"
                                         "</domainblocksnapshot>")
        lf.blockExportStart(t.dom, f"<domainblockexport type='nbd'><disk name='vda' "
                                   f"snapshot='i{i}'/><disk name='vdb' snapshot='i{i}'/>"
                                   "</domainblockexport>")
        sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
        a, b = counter(read_sector0(sock, f"vda-i{i}")), counter(read_sector0(sock, f"vdb-i{i}"))
        lf.blockSnapshotLookupByName(t.dom, f"i{i}").delete(
            lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
        seen.append((a, b))
        assert a > 0 and a - b in (0, 1), f"snapshot {i}: vda={a} vdb={b} (not one instant)"
        time.sleep(0.2)
    # the guest never noticed: still running, still counting, no write errors
    assert t.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert seen[-1][0] > seen[0][0]
    errors = re.findall(r"errors=(\d+)", t.serial_log())
    assert not errors or errors[-1] == "0"
