# SPDX-License-Identifier: LGPL-2.1-or-later
"""The coexistence matrix (issue 11): every plugin state x every libvirt operation.

Plugin states: none, checkpoint only (two checkpoints c1, c2), snapshot, snapshot + export,
stacked (two snapshots of one disk), broken (a snapshot past its size limit) and backup
running (``libvirt_fleece.backup.backup`` held after its snapshot, checkpoint and export are
up and its NBD connections are open, before it copies a byte).

libvirt operations: external disk-only snapshot, active and inactive blockcommit, blockpull,
blockcopy, blockresize, internal snapshot, libvirt's pull and push backup, libvirt's own
checkpoint (create, then delete), attach-disk, detach-disk (virtio-scsi hot-unplug), save +
restore; the libvirtd restart is in the serial tier (the last two tests of this module,
skipped unless ``-m serial`` selects them).

Cells of one state share a small domain (see GROUPS) whose disk vda is the top of a chain
base <- mid <- vda (the guest boots no OS; I/O goes through qemu-io on the device, see
vm.py); the plugin's state is made anew for every cell and removed after it. A cell checks:
what libvirt's operation did against the expected outcome of the cell (works / refused by
qemu, with the error), that qemu runs, that a refused operation changed nothing (disk source
in the live XML), every snapshot's export byte-exact against the model, every checkpoint
valid with the dirty map of the clusters written since it, the plugin's backup restored
byte-exact, then the plugin still working (new snapshot + export exact, delete), and nothing
left behind (conftest.plugin_leftovers, no fleece image of the domain).

``FLEECE_MATRIX_RECORD=FILE`` also writes every cell's outcome as a JSON line to FILE (used
to write the README table).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading

import libvirt
import libvirt_qemu
import pytest

import libvirt_fleece as lf
from libvirt_fleece import backup as bk
from conftest import plugin_leftovers
from test_checkpoints import changed
from vm import MiB, TestVM, clusters, expected_image, kvm_usable, read_export, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.coexistence]

SIZE = 16 * MiB
CP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT
STOP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS
FLEECE_DIR = "/var/lib/libvirt/fleece"
RECORD = os.environ.get("FLEECE_MATRIX_RECORD")

STATES = ["none", "checkpoint", "snapshot", "snapshot+export", "stacked", "broken", "backup"]
OPS = ["external-snapshot", "blockcommit-active", "blockcommit-inactive", "blockpull",
       "blockcopy", "blockresize", "internal-snapshot", "pull-backup", "push-backup",
       "libvirt-checkpoint", "attach-disk", "detach-disk", "save"]

# States that hold a copy-before-write filter (and the fleece image's backing link, the
# op blocker) on the disk while libvirt's operation runs.
FILTERED = {"snapshot", "snapshot+export", "stacked", "backup"}

BLOCKED = "is busy: node is used as backing hd"     # qemu's op blocker, in libvirt's error

# (operation, state) -> "works" or the texts (one must appear) of libvirt's error when the
# operation is refused. From what the runs showed: QEMU 7.2 / libvirt 9.0 (Debian 12) and
# QEMU 10.0 / libvirt 11.3 (Debian 13), see docs/limits.md. A broken snapshot has no filter
# left: there libvirt's operations run as without a plugin state.
REFUSED = {
    "external-snapshot": (BLOCKED,),                    # blockdev-snapshot in a transaction
    "blockcommit-active": ("Need a root block node",),
    "blockcommit-inactive": ("Need a root block node",),
    "blockcopy": ("Need a root block node",),
    "blockresize": ("is in use", BLOCKED),              # QEMU 7.2 / QEMU 10.0
    "internal-snapshot": ("is writable but does not support snapshots",),
    "save": ("job 'domain save' unexpectedly failed",   # libvirt 9.0
             "job 'domain save' failed"),               # libvirt 11.3
}
EXPECT: dict = {(op, state): why for op, why in REFUSED.items() for state in FILTERED}
# libvirt 10 and later take internal snapshots of a running domain with QMP snapshot-save
# on the disks' own format nodes only: the plugin's nodes are not asked, and it works.
INTERNAL_SNAPSHOT_OF_OWN_NODES = 10_000_000


def expect(op: str, state: str, libvirt_version: int = 0) -> "str | tuple":
    if op == "internal-snapshot" and libvirt_version >= INTERNAL_SNAPSHOT_OF_OWN_NODES:
        return "works"
    if (op, state) in EXPECT:
        return EXPECT[(op, state)]
    return EXPECT.get((op, "*"), "works")


# Graph changes that the checkpoint scheme change (chains.py/checkpoints.py, in progress) is
# to carry every checkpoint through, old ones included.
CHAIN_OPS = {"external-snapshot", "blockcommit-active", "blockcommit-inactive", "blockpull",
             "blockcopy"}


# libvirt's pull backup while the plugin has an export (so qemu's one NBD server runs):
# qemu refuses libvirt's nbd-server-start, and libvirtd 9.0 then crashed (SIGSEGV in
# libvirt_driver_qemu.so, right after "entering monitor without asking for a nested job
# is dangerous" and "Missing monitor reply object" in libvirtd.log); the restarted
# libvirtd could not read that domain's status XML back ("Missing required attribute
# 'state' in element 'disk'", the half-started backup) and lost the running qemu.
# Never run on a shared libvirtd.
HAS_EXPORT = {"snapshot+export", "backup"}
LIBVIRTD_CRASH = ("libvirt's pull backup beside a plugin export crashed libvirtd 9.0 "
                  "(SIGSEGV after qemu refused its nbd-server-start); not run on a shared "
                  "libvirtd")


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=120)


def q(dom, cmd, args=None):
    msg = {"execute": cmd, **({"arguments": args} if args else {})}
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))
    assert "error" not in reply, reply
    return reply["return"]


# --- the domain ---------------------------------------------------------------------------


class MatrixVM(TestVM):
    """vda: the top of base <- mid <- vda (base holds 0x31 over 2 MiB, mid 0x32 over 1 MiB
    at 4 MiB); with ``scsi``, also sda on a virtio-scsi controller (unpluggable without a
    guest OS). ``model`` holds every write per disk."""

    __test__ = False

    def __init__(self, conn, scsi: bool = False) -> None:
        super().__init__(conn, disks=1, tag="mx-")
        top = self.disks[0]["path"]
        os.unlink(top)
        self.base = os.path.join(self.dir, "base.qcow2")
        self.mid = os.path.join(self.dir, "mid.qcow2")
        for path, backing, data in ((self.base, None, "write -P 0x31 0 2M"),
                                    (self.mid, self.base, "write -P 0x32 4M 1M"),
                                    (top, self.mid, None)):
            cmd = ["qemu-img", "create", "-q", "-f", "qcow2", path, f"{SIZE}"]
            if backing:
                cmd[5:5] = ["-b", backing, "-F", "qcow2"]
            subprocess.run(cmd, check=True)
            if data:
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", data, path], check=True,
                               capture_output=True)
        self.model = {"vda": [(0x31, 0, 2 * MiB), (0x32, 4 * MiB, MiB)]}
        self.size = {"vda": SIZE}
        self.scsi = scsi
        self.seq = 0                    # numbers the files of libvirt's backups
        if scsi:
            self.disks.append({"dev": "sda", "path": os.path.join(self.dir, "sda.qcow2"),
                               "format": "qcow2"})
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            self.disks[1]["path"], f"{SIZE}"], check=True)
            self.model["sda"] = []
            self.size["sda"] = SIZE

    def start(self):
        disks = "".join(
            f"""<disk type='file' device='disk'><driver name='qemu' type='qcow2'
            cache='none'/><source file='{d["path"]}'/><target dev='{d["dev"]}'
            bus='{"scsi" if d["dev"].startswith("sd") else "virtio"}'/></disk>"""
            for d in self.disks)
        ctrl = "<controller type='scsi' model='virtio-scsi'/>" if self.scsi else ""
        self.dom = self.conn.createXML(f"""<domain type='{"kvm" if kvm_usable() else "qemu"}'>
            <name>{self.name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
            <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
            <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
            <devices>{ctrl}{disks}</devices></domain>""", 0)
        return self.dom

    def qdev(self, dev: str) -> str:
        if dev.startswith("sd"):
            return "scsi0-0-0-" + str(ord(dev[2]) - ord("a"))
        return f"/machine/peripheral/virtio-disk{ord(dev[2]) - ord('a')}/virtio-backend"

    def source(self, dev: str = "vda") -> str:
        for disk in re.findall(r"<disk .*?</disk>", self.dom.XMLDesc(0), re.S):
            if f"<target dev='{dev}'" in disk:
                return re.search(r"<source file='([^']+)'", disk).group(1)
        return ""


class Pool:
    """Domains shared by consecutive cells of one state (see GROUPS); each is removed in a
    background thread once no cell needs it (a destroy takes 1.5 to 3 s here)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.live: dict = {}
        self.removing: list = []

    def get(self, state: str, group: str) -> MatrixVM:
        for key in [k for k in self.live if k[0] != state]:
            self.discard(key)
        if (state, group) not in self.live:
            t = MatrixVM(self.conn, scsi=True)
            self.live[(state, group)] = t
            t.start()
        return self.live[(state, group)]

    def discard(self, key) -> None:
        t = self.live.pop(key, None)
        if t is not None:
            th = threading.Thread(target=t.cleanup, daemon=True)
            th.start()
            self.removing.append(th)

    def close(self) -> None:
        for key in list(self.live):
            self.discard(key)
        for th in self.removing:
            th.join(120)


@pytest.fixture(scope="module")
def pool(conn):
    p = Pool(conn)
    yield p
    p.close()


# --- a cell -------------------------------------------------------------------------------


_SOCKETS: dict = {}


def socket_of(dom) -> str:
    """The plugin's socket of the domain (one per domain; it does not change)."""
    if dom.name() not in _SOCKETS:
        _SOCKETS[dom.name()] = re.search(r'socket="([^"]+)"',
                                         lf.blockExportList(dom)[0]).group(1)
    return _SOCKETS[dom.name()]


class Cell:
    """A plugin state on a MatrixVM, the models that state promises, and its checks."""

    def __init__(self, t: MatrixVM, state: str, disks: tuple) -> None:
        self.t, self.state, self.disks = t, state, disks
        self.snaps: dict = {}       # snapshot -> {disk: (size, writes at its instant)}
        self.cps: dict = {}         # checkpoint -> {disk: writes since}
        self.thread = None
        self.go = threading.Event()
        self.started = threading.Event()
        self.result: dict = {}
        self.worked = False

    def w(self, dev: str, pattern: int, offset: int, length: int) -> None:
        self.t.write(dev, pattern, offset, length)
        self.t.model[dev].append((pattern, offset, length))
        for since in self.cps.values():
            since.setdefault(dev, []).append((pattern, offset, length))

    def snapshot(self, name: str, flags: int = 0, extra: str = "") -> None:
        body = "".join(f"<disk name='{d}'/>" for d in self.disks)
        lf.blockSnapshotCreateXML(self.t.dom, f"<domainblocksnapshot><name>{name}</name>"
                                              f"{extra}{body}</domainblocksnapshot>", flags)
        self.snaps[name] = {d: (self.t.size[d], list(self.t.model[d])) for d in self.disks}

    def export(self, name: str) -> None:
        lf.blockExportStart(self.t.dom, "<domainblockexport type='nbd'>" + "".join(
            f"<disk name='{d}' snapshot='{name}'/>" for d in self.disks) +
            "</domainblockexport>")

    def set_up(self, tmp_path) -> None:
        t, dom = self.t, self.t.dom
        for d in self.disks:
            self.w(d, 0x5A, 0, MiB)
        if self.state == "checkpoint":
            for name, pattern in (("c1", 0x41), ("c2", 0x42)):
                self.snapshot(name, CP)
                lf.blockSnapshotLookupByName(dom, name).delete()
                del self.snaps[name]
                self.cps[name] = {}
                self.w("vda", pattern, 9 * MiB + (pattern & 0xF) * MiB, MiB)   # 10, 11 MiB
        elif self.state in ("snapshot", "snapshot+export"):
            self.snapshot("p1")
            if self.state == "snapshot+export":
                self.export("p1")
        elif self.state == "stacked":
            self.snapshot("p1")
            self.w("vda", 0x43, 12 * MiB, MiB)
            self.snapshot("p2")
        elif self.state == "broken":
            self.snapshot("p1", extra=f"<sizeLimit>{MiB}</sizeLimit>")
            del self.snaps["p1"]
            self.w("vda", 0x44, 0, 4 * MiB)           # 4 MiB of old data: past 1 MiB
            wait_for(lambda: "<state>broken</state>" in
                     lf.blockSnapshotLookupByName(dom, "p1").getXMLDesc(), 15,
                     "the snapshot past its size limit is not broken")
        elif self.state == "backup":
            self.backup_model = {d: (t.size[d], list(t.model[d])) for d in self.disks}
            self.target = str(tmp_path / "backup")

            def progress(ev):
                if ev.kind == "start":
                    self.started.set()
                    self.go.wait(120)

            def run():
                try:
                    self.result["ok"] = bk.backup(dom, self.target, mode="full",
                                                  disks=list(self.disks), progress=progress)
                except Exception as e:  # noqa: BLE001
                    self.result["error"] = e
                finally:
                    self.started.set()

            self.thread = threading.Thread(target=run, daemon=True)
            self.thread.start()
            assert self.started.wait(60), "the plugin's backup did not start"
            assert "error" not in self.result, self.result.get("error")
        self.w("vda", 0x77, 512 * 1024, MiB)      # after the state's instant, before the op

    # -- checks after libvirt's operation --

    def check_state(self, op: str, problems: list) -> None:
        t, dom = self.t, self.t.dom
        present = [d for d in self.disks if f"<target dev='{d}'" in dom.XMLDesc(0)]
        if self.state in ("snapshot", "snapshot+export", "stacked"):
            listing = " ".join(lf.blockExportList(dom))
            for name, per_disk in self.snaps.items():
                desc = lf.blockSnapshotLookupByName(dom, name).getXMLDesc()
                if "<state>ready</state>" not in desc:
                    problems.append(f"snapshot {name} is not ready after {op}: {desc}")
                    continue
                for d in present:
                    if f'"{d}-{name}"' not in listing and f"'{d}-{name}'" not in listing:
                        lf.blockExportStart(dom, "<domainblockexport type='nbd'><disk "
                                                 f"name='{d}' snapshot='{name}'/>"
                                                 "</domainblockexport>")
                    size, writes = per_disk[d]
                    if read_export(socket_of(dom), f"{d}-{name}") != \
                            expected_image(size, writes):
                        problems.append(f"export {d}-{name} is not the disk at its instant")
        elif self.state == "broken":
            desc = lf.blockSnapshotLookupByName(dom, "p1").getXMLDesc()
            if "<state>broken</state>" not in desc:
                problems.append(f"the broken snapshot is not reported broken: {desc}")
            with pytest.raises(lf.OperationInvalid, match="broken"):
                self.export("p1")
        elif self.state == "checkpoint" and op == "blockresize" and self.worked:
            # by design: a checkpoint of a disk whose size changed since is invalid
            for name in self.cps:
                desc = lf.blockCheckpointLookupByName(dom, name).getXMLDesc()
                if "<valid>no</valid>" not in desc or "was resized" not in desc:
                    problems.append(f"checkpoint {name} after a resize: {desc}")
        elif self.state == "checkpoint":
            valid = []
            for name in self.cps:
                desc = lf.blockCheckpointLookupByName(dom, name).getXMLDesc()
                vda = re.search(r'<disk name="vda"[^>]*>', desc)
                if not vda or 'valid="yes"' not in vda.group(0):
                    problems.append(f"checkpoint {name} invalid on vda after {op}: {desc}")
                else:
                    valid.append(name)
            if valid:       # one snapshot, the dirty map since each checkpoint from it
                lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot><name>chk</name><disk "
                                               "name='vda'/></domainblocksnapshot>", 0)
                try:
                    for name in valid:
                        got = changed(dom, "chk", name)
                        want = clusters(self.cps[name].get("vda", []))
                        if got != want:
                            problems.append(f"dirty map since {name} after {op}: "
                                            f"missing {sorted(want - got)}, "
                                            f"extra {sorted(got - want)}")
                finally:
                    lf.blockSnapshotLookupByName(dom, "chk").delete(STOP)
        elif self.state == "backup":
            self.go.set()
            self.thread.join(120)
            assert not self.thread.is_alive(), "the plugin's backup hangs"
            if "error" in self.result:
                self.backup_outcome = f"backup failed: {self.result['error']}"
                there = os.listdir(self.target) if os.path.isdir(self.target) else []
                left = [f for f in there if f.endswith((".part", ".qcow2"))]
                if left:
                    problems.append(f"the failed backup left files that look like one: {left}")
            else:
                self.backup_outcome = "backup exact"
                for d in self.disks:
                    out = os.path.join(t.dir, f"restored-{d}.raw")
                    bk.restore(self.target, d, out)
                    with open(out, "rb") as f:
                        if f.read() != expected_image(*self.backup_model[d]):
                            problems.append(f"the backup of {d} is not the disk at its start")
                            self.backup_outcome = "backup wrong"
                    os.unlink(out)

    def clean_up_and_check_plugin_works(self, problems: list) -> None:
        t, dom = self.t, self.t.dom
        for s in reversed(lf.blockSnapshotList(dom)):
            s.delete(STOP)
        assert lf.blockSnapshotList(dom) == [] and lf.blockExportList(dom) == []
        # the plugin still works: a new snapshot of every disk there is now, exact
        xml = dom.XMLDesc(0)
        present = [d for d in t.model if f"<target dev='{d}'" in xml and
                   (d != "sda" or "sda" in self.disks)]
        body = "".join(f"<disk name='{d}'/>" for d in present)
        lf.blockSnapshotCreateXML(dom, f"<domainblocksnapshot><name>after</name>{body}"
                                       "</domainblocksnapshot>", 0)
        lf.blockExportStart(dom, "<domainblockexport type='nbd'>" + "".join(
            f"<disk name='{d}' snapshot='after'/>" for d in present) + "</domainblockexport>")
        t.write("vda", 0x99, 0, MiB)              # after the snapshot: not in the export
        for d in present:
            if read_export(socket_of(dom), f"{d}-after") != \
                    expected_image(t.size[d], t.model[d]):
                problems.append(f"a new snapshot of {d} is not the disk (the guest's data "
                                f"after the operation is not the model)")
        lf.blockSnapshotLookupByName(dom, "after").delete(STOP)
        t.model["vda"].append((0x99, 0, MiB))
        for c in reversed(lf.blockCheckpointList(dom)):
            try:
                c.delete()
            except lf.OperationInvalid as e:
                # documented: a checkpoint whose bitmap also lives in a read-only backing
                # image (after libvirt's external snapshot) is deleted after a commit
                if "read-only backing" not in str(e):
                    raise
                r = virsh("blockcommit", t.name, "vda", "--active", "--pivot", "--wait")
                assert r.returncode == 0, r.stderr
                c.delete()
        assert lf.blockCheckpointList(dom) == []
        left = plugin_leftovers(dom)
        if left:
            problems.append(f"left in qemu: {left}")
        files = fleece_files(dom.UUIDString())
        if files:
            problems.append(f"fleece images left: {files}")
        assert dom.isActive(), "qemu is alive"


def fleece_files(uuid: str) -> list:
    out = []
    if os.path.isdir(FLEECE_DIR):
        for f in os.listdir(FLEECE_DIR):
            try:
                tag = os.getxattr(os.path.join(FLEECE_DIR, f), "trusted.libvirt-fleece",
                                  follow_symlinks=False)
            except OSError:
                continue
            if tag.startswith(uuid.encode() + b"/"):
                out.append(f)
    return out


# --- libvirt's operations -----------------------------------------------------------------


def run_op(op: str, cell: Cell, problems: list) -> tuple:
    """Run libvirt's operation; return (worked, libvirt's error text)."""
    t, dom = cell.t, cell.t.dom
    d = t.dir
    if op == "external-snapshot":
        r = virsh("snapshot-create-as", t.name, "ext", "--disk-only", "--no-metadata",
                  "--atomic", "--diskspec", f"vda,file={d}/ext.qcow2", "--diskspec",
                  "sda,snapshot=no")
    elif op == "blockcommit-active":
        r = virsh("blockcommit", t.name, "vda", "--active", "--pivot", "--wait")
    elif op == "blockcommit-inactive":
        r = virsh("blockcommit", t.name, "vda", "--top", t.mid, "--base", t.base, "--wait")
    elif op == "blockpull":
        r = virsh("blockpull", t.name, "vda", "--wait")
    elif op == "blockcopy":
        r = virsh("blockcopy", t.name, "vda", f"{d}/copy.qcow2", "--wait", "--pivot",
                  "--transient-job")
    elif op == "blockresize":
        r = virsh("blockresize", t.name, "vda", str(2 * SIZE) + "B")
        if r.returncode == 0:
            t.size["vda"] = 2 * SIZE
    elif op == "internal-snapshot":
        r = virsh("snapshot-create-as", t.name, "int1")
    elif op in ("pull-backup", "push-backup"):
        return libvirt_backup(op, cell, problems)
    elif op == "libvirt-checkpoint":
        return libvirt_checkpoint(cell, problems)
    elif op == "attach-disk":
        path = f"{d}/vdb.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{SIZE}"], check=True)
        r = virsh("attach-disk", t.name, path, "vdb", "--targetbus", "virtio", "--subdriver",
                  "qcow2", "--live")
        if r.returncode == 0:
            t.model["vdb"] = []
            t.size["vdb"] = SIZE
            cell.w("vdb", 0x3C, MiB, MiB)
    elif op == "detach-disk":
        r = virsh("detach-disk", t.name, "sda", "--live")
        if r.returncode == 0:
            wait_for(lambda: "<target dev='sda'" not in dom.XMLDesc(0), 15,
                     "sda is still in the live XML")
            cell.sda_model = t.model.pop("sda")
            # the plugin follows (its watcher on DEVICE_DELETED, or its next call)
            for name in list(cell.snaps):
                wait_for(lambda: "sda" not in
                         lf.blockSnapshotLookupByName(dom, name).getXMLDesc(), 15,
                         f"snapshot {name} still has a part on sda")
    elif op == "save":
        r = virsh("save", t.name, f"{d}/saved.img")
        if r.returncode == 0:
            r2 = virsh("restore", f"{d}/saved.img")
            assert r2.returncode == 0, f"restore: {r2.stderr}"
            t.dom = t.conn.lookupByName(t.name)
    else:
        raise AssertionError(op)
    return r.returncode == 0, r.stderr.strip()


def libvirt_backup(op: str, cell: Cell, problems: list) -> tuple:
    """libvirt's own backup of vda; its data checked against the model."""
    t, dom = cell.t, cell.t.dom
    if op == "pull-backup":
        sock = f"/tmp/{t.name}-backup.sock"
        xml = (f"<domainbackup mode='pull'><server transport='unix' socket='{sock}'/>"
               f"<disks><disk name='vda' backup='yes' type='file'><scratch "
               f"file='{t.dir}/scratch.qcow2'/></disk><disk name='sda' backup='no'/></disks>"
               f"</domainbackup>")
    else:
        xml = (f"<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'>"
               f"<target file='{t.dir}/push.raw'/><driver type='raw'/></disk>"
               f"<disk name='sda' backup='no'/></disks>"
               f"</domainbackup>")
    want = expected_image(t.size["vda"], t.model["vda"])
    try:
        t.seq += 1
        xml = xml.replace("scratch.qcow2", f"scratch{t.seq}.qcow2").replace(
            "push.raw", f"push{t.seq}.raw")
        dom.backupBegin(xml, None, 0)
    except libvirt.libvirtError as e:
        return False, str(e)
    try:
        # while libvirt's job runs, the plugin refuses to create a snapshot of that disk
        try:
            lf.blockSnapshotCreateXML(dom, "<domainblocksnapshot><name>during</name>"
                                           "<disk name='vda'/></domainblocksnapshot>", 0)
            if dom.jobInfo()[0] in (libvirt.VIR_DOMAIN_JOB_BOUNDED,
                                    libvirt.VIR_DOMAIN_JOB_UNBOUNDED):
                problems.append("the plugin created a snapshot while libvirt's backup job ran")
            lf.blockSnapshotLookupByName(dom, "during").delete(STOP)
        except lf.OperationInvalid as e:
            if "job" not in str(e):
                problems.append(f"the plugin's refusal does not name the job: {e}")
        if op == "pull-backup":
            if read_export(sock, "vda") != want:
                problems.append("libvirt's pull backup export is not the disk")
            return True, ""
        wait_for(lambda: dom.jobInfo()[0] in (libvirt.VIR_DOMAIN_JOB_NONE,
                                              libvirt.VIR_DOMAIN_JOB_COMPLETED,
                                              libvirt.VIR_DOMAIN_JOB_FAILED), 60,
                 "libvirt's push backup does not end")
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
            return False, f"push backup job ended: {stats.get('errmsg', stats)}"
        with open(f"{t.dir}/push{t.seq}.raw", "rb") as f:
            if f.read() != want:
                problems.append("libvirt's push backup is not the disk")
        return True, ""
    finally:
        if op == "pull-backup":
            try:
                dom.abortJob()
            except libvirt.libvirtError:
                pass
            # libvirt stops its NBD server before the job ends; until then the plugin
            # refuses to export (OperationInvalid: "already runs an NBD server")
            wait_for(lambda: dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, 30,
                     "libvirt's aborted backup job does not end")
            if os.path.exists(sock):
                os.unlink(sock)


def libvirt_checkpoint(cell: Cell, problems: list) -> tuple:
    """libvirt's own checkpoint: a bitmap named like it that counts exactly what the guest
    writes after it; the plugin neither lists it nor touches it; then deleted by libvirt."""
    t, dom = cell.t, cell.t.dom
    r = virsh("checkpoint-create-as", t.name, "lcp")
    if r.returncode != 0:
        return False, r.stderr.strip()
    cell.w("vda", 0x78, 13 * MiB, MiB + 4096)
    top = t.source("vda")
    counts = [b.get("count") for n in q(dom, "query-named-block-nodes", {"flat": True})
              if n.get("file") == top and n.get("drv") == "qcow2"
              for b in n.get("dirty-bitmaps") or [] if b.get("name") == "lcp"]
    if counts != [len(clusters([(0, 13 * MiB, MiB + 4096)])) * 64 * 1024]:
        problems.append(f"libvirt's checkpoint bitmap counts {counts}")
    if "lcp" in [c.getName() for c in lf.blockCheckpointList(dom)]:
        problems.append("the plugin lists libvirt's checkpoint as its own")
    r = virsh("checkpoint-delete", t.name, "lcp")
    if r.returncode != 0:
        return False, "checkpoint-delete: " + r.stderr.strip()
    return True, ""


# --- the matrix ---------------------------------------------------------------------------

# Cells of one state share a domain, in this order. "chain" cells change the backing chain
# when libvirt's operation works: their domain is then replaced for the next cell (it is
# kept after a refusal, which changed nothing). "light" cells leave a domain the next one
# can use (libvirt's internal snapshot is deleted again, a detached disk attached again).
GROUPS = {
    "chain": ["external-snapshot", "blockcommit-active", "blockcommit-inactive", "blockpull",
              "blockcopy"],
    "light": ["libvirt-checkpoint", "pull-backup", "push-backup", "internal-snapshot",
              "blockresize", "attach-disk", "detach-disk", "save"],
}
assert sorted(GROUPS["chain"] + GROUPS["light"]) == sorted(OPS)


def cells():
    for state in STATES:
        for group, ops in GROUPS.items():
            for op in ops:
                marks = []
                if op == "pull-backup" and state in HAS_EXPORT:
                    marks.append(pytest.mark.skip(reason=LIBVIRTD_CRASH))
                yield pytest.param(state, group, op, id=f"{state}-{op}", marks=marks)


@pytest.mark.parametrize("state,group,op", list(cells()))
def test_cell(pool, tmp_path, state, group, op):
    t = pool.get(state, group)
    keep = False
    try:
        keep = run_cell(t, tmp_path, state, group, op)
    finally:
        if not keep:
            pool.discard((state, group))


def run_cell(t: MatrixVM, tmp_path, state: str, group: str, op: str) -> bool:
    """One cell on ``t``; returns whether the next cell of the state may use ``t``."""
    disks = ("vda", "sda") if op == "detach-disk" else ("vda",)
    cell = Cell(t, state, disks)
    try:
        return _run_cell(t, cell, tmp_path, state, group, op)
    finally:
        cell.go.set()               # a failed cell never leaves the plugin's backup waiting
        if cell.thread is not None:
            cell.thread.join(60)


def qemu_alive(t: MatrixVM) -> bool:
    try:
        return bool(t.dom.isActive())
    except libvirt.libvirtError:
        return False                    # a transient domain whose qemu died is gone


def qemu_7_2_stream_crash(conn: libvirt.virConnect, state: str) -> None:
    """An open problem, seen twice in many runs on QEMU 7.2 only: qemu died (SIGSEGV in
    bdrv_refresh_filename, the childless copy-on-read filter block-stream leaves while its
    job is concluded) during libvirt's blockpull beside the plugin's nodes. The plugin's own
    queries wait for that window (qmp.wait_for_settled_jobs); what else walked the graph
    then is not found yet. xfail there, fail anywhere else."""
    if conn.getVersion() < 8_000_000 and state != "none":
        pytest.xfail("QEMU 7.2 died during blockpull beside the plugin's nodes (open "
                     "problem, see RELIABILITY.md section 9)")


def _run_cell(t: MatrixVM, cell: Cell, tmp_path, state: str, group: str, op: str) -> bool:
    cell.set_up(tmp_path)
    source = t.source()
    problems: list = []
    worked, error = run_op(op, cell, problems)
    cell.worked = worked
    if op == "blockpull" and not qemu_alive(t):
        qemu_7_2_stream_crash(t.conn, state)
    assert t.dom.isActive(), f"qemu died in {op}: {error}"
    if not worked:
        assert t.source() == source, "a refused operation changed the disk's source"
    cell.w("vda", 0x66, 8 * MiB, MiB)              # after the operation
    cell.check_state(op, problems)
    if op == "detach-disk" and worked:            # the image was freed: it attaches again
        r = virsh("attach-disk", t.name, t.disks[1]["path"], "sda", "--targetbus", "scsi",
                  "--subdriver", "qcow2", "--live")
        if r.returncode != 0:
            problems.append(f"sda does not attach again: {r.stderr.strip()}")
        else:
            t.model["sda"] = cell.sda_model
    cell.clean_up_and_check_plugin_works(problems)
    if op == "internal-snapshot" and worked:
        r = virsh("snapshot-delete", t.name, "int1")
        if r.returncode != 0:
            problems.append(f"libvirt cannot delete its internal snapshot: {r.stderr.strip()}")
    outcome = "works" if worked else error
    if RECORD:
        with open(RECORD, "a") as f:
            f.write(json.dumps({"state": state, "op": op, "worked": worked, "error": error,
                                "backup": getattr(cell, "backup_outcome", None),
                                "problems": problems}) + "\n")
    want = expect(op, state, t.conn.getLibVersion())
    if want == "works":
        assert worked, f"libvirt's {op} failed: {error}"
    else:
        assert not worked and any(w in error for w in want), \
            f"expected refusal ({' or '.join(want)}), got: {outcome}"
    if state == "backup":
        # a hot-unplugged disk's export goes: the plugin's backup of it fails, cleanly
        # (QEMU 7.2), or the export served the snapshot to its end (QEMU 10.0)
        allowed = {"backup exact"} | ({"backup failed: the copy was cancelled"}
                                      if op == "detach-disk" else set())
        assert cell.backup_outcome in allowed, cell.backup_outcome
    assert not problems, problems
    return group == "light" or not worked


# --- serial tier: libvirtd restart (last in this module) ------------------------------------


def remove_after_restart(vms: list, old: libvirt.virConnect) -> None:
    """Remove test domains through a fresh connection (the old one may have died with
    libvirtd), then close the old one if it still can be."""
    fresh = libvirt.open("qemu:///system")
    for t in vms:
        t.conn = fresh
        t.cleanup()
    fresh.close()
    try:
        old.close()
    except libvirt.libvirtError:
        pass


def serial_tier_selected(config) -> bool:
    expr = config.getoption("-m") or ""
    return "serial" in expr and "not serial" not in expr


@pytest.mark.serial
def test_libvirtd_restart_with_every_plugin_state(request, tmp_path):
    """One domain per plugin state (but the running backup, see the next test), one
    libvirtd restart for all of them; then every state
    is checked as in a cell (the operation "followed": qemu runs on, the plugin reads its
    state back from LIVE metadata and qemu). Runs on its own connections (the old one dies
    with libvirtd) and never uses the session's connection (conftest's ``conn``): created
    before a restart, it could still say it is alive and then fail ("Cannot write data:
    Broken pipe") in a later serial test."""
    from vm import restart_libvirtd
    if not serial_tier_selected(request.config):
        pytest.skip("restarts libvirtd: runs only in the serial tier (pytest -m serial)")
    c = libvirt.open("qemu:///system")
    made: list = []
    problems: dict = {}
    try:
        for state in [s for s in STATES if s != "backup"]:      # backup: the next test
            t = MatrixVM(c, scsi=True)
            made.append(t)
            t.start()
            cell = Cell(t, state, ("vda",))
            (tmp_path / state).mkdir()
            cell.set_up(tmp_path / state)
            made[-1] = (t, cell)
        restart_libvirtd()
        c2 = libvirt.open("qemu:///system")
        for t, cell in made:
            found: list = []
            t.conn = c2
            t.dom = c2.lookupByName(t.name)
            try:
                assert t.dom.isActive(), "qemu died across the restart"
                cell.w("vda", 0x66, 8 * MiB, MiB)
                cell.check_state("libvirtd-restart", found)
                cell.clean_up_and_check_plugin_works(found)
                if cell.state == "backup" and cell.backup_outcome != "backup exact":
                    found.append(cell.backup_outcome)
            except Exception as e:  # noqa: BLE001 - collected per cell, reported below
                found.append(f"{type(e).__name__}: {e}")
            if found:
                problems[f"[{cell.state}-libvirtd-restart]"] = found
        c2.close()
    finally:
        remove_after_restart([item[0] if isinstance(item, tuple) else item for item in made], c)
    if RECORD:
        with open(RECORD, "a") as f:
            f.write(json.dumps({"op": "libvirtd-restart", "problems": problems}) + "\n")
    assert not problems, problems


@pytest.mark.serial
def test_libvirtd_restart_while_the_plugins_backup_runs(request, tmp_path):
    """The plugin's backup, held with its snapshot, export and NBD connections up, across a
    libvirtd restart: it finishes exact (it reconnects for its teardown: the copy reads the
    NBD socket, not libvirt), and the next backup into the directory is exact too."""
    from vm import restart_libvirtd
    if not serial_tier_selected(request.config):
        pytest.skip("restarts libvirtd: runs only in the serial tier (pytest -m serial)")
    c = libvirt.open("qemu:///system")
    t = MatrixVM(c, scsi=True)
    cell = None
    try:
        t.start()
        cell = Cell(t, "backup", ("vda",))
        cell.set_up(tmp_path)
        restart_libvirtd()
        c2 = libvirt.open("qemu:///system")
        t.conn = c2
        t.dom = c2.lookupByName(t.name)
        assert t.dom.isActive(), "qemu died across the restart"
        cell.w("vda", 0x66, 8 * MiB, MiB)
        first_left: list = []
        cell.check_state("libvirtd-restart", first_left)
        first = cell.backup_outcome
        found: list = []
        left_in_qemu = plugin_leftovers(t.dom)
        left_files = sorted(os.listdir(cell.target))
        # the next backup into the directory recovers and is exact
        r = bk.backup(t.dom, cell.target, mode="auto")
        out = os.path.join(t.dir, "next.raw")
        bk.restore(cell.target, "vda", out, point=r.point.index)
        with open(out, "rb") as f:
            assert f.read() == expected_image(t.size["vda"], t.model["vda"]), \
                "the next backup after the restart is not the disk"
        cell.clean_up_and_check_plugin_works(found)
        assert not found, found
        c2.close()
        # the promise: the backup went through, or failed leaving nothing behind
        assert first == "backup exact" and not first_left, \
            (first, first_left, left_in_qemu, left_files)
    finally:
        if cell is not None:
            cell.go.set()
        remove_after_restart([t], c)
