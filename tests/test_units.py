# SPDX-License-Identifier: LGPL-2.1-or-later
"""Unit tests of the pure parts: documents, metadata, config, disks, files, errors."""

from __future__ import annotations

import os

import pytest

import libvirt_fleece as lf
from libvirt_fleece import config, disks, documents, errors, fleecefile, metadata, virt
from libvirt_fleece.faults import KILL_POINTS

XMLDIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xml-metadata")


def test_every_public_name_exists():
    for name in lf.__all__:
        assert hasattr(lf, name), name
    assert len(set(lf.__all__)) == len(lf.__all__)


def test_errors_are_one_tree_with_fields():
    e = errors.QMPError("blockdev-add", "GenericError", "boom", {"x": 1})
    assert isinstance(e, lf.Error) and e.command == "blockdev-add"
    assert str(e) == "qemu refused blockdev-add: boom (GenericError)"
    assert issubclass(lf.NotFound, lf.InvalidArgument)
    assert issubclass(lf.AlreadyExists, lf.InvalidArgument)


def test_snapshot_document_parses_with_defaults():
    spec = documents.parse_snapshot(
        "<domainblocksnapshot><name>n1</name><disk name='vda' type='file'>"
        "<fleece file='/x/y.qcow2'/></disk><disk name='vdb'/></domainblocksnapshot>")
    assert spec.name == "n1"
    assert [(d.name, d.fleece) for d in spec.disks] == [("vda", "/x/y.qcow2"), ("vdb", None)]
    assert documents.parse_snapshot("<domainblocksnapshot/>").disks == []


@pytest.mark.parametrize("xml", [
    "<domainblocksnapshot><disk/></domainblocksnapshot>",
    "<domainblocksnapshot><disk name='vda' type='block'/></domainblocksnapshot>",
    "<domainblocksnapshot><name></name></domainblocksnapshot>",
    "<domainblocksnapshot><name> x</name></domainblocksnapshot>",
    "<domainblocksnapshot><name>é</name></domainblocksnapshot>",
    "<domainblocksnapshot><name>a b</name></domainblocksnapshot>",
    "<domainblocksnapshot><disk name='vda'><fleece file='/a\u0007b'/></disk></domainblocksnapshot>",
    "<x:domainblocksnapshot xmlns:x='urn:x'/>",
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
    "<domainblocksnapshot><name>&lol2;</name></domainblocksnapshot>",
    "<domainblocksnapshot><xi:include xmlns:xi='http://www.w3.org/2001/XInclude' "
    "href='/etc/passwd'/></domainblocksnapshot>",
    b"\xff\xfe",
    12,
])
def test_bad_snapshot_documents_are_refused(xml):
    with pytest.raises(lf.InvalidArgument):
        documents.parse_snapshot(xml)


def test_export_document_parses_addresses():
    spec = documents.parse_export(
        "<domainblockexport type='nbd'><address type='ip' host='::1' port='10809'/>"
        "<disk name='vda' snapshot='s' exportname='e'/></domainblockexport>")
    assert spec.address == documents.Address(type="ip", host="::1", port=10809)
    assert spec.disks[0].exportname == "e"
    spec = documents.parse_export("<domainblockexport type='nbd'><disk name='vda' "
                                  "snapshot='s'/></domainblockexport>")
    assert spec.address is None


def test_output_documents_validate_against_the_schemas():
    from libvirt_fleece import xmlutil
    doc = documents.snapshot_document("s", 1700000000, [
        {"name": "vda", "file": "/f.qcow2", "capacity": 10, "allocation": 5}])
    xmlutil.validate(xmlutil.parse(doc, "t"), "domainblocksnapshot", "t")
    doc = documents.export_list_document(documents.Address("unix", socket="/run/x.sock"), [
        {"name": "vda", "snapshot": "s", "exportname": "vda-s"}])
    xmlutil.validate(xmlutil.parse(doc, "t"), "domainblockexport", "t")


def sample_state():
    disk = metadata.DiskRecord(
        name="vda", file="/var/lib/libvirt/fleece/d.s.vda.qcow2",
        qdev="/machine/peripheral/virtio-disk0/virtio-backend", base="libvirt-2-format",
        below="libvirt-2-format", fleece_node="fleece-0123abcd-0-img",
        filter_node="fleece-0123abcd-0-cbw", access_node="fleece-0123abcd-0-acc",
        fdset=1818624000, capacity=1 << 30)
    snap = metadata.SnapshotRecord(name="s", id="0123abcd", state="ready", created=1, disks=[disk])
    server = metadata.ServerRecord(state="ready", type="unix", fdname="fleece-nbd",
                                   socket="/run/libvirt-fleece/d.sock", exports=[
                                       metadata.ExportRecord(id="fleece-0123abcd-0-exp0",
                                                             disk="vda", snapshot="s",
                                                             name="vda-s", state="ready")])
    return metadata.State(snapshots=[snap], server=server)


def test_metadata_round_trips_and_validates():
    state = sample_state()
    assert metadata.loads(metadata.dumps(state)) == state


def test_metadata_with_namespace_as_libvirt_returns_it():
    text = metadata.dumps(sample_state()).replace(
        "<state ", f"<fleece:state xmlns:fleece='{metadata.NS_URI}' ").replace(
        "</state>", "</fleece:state>")
    assert metadata.loads(text) == sample_state()


@pytest.mark.parametrize("text", [
    "<state version='2'/>",
    "<state version='1'><snapshot name='x'/></state>",
    "<state version='1'><server state='ready' type='unix' fdname='f'/></state>",
    "not xml",
])
def test_unusable_metadata_is_refused(text):
    with pytest.raises(lf.InvalidArgument):
        metadata.loads(text)


def test_config_defaults_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(config.ENV_PATH, str(tmp_path / "missing.yaml"))
    assert config.load() == config.Config()
    p = tmp_path / "c.yaml"
    p.write_text("fleece_dir: /srv/fleece\nsocket_dir: /run/x\n")
    assert config.load(str(p)).fleece_dir == "/srv/fleece"
    for bad in ("fleece_dir: relative\n", "typo_key: 1\n", "- a list\n", "a: [\n",
                "pause_guard_timeout: 100\n", "socket_group: no-such-group-xyz\n"):
        p.write_text(bad)
        with pytest.raises(lf.InvalidArgument):
            config.load(str(p))


DOMAIN = """<domain><devices>
  <disk type='file' device='disk'><driver type='qcow2'/><source file='/a.qcow2' index='2'/>
    <target dev='vda'/><alias name='virtio-disk0'/></disk>
  <disk type='file' device='cdrom'><driver type='raw'/><target dev='hdc'/><readonly/>
    <alias name='ide0-1-0'/></disk>
  <disk type='network' device='disk'><driver type='raw'/><source protocol='nbd' name='x'/>
    <target dev='vdb'/><alias name='virtio-disk1'/></disk>
  <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/sdx'/>
    <target dev='sda'/><alias name='scsi0-0-0-0'/><shareable/></disk>
</devices></domain>"""


def test_domain_disks_and_why_they_cannot_be_snapshotted():
    found = {d.target: d for d in disks.parse_domain_disks(DOMAIN)}
    assert found["vda"].unsupported_reason() is None
    assert "cdrom" in found["hdc"].unsupported_reason()
    assert "network" in found["vdb"].unsupported_reason()
    assert "shareable" in found["sda"].unsupported_reason()
    assert found["vda"].matches_qdev("/machine/peripheral/virtio-disk0/virtio-backend")
    assert not found["vda"].matches_qdev("/machine/peripheral/virtio-disk01/virtio-backend")
    assert found["sda"].matches_qdev("scsi0-0-0-0")


def test_fleece_file_is_created_once_and_removed_only_when_ours(tmp_path):
    path = str(tmp_path / "f.qcow2")
    tag = fleecefile.owner_tag("uuid", "0123abcd", "vda")
    fd = fleecefile.create(path, 1 << 20, tag)
    os.close(fd)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(lf.AlreadyExists):
        fleecefile.create(path, 1 << 20, tag)
    assert not fleecefile.remove(path, fleecefile.owner_tag("uuid", "other", "vda"))
    link = str(tmp_path / "link")
    os.symlink(path, link)
    assert not fleecefile.remove(link, tag)
    assert os.path.exists(path)
    assert fleecefile.remove(path, tag) and not os.path.exists(path)
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert not fleecefile.remove(str(plain), tag) and plain.exists()


def test_remote_or_unprivileged_connections_are_refused(monkeypatch):
    class Conn:
        def __init__(self, uri):
            self.uri = uri

        def getURI(self):
            return self.uri

    with pytest.raises(lf.ConnectionError, match="local"):
        virt.check_connection(Conn("qemu+ssh://host/system"))
    with pytest.raises(lf.ConnectionError, match="local"):
        virt.check_connection(Conn("test:///default"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(lf.ConnectionError, match="root"):
        virt.check_connection(Conn("qemu:///system"))


def test_kill_points_are_unique():
    assert len(set(KILL_POINTS)) == len(KILL_POINTS) >= 20


def test_second_fleece_image_of_a_size_is_identical_to_what_qemu_img_makes(tmp_path):
    import subprocess
    tag = fleecefile.owner_tag("uuid", "0123abcd", "vda")
    for name in ("a.qcow2", "b.qcow2"):                 # b comes from the reused bytes
        os.close(fleecefile.create(str(tmp_path / name), 5 << 30, tag))
    ref = tmp_path / "ref.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(ref), str(5 << 30)],
                   check=True)
    assert (tmp_path / "b.qcow2").read_bytes() == ref.read_bytes()
    assert subprocess.run(["qemu-img", "check", str(tmp_path / "b.qcow2")]).returncode == 0


def test_resume_left_paused_tolerates_the_guard_resuming_first(tmp_path, monkeypatch):
    """The pause guard and the next call race to resume a guest a dead call left paused:
    libvirt's "domain is not paused" for the loser is success, not an error."""
    import types

    import libvirt

    from libvirt_fleece import errors, pauseguard, virt
    from libvirt_fleece.steps import reconcile

    states = [(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER),
              (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)]
    dom = types.SimpleNamespace(name=lambda: "d", state=lambda: states.pop(0) if len(states) > 1
                                else states[0])
    sess = types.SimpleNamespace(dom=dom, uuid="u",
                                 cfg=types.SimpleNamespace(state_dir=str(tmp_path)))
    marker = pauseguard.marker_path(str(tmp_path), "u")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    open(marker, "w").close()

    def resume(_dom):
        raise errors.OperationInvalid("cannot resume domain 'd': domain is already running")
    monkeypatch.setattr(virt, "resume", resume)
    reconcile._resume_if_left_paused(sess)
    assert not os.path.exists(marker)
