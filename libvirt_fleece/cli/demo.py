# SPDX-License-Identifier: LGPL-2.1-or-later
"""``virsh-fleece demo``: the whole cycle on a throwaway domain, verified.

1. create a transient domain ``fleece-demo-<hex>`` (no OS: SeaBIOS keeps it
   running) with one empty 64 MiB qcow2 disk in its own image directory;
2. write 0x5a over the first 4 MiB through the guest's device (HMP qemu-io);
3. take a temporary block snapshot;
4. overwrite the guest disk (0xa5 over the first 4 MiB, 0x11 at 8 MiB) so
   the disk moves on;
5. export the snapshot over NBD (default unix socket);
6. copy the export to a file with ``nbdcopy``;
7. check the copy's SHA-256 against the disk as it was at snapshot time.

Everything is removed afterwards (snapshot with its export, domain, image
directory, copy) unless ``keep`` is true. Each run uses fresh random names,
so runs never collide.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import secrets
import shutil
import stat
import subprocess
import time
from typing import Callable, Iterator, Optional
from urllib.parse import quote

import libvirt
import libvirt_qemu
from lxml import etree

import libvirt_fleece as fleece
from libvirt_fleece import config
from libvirt_fleece.qemu import readpath, tools

log = logging.getLogger(__name__)

PREFIX = "fleece-demo-"
IMAGE_ROOT = "/var/lib/libvirt/images"
MiB = 1 << 20
DISK_SIZE = 64 * MiB
QDEV = "/machine/peripheral/virtio-disk0/virtio-backend"
SNAPSHOT = "demo"
EXPORT = "demo-vda"

# (pattern, offset, length) of the guest writes before and after the snapshot
BEFORE = [(0x5A, 0, 4 * MiB)]
AFTER = [(0xA5, 0, 4 * MiB), (0x11, 8 * MiB, 1 * MiB)]


class DemoFailed(Exception):
    """A demo step did not do what it should."""


def kvm_usable() -> bool:
    """Whether qemu (running as a member of group kvm) can use /dev/kvm."""
    try:
        st = os.stat("/dev/kvm")
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_gid == kvm_gid and \
        (st.st_mode & 0o060) == 0o060


def domain_xml(name: str, disk: str, domain_type: str) -> str:
    root = etree.Element("domain", type=domain_type)
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "memory", unit="MiB").text = "64"
    etree.SubElement(root, "vcpu").text = "1"
    os_el = etree.SubElement(root, "os")
    etree.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    for event in ("on_poweroff", "on_crash"):
        etree.SubElement(root, event).text = "destroy"
    devices = etree.SubElement(root, "devices")
    d = etree.SubElement(devices, "disk", type="file", device="disk")
    etree.SubElement(d, "driver", name="qemu", type="qcow2")
    etree.SubElement(d, "source", file=disk)
    etree.SubElement(d, "target", dev="vda", bus="virtio")
    return etree.tostring(root, encoding="unicode")


def expected_sha256(size: int, writes: list[tuple[int, int, int]]) -> str:
    """SHA-256 of a zeroed disk of ``size`` bytes after ``writes``."""
    buf = bytearray(size)
    for pattern, offset, length in writes:
        buf[offset:offset + length] = bytes([pattern]) * length
    return hashlib.sha256(buf).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def guest_write(dom: libvirt.virDomain, pattern: int, offset: int, length: int) -> None:
    """Write through the guest device's BlockBackend (what the snapshot filter sees)."""
    cmd = f'qemu-io -d {QDEV} "write -P 0x{pattern:02x} {offset} {length}"'
    reply = libvirt_qemu.qemuMonitorCommand(
        dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if reply.strip():
        raise DemoFailed(f"guest write failed: {reply.strip()}")


def export_socket(dom: libvirt.virDomain) -> str:
    """The unix socket of the domain's NBD server, from blockExportList."""
    for doc in fleece.blockExportList(dom):
        addr = etree.fromstring(doc.encode("utf-8")).find("address")
        sock = addr.get("socket") if addr is not None and addr.get("type") == "unix" else None
        if sock:
            return sock
    raise DemoFailed("blockExportList shows no unix socket")


def fleece_allocation(snap: fleece.BlockSnapshot) -> int:
    """Bytes the snapshot's fleece images occupy, from its getXMLDesc()."""
    root = etree.fromstring(snap.getXMLDesc().encode("utf-8"))
    return sum(int(f.get("allocation", "0")) for f in root.iter("fleece"))


class _Steps:
    """Numbered steps with their duration, printed as they finish."""

    def __init__(self, out: Callable[[str], None], total: int) -> None:
        self.out = out
        self.total = total
        self.done = 0
        self.current = ""
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[list]:
        """Yields a list: what the step appends is printed after its text."""
        self.current = text
        t0 = time.monotonic()
        notes: list[str] = []
        yield notes
        self.done += 1
        extra = "".join(f": {n}" for n in notes)
        self.out(f"[{self.done}/{self.total}] {text}{extra} ({time.monotonic() - t0:.2f} s)")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _Demo:
    def __init__(self, conn: libvirt.virConnect, out: Callable[[str], None]) -> None:
        self.conn = conn
        self.out = out
        self.name = PREFIX + secrets.token_hex(4)
        self.dir = os.path.join(IMAGE_ROOT, self.name)
        self.disk = os.path.join(self.dir, "vda.qcow2")
        self.copy = os.path.join(self.dir, "copy.raw")
        self.dom: Optional[libvirt.virDomain] = None
        self.snapshot_taken = False
        self.uri = ""

    def run(self, steps: _Steps) -> str:
        """All steps; returns the copy's SHA-256 when it is right. Raises on failure."""
        nbdcopy = shutil.which("nbdcopy")
        if nbdcopy is None:
            raise DemoFailed("nbdcopy not found (install libnbd-bin)")
        dtype = "kvm" if kvm_usable() else "qemu"
        with steps.step(f"create transient domain {self.name} ({dtype}, 64 MiB qcow2 disk)"):
            os.mkdir(self.dir)
            os.chmod(self.dir, 0o755)
            tools.qemu_img(["create", "-q", "-f", "qcow2", self.disk, str(DISK_SIZE)])
            self.dom = self.conn.createXML(domain_xml(self.name, self.disk, dtype), 0)
        with steps.step("guest writes 0x5a over the first 4 MiB"):
            for w in BEFORE:
                guest_write(self.dom, *w)
        with steps.step(f"create block snapshot {SNAPSHOT!r} of vda") as notes:
            fleece.blockSnapshotCreateXML(
                self.dom, f"<domainblocksnapshot><name>{SNAPSHOT}</name>"
                          f"<disk name='vda'/></domainblocksnapshot>")
            self.snapshot_taken = True
            found = readpath.verdict(self.dom, config.load().state_dir)
            notes.append(f"read path {found.readpath}: {found.reason}")
        with steps.step("guest overwrites: 0xa5 over the first 4 MiB, "
                        "0x11 over 1 MiB at 8 MiB") as notes:
            for w in AFTER:
                guest_write(self.dom, *w)
            # The filter must have saved the old 4 MiB of 0x5a: proof that the
            # writes reached the disk after the snapshot.
            saved = fleece_allocation(fleece.blockSnapshotLookupByName(self.dom, SNAPSHOT))
            if saved < 4 * MiB:
                raise DemoFailed(f"the fleece image holds only {saved} bytes after the guest "
                                 f"overwrote 4 MiB of data (did the writes happen?)")
            notes.append(f"the fleece image now holds {saved / MiB:.1f} MiB of old data")
        with steps.step(f"export the snapshot over NBD as {EXPORT!r}"):
            fleece.blockExportStart(
                self.dom, f"<domainblockexport type='nbd'><disk name='vda' "
                          f"snapshot='{SNAPSHOT}' exportname='{EXPORT}'/></domainblockexport>")
            sock = export_socket(self.dom)
            self.uri = f"nbd+unix:///{EXPORT}?socket={quote(sock, safe='/')}"
        with steps.step(f"copy {self.uri} with nbdcopy"):
            proc = subprocess.run([nbdcopy, self.uri, self.copy], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise DemoFailed(f"nbdcopy failed: {proc.stderr.strip()}")
        with steps.step("compare the copy's SHA-256 with the disk at snapshot time"):
            want = expected_sha256(DISK_SIZE, BEFORE)
            got = file_sha256(self.copy)
            size = os.path.getsize(self.copy)
            if size != DISK_SIZE or got != want:
                raise DemoFailed(
                    f"the copy ({size} bytes, sha256 {got}) differs from the disk at "
                    f"snapshot time ({DISK_SIZE} bytes, sha256 {want})")
        return got

    def cleanup(self) -> bool:
        """Remove everything the demo made; failures are logged, never raised.

        Returns whether everything is gone.
        """
        ok = True
        if self.dom is not None and self.snapshot_taken:
            try:
                fleece.blockSnapshotLookupByName(self.dom, SNAPSHOT).delete(
                    fleece.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
            except (fleece.Error, libvirt.libvirtError) as e:
                log.warning("demo: cannot delete snapshot %s of %s: %s", SNAPSHOT, self.name, e)
                ok = False
        try:
            self.conn.lookupByName(self.name).destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                log.warning("demo: cannot destroy domain %s: %s", self.name, e)
                ok = False
        shutil.rmtree(self.dir, ignore_errors=True)
        if os.path.exists(self.dir):
            log.warning("demo: cannot remove %s", self.dir)
            ok = False
        return ok

    def describe_kept(self) -> None:
        self.out(f"kept: domain {self.name}, snapshot {SNAPSHOT!r}, export {self.uri or '-'}, "
                 f"directory {self.dir}")
        self.out(f"remove with: virsh-fleece blocksnapshot-delete {self.name} {SNAPSHOT} "
                 f"--stop-exports; virsh destroy {self.name}; rm -r {self.dir}")


def run(conn: libvirt.virConnect, keep: bool = False,
        out: Callable[[str], None] = print) -> int:
    """Run the demo on ``conn``; print progress with ``out``; return 0 on success, 1 on failure.

    Never raises for a failed step (it prints a FAILED line, and logs the
    traceback at DEBUG level); KeyboardInterrupt propagates after the cleanup.
    """
    demo = _Demo(conn, out)
    steps = _Steps(out, total=7)
    try:
        digest = demo.run(steps)
    except Exception as e:  # noqa: BLE001 - every failure ends in a FAILED line
        log.debug("demo failed", exc_info=True)
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr \
            else str(e)
        out(f"FAILED at step {steps.done + 1}/{steps.total} ({steps.current}): {detail}")
        return 1
    finally:
        if keep:
            demo.describe_kept()
        else:
            t0 = time.monotonic()
            what = "removed" if demo.cleanup() else "INCOMPLETE (see the warnings)"
            out(f"cleanup: snapshot, export, domain and {demo.dir} {what} "
                f"({time.monotonic() - t0:.2f} s)")
    out(f"OK: the copy equals the disk at snapshot time (sha256 {digest}); "
        f"{steps.elapsed():.1f} s in all")
    return 0
