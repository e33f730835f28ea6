# SPDX-License-Identifier: LGPL-2.1-or-later
"""Metadata that does not parse or does not match qemu is reported and repaired, never trusted."""

from __future__ import annotations

import os
import re

import libvirt
import pytest

import libvirt_fleece as lf
from libvirt_fleece import metadata
from conftest import plugin_leftovers, stop_watcher
from vm import MiB, expected_image, read_export

pytestmark = pytest.mark.integration


def set_state(dom, text):
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text, "fleece" if text else None,
                    metadata.NS_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def live_snapshot(t, name="s"):
    lf.blockSnapshotCreateXML(t.dom, f"<domainblocksnapshot><name>{name}</name>"
                                     "</domainblocksnapshot>")
    lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                               f"<disk name='vda' snapshot='{name}'/></domainblockexport>")
    files = re.findall(r'file="([^"]+)"',
                       lf.blockSnapshotLookupByName(t.dom, name).getXMLDesc())
    assert files and plugin_leftovers(t.dom)
    return files


def assert_repaired_and_usable(t, files):
    assert lf.blockSnapshotList(t.dom) == []
    assert plugin_leftovers(t.dom) == {}
    assert not any(os.path.exists(f) for f in files)
    # and the domain works normally again
    t.write("vda", 0x42, 0, MiB)
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>again</name>"
                                     "<disk name='vda'/></domainblocksnapshot>")
    lf.blockExportStart(t.dom, "<domainblockexport type='nbd'>"
                               "<disk name='vda' snapshot='again'/></domainblockexport>")
    sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
    assert read_export(sock, "vda-again") == expected_image(64 * MiB, [(0x42, 0, MiB)])
    lf.blockSnapshotLookupByName(t.dom, "again").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)


@pytest.mark.parametrize("garbage", [
    "<state version='7'><snapshot name='x'/></state>",          # another version
    "<state version='1'><bogus/></state>",                        # hand-edited
    "<other xmlns='urn:x'>text</other>",                         # not ours at all
])
def test_unparseable_metadata_is_reported_and_rebuilt(vm, garbage):
    files = live_snapshot(vm)
    stop_watcher(vm.dom)        # else its first look may repair before we ask
    set_state(vm.dom, garbage)
    report = lf.repair(vm.dom)
    # libvirt keeps a foreign-namespace element apart: then ours simply looks absent
    assert report[0].startswith("the stored metadata was unusable") or "urn:x" in garbage
    assert any("orphaned node" in line for line in report)
    assert_repaired_and_usable(vm, files)


def test_lost_metadata_leaves_no_orphans(vm):
    files = live_snapshot(vm)
    set_state(vm.dom, None)
    assert lf.blockSnapshotList(vm.dom) == []      # any call repairs
    assert_repaired_and_usable(vm, files)


def test_forged_record_deletes_nothing_it_cannot_prove_is_ours(vm, tmp_path):
    victim = tmp_path / "victim.img"
    victim.write_bytes(b"keep me")
    forged = metadata.State(snapshots=[metadata.SnapshotRecord(
        name="forged", id="0badc0de", state="creating", created=1, disks=[metadata.DiskRecord(
            name="vda", file=str(victim), qdev="/machine/peripheral/virtio-disk0/virtio-backend",
            base="libvirt-2-format", below="libvirt-2-format",
            fleece_node="fleece-0badc0de-0-img", filter_node="fleece-0badc0de-0-cbw",
            access_node="fleece-0badc0de-0-acc", fdset=1818624001, capacity=1)])])
    set_state(vm.dom, metadata.dumps(forged))
    assert lf.blockSnapshotList(vm.dom) == []
    assert victim.read_bytes() == b"keep me"
    assert plugin_leftovers(vm.dom) == {}


def test_metadata_copied_from_another_domain_is_not_trusted(make_vm):
    a = make_vm(disks=1)
    b = make_vm(disks=1)
    files_a = live_snapshot(a)
    text = a.dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, metadata.NS_URI,
                          libvirt.VIR_DOMAIN_AFFECT_LIVE)
    set_state(b.dom, text)
    assert lf.blockSnapshotList(b.dom) == []       # its nodes are not in b's qemu
    assert plugin_leftovers(b.dom) == {}
    assert all(os.path.exists(f) for f in files_a), "a's files are a's"
    assert [s.getName() for s in lf.blockSnapshotList(a.dom)] == ["s"]
    lf.blockSnapshotLookupByName(a.dom, "s").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)


def test_cli_repair_reports_what_it_did(vm):
    import subprocess
    import sys
    import libvirt_qemu
    files = live_snapshot(vm)
    set_state(vm.dom, None)
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "repair", vm.name],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # a snapshot with a size limit (every snapshot on QEMU 7.2) has a watcher, whose
    # first look may have removed the orphans just before this call did
    assert ("orphaned node" in out.stdout and "Repaired:" in out.stdout) or \
        out.stdout.strip() == "Nothing to repair"
    assert plugin_leftovers(vm.dom) == {}
    assert not any(os.path.exists(f) for f in files)
    # an orphan that no background process of ours knows about: this call reports it
    libvirt_qemu.qemuMonitorCommand(vm.dom, '{"execute": "blockdev-add", "arguments": '
                                    '{"driver": "null-co", "node-name": "fleece-orphan"}}', 0)
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "repair", vm.name],
                         capture_output=True, text=True)
    assert "orphaned node fleece-orphan" in out.stdout and "Repaired:" in out.stdout
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "repair", vm.name],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "Nothing to repair"
