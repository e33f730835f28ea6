# SPDX-License-Identifier: LGPL-2.1-or-later
"""Faults around the plugin (issue 6, promise 3): qemu killed during an export read,
libvirtd restarted in the middle of an API call and during an export, and a guest
that shuts itself down while exported.

Serial tier: these tests restart the shared libvirtd. They use their own libvirt
connection (the session's ``conn`` dies with the old daemon) and reopen it after
each restart. Figures go to ``tests/.reliability/faults_around.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import libvirt
import pytest

import libvirt_fleece as lf
from libvirt_fleece.faults import ENV
from conftest import plugin_leftovers
from vm import (GUEST_DIR, MiB, TestVM, expected_image, guest_kernel, read_export,
                restart_libvirtd, wait_for)

pytestmark = [pytest.mark.integration, pytest.mark.serial]

HERE = os.path.dirname(os.path.abspath(__file__))
URI = "qemu:///system"
FLEECE_DIR = "/var/lib/libvirt/fleece"
SOCKET_DIR = "/run/libvirt-fleece"
REPORT = os.path.join(HERE, ".reliability", "faults_around.json")
STOP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS
FIGURES: dict = {}

# Reads an export with libnbd in its own process, so a hang is bounded by a timeout.
#   loop:      read the whole export again and again until an NBD error (exit 3)
#   once-slow: read it once, PAUSE s per MiB, print its sha256 (exit 0)
READER = r"""
import hashlib, sys, time
import nbd
sock, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD()
h.set_export_name(name)
h.connect_unix(sock)
size = h.get_size()
print("connected", size, flush=True)
chunk = 1 << 20
try:
    if mode == "once-slow":
        pause = float(sys.argv[4])
        d = hashlib.sha256()
        for off in range(0, size, chunk):
            d.update(h.pread(min(chunk, size - off), off))
            time.sleep(pause)
        print("sha256", d.hexdigest(), flush=True)
    else:
        n = 0
        while True:
            for off in range(0, size, chunk):
                h.pread(min(chunk, size - off), off)
                n += 1
                if n == 1:
                    print("reading", flush=True)
except nbd.Error as e:
    print("nbd-error", str(e).replace("\n", " "), flush=True)
    sys.exit(3)
"""


# --- libvirtd and connections ------------------------------------------------------------

class Libvirt:
    """This module's own connection, reopened after every libvirtd restart."""

    def __init__(self) -> None:
        self.conn = self._open(30)
        self.vms: list[TestVM] = []

    @staticmethod
    def _open(timeout: float) -> libvirt.virConnect:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return libvirt.open(URI)
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def reopen(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
        self.conn = self._open(60)
        for t in self.vms:
            t.conn = self.conn
            try:
                t.dom = self.conn.lookupByName(t.name)
            except libvirt.libvirtError:
                t.dom = None

    def vm(self, **kwargs) -> TestVM:
        t = TestVM(self.conn, **kwargs)
        self.vms.append(t)
        t.start()
        return t

    def close(self) -> None:
        for t in self.vms:
            t.conn = self.conn
            t.cleanup()
        self.conn.close()


@pytest.fixture(scope="module")
def lv():
    try:
        h = Libvirt()
    except libvirt.libvirtError as e:
        pytest.fail(f"libvirt is required here but unusable: {e}")
    yield h
    h.close()
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        json.dump(FIGURES, f, indent=2, sort_keys=True)


# --- helpers ------------------------------------------------------------------------------

def snapshot_xml(name: str, disks=()) -> str:
    return (f"<domainblocksnapshot><name>{name}</name>"
            + "".join(f"<disk name='{d}'/>" for d in disks) + "</domainblocksnapshot>")


def export_xml(snap: str, disks=("vda",)) -> str:
    return ("<domainblockexport type='nbd'>"
            + "".join(f"<disk name='{d}' snapshot='{snap}'/>" for d in disks)
            + "</domainblockexport>")


def socket_of(dom) -> str:
    return re.search(r'socket="([^"]+)"', lf.blockExportList(dom)[0]).group(1)


def fleece_files(t: TestVM) -> list[str]:
    try:
        return sorted(f for f in os.listdir(FLEECE_DIR) if f.startswith(t.name + "."))
    except FileNotFoundError:
        return []


def default_socket(t: TestVM) -> str:
    return os.path.join(SOCKET_DIR, f"{t.name}.sock")


def hook_installed() -> bool:
    return os.path.exists("/etc/libvirt/hooks/qemu.d/libvirt-fleece")


def reader(sock: str, name: str, mode: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", READER, sock, name, mode, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    """The reader's next stdout line starting with ``prefix`` (fails on timeout or exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"reader ended before {prefix!r}: {proc.stderr.read()[-1000:]}")
            if line.startswith(prefix):
                return line.strip()
    proc.kill()
    pytest.fail(f"reader printed no {prefix!r} within {timeout} s")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str, float]:
    """Wait for the reader; a hang is a failure. Returns stdout, stderr, seconds."""
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"the NBD client hung for more than {timeout} s")
    return out, err, time.monotonic() - t0


def assert_nothing_of_ours(t: TestVM) -> None:
    """After the next API call on the restarted domain: no state, no files, no socket."""
    assert [s.getName() for s in lf.blockSnapshotList(t.dom)] == []
    assert lf.blockExportList(t.dom) == []
    assert plugin_leftovers(t.dom) == {}
    assert fleece_files(t) == [], "fleece images of the dead qemu are left"
    assert not os.path.exists(default_socket(t)), "the dead server's socket is left"


def apicall(name: str, *args: str, kill_at: str = "") -> subprocess.Popen:
    env = dict(os.environ)
    if kill_at:
        env[ENV] = kill_at
    return subprocess.Popen([sys.executable, os.path.join(HERE, "apicall.py"), name, *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- 1. qemu killed during an export read -------------------------------------------------

def test_qemu_killed_during_an_export_read(lv):
    t = lv.vm(disks=1, persistent=True, tag="qkill-")
    t.write("vda", 0x3A, 0, MiB)
    lf.blockSnapshotCreateXML(t.dom, snapshot_xml("s"))
    lf.blockExportStart(t.dom, export_xml("s"))
    proc = reader(socket_of(t.dom), "vda-s", "loop")
    wait_line(proc, "reading", 30)
    with open(f"/run/libvirt/qemu/{t.name}.pid") as f:
        qemu = int(f.read().strip())
    os.kill(qemu, signal.SIGKILL)
    out, err, took = finish(proc, 30)
    assert proc.returncode == 3 and "nbd-error" in out, (proc.returncode, out, err[-500:])
    wait_for(lambda: t.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, 30,
             "libvirt did not notice that qemu died")
    left_while_off = fleece_files(t)
    t.dom.create()
    assert_nothing_of_ours(t)
    # and the plugin works on the restarted domain (the write before the kill was never
    # flushed, so qemu's crash may have lost it: write again)
    t.write("vda", 0x3B, 0, MiB)
    lf.blockSnapshotCreateXML(t.dom, snapshot_xml("again"))
    lf.blockExportStart(t.dom, export_xml("again"))
    assert read_export(socket_of(t.dom), "vda-again") == expected_image(64 * MiB,
                                                                        [(0x3B, 0, MiB)])
    lf.blockSnapshotLookupByName(t.dom, "again").delete(STOP)
    assert plugin_leftovers(t.dom) == {} and fleece_files(t) == []
    FIGURES["qemu_killed_during_read"] = {
        "client_error_after_s": round(took, 2), "client_error": out.strip().splitlines()[-1],
        "hook_installed": hook_installed(),
        "fleece_files_left_while_domain_off": len(left_while_off),
        "fleece_files_left_after_next_call": 0}


# --- 2. libvirtd restarted in the middle of an API call ---------------------------------------

DISKS = ("vda", "vdb", "vdc", "vdd")
WRITES = {d: [(0x41 + i, i * MiB, MiB)] for i, d in enumerate(DISKS)}


def four_disk_vm(lv, tag: str) -> TestVM:
    t = lv.vm(disks=4, size_mib=16, tag=tag)
    for d, writes in WRITES.items():
        for pattern, offset, length in writes:
            t.write(d, pattern, offset, length)
    return t


def check_after_restart(t: TestVM, completed: bool) -> str:
    """The next call: guest running, and either exactly the snapshot (exact data) or nothing."""
    snaps = [s.getName() for s in lf.blockSnapshotList(t.dom)]
    deadline = time.monotonic() + 5
    while t.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    left_paused = t.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING
    if completed:
        assert snaps == ["r"], "a snapshot whose creation succeeded was lost"
    assert snaps in ([], ["r"])
    left = plugin_leftovers(t.dom)
    if snaps == ["r"]:
        assert "exports" not in left and len(fleece_files(t)) == 4
        assert len(left["drives"]) == 4
        # the new guest writes must not show in the snapshot
        for d in DISKS:
            t.write(d, 0xEE, 0, 4 * MiB)
        lf.blockExportStart(t.dom, export_xml("r", DISKS))
        sock = socket_of(t.dom)
        for d in DISKS:
            assert read_export(sock, f"{d}-r") == expected_image(16 * MiB, WRITES[d]), d
        lf.blockSnapshotLookupByName(t.dom, "r").delete(STOP)
        outcome = "snapshot kept, data exact"
    else:
        outcome = "nothing left"
    assert plugin_leftovers(t.dom) == {}
    assert fleece_files(t) == []
    assert not os.path.exists(default_socket(t))
    return outcome + ("; GUEST LEFT PAUSED" if left_paused else "")


def clear_error(stderr: str) -> bool:
    """apicall.py died on an Error of ours (its last line), not on anything else."""
    lines = stderr.strip().splitlines()
    return bool(lines) and lines[-1].startswith("libvirt_fleece.errors.")


def never_started(stderr: str) -> bool:
    """libvirtd was down before apicall.py's own libvirt.open: the call never ran."""
    return "conn = libvirt.open(" in stderr and "libvirt.libvirtError" in stderr


@pytest.mark.parametrize("delay", [0.2, 0.35, 0.5, 0.7])
def test_libvirtd_restarted_while_a_snapshot_is_created(lv, delay):
    t = four_disk_vm(lv, "lvrc-")
    proc = apicall(t.name, "create", snapshot_xml("r"))
    time.sleep(delay)
    took = restart_libvirtd()
    lv.reopen()
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the API call hung after libvirtd restarted")
    completed = proc.returncode == 0
    assert completed or clear_error(err) or never_started(err), \
        f"exit {proc.returncode}: {err[-1500:]}"
    outcome = check_after_restart(t, completed)
    call = "succeeded" if completed else "never started (libvirtd down at its connect)" \
        if never_started(err) else err.strip().splitlines()[-1][:200]
    FIGURES.setdefault("libvirtd_restart_during_create", []).append({
        "delay_s": delay, "restart_s": round(took, 2), "call": call,
        "after_next_call": outcome})
    # even when the restart falls into the few ms the guest is paused, the guard retries
    # and the next call resumes (the pause marker): the guest is never left paused
    assert not outcome.endswith("GUEST LEFT PAUSED"), outcome


@pytest.mark.parametrize("point", [
    "snapshot-create:fleece-node-added",
    "snapshot-create:guest-paused",
    "snapshot-create:ready"])
def test_killed_at_a_step_then_libvirtd_restarted(lv, point):
    t = four_disk_vm(lv, "lvkp-")
    proc = apicall(t.name, "create", snapshot_xml("r"), kill_at=point)
    _out, err = proc.communicate(timeout=90)
    assert proc.returncode == -9, f"kill point {point} not reached: {err[-1500:]}"
    restart_libvirtd()
    lv.reopen()
    outcome = check_after_restart(t, completed=point == "snapshot-create:ready")
    FIGURES.setdefault("killed_then_libvirtd_restarted", []).append(
        {"kill_point": point, "after_next_call": outcome})
    assert not outcome.endswith("GUEST LEFT PAUSED"), "the guest was left paused"


# --- 3. libvirtd restarted during an export --------------------------------------------------

def test_libvirtd_restarted_during_an_export_read(lv):
    t = lv.vm(disks=1, size_mib=64, tag="lvexp-")
    writes = [(0x5A, 0, 2 * MiB), (0x6B, 40 * MiB, MiB)]
    for w in writes:
        t.write("vda", *w)
    lf.blockSnapshotCreateXML(t.dom, snapshot_xml("s"))
    t.write("vda", 0xFF, 0, 8 * MiB)          # after the snapshot: must not show
    lf.blockExportStart(t.dom, export_xml("s"))
    sock = socket_of(t.dom)
    want = expected_image(64 * MiB, writes)
    proc = reader(sock, "vda-s", "once-slow", "0.05")     # 64 MiB in about 3.2 s
    wait_line(proc, "connected", 30)
    time.sleep(0.5)
    took = restart_libvirtd()
    lv.reopen()
    out, err, _ = finish(proc, 60)
    assert proc.returncode == 0, err[-1000:]
    assert f"sha256 {hashlib.sha256(want).hexdigest()}" in out, "the read returned wrong data"
    docs = lf.blockExportList(t.dom)
    assert len(docs) == 1 and "vda-s" in docs[0], "the export is no longer listed"
    assert read_export(socket_of(t.dom), "vda-s") == want
    lf.blockSnapshotLookupByName(t.dom, "s").delete(STOP)
    assert plugin_leftovers(t.dom) == {} and fleece_files(t) == []
    FIGURES["libvirtd_restart_during_read"] = {"restart_s": round(took, 2),
                                               "read": "completed, data exact",
                                               "export_listed_after": True}


# --- 4. guest shut down from inside while exported ------------------------------------------

@pytest.fixture(scope="module")
def built_guest():
    subprocess.run([os.path.join(HERE, "guest", "build-guest.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    assert os.path.exists(os.path.join(GUEST_DIR, "vmlinuz"))


def test_guest_powers_off_while_exported(lv, built_guest):
    delay = 12
    t = lv.vm(disks=1, size_mib=16, persistent=True, tag="poff-",
              kernel=guest_kernel(f"poweroff-after fleece.delay={delay}"))
    wait_for(lambda: "poweroff-after: powering off in" in t.serial_log(), 90,
             "the guest did not boot into poweroff-after mode")
    lf.blockSnapshotCreateXML(t.dom, snapshot_xml("s"))
    lf.blockExportStart(t.dom, export_xml("s"))
    proc = reader(socket_of(t.dom), "vda-s", "loop")
    wait_line(proc, "reading", 30)
    out, err, took = finish(proc, delay + 60)
    assert proc.returncode == 3 and "nbd-error" in out, (proc.returncode, out, err[-500:])
    wait_for(lambda: t.dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, 30,
             "the domain did not stop")
    assert "poweroff-after: poweroff now" in t.serial_log()
    left_while_off = fleece_files(t)
    if hook_installed():
        assert left_while_off == [], "the hook did not remove the fleece images"
    t.dom.create()
    assert_nothing_of_ours(t)
    t.destroy()
    FIGURES["guest_poweroff_while_exported"] = {
        "client_error_after_s": round(took, 2), "client_error": out.strip().splitlines()[-1],
        "hook_installed": hook_installed(),
        "fleece_files_left_while_domain_off": len(left_while_off),
        "fleece_files_left_after_next_call": 0}
