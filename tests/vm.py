# SPDX-License-Identifier: LGPL-2.1-or-later
"""Throwaway test domains on the real libvirtd, and guest I/O through the real device path."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from typing import Optional

import libvirt
import libvirt_qemu

IMAGE_ROOT = "/var/lib/libvirt/images"
GUEST_DIR = os.path.join(IMAGE_ROOT, "fleece-guest")


def guest_kernel(mode: str) -> dict:
    """The busybox test guest (tests/guest/build-guest.sh) in a fleece.mode."""
    return {"kernel": os.path.join(GUEST_DIR, "vmlinuz"),
            "initrd": os.path.join(GUEST_DIR, "initrd.img"),
            "cmdline": f"console=ttyS0 panic=-1 quiet fleece.mode={mode}"}


PREFIX = "fleecetest-"
MiB = 1 << 20


def kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK) and \
        (os.stat("/dev/kvm").st_mode & 0o060) == 0o060 and _qemu_user_in_kvm_group()


def _qemu_user_in_kvm_group() -> bool:
    """Whether qemu's user (libvirt-qemu) is in /dev/kvm's group (the group can change under
    us, e.g. to a gid of another root's kvm group); True when there is no such user."""
    import grp
    import pwd
    try:
        user = pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return True
    gid = os.stat("/dev/kvm").st_gid
    try:
        return gid == user.pw_gid or user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def domain_xml(name: str, disks: list[dict], kernel: Optional[dict] = None,
               memory_mib: int = 64, cdrom: bool = False, discard: bool = False) -> str:
    """A small domain; each disk dict has path, format, dev (vda...). ``discard``:
    pass guest discards down (discard='unmap'; libvirt ignores them by default)."""
    # The kernel guest gets TCG: on nested/paravirtual KVM hosts (like CI here) the
    # Debian kernel hits "KVM internal error ... emulation failure" (tests/guest/README.md).
    dtype = "kvm" if kvm_usable() and not kernel else "qemu"
    os_extra = ""
    if kernel:
        os_extra = (f"<kernel>{kernel['kernel']}</kernel><initrd>{kernel['initrd']}</initrd>"
                    f"<cmdline>{kernel['cmdline']}</cmdline>")
    unmap = " discard='unmap'" if discard else ""
    disk_xml = "".join(
        f"""<disk type='file' device='disk'>
              <driver name='qemu' type='{d["format"]}' cache='none'{unmap}/>
              <source file='{d["path"]}'/><target dev='{d["dev"]}' bus='virtio'/>
            </disk>""" for d in disks)
    if cdrom:
        disk_xml += ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                     "<target dev='hdc' bus='ide'/><readonly/></disk>")
    return f"""<domain type='{dtype}'>
      <name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>
      <features><acpi/></features>
      <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>{disk_xml}
        <serial type='file'><source path='/var/log/libvirt/qemu/{name}-serial.log'/></serial>
      </devices></domain>"""


class TestVM:
    """A transient domain with qcow2 (or raw) disks in its own image directory."""

    __test__ = False

    def __init__(self, conn: libvirt.virConnect, disks: int = 1, size_mib: int = 64,
                 fmt: str = "qcow2", kernel: Optional[dict] = None, tag: str = "",
                 cdrom: bool = False, persistent: bool = False, discard: bool = False) -> None:
        self.conn = conn
        self.name = f"{PREFIX}{tag}{secrets.token_hex(4)}"
        self.dir = os.path.join(IMAGE_ROOT, self.name)
        os.makedirs(self.dir, mode=0o755)
        self.disks = []
        for i in range(disks):
            dev = "vd" + chr(ord("a") + i)
            path = os.path.join(self.dir, f"{dev}.{fmt}")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, f"{size_mib}M"],
                           check=True)
            self.disks.append({"dev": dev, "path": path, "format": fmt})
        self.kernel = kernel
        self.cdrom = cdrom
        self.persistent = persistent
        self.discard = discard
        self.dom: Optional[libvirt.virDomain] = None

    def start(self) -> libvirt.virDomain:
        xml = domain_xml(self.name, self.disks, self.kernel, cdrom=self.cdrom,
                         memory_mib=128 if self.kernel else 64, discard=self.discard)
        if self.persistent:
            self.dom = self.conn.defineXML(xml)
            self.dom.create()
        else:
            self.dom = self.conn.createXML(xml, 0)
        return self.dom

    def serial_log(self) -> str:
        try:
            with open(f"/var/log/libvirt/qemu/{self.name}-serial.log", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def qdev(self, dev: str) -> str:
        index = [d["dev"] for d in self.disks].index(dev)
        return f"/machine/peripheral/virtio-disk{index}/virtio-backend"

    def write(self, dev: str, pattern: int, offset: int, length: int) -> None:
        """A guest write through the device's BlockBackend (what bitmaps and filters see)."""
        cmd = f'qemu-io -d {self.qdev(dev)} "write -P 0x{pattern:02x} {offset} {length}"'
        out = libvirt_qemu.qemuMonitorCommand(
            self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        if out.strip():
            raise AssertionError(f"guest write failed: {out.strip()}")

    def _remove_fleece_files(self, uuid: Optional[str]) -> None:
        """Fleece images the plugin left for this domain (the hook does this when installed)."""
        d = "/var/lib/libvirt/fleece"
        if not uuid or not os.path.isdir(d):
            return
        for f in os.listdir(d):
            path = os.path.join(d, f)
            try:
                tag = os.getxattr(path, "trusted.libvirt-fleece", follow_symlinks=False)
            except OSError:
                continue
            if tag.startswith(uuid.encode() + b"/"):
                os.unlink(path)

    def destroy(self) -> None:
        try:
            dom = self.conn.lookupByName(self.name)
            dom.destroy()
        except libvirt.libvirtError:
            pass

    def cleanup(self) -> None:
        uuid = None
        try:
            uuid = self.conn.lookupByName(self.name).UUIDString()
        except libvirt.libvirtError:
            pass
        self.destroy()
        self._remove_fleece_files(uuid)
        if self.persistent:
            try:
                self.conn.lookupByName(self.name).undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
            except libvirt.libvirtError:
                pass
        for _ in range(50):
            try:
                self.conn.lookupByName(self.name)
                time.sleep(0.1)
            except libvirt.libvirtError:
                break
        shutil.rmtree(self.dir, ignore_errors=True)
        for f in (f"/var/log/libvirt/qemu/{self.name}-serial.log",):
            if os.path.exists(f):
                os.unlink(f)


def expected_image(size: int, writes: list[tuple[int, int, int]]) -> bytes:
    """Disk content after (pattern, offset, length) writes on a zeroed disk."""
    buf = bytearray(size)
    for pattern, offset, length in writes:
        buf[offset:offset + length] = bytes([pattern]) * length
    return bytes(buf)


def read_export(socket: str, name: str) -> bytes:
    """Read a whole NBD export with libnbd (the NBD project's client)."""
    import nbd
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(socket)
    try:
        size = h.get_size()
        out = bytearray()
        chunk = 4 * MiB
        for off in range(0, size, chunk):
            out += h.pread(min(chunk, size - off), off)
        return bytes(out)
    finally:
        h.shutdown()


def dirty_clusters(socket: str, name: str, bitmap: str, granularity: int = 64 * 1024) -> set:
    """Indexes of the clusters an export's dirty-bitmap meta context marks dirty (libnbd)."""
    import nbd
    ctx = f"qemu:dirty-bitmap:{bitmap}"
    h = nbd.NBD()
    h.set_export_name(name)
    h.add_meta_context(ctx)
    h.connect_unix(socket)
    try:
        assert h.can_meta_context(ctx), f"export {name} has no context {ctx}"
        size = h.get_size()
        dirty = set()
        offset = 0
        while offset < size:
            seen = []

            def cb(metacontext, off, entries, err):
                if metacontext == ctx:
                    seen.append((off, entries))
                return 0

            h.block_status(min(size - offset, 1 << 30), offset, cb)
            off, entries = seen[0]
            pos = off
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & 1:
                    dirty.update(range(pos // granularity, (pos + length - 1) // granularity + 1))
                pos += length
            offset = pos
        return dirty
    finally:
        h.shutdown()


def clusters(writes, granularity: int = 64 * 1024) -> set:
    """Clusters touched by (pattern, offset, length) writes."""
    out = set()
    for _p, off, length in writes:
        out.update(range(off // granularity, (off + length - 1) // granularity + 1))
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll until true; return the seconds it took. Fails the test with ``what``."""
    import pytest
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"after {timeout:.0f} s: {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def restart_libvirtd() -> float:
    """SIGTERM the pidfile's libvirtd (never by name), start a new one, wait until it
    answers; return the seconds it took. Serial-tier tests only."""
    import signal
    t0 = time.monotonic()
    with open("/run/libvirtd.pid") as f:
        pid = int(f.read().strip())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 60, "libvirtd does not stop")
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                    capture_output=True, timeout=30).returncode == 0, 60,
             "libvirtd does not answer")
    return time.monotonic() - t0
