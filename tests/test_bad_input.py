# SPDX-License-Identifier: LGPL-2.1-or-later
"""Bad input gets a clear libvirt_fleece.Error and changes nothing (real domains)."""

from __future__ import annotations

import os

import libvirt
import pytest

import libvirt_fleece as lf
from conftest import plugin_leftovers
from vm import TestVM, domain_xml

pytestmark = pytest.mark.integration

FLEECE_DIR = "/var/lib/libvirt/fleece"


def world(t: TestVM) -> tuple:
    """Everything a failed call must leave as it was."""
    try:
        meta = t.dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                              "http://libvirt-fleece.org/xmlns/state/1",
                              libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError:
        meta = None
    files = sorted(os.listdir(t.dir)) + sorted(
        f for f in os.listdir(FLEECE_DIR) if t.name in f) if os.path.isdir(FLEECE_DIR) \
        else sorted(os.listdir(t.dir))
    return plugin_leftovers(t.dom), meta, files, t.dom.state()[0]


@pytest.fixture(scope="module")
def target(conn):
    t = TestVM(conn, disks=2, cdrom=True, tag="bad-")
    t.start()
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>taken</name>"
                                     "<disk name='vda'/></domainblocksnapshot>")
    existing = os.path.join(t.dir, "precious.img")
    with open(existing, "wb") as f:
        f.write(b"precious data")
    os.symlink(existing, os.path.join(t.dir, "link.qcow2"))
    os.symlink("/nonexistent/x", os.path.join(t.dir, "dangling.qcow2"))
    yield t
    t.cleanup()


def snapshot_cases(d):
    return [
        ("<domainblocksnapshot>", lf.InvalidArgument, "malformed"),
        ("", lf.InvalidArgument, "malformed|empty"),
        ("<foo/>", lf.InvalidArgument, "schema"),
        ("<domainblocksnapshot><bogus/></domainblocksnapshot>", lf.InvalidArgument, "schema"),
        ("<domainblocksnapshot><name>a/b</name></domainblocksnapshot>", lf.InvalidArgument,
         "not a valid name"),
        ("<domainblocksnapshot><name>" + "x" * 200 + "</name></domainblocksnapshot>",
         lf.InvalidArgument, "not a valid name"),
        ("<domainblocksnapshot><name>taken</name></domainblocksnapshot>",
         lf.AlreadyExists, "already has a snapshot 'taken'"),
        ("<domainblocksnapshot><disk name='vdz'/></domainblocksnapshot>", lf.NotFound, "'vdz'"),
        ("<domainblocksnapshot><disk name='vdb'/><disk name='vdb'/></domainblocksnapshot>",
         lf.InvalidArgument, "given twice"),
        ("<domainblocksnapshot><disk name='hdc'/></domainblocksnapshot>",
         lf.InvalidArgument, "cdrom"),
        (f"<domainblocksnapshot><disk name='vdb'><fleece file='{d}/precious.img'/></disk>"
         "</domainblocksnapshot>", lf.AlreadyExists, "never overwrites"),
        (f"<domainblocksnapshot><disk name='vdb'><fleece file='{d}/link.qcow2'/></disk>"
         "</domainblocksnapshot>", lf.AlreadyExists, "already exists"),
        (f"<domainblocksnapshot><disk name='vdb'><fleece file='{d}/dangling.qcow2'/></disk>"
         "</domainblocksnapshot>", lf.AlreadyExists, "already exists"),
        (f"<domainblocksnapshot><disk name='vdb'><fleece file='{d}/nodir/x.qcow2'/></disk>"
         "</domainblocksnapshot>", lf.InvalidArgument, "not usable"),
        (f"<domainblocksnapshot><disk name='vdb'><fleece file='{d}/../x.qcow2'/></disk>"
         "</domainblocksnapshot>", lf.InvalidArgument, "normalized"),
        ("<domainblocksnapshot><disk name='vdb'><fleece file='rel.qcow2'/></disk>"
         "</domainblocksnapshot>", lf.InvalidArgument, "schema"),
        ("<domainblocksnapshot><disk name='vdb'><fleece file='/dev/null'/></disk>"
         "</domainblocksnapshot>", lf.AlreadyExists, "already exists"),
        ("<domainblocksnapshot><disk name='vdb'><fleece file='/etc/passwd'/></disk>"
         "</domainblocksnapshot>", lf.AlreadyExists, "already exists"),
        (f"<domainblocksnapshot><disk name='vda'><fleece file='{d}/a.qcow2'/></disk>"
         f"<disk name='vdb'><fleece file='{d}/a.qcow2'/></disk></domainblocksnapshot>",
         lf.InvalidArgument, "given twice"),
        ('<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><domainblocksnapshot>'
         "<name>&e;</name></domainblocksnapshot>", lf.InvalidArgument, "DOCTYPE"),
        ("<domainblocksnapshot><name>a\x01b</name></domainblocksnapshot>",
         lf.InvalidArgument, "malformed"),
        (None, lf.InvalidArgument, "expected an XML string"),
        ("<domainblocksnapshot/>" + " " * (2 << 20), lf.InvalidArgument, "larger than"),
    ]


def test_bad_snapshot_requests_change_nothing(target):
    d = target.dir
    before = world(target)
    for xml, err, match in snapshot_cases(d):
        with pytest.raises(err, match=match):
            lf.blockSnapshotCreateXML(target.dom, xml)
        assert world(target) == before, xml
    with open(os.path.join(d, "precious.img"), "rb") as f:
        assert f.read() == b"precious data"


@pytest.mark.parametrize("flags", [-1, 1 << 7, "1", 1.5])
def test_bad_flags_are_refused(target, flags):
    before = world(target)
    with pytest.raises(lf.InvalidArgument, match="flags"):
        lf.blockSnapshotCreateXML(target.dom, "<domainblocksnapshot/>", flags)
    with pytest.raises(lf.InvalidArgument, match="flags"):
        lf.blockExportStop(target.dom, "<domainblockexport type='nbd'/>", flags)
    assert world(target) == before


def export_cases(d):
    e = "<domainblockexport type='nbd'>{}</domainblockexport>"
    return [
        (e.format("<disk name='vda' snapshot='nope'/>"), lf.NotFound, "no snapshot 'nope'"),
        (e.format("<disk name='vdb' snapshot='taken'/>"), lf.NotFound, "has no disk 'vdb'"),
        (e.format("<disk name='vda' snapshot='taken' checkpoint='c'/>"),
         lf.InvalidArgument, "checkpoint"),
        (e.format(""), lf.InvalidArgument, "schema"),
        ("<domainblockexport type='iscsi'><disk name='vda' snapshot='taken'/></domainblockexport>",
         lf.InvalidArgument, "schema"),
        (e.format("<address type='ip' host='127.0.0.1' port='70000'/>"
                  "<disk name='vda' snapshot='taken'/>"), lf.InvalidArgument, "schema"),
        (e.format("<address type='ip' host='127.0.0.1' port='-1'/>"
                  "<disk name='vda' snapshot='taken'/>"), lf.InvalidArgument, "schema"),
        (e.format("<address type='ip' host='example.com' port='10809'/>"
                  "<disk name='vda' snapshot='taken'/>"), lf.InvalidArgument, "not an IP"),
        (e.format(f"<address type='unix' socket='{d}/precious.img'/>"
                  "<disk name='vda' snapshot='taken'/>"), lf.AlreadyExists, "already exists"),
        (e.format("<address type='unix' socket='/nonexistent-dir/x.sock'/>"
                  "<disk name='vda' snapshot='taken'/>"), lf.InvalidArgument, "cannot bind"),
        (e.format("<disk name='vda' snapshot='taken' exportname='x'/>"
                  "<disk name='vda' snapshot='taken' exportname='x'/>"),
         lf.InvalidArgument, "given twice"),
        (e.format("<disk name='vda' snapshot='taken' exportname='../etc'/>"),
         lf.InvalidArgument, "not a valid name"),
        ("<blockexport type='nbd'><disk name='vda' snapshot='taken'/></blockexport>",
         lf.InvalidArgument, "expected <domainblockexport>"),
    ]


def test_bad_export_requests_change_nothing(target):
    before = world(target)
    for xml, err, match in export_cases(target.dir):
        with pytest.raises(err, match=match):
            lf.blockExportStart(target.dom, xml)
        assert world(target) == before, xml
        assert lf.blockExportList(target.dom) == []
    with open(os.path.join(target.dir, "precious.img"), "rb") as f:
        assert f.read() == b"precious data"


def test_bad_stop_and_lookup_requests(target):
    before = world(target)
    with pytest.raises(lf.NotFound):
        lf.blockExportStop(target.dom, "<domainblockexport type='nbd'>"
                                       "<disk name='vda' snapshot='taken'/></domainblockexport>")
    with pytest.raises(lf.NotFound):
        lf.blockSnapshotLookupByName(target.dom, "missing")
    with pytest.raises(lf.InvalidArgument):
        lf.blockSnapshotLookupByName(target.dom, None)
    with pytest.raises(lf.InvalidArgument):
        lf.blockSnapshotList("not a domain")
    assert world(target) == before


def test_export_name_in_use_is_refused(target):
    lf.blockExportStart(target.dom, "<domainblockexport type='nbd'><disk name='vda' "
                                    "snapshot='taken' exportname='one'/></domainblockexport>")
    before = world(target)
    with pytest.raises(lf.AlreadyExists, match="'one' is already in use"):
        lf.blockExportStart(target.dom, "<domainblockexport type='nbd'><disk name='vda' "
                                        "snapshot='taken' exportname='one'/></domainblockexport>")
    assert world(target) == before
    lf.blockExportStop(target.dom, "<domainblockexport type='nbd'><disk name='vda' "
                                   "snapshot='taken' exportname='one'/></domainblockexport>")


def test_domain_that_is_not_running_is_refused(conn, tmp_path):
    t = TestVM(conn, disks=1, tag="off-")
    dom = conn.defineXML(domain_xml(t.name, t.disks))
    try:
        with pytest.raises(lf.OperationInvalid, match="not running"):
            lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot/>")
        with pytest.raises(lf.OperationInvalid, match="not running"):
            lf.blockSnapshotList(dom)
    finally:
        dom.undefine()
        t.cleanup()
