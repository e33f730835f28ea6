# SPDX-License-Identifier: LGPL-2.1-or-later
"""The read-path self-test on a running domain: the right verdict, no guest I/O, kept per qemu."""

from __future__ import annotations

import os
import re

import pytest

import libvirt_fleece as lf
from libvirt_fleece import config
from libvirt_fleece.qemu import readpath
from conftest import plugin_leftovers
from vm import MiB, expected_image, read_export

pytestmark = pytest.mark.integration

STATE = config.load().state_dir


def guest_disk_stats(dom) -> dict:
    import json

    import libvirt_qemu
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(
        dom, '{"execute": "query-blockstats", "arguments": {"query-nodes": true}}', 0))
    return {s["node-name"]: (s["stats"]["rd_operations"], s["stats"]["wr_operations"])
            for s in reply["return"] if s.get("node-name", "").startswith("libvirt-")}


def test_the_self_test_decides_by_behaviour_and_touches_no_guest_disk(make_vm):
    t = make_vm(disks=1)
    t.write("vda", 0x3C, 0, MiB)
    identity = readpath._qemu_identity(t.dom)
    assert identity is not None, "the qemu process is identified by pid and start time"
    cached = os.path.join(STATE, "qemu", identity + ".json")
    assert not os.path.exists(cached)
    before = guest_disk_stats(t.dom)
    found = readpath.verdict(t.dom, STATE)
    assert guest_disk_stats(t.dom) == before, "the self-test made no I/O on the guest's disks"
    assert plugin_leftovers(t.dom) == {}
    major = int(readpath.qemu_version(t.dom).split(".")[0])
    if major < 8:
        assert found.readpath == readpath.OVERLAY and "served live data" in found.reason
    else:
        assert found.readpath == readpath.SNAPSHOT_ACCESS, found.reason
    print(f"qemu {found.qemu}: {found.readpath} ({found.reason})")
    # kept for this qemu process, root-only, and not run again
    st = os.stat(cached)
    assert st.st_uid == 0 and st.st_mode & 0o077 == 0
    assert readpath.verdict(t.dom, STATE) == found and os.stat(cached).st_mtime == st.st_mtime
    # the snapshot takes that path, and says so in the export list
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>p</name></domainblocksnapshot>")
    lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                               "<disk name='vda' snapshot='p'/></domainblockexport>")
    listing = lf.blockExportList(t.dom)[0]
    assert f'readPath="{found.readpath}"' in listing
    if found.readpath == readpath.OVERLAY:
        assert "<sizeLimit>" in lf.blockSnapshotLookupByName(t.dom, "p").getXMLDesc()
    t.write("vda", 0x4D, 0, MiB // 2)
    sock = re.search(r'socket="([^"]+)"', listing).group(1)
    assert read_export(sock, "vda-p") == expected_image(64 * MiB, [(0x3C, 0, MiB)])
    lf.blockSnapshotLookupByName(t.dom, "p").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    # a new qemu process gets a verdict of its own; the old one's is dropped
    t.destroy()
    t.start()
    assert readpath._qemu_identity(t.dom) != identity
    assert readpath.verdict(t.dom, STATE).readpath == found.readpath
    assert not os.path.exists(cached)


def test_a_snapshot_access_snapshot_from_an_older_version_is_not_exported_where_it_is_wrong(
        make_vm):
    t = make_vm(disks=1)
    if readpath.verdict(t.dom, STATE).readpath != readpath.OVERLAY:
        pytest.skip("this QEMU reads snapshot-access snapshots right")   # Debian 13
    from libvirt_fleece import metadata
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>old</name>"
                                     "</domainblocksnapshot>")
    state = metadata.load(t.dom)
    rec = state.snapshots[0]
    rec.readpath = readpath.SNAPSHOT_ACCESS                 # as 0.1.x made it
    from libvirt_fleece.qemu import blockgraph
    blockgraph.add_access(t.dom, rec.disks[0].access_node, rec.disks[0].filter_node)
    metadata.save(t.dom, state)
    with pytest.raises(lf.OperationInvalid, match="serves live data"):
        lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                                   "<disk name='vda' snapshot='old'/></domainblockexport>")
    assert lf.blockExportList(t.dom) == []
