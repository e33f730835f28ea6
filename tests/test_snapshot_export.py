# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshots and exports on real domains: exact data, lifecycle, no leftovers."""

from __future__ import annotations

import os
import re
import socket
import stat

import libvirt
import nbd
import pytest

import libvirt_fleece as lf
from libvirt_fleece import metadata
from conftest import plugin_leftovers
from vm import MiB, expected_image, read_export

pytestmark = pytest.mark.integration

SIZE = 64 * MiB


def snap_xml(name=None, disks=()):
    body = f"<name>{name}</name>" if name else ""
    for d in disks:
        if isinstance(d, tuple):
            body += f"<disk name='{d[0]}' type='file'><fleece file='{d[1]}'/></disk>"
        else:
            body += f"<disk name='{d}'/>"
    return f"<domainblocksnapshot>{body}</domainblocksnapshot>"


def export_xml(disks, address=""):
    body = "".join(
        f"<disk name='{d}' snapshot='{s}'" + (f" exportname='{n}'" if n else "") + "/>"
        for d, s, n in disks)
    return f"<domainblockexport type='nbd'>{address}{body}</domainblockexport>"


def server_socket(dom) -> str:
    docs = lf.blockExportList(dom)
    assert len(docs) == 1
    return re.search(r'socket="([^"]+)"', docs[0]).group(1)


def assert_clean(dom):
    assert plugin_leftovers(dom) == {}
    assert lf.blockSnapshotList(dom) == []
    assert lf.blockExportList(dom) == []
    with pytest.raises(libvirt.libvirtError):
        dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.NS_URI,
                     libvirt.VIR_DOMAIN_AFFECT_LIVE)


def test_export_is_the_disk_at_snapshot_time_while_the_guest_writes_on(vm):
    dom = vm.dom
    before = [(0xAA, 0, 1 * MiB), (0xBB, 5 * MiB, 64 * 1024)]
    for p, o, n in before:
        vm.write("vda", p, o, n)
    snap = lf.blockSnapshotCreateXML(dom, snap_xml("s1", ["vda"]))
    # overwrite old data, write into holes, partial clusters, the last byte
    for p, o, n in [(0x11, 0, 512 * 1024), (0x22, 5 * MiB + 4096, 4096),
                    (0x33, 20 * MiB, 2 * MiB), (0x44, SIZE - 512, 512)]:
        vm.write("vda", p, o, n)
    lf.blockExportStart(dom, export_xml([("vda", "s1", None)]))
    data = read_export(server_socket(dom), "vda-s1")
    assert data == expected_image(SIZE, before)
    desc = snap.getXMLDesc()
    alloc = int(re.search(r'allocation="(\d+)"', desc).group(1))
    assert alloc >= 512 * 1024, "the fleece image holds the overwritten data"
    snap.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert_clean(dom)


def test_snapshot_without_disks_covers_every_snapshottable_disk(vm):
    snap = lf.blockSnapshotCreateXML(vm.dom, "<domainblocksnapshot/>")
    desc = snap.getXMLDesc()
    assert re.findall(r'<disk name="(\w+)"', desc) == ["vda", "vdb"]
    assert re.fullmatch(r"[0-9a-f-]{36}", snap.getName()), "a UUID is generated"
    assert [s.getName() for s in lf.blockSnapshotList(vm.dom)] == [snap.getName()]
    assert lf.blockSnapshotLookupByName(vm.dom, snap.getName()) == snap
    assert snap.getDomain().UUIDString() == vm.dom.UUIDString()
    snap.delete()
    assert_clean(vm.dom)


def test_stacked_snapshots_each_stay_exact_and_delete_newest_first(vm):
    dom = vm.dom
    vm.write("vda", 0x01, 0, MiB)
    s1 = lf.blockSnapshotCreateXML(dom, snap_xml("old", ["vda"]))
    vm.write("vda", 0x02, 0, MiB)
    vm.write("vda", 0x03, 2 * MiB, MiB)
    s2 = lf.blockSnapshotCreateXML(dom, snap_xml("new", ["vda"]))
    vm.write("vda", 0x04, 0, 3 * MiB)
    lf.blockExportStart(dom, export_xml([("vda", "old", None), ("vda", "new", None)]))
    sock = server_socket(dom)
    assert read_export(sock, "vda-old") == expected_image(SIZE, [(0x01, 0, MiB)])
    assert read_export(sock, "vda-new") == expected_image(
        SIZE, [(0x02, 0, MiB), (0x03, 2 * MiB, MiB)])
    with pytest.raises(lf.OperationInvalid, match="delete 'new' first"):
        s1.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert read_export(sock, "vda-old") == expected_image(SIZE, [(0x01, 0, MiB)])
    s2.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    vm.write("vda", 0x05, 0, MiB)
    assert read_export(sock, "vda-old") == expected_image(SIZE, [(0x01, 0, MiB)])
    s1.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert_clean(dom)


def test_delete_removes_nodes_fdsets_file_and_metadata(vm):
    snap = lf.blockSnapshotCreateXML(vm.dom, snap_xml("d", ["vda", "vdb"]))
    files = re.findall(r'file="([^"]+)"', snap.getXMLDesc())
    assert len(files) == 2 and all(os.path.isfile(f) for f in files)
    for f in files:
        st = os.stat(f)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert plugin_leftovers(vm.dom)["nodes"]
    snap.delete()
    assert not any(os.path.exists(f) for f in files)
    assert_clean(vm.dom)
    with pytest.raises(lf.NotFound):
        snap.getXMLDesc()
    with pytest.raises(lf.NotFound):
        snap.delete()


def test_deleting_an_exported_snapshot_needs_the_stop_exports_flag(vm):
    snap = lf.blockSnapshotCreateXML(vm.dom, snap_xml("e", ["vda"]))
    lf.blockExportStart(vm.dom, export_xml([("vda", "e", "mine")]))
    with pytest.raises(lf.OperationInvalid, match="exported as 'mine'"):
        snap.delete()
    assert len(lf.blockExportList(vm.dom)) == 1
    snap.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert_clean(vm.dom)


def test_server_starts_with_first_export_and_stops_with_the_last(vm):
    dom = vm.dom
    lf.blockSnapshotCreateXML(dom, snap_xml("a"))
    lf.blockExportStart(dom, export_xml([("vda", "a", None)]))
    sock = server_socket(dom)
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    # joins the running server when <address> is omitted
    lf.blockExportStart(dom, export_xml([("vdb", "a", None)]))
    doc = lf.blockExportList(dom)[0]
    assert 'exportname="vda-a"' in doc and 'exportname="vdb-a"' in doc
    with pytest.raises(lf.AlreadyExists, match="already listens"):
        lf.blockExportStart(dom, export_xml([("vda", "a", "other")],
                                            "<address type='unix' socket='/run/elsewhere.sock'/>"))
    lf.blockExportStop(dom, export_xml([("vda", "a", None)]))
    assert os.path.exists(sock)
    lf.blockExportStop(dom, export_xml([("vdb", "a", None)]))
    assert not os.path.exists(sock)
    assert lf.blockExportList(dom) == []
    # qemu's one NBD server is free again: libvirt's own pull backup can start
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dom.backupBegin("<domainbackup mode='pull'><server transport='tcp' name='127.0.0.1' "
                    f"port='{port}'/><disks><disk name='vda' backup='yes' type='file'>"
                    f"<scratch file='{vm.dir}/scratch.qcow2'/></disk>"
                    "<disk name='vdb' backup='no'/></disks></domainbackup>", None, 0)
    dom.abortJob()
    lf.blockSnapshotLookupByName(dom, "a").delete()
    assert_clean(dom)


def test_exports_are_read_only(vm):
    lf.blockSnapshotCreateXML(vm.dom, snap_xml("ro", ["vda"]))
    lf.blockExportStart(vm.dom, export_xml([("vda", "ro", None)]))
    h = nbd.NBD()
    h.set_export_name("vda-ro")
    h.connect_unix(server_socket(vm.dom))
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()
    lf.blockSnapshotLookupByName(vm.dom, "ro").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)


def test_tcp_export_binds_the_address_asked_for_and_reports_the_port(vm):
    lf.blockSnapshotCreateXML(vm.dom, snap_xml("t", ["vda"]))
    vm.write("vda", 0x7E, 0, MiB)
    lf.blockExportStart(vm.dom, export_xml([("vda", "t", None)],
                                           "<address type='ip' host='127.0.0.1' port='0'/>"))
    doc = lf.blockExportList(vm.dom)[0]
    port = int(re.search(r'port="(\d+)"', doc).group(1))
    assert port > 0 and 'host="127.0.0.1"' in doc
    h = nbd.NBD()
    h.set_export_name("vda-t")
    h.connect_tcp("127.0.0.1", str(port))
    assert h.pread(4096, 0) == b"\0" * 4096
    h.shutdown()
    # an address in use is refused clearly
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        lf.blockExportStop(vm.dom, export_xml([("vda", "t", None)]))
        with pytest.raises(lf.AlreadyExists, match="address in use"):
            lf.blockExportStart(vm.dom, export_xml(
                [("vda", "t", None)],
                f"<address type='ip' host='127.0.0.1' port='{busy.getsockname()[1]}'/>"))
    assert lf.blockExportList(vm.dom) == []
    lf.blockSnapshotLookupByName(vm.dom, "t").delete()
    assert_clean(vm.dom)


def test_user_paused_guest_stays_paused_and_running_guest_is_resumed(vm):
    vm.dom.suspend()
    lf.blockSnapshotCreateXML(vm.dom, snap_xml("p1"))
    assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    vm.dom.resume()
    lf.blockSnapshotCreateXML(vm.dom, snap_xml("p2"))
    assert vm.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    lf.blockSnapshotLookupByName(vm.dom, "p2").delete()
    lf.blockSnapshotLookupByName(vm.dom, "p1").delete()
    assert_clean(vm.dom)


def test_raw_disk_can_be_snapshotted(make_vm):
    t = make_vm(disks=1, fmt="raw")
    t.write("vda", 0x66, 0, MiB)
    lf.blockSnapshotCreateXML(t.dom, snap_xml("raw"))
    t.write("vda", 0x67, 0, MiB)
    lf.blockExportStart(t.dom, export_xml([("vda", "raw", None)]))
    assert read_export(server_socket(t.dom), "vda-raw") == expected_image(SIZE, [(0x66, 0, MiB)])
    lf.blockSnapshotLookupByName(t.dom, "raw").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert_clean(t.dom)
