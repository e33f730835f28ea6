# SPDX-License-Identifier: LGPL-2.1-or-later
"""libvirt's own block work beside a plugin snapshot: refused before it changes anything,
or refused by the plugin with a clear error, never a crash, wrong data or a wedged plugin."""

from __future__ import annotations

import re
import subprocess

import libvirt
import pytest

import libvirt_fleece as lf
from conftest import plugin_leftovers
from vm import MiB, expected_image, read_export

pytestmark = [pytest.mark.integration, pytest.mark.coexistence]

SIZE = 64 * MiB
EXPORT = "<domainblockexport type='nbd'><disk name='vda' snapshot='p1'/></domainblockexport>"


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=120)


def snapshot_and_export(t) -> str:
    """Snapshot p1 of vda after writing 0x5a over 1 MiB; export it; return the socket."""
    t.write("vda", 0x5A, 0, MiB)
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>p1</name>"
                                     "</domainblocksnapshot>")
    lf.blockExportStart(t.dom, EXPORT)
    t.write("vda", 0x77, 0, MiB // 2)
    return re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)


def assert_exact_and_usable(t, sock: str) -> None:
    assert read_export(sock, "vda-p1") == expected_image(SIZE, [(0x5A, 0, MiB)])
    lf.blockSnapshotLookupByName(t.dom, "p1").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert lf.blockSnapshotList(t.dom) == [] and plugin_leftovers(t.dom) == {}


@pytest.mark.parametrize("operation", ["external-snapshot", "blockcopy", "blockcommit-active",
                                       "blockresize"])
def test_graph_changes_of_libvirt_are_refused_before_they_change_anything(
        make_vm, tmp_path, operation):
    t = make_vm(disks=1)
    sock = snapshot_and_export(t)
    xml_before = t.dom.XMLDesc(0)
    source = re.search(r"<source file='([^']+)'", xml_before).group(1)
    if operation == "external-snapshot":
        out = virsh("snapshot-create-as", t.name, "ext1", "--disk-only", "--no-metadata",
                    "--diskspec", f"vda,file={t.dir}/ext1.qcow2")
    elif operation == "blockcopy":
        out = virsh("blockcopy", t.name, "vda", f"{t.dir}/copy.qcow2", "--wait", "--pivot",
                    "--transient-job")
    elif operation == "blockcommit-active":
        out = virsh("blockcommit", t.name, "vda", "--active", "--pivot", "--wait")
    else:
        out = virsh("blockresize", t.name, "vda", str(2 * SIZE))
    assert out.returncode != 0, f"libvirt's {operation} went through: {out.stdout}"
    assert t.dom.isActive(), "qemu is alive"
    assert re.search(r"<source file='([^']+)'", t.dom.XMLDesc(0)).group(1) == source
    assert_exact_and_usable(t, sock)
    if operation == "external-snapshot":          # and once the plugin let go, it works
        out = virsh("snapshot-create-as", t.name, "ext2", "--disk-only", "--no-metadata",
                    "--diskspec", f"vda,file={t.dir}/ext2.qcow2")
        assert out.returncode == 0, out.stderr


def test_a_libvirt_backup_job_makes_the_plugin_refuse_cleanly_not_wedge(make_vm):
    t = make_vm(disks=1)
    t.write("vda", 0x5A, 0, MiB)
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>p1</name>"
                                     "</domainblocksnapshot>")
    # libvirt's pull backup needs qemu's one NBD server: no export of ours meanwhile
    t.dom.backupBegin(f"""<domainbackup mode='pull'>
        <server transport='unix' socket='/tmp/{t.name}-backup.sock'/>
        <disks><disk name='vda' backup='yes' type='file'>
          <scratch file='{t.dir}/scratch.qcow2'/></disk></disks></domainbackup>""", None, 0)
    try:
        with pytest.raises(lf.OperationInvalid, match=r"libvirt's job backup-vda.*try again"):
            lf.blockSnapshotLookupByName(t.dom, "p1").delete(
                lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
        with pytest.raises(lf.OperationInvalid, match=r"job"):
            lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>p2</name>"
                                             "</domainblocksnapshot>")
        with pytest.raises(lf.OperationInvalid, match="NBD server"):
            lf.blockExportStart(t.dom, EXPORT)
        t.write("vda", 0x77, 0, MiB // 2)
        # listing and looking up go on working
        assert [s.getName() for s in lf.blockSnapshotList(t.dom)] == ["p1"]
        assert "<state>ready</state>" in lf.blockSnapshotLookupByName(t.dom, "p1").getXMLDesc()
    finally:
        t.dom.abortJob()
    assert t.dom.isActive()
    lf.blockExportStart(t.dom, EXPORT)
    sock = re.search(r'socket="([^"]+)"', lf.blockExportList(t.dom)[0]).group(1)
    assert_exact_and_usable(t, sock)


@pytest.mark.parametrize("command", ["save", "managedsave"])
def test_save_fails_inside_qemu_and_leaves_guest_and_snapshot_usable(make_vm, command):
    t = make_vm(disks=1, persistent=True)       # managedsave needs a persistent domain
    sock = snapshot_and_export(t)
    args = [command, t.name] + ([f"{t.dir}/saved.img"] if command == "save" else [])
    out = virsh(*args)
    assert out.returncode != 0, "qemu cannot inactivate the images under a plugin snapshot"
    # QEMU 7.2: "job 'domain save' unexpectedly failed"; 10.0: "job 'domain save' failed:
    # Error in migration completion: Bad address"
    assert "job 'domain save'" in out.stderr, out.stderr
    assert t.dom.isActive() and t.dom.state()[0] == 1, "the guest keeps running"
    assert [s.getName() for s in lf.blockSnapshotList(t.dom)] == ["p1"]
    t.write("vda", 0x66, MiB, MiB)
    assert_exact_and_usable(t, sock)
    # with the plugin's snapshots gone, libvirt's command works
    out = virsh(*args)
    assert out.returncode == 0, out.stderr
    if command == "managedsave":
        t.conn.lookupByName(t.name).managedSaveRemove(0)


@pytest.fixture
def scsi_vm(conn):
    """A domain with vda (virtio) and sda (virtio-scsi, unpluggable without a guest)."""
    import os
    import secrets
    import shutil
    import libvirt
    from vm import kvm_usable
    name = f"fleecetest-scsi-{secrets.token_hex(4)}"
    d = f"/var/lib/libvirt/images/{name}"
    os.makedirs(d)
    for dev in ("vda", "sda"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/{dev}.qcow2", "64M"],
                       check=True)
    disks = "".join(f"""<disk type='file' device='disk'><driver name='qemu' type='qcow2'
        cache='none'/><source file='{d}/{dev}.qcow2'/><target dev='{dev}' bus='{bus}'/></disk>"""
                    for dev, bus in (("vda", "virtio"), ("sda", "scsi")))
    dom = conn.createXML(f"""<domain type='{"kvm" if kvm_usable() else "qemu"}'>
        <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
        <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
        <controller type='scsi' model='virtio-scsi'/>{disks}</devices></domain>""", 0)
    yield dom, d
    try:
        dom.destroy()
    except libvirt.libvirtError:
        pass
    shutil.rmtree(d, ignore_errors=True)


def test_hot_unplug_of_a_snapshotted_disk_is_followed_and_the_image_freed(scsi_vm):
    import libvirt_qemu
    import time
    dom, d = scsi_vm

    def write(qdev: str, pattern: int) -> None:
        libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {qdev} "write -P 0x{pattern:02x} 0 1M"',
                                        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    vda = "/machine/peripheral/virtio-disk0/virtio-backend"
    write(vda, 0x5A)
    write("scsi0-0-0-0", 0x6B)
    lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot><name>p1</name></domainblocksnapshot>")
    lf.blockExportStart(dom, "<domainblockexport type='nbd'><disk name='vda' snapshot='p1'/>"
                             "<disk name='sda' snapshot='p1'/></domainblockexport>")
    out = virsh("detach-disk", dom.name(), "sda", "--live")
    assert out.returncode == 0, out.stderr
    # the plugin follows (its watcher on DEVICE_DELETED, or this call): sda's part goes
    deadline = time.monotonic() + 15
    while "sda" in lf.blockSnapshotLookupByName(dom, "p1").getXMLDesc() and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    desc = lf.blockSnapshotLookupByName(dom, "p1").getXMLDesc()
    assert "name=\"vda\"" in desc and "sda" not in desc
    listing = lf.blockExportList(dom)[0]
    assert "vda-p1" in listing and "sda-p1" not in listing
    write(vda, 0x77)
    sock = re.search(r'socket="([^"]+)"', listing).group(1)
    assert read_export(sock, "vda-p1") == expected_image(SIZE, [(0x5A, 0, MiB)])
    # libvirt's stranded nodes of sda are gone: the image can be attached again
    out = virsh("attach-disk", dom.name(), f"{d}/sda.qcow2", "sda", "--targetbus", "scsi",
                "--subdriver", "qcow2", "--live")
    assert out.returncode == 0, out.stderr
    lf.blockSnapshotLookupByName(dom, "p1").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert plugin_leftovers(dom) == {}
    assert dom.isActive()


@pytest.mark.parametrize("operation", ["blockpull", "blockcommit-inactive"])
def test_libvirt_jobs_below_the_top_of_a_chain_leave_the_snapshot_exact(conn, operation):
    """A disk that had a backing chain before the snapshot: libvirt's pull (into the top)
    runs beside the snapshot, its inactive commit is refused by qemu; the snapshot stays
    exact either way, and so does the guest's disk."""
    import os
    import secrets
    import shutil
    from vm import kvm_usable
    name = f"fleecetest-chain-{secrets.token_hex(4)}"
    d = f"/var/lib/libvirt/images/{name}"
    os.makedirs(d)
    try:
        for img, backing in (("base", None), ("mid", "base"), ("top", "mid")):
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/{img}.qcow2", "64M"]
            if backing:
                cmd[5:5] = ["-b", f"{d}/{backing}.qcow2", "-F", "qcow2"]
            subprocess.run(cmd, check=True)
            if img == "base":
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 2M",
                                f"{d}/base.qcow2"], check=True, capture_output=True)
        dom = conn.createXML(f"""<domain type='{"kvm" if kvm_usable() else "qemu"}'>
            <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
            <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/>
            <source file='{d}/top.qcow2'/><target dev='vda' bus='virtio'/></disk>
            </devices></domain>""", 0)
        import libvirt_qemu
        qdev = "/machine/peripheral/virtio-disk0/virtio-backend"
        libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {qdev} "write -P 0x5a 0 1M"',
                                        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot><name>p1</name>"
                                       "</domainblocksnapshot>")
        lf.blockExportStart(dom, EXPORT)
        libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {qdev} "write -P 0x77 512k 1M"',
                                        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if operation == "blockpull":
            out = virsh("blockpull", name, "vda", "--wait")
        else:
            out = virsh("blockcommit", name, "vda", "--top", f"{d}/mid.qcow2",
                        "--base", f"{d}/base.qcow2", "--wait")
        try:
            alive = dom.isActive()
        except libvirt.libvirtError:
            alive = False               # a transient domain whose qemu died is gone
        if not alive and operation == "blockpull" and conn.getVersion() < 8_000_000:
            for f in os.listdir("/var/lib/libvirt/fleece"):     # no hook in the tests
                if f.startswith(name + "."):
                    os.unlink(os.path.join("/var/lib/libvirt/fleece", f))
            pytest.xfail("QEMU 7.2 died during blockpull beside the plugin's nodes (open "
                         "problem, see RELIABILITY.md section 9)")
        assert alive, "qemu is alive"
        if operation == "blockpull":
            assert out.returncode == 0, out.stderr      # runs beside the snapshot
        else:
            assert out.returncode != 0 and "root block node" in out.stderr  # refused
        sock = re.search(r'socket="([^"]+)"', lf.blockExportList(dom)[0]).group(1)
        want = expected_image(SIZE, [(0x31, 0, 2 * MiB), (0x5A, 0, MiB)])
        assert read_export(sock, "vda-p1") == want
        lf.blockSnapshotLookupByName(dom, "p1").delete(
            lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
        assert plugin_leftovers(dom) == {}
        # the guest's disk holds its data
        lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot><name>p1</name>"
                                       "</domainblocksnapshot>")
        lf.blockExportStart(dom, EXPORT)
        sock = re.search(r'socket="([^"]+)"', lf.blockExportList(dom)[0]).group(1)
        now = expected_image(SIZE, [(0x31, 0, 2 * MiB), (0x5A, 0, MiB), (0x77, 512 * 1024, MiB)])
        assert read_export(sock, "vda-p1") == now
        lf.blockSnapshotLookupByName(dom, "p1").delete(
            lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)   # no hook here to remove it
        dom.destroy()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _chain_domain(conn, name: str, d: str):
    """A transient domain whose vda (top.qcow2) has a backing image base.qcow2."""
    import os
    from vm import kvm_usable
    os.makedirs(d)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/base.qcow2", "64M"],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{d}/base.qcow2",
                    "-F", "qcow2", f"{d}/top.qcow2", "64M"], check=True)
    return conn.createXML(f"""<domain type='{"kvm" if kvm_usable() else "qemu"}'>
        <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
        <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{d}/top.qcow2'/><target dev='vda' bus='virtio'/></disk>
        </devices></domain>""", 0)


def test_a_concluded_undismissed_job_makes_the_plugin_wait_not_crash_qemu(conn, monkeypatch):
    """QEMU 7.2 aborts when query-named-block-nodes runs while block-stream's job is
    concluded and not dismissed (its implicit copy-on-read filter lingers without a child;
    libvirt dismisses within milliseconds, the plugin can land in that window). The plugin
    waits for the dismissal: with a job left concluded it gives OperationInvalid naming it,
    qemu stays alive, and once the job is dismissed (here by another thread while a call
    waits) the plugin works."""
    import json
    import secrets
    import shutil
    import threading
    import time
    import libvirt_qemu
    from libvirt_fleece.qemu import qmp
    name = f"fleecetest-settle-{secrets.token_hex(4)}"
    d = f"/var/lib/libvirt/images/{name}"
    dom = None
    try:
        dom = _chain_domain(conn, name, d)

        def q(cmd, args=None):
            msg = {"execute": cmd, **({"arguments": args} if args else {})}
            return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))

        top = next(b["inserted"]["node-name"] for b in q("query-block")["return"]
                   if b.get("inserted"))
        assert "error" not in q("block-stream", {"job-id": "someone-elses", "device": top,
                                                 "auto-dismiss": False})
        deadline = time.monotonic() + 30
        while q("query-jobs")["return"][0]["status"] != "concluded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        monkeypatch.setattr(qmp, "SETTLE_TIMEOUT", 1.0)
        with pytest.raises(lf.OperationInvalid, match="someone-elses.*not dismissed"):
            lf.blockSnapshotList(dom)
        assert dom.isActive(), "qemu is alive"
        monkeypatch.setattr(qmp, "SETTLE_TIMEOUT", 20.0)
        threading.Timer(1.0, lambda: q("job-dismiss", {"id": "someone-elses"})).start()
        assert lf.blockSnapshotList(dom) == []           # waited for the dismissal
        lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot><name>p1</name>"
                                       "</domainblocksnapshot>")
        lf.blockSnapshotLookupByName(dom, "p1").delete()
        assert plugin_leftovers(dom) == {} and dom.isActive()
    finally:
        if dom is not None:
            try:
                dom.destroy()
            except Exception:  # noqa: BLE001 - gone already
                pass
        shutil.rmtree(d, ignore_errors=True)
