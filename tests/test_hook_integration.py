# SPDX-License-Identifier: LGPL-2.1-or-later
"""The qemu hook really installed into the running libvirtd: cleanup on stop and crash,
checkpoints rediscovered on start, exports surviving a libvirtd restart, forged paths refused.

Serial tier: installing a hook (and reloading or restarting libvirtd) affects every
domain of this libvirtd. The libvirtd restart test comes last in this module.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time

import libvirt
import pytest
from lxml import etree

import libvirt_fleece as lf
from libvirt_fleece import config, fleecefile, hook, hookinstall, metadata
from vm import MiB, TestVM, expected_image, read_export, restart_libvirtd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.serial]

CP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT
STOP = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS
HOOK = hookinstall.hook_path()
OTHER_UUID = "0b7f5a9e-1111-4222-8333-444455556666"
TIMINGS: dict = {}


# --- helpers -----------------------------------------------------------------------


def hook_log() -> str:
    """What the hook logged (its file, or the journal when it logs to syslog)."""
    cfg = config.load()
    if cfg.hook_syslog and hook._is_socket(hook.SYSLOG_SOCKET):
        proc = subprocess.run(["journalctl", "-q", "-o", "cat", "-t", hook.SYSLOG_IDENT,
                               "--since", "-2h"], capture_output=True, text=True)
        return proc.stdout
    try:
        with open(cfg.hook_log_file, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def log_lines(name: str, operation: str = "") -> list[str]:
    tag = f"domain {name}, operation {operation}" if operation else f"domain {name},"
    return [line for line in hook_log().splitlines() if tag in line]


def snapshot(dom, name: str, disks=("vda",), flags: int = 0, fleece: dict = None):
    fleece = fleece or {}
    body = "".join(f"<disk name='{d}'><fleece file='{fleece[d]}'/></disk>" if d in fleece
                   else f"<disk name='{d}'/>" for d in disks)
    return lf.blockSnapshotCreateXML(
        dom, f"<domainblocksnapshot><name>{name}</name>{body}</domainblocksnapshot>", flags)


def export(dom, snap: str, disk: str = "vda") -> tuple[str, str]:
    """Start an export; return (socket, export name)."""
    name = f"{disk}-{snap}"
    lf.blockExportStart(dom, f"<domainblockexport type='nbd'><disk name='{disk}' "
                             f"snapshot='{snap}' exportname='{name}'/></domainblockexport>")
    state = metadata.load(dom)
    return state.server.socket, name


def fleece_files(dom) -> list[str]:
    return [d.file for s in metadata.load(dom).snapshots for d in s.disks]


def mirror(dom) -> dict:
    """{checkpoint name: valid} from the domain XML as `virsh dumpxml` shows it."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    result = {}
    for cp in root.iter(f"{{{metadata.CHECKPOINTS_NS_URI}}}checkpoint"):
        result[cp.get("name")] = result.get(cp.get("name"), True) and cp.get("valid") == "yes"
    return result


def kill_qemu(t: TestVM) -> None:
    with open(f"/run/libvirt/qemu/{t.name}.pid") as f:
        os.kill(int(f.read()), signal.SIGKILL)
    wait_for(lambda: t.dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING, 20, "qemu still runs")


def run_installed_hook(args: list[str], text: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the installed shim as libvirtd does (environment: LC_ALL=C only)."""
    t0 = time.monotonic()
    proc = subprocess.run([HOOK, *args], input=text.encode(), capture_output=True,
                          env={"LC_ALL": "C"}, timeout=30, cwd="/")
    return proc, time.monotonic() - t0


# --- the installed hook -------------------------------------------------------------

@pytest.fixture(scope="module")
def installed_hook(conn):
    """The hook installed into the running libvirtd (reloaded so it sees it).

    Removed afterwards only when it was not installed before (restored if it was)."""
    before = None
    if os.path.lexists(HOOK):
        with open(HOOK, "rb") as f:
            before = f.read()
    msg = hookinstall.install(reload=True)
    print(msg)
    # libvirtd re-reads the hook directory in its reload thread
    wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                    capture_output=True).returncode == 0, 30,
             "libvirtd does not answer after SIGHUP")
    time.sleep(1.0)
    yield HOOK
    if before is None:
        hookinstall.uninstall()
    elif open(HOOK, "rb").read() != before:
        with open(HOOK, "wb") as f:
            f.write(before)
    if TIMINGS:
        print("hook timings:", TIMINGS)


def test_hook_is_called_by_libvirtd(installed_hook, make_vm):
    t = make_vm(disks=1)
    wait_for(lambda: log_lines(t.name, "started"), 10,
             "libvirtd did not run the hook on start (was it reloaded?)")
    st = hookinstall.status()
    assert st.installed and st.up_to_date and st.libvirtd_running


def test_destroy_with_live_snapshots_and_exports_leaves_no_file(installed_hook, make_vm):
    t = make_vm(disks=2)
    custom = os.path.join(t.dir, "custom-vdb.qcow2")       # wherever the caller put it
    snapshot(t.dom, "s1", ("vda", "vdb"), fleece={"vdb": custom})
    snapshot(t.dom, "s2", ("vda",))
    sock, _ = export(t.dom, "s1")
    export(t.dom, "s2")
    files = fleece_files(t.dom)
    assert len(files) == 3 and custom in files and all(os.path.exists(f) for f in files)
    assert os.path.exists(sock)
    t0 = time.monotonic()
    t.dom.destroy()
    TIMINGS["destroy with 3 fleece images (s)"] = round(time.monotonic() - t0, 3)
    # release runs before destroy returns: nothing is left, no waiting
    assert [f for f in files if os.path.lexists(f)] == []
    assert not os.path.lexists(sock)
    removed = [line for line in log_lines(t.name) if "removed fleece image" in line]
    assert {f for f in files if any(f in line for line in removed)} == set(files)


def test_kill9_then_start_removes_files_and_reports_checkpoints_invalid(installed_hook,
                                                                        make_vm):
    t = make_vm(disks=1, persistent=True)
    snapshot(t.dom, "before", flags=CP).delete()
    t.destroy()                          # a clean stop stores "before" in the image
    t.dom.create()
    snapshot(t.dom, "during", flags=CP).delete()
    snapshot(t.dom, "live")
    sock, _ = export(t.dom, "live")
    files = fleece_files(t.dom)
    assert files and all(os.path.exists(f) for f in files)
    t.write("vda", 0x33, 0, MiB)
    kill_qemu(t)
    wait_for(lambda: not any(os.path.lexists(f) for f in files), 10,
             f"fleece images left after kill -9: {files}")
    assert not os.path.lexists(sock)
    t.dom.create()
    t0 = time.monotonic()
    took = wait_for(lambda: mirror(t.dom) == {"before": False, "during": False}, 30,
                    f"checkpoints not reported invalid in the domain XML: {mirror(t.dom)}")
    TIMINGS["checkpoints judged after start (s)"] = round(took, 2)
    xml = t.dom.XMLDesc(0)
    assert "uncleanly" in xml and "missing" in xml
    # the plugin agrees (this is the first call of the plugin since the start)
    assert {c.getName() for c in lf.blockCheckpointList(t.dom)} == {"before", "during"}
    assert time.monotonic() - t0 < 30


def test_metadata_removed_then_start_brings_checkpoints_back(installed_hook, make_vm):
    t = make_vm(disks=1, persistent=True)
    snapshot(t.dom, "c1", flags=CP).delete()
    t.write("vda", 0x11, 0, MiB)
    snapshot(t.dom, "c2", flags=CP).delete()
    assert mirror(t.dom) == {"c1": True, "c2": True}
    t.destroy()
    t.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, metadata.CHECKPOINTS_NS_URI,
                      libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert metadata.CHECKPOINTS_NS_URI not in t.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    t0 = time.monotonic()
    t.dom.create()
    TIMINGS["start of a persistent domain (s)"] = round(time.monotonic() - t0, 3)
    took = wait_for(lambda: mirror(t.dom) == {"c1": True, "c2": True}, 30,
                    f"checkpoints not rediscovered into the domain XML: {mirror(t.dom)}")
    TIMINGS["checkpoints back in dumpxml after start (s)"] = round(took, 2)
    # in the persistent definition too, so they survive the next stop
    assert metadata.CHECKPOINTS_NS_URI in t.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert log_lines(t.name, "reconcile")


def crafted_state(snap_id: str, files: dict) -> str:
    disks = "".join(
        f"<disk name='{d}' file='{p}' qdev='/machine/peripheral/virtio-disk0/virtio-backend' "
        f"base='libvirt-2-format' below='libvirt-2-format' fleece-node='fleece-{snap_id}-0-img' "
        f"filter-node='fleece-{snap_id}-0-cbw' access-node='fleece-{snap_id}-0-acc' "
        f"fdset='2041741347' capacity='1048576'/>" for d, p in files.items())
    return (f"<state version='1'><snapshot name='forged' id='{snap_id}' state='ready' "
            f"created='1764450000'>{disks}</snapshot></state>")


def test_forged_fleece_paths_and_symlinks_delete_nothing(installed_hook, make_vm):
    t = make_vm(disks=1)
    uuid = t.dom.UUIDString()
    cfg = config.load()
    passwd = open("/etc/passwd", "rb").read()
    victim = os.path.join(t.dir, "precious.qcow2")
    with open(victim, "w") as f:
        f.write("not a fleece image\n")
    # a real image of this domain, outside fleece_dir, reached through a symlink
    target = os.path.join(t.dir, "target.qcow2")
    os.close(fleecefile.create(target, MiB, fleecefile.owner_tag(uuid, "deadbeef", "vdb")))
    link = os.path.join(t.dir, "link.qcow2")
    os.symlink(target, link)
    etc_link = os.path.join(t.dir, "etc-link")
    os.symlink("/etc/passwd", etc_link)
    # an image of another domain in the shared fleece directory
    os.makedirs(cfg.fleece_dir, mode=0o700, exist_ok=True)
    foreign = os.path.join(cfg.fleece_dir, f"{t.name}.foreign.vda.qcow2")
    os.close(fleecefile.create(foreign, MiB, fleecefile.owner_tag(OTHER_UUID, "deadbeef", "vda")))
    try:
        doc = crafted_state("deadbeef", {"vda": victim, "vdb": link, "vdc": "/etc/passwd",
                                         "vdd": etc_link})
        t.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, doc, metadata.NS_PREFIX,
                          metadata.NS_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert "precious.qcow2" in t.dom.XMLDesc(0)
        t.dom.destroy()
        for path in (victim, target, foreign, "/etc/passwd"):
            assert os.path.exists(path), f"{path} was deleted"
        assert os.path.islink(link) and os.path.islink(etc_link)
        assert open("/etc/passwd", "rb").read() == passwd
        refusals = [line for line in log_lines(t.name, "release") if "refusing" in line]
        for path in (victim, link, "/etc/passwd", etc_link):
            assert any(path in line for line in refusals), (path, refusals)
    finally:
        if not os.path.exists("/etc/passwd"):         # never happens; but never lose it
            with open("/etc/passwd", "wb") as f:
                f.write(passwd)
        os.unlink(foreign)


def test_migrate_filter_on_a_real_domain_xml_keeps_checkpoints_only(installed_hook, make_vm):
    t = make_vm(disks=1)
    snapshot(t.dom, "c1", flags=CP)
    export(t.dom, "c1")
    xml = t.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    assert metadata.NS_URI in xml and metadata.CHECKPOINTS_NS_URI in xml
    for op in ("migrate", "restore"):
        proc, _ = run_installed_hook([t.name, op, "begin", "-"], xml)
        assert proc.returncode == 0
        out = proc.stdout.decode()
        assert metadata.NS_URI not in out and metadata.CHECKPOINTS_NS_URI in out
        got = etree.fromstring(out.encode())
        want = etree.fromstring(xml.encode())
        md = want.find("metadata")
        md.remove(md.find(f"{{{metadata.NS_URI}}}state"))
        assert etree.tostring(got, method="c14n").split() == \
            etree.tostring(want, method="c14n").split()
    lf.blockSnapshotLookupByName(t.dom, "c1").delete(STOP)


@pytest.mark.parametrize("operation", hook.OPERATIONS)
def test_installed_hook_given_garbage_exits_0_and_logs(installed_hook, operation):
    name = f"fleecetest-garbage-{operation}"
    proc, elapsed = run_installed_hook([name, operation, "begin", "-"],
                                       "<domain><uuid>x</uuid><<<\0 garbage")
    assert proc.returncode == 0 and proc.stdout == b""
    assert any("ignoring unusable input" in line for line in log_lines(name, operation))
    assert elapsed < 1.0


def test_hook_time_per_invocation_and_start_stop_not_slowed(installed_hook, conn):
    def cycle(n: int = 3) -> tuple[float, float]:
        starts, stops = [], []
        for _ in range(n):
            t = TestVM(conn, disks=1, tag="time")
            try:
                t0 = time.monotonic()
                t.start()
                starts.append(time.monotonic() - t0)
                t0 = time.monotonic()
                t.dom.destroy()
                stops.append(time.monotonic() - t0)
            finally:
                t.cleanup()
        return statistics.median(starts), statistics.median(stops)

    # each invocation of the installed shim, with a real domain's XML
    t = TestVM(conn, disks=1, tag="time")
    try:
        t.start()
        xml = t.dom.XMLDesc(0)
        per_op = {}
        for op in ("prepare", "started", "reconnect", "stopped", "release", "migrate"):
            best = min(run_installed_hook([t.name, op, "begin", "-"], xml)[1]
                       for _ in range(5))
            per_op[op] = round(best, 3)
    finally:
        t.cleanup()
    TIMINGS["installed shim per operation (s)"] = per_op
    assert max(per_op.values()) < 0.5, per_op
    # start and stop with the hook and without it (the file moved away: libvirtd keeps
    # calling qemu.d/ once it found a hook, so no reload is needed either way)
    with_hook = cycle()
    parked = HOOK + ".parked"
    os.rename(HOOK, parked)
    os.chmod(parked, 0o644)
    try:
        without = cycle()
    finally:
        os.chmod(parked, 0o755)
        os.rename(parked, HOOK)
    TIMINGS["start/stop median with hook (s)"] = tuple(round(x, 3) for x in with_hook)
    TIMINGS["start/stop median without hook (s)"] = tuple(round(x, 3) for x in without)
    print(TIMINGS)
    # a start runs one Python hook (started), a stop two (stopped, release)
    assert with_hook[0] - without[0] < 0.6, (with_hook, without)
    assert with_hook[1] - without[1] < 1.0, (with_hook, without)


# --- last: restarts libvirtd ---------------------------------------------------------------


def test_forged_config_record_naming_foreign_sockets_unlinks_nothing_at_start(installed_hook,
                                                                              make_vm):
    """Issue 12, item 9: a CONFIG record (server 'creating') naming someone else's sockets,
    one at the plugin's own default path, reaches the hook's reconcile worker at the next
    start: the worker repairs the record and leaves both sockets."""
    import socket as socketlib
    t = make_vm(disks=1, persistent=True)
    t.destroy()
    cfg = config.load()
    os.makedirs(cfg.socket_dir, exist_ok=True)
    listening = os.path.join(cfg.socket_dir, f"{t.name}.sock")     # the default name
    dead = os.path.join(t.dir, "someone-else.sock")
    owner = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    owner.bind(listening)
    owner.listen(1)
    gone = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    gone.bind(dead)
    gone.close()
    try:
        for path in (listening, dead):
            doc = (f"<state version='1'><server state='creating' type='unix' socket='{path}' "
                   f"fdname='fleece-nbd'/></state>")
            t.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, doc, metadata.NS_PREFIX,
                              metadata.NS_URI, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            before = len(log_lines(t.name, "reconcile"))
            t.dom.create()
            wait_for(lambda: len(log_lines(t.name, "reconcile")) > before, 30,
                     "the hook's reconcile worker did not run")
            wait_for(lambda: metadata.NS_URI not in t.dom.XMLDesc(0), 30,
                     "the forged record was not repaired")
            assert os.path.exists(listening) and os.path.exists(dead), \
                "a socket was unlinked because metadata named it"
            t.dom.destroy()
    finally:
        owner.close()
        for path in (listening, dead):
            if os.path.exists(path):
                os.unlink(path)


def test_libvirtd_restart_while_an_export_is_read(installed_hook):
    """Runs on its own connection: the session's connection dies with the old libvirtd."""
    c = libvirt.open("qemu:///system")
    t = TestVM(c, disks=1, tag="restart")
    try:
        t.start()
        writes = [(0x5A, 0, 2 * MiB), (0xA5, 40 * MiB, MiB)]
        for w in writes:
            t.write("vda", *w)
        snapshot(t.dom, "s1")
        sock, name = export(t.dom, "s1")
        expected = expected_image(64 * MiB, writes)
        uuid = t.dom.UUIDString()
        restarted = threading.Event()
        result: dict = {}

        def reader():
            import nbd
            h = nbd.NBD()
            h.set_export_name(name)
            h.connect_unix(sock)
            try:
                out = bytearray()
                size = h.get_size()
                chunk = MiB
                for off in range(0, size, chunk):
                    if off == size // 2:
                        result["half"] = True
                        restarted.wait(120)         # the second half after the restart
                    out += h.pread(min(chunk, size - off), off)
                    time.sleep(0.02)
                result["data"] = bytes(out)
            except Exception as e:  # noqa: BLE001
                result["error"] = e
            finally:
                h.shutdown()

        th = threading.Thread(target=reader)
        th.start()
        wait_for(lambda: result.get("half") or "error" in result, 30, "the read did not start")
        TIMINGS["libvirtd restart (s)"] = round(restart_libvirtd(), 2)
        restarted.set()
        th.join(120)
        assert "error" not in result, result.get("error")
        assert result.get("data") == expected
        c2 = libvirt.open("qemu:///system")
        t.conn = c2
        dom = c2.lookupByUUIDString(uuid)
        t.dom = dom
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        wait_for(lambda: log_lines(t.name, "reconnect"), 30, "no reconnect hook ran")
        wait_for(lambda: any("reconciled" in line for line in log_lines(t.name, "reconcile")),
                 60, "the reconnect worker did not finish")
        docs = lf.blockExportList(dom)
        assert any(name in d for d in docs), docs
        assert read_export(sock, name) == expected
        lf.blockSnapshotLookupByName(dom, "s1").delete(STOP)
        c2.close()
    finally:
        try:
            c.close()
        except libvirt.libvirtError:
            pass
        t.conn = libvirt.open("qemu:///system")
        t.cleanup()
        t.conn.close()
