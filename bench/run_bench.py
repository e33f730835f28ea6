#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backup benchmarks of issue 5, side by side on one running domain, as one table.

    sudo .venv/bin/python bench/run_bench.py            # the full run (minutes, ~12 GiB disk)
    sudo .venv/bin/python bench/run_bench.py --smoke    # small and fast (CI)

1. full backup of a disk holding random data: this client vs ``virtnbdbackup -l full``
   vs a local ``qemu-img convert`` of the same image (the machine's copy limit);
2. incremental after scattered guest writes: this client vs ``virtnbdbackup -l inc``;
3. incremental of the same writes on a small and on a huge sparse disk (time must follow
   the data, not the disk size);
4. set-up latency for 1, 4 and 16 disks: blockSnapshotCreateXML alone, and with
   blockExportStart, vs libvirt's own backupBegin (pull mode, export included);
5. guest write throughput while a snapshot exists (copy-before-write) vs without.

Needs root, the real libvirtd, qemu-img, python3-libnbd; virtnbdbackup is optional
(its rows show n/a without it). Ratios are computed within this one run.
"""

from __future__ import annotations

import argparse
import os
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TOP, os.path.join(TOP, "tests")]

import libvirt  # noqa: E402
import libvirt_qemu  # noqa: E402

import libvirt_fleece as lf  # noqa: E402
from libvirt_fleece import backup as bk  # noqa: E402
import vm as vmlib  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

SIZES = {
    # name: (random data, its disk, scattered writes, write size, small sparse, huge sparse,
    #        data written to sparse disks, guest write volume, latency repeats)
    "full": dict(data=2 * GiB, disk=8 * GiB, scattered=64 * MiB, chunk=64 * 1024,
                 sparse_small=16 * GiB, sparse_huge=1 << 40, sparse_data=256 * MiB,
                 sparse_chunk=MiB, guest_write=512 * MiB, repeats=7, disks=(1, 4, 16),
                 checkpoints=100),
    "smoke": dict(data=64 * MiB, disk=256 * MiB, scattered=4 * MiB, chunk=64 * 1024,
                  sparse_small=1 * GiB, sparse_huge=64 * GiB, sparse_data=8 * MiB,
                  sparse_chunk=MiB, guest_write=16 * MiB, repeats=1, disks=(1, 4),
                  checkpoints=10),
}


def log(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs) -> float:
    t = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - t


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                           f"{r.stderr[-2000:]}{r.stdout[-1500:]}")
    return r


def hmp(dom, cmd: str) -> None:
    out = libvirt_qemu.qemuMonitorCommand(dom, cmd,
                                          libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    if out.strip():
        raise RuntimeError(f"{cmd}: {out.strip()}")


class Bench:
    def __init__(self, conn, size: dict, workdir: str) -> None:
        self.conn = conn
        self.s = size
        self.work = workdir
        self.name = f"{vmlib.PREFIX}bench-{os.getpid()}"
        self.dir = os.path.join(vmlib.IMAGE_ROOT, self.name)
        self.dom = None
        self.rows: list[tuple[str, str, str, str]] = []
        self.vnb = shutil.which("virtnbdbackup")

    # --- the domain ---------------------------------------------------------------
    def setup(self) -> None:
        os.makedirs(self.dir, mode=0o755)
        s = self.s
        vda = os.path.join(self.dir, "vda.qcow2")
        raw = os.path.join(self.work, "random.raw")
        log(f"writing {s['data'] // MiB} MiB of random data")
        with open("/dev/urandom", "rb") as src, open(raw, "wb") as dst:
            left = s["data"]
            while left:
                n = min(left, 64 * MiB)
                dst.write(src.read(n))
                left -= n
        os.truncate(raw, s["disk"])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, vda])
        os.unlink(raw)
        disks = [{"dev": "vda", "path": vda, "format": "qcow2"}]
        for dev, size in (("vdb", s["sparse_small"]), ("vdc", s["sparse_huge"])):
            path = os.path.join(self.dir, f"{dev}.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
            disks.append({"dev": dev, "path": path, "format": "qcow2"})
        for i in range(16):            # small disks for the latency rows
            dev = "vd" + chr(ord("d") + i)
            path = os.path.join(self.dir, f"{dev}.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", path, "64M"])
            disks.append({"dev": dev, "path": path, "format": "qcow2"})
        self.devs = [d["dev"] for d in disks]
        self.pattern = os.path.join(self.dir, "pattern.bin")
        with open(self.pattern, "wb") as f:
            f.write(os.urandom(max(s["chunk"], s["sparse_chunk"])))
        os.chmod(self.pattern, 0o644)
        xml = vmlib.domain_xml(self.name, disks)
        self.dom = self.conn.defineXML(xml)      # persistent: virtnbdbackup wants that
        self.dom.create()
        log(f"domain {self.name} running ({'KVM' if vmlib.kvm_usable() else 'TCG'})")

    def cleanup(self) -> None:
        try:
            for s in lf.blockSnapshotList(self.dom):
                s.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
        except Exception:  # noqa: BLE001
            pass
        for call in (lambda: self.dom.abortJob(), lambda: self.dom.destroy(),
                     lambda: self.dom.undefineFlags(
                         libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)):
            try:
                call()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def qdev(self, dev: str) -> str:
        return f"/machine/peripheral/virtio-disk{self.devs.index(dev)}/virtio-backend"

    def scattered_writes(self, dev: str, total: int, chunk: int, span: int) -> None:
        """total bytes in chunk-sized guest writes spread evenly over [0, span)."""
        n = total // chunk
        stride = span // n // chunk * chunk
        for i in range(n):
            hmp(self.dom, f'qemu-io -d {self.qdev(dev)} '
                          f'"write -s {self.pattern} {i * stride} {chunk}"')

    def row(self, what: str, value: str, ratio: str = "", target: str = "") -> None:
        self.rows.append((what, value, ratio, target))
        log(f"{what}: {value} {ratio}")

    # --- 1 and 2 --------------------------------------------------------------------
    @staticmethod
    def cold() -> None:
        """Flush and drop the page cache, so no row reads what an earlier one left in
        memory (the guest reads its disks with cache=none; the local copy would not)."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        except OSError as e:       # a container may not allow it: say so, go on
            if not getattr(Bench, "warned", False):
                log(f"cannot drop the page cache ({e}); local copy rows may read from memory")
                Bench.warned = True

    def ours(self, target: str, mode: str, disk: str) -> float:
        self.cold()
        t = time.monotonic()
        r = bk.backup(self.dom, target, mode=mode, disks=[disk])
        assert r.mode == mode, r.reason
        return time.monotonic() - t

    def virtnbdbackup(self, level: str, out: str) -> float:
        self.cold()
        t = time.monotonic()
        run([self.vnb, "-d", self.name, "-l", level, "-i", "vda", "-o", out, "-n",
             "--scratchdir", self.work])   # not -S: --start-domain in virtnbdbackup 2.x
        return time.monotonic() - t

    def full_and_incremental(self) -> None:
        s = self.s
        ours_dir = os.path.join(self.work, "ours")
        vnb_dir = os.path.join(self.work, "vnb")
        local = os.path.join(self.work, "local.qcow2")
        data = f"{s['data'] // MiB} MiB"
        convert = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                   os.path.join(self.dir, "vda.qcow2"), local]
        t_warm = timed(run, convert)              # the source is still in the page cache
        os.unlink(local)
        self.cold()
        t_local = timed(run, convert[:2] + ["-t", "none"] + convert[2:])
        os.unlink(local)
        t_ours = self.ours(ours_dir, "full", "vda")
        t_vnb = self.virtnbdbackup("full", vnb_dir) if self.vnb else None
        self.row(f"1. full backup, {data} random data: local qemu-img convert, cold cache, "
                 f"-t none", f"{t_local:.2f} s")
        self.row(f"1. full backup, {data} random data: local qemu-img convert, source in "
                 f"page cache", f"{t_warm:.2f} s", f"this client takes {t_ours / t_warm:.2f}x")
        self.row(f"1. full backup, {data} random data: this client", f"{t_ours:.2f} s",
                 f"{t_ours / t_local:.2f}x the local copy", "<= 2x local")
        if t_vnb is not None:
            self.row(f"1. full backup, {data} random data: virtnbdbackup -l full",
                     f"{t_vnb:.2f} s", f"{t_vnb / t_ours:.2f}x slower than this client",
                     ">= 2x")
        else:
            self.row("1. full backup: virtnbdbackup -l full", "n/a (not installed)")
        self.scattered_writes("vda", s["scattered"], s["chunk"], s["data"])
        w = f"{s['scattered'] // MiB} MiB scattered writes"
        t_ours = self.ours(ours_dir, "incremental", "vda")
        t_vnb = self.virtnbdbackup("inc", vnb_dir) if self.vnb else None
        self.row(f"2. incremental after {w}: this client", f"{t_ours:.2f} s")
        if t_vnb is not None:
            self.row(f"2. incremental after {w}: virtnbdbackup -l inc", f"{t_vnb:.2f} s",
                     f"{t_vnb / t_ours:.2f}x slower than this client", ">= 2x")
        shutil.rmtree(vnb_dir, ignore_errors=True)
        shutil.rmtree(ours_dir, ignore_errors=True)

    # --- 3 ----------------------------------------------------------------------------
    def sparse(self) -> None:
        s = self.s
        times = {}
        for dev, size in (("vdb", s["sparse_small"]), ("vdc", s["sparse_huge"])):
            d = os.path.join(self.work, f"sparse-{dev}")
            t_full = self.ours(d, "full", dev)
            self.scattered_writes(dev, s["sparse_data"], s["sparse_chunk"], size)
            times[dev] = self.ours(d, "incremental", dev)
            self.row(f"3. sparse {size // GiB} GiB disk: full backup (empty)", f"{t_full:.2f} s")
            self.row(f"3. sparse {size // GiB} GiB disk: incremental, "
                     f"{s['sparse_data'] // MiB} MiB written", f"{times[dev]:.2f} s")
            shutil.rmtree(d, ignore_errors=True)
        factor = s["sparse_huge"] // s["sparse_small"]
        self.row(f"3. incremental time, {factor}x larger disk, same data",
                 f"{times['vdc'] / times['vdb']:.2f}x", "", "~1x")

    # --- 4 ----------------------------------------------------------------------------
    def latency(self) -> None:
        small = [d for d in self.devs if d not in ("vda", "vdb", "vdc")]
        pauses: list[float] = []

        class PauseLog(logging.Handler):      # "guest paused %.1f ms" from snapshots.py
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().count("guest paused"):
                    pauses.append(float(record.getMessage().split("guest paused ")[1].split()[0]))

        snaplog = logging.getLogger("libvirt_fleece.snapshots")
        snaplog.setLevel(logging.DEBUG)
        snaplog.addHandler(PauseLog())
        for n in self.s["disks"]:
            devs = small[:n]
            snap_t, exp_t, lv_t = [], [], []
            pauses.clear()
            for _ in range(self.s["repeats"]):
                xml = "<domainblocksnapshot><name>lat</name>%s</domainblocksnapshot>" % \
                    "".join(f"<disk name='{d}'/>" for d in devs)
                snap_t.append(timed(lf.blockSnapshotCreateXML, self.dom, xml))
                lf.blockSnapshotLookupByName(self.dom, "lat").delete()
                sock = os.path.join(self.work, "lat.sock")

                def both():
                    lf.blockSnapshotCreateXML(self.dom, xml)
                    lf.blockExportStart(self.dom, (
                        f"<domainblockexport type='nbd'><address type='unix' socket='{sock}'/>"
                        + "".join(f"<disk name='{d}' snapshot='lat'/>" for d in devs)
                        + "</domainblockexport>"))
                exp_t.append(timed(both))
                lf.blockSnapshotLookupByName(self.dom, "lat").delete(
                    lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
                lv = (f"<domainbackup mode='pull'><server transport='unix' "
                      f"socket='/var/tmp/fleece-bench-lv-{os.getpid()}.sock'/><disks>"
                      + "".join(f"<disk name='{d}' backup='yes' type='file'><scratch file="
                                f"'{self.work}/scratch-{d}.qcow2'/></disk>" for d in devs)
                      + "</disks></domainbackup>")
                lv_t.append(timed(self.dom.backupBegin, lv, None))
                self.dom.abortJob()
                while self.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                    time.sleep(0.05)
            a, b, c = (statistics.median(x) * 1000 for x in (snap_t, exp_t, lv_t))
            self.row(f"4. set-up, {n} disk(s): blockSnapshotCreateXML", f"{a:.0f} ms",
                     f"{a / c:.2f}x backupBegin", "<= 1x")
            self.row(f"4. set-up, {n} disk(s): snapshot + blockExportStart", f"{b:.0f} ms",
                     f"{b / c:.2f}x backupBegin")
            self.row(f"4. set-up, {n} disk(s): libvirt backupBegin (pull)", f"{c:.0f} ms")
            if pauses:
                self.row(f"4. guest vCPUs paused, {n} disk(s) (max of {len(pauses)})",
                         f"{max(pauses):.1f} ms")

    # --- 6 ----------------------------------------------------------------------------
    def checkpoint_cost(self) -> None:
        """Snapshot with vs without a checkpoint; export from the oldest of N checkpoints."""
        dev = "vdd"
        xml = f"<domainblocksnapshot><name>c%d</name><disk name='{dev}'/></domainblocksnapshot>"
        n = self.s["checkpoints"]
        plain, with_cp = [], []
        for i in range(n):
            plain.append(timed(lf.blockSnapshotCreateXML, self.dom, xml % (10_000 + i)))
            lf.blockSnapshotLookupByName(self.dom, f"c{10_000 + i}").delete()
            with_cp.append(timed(lf.blockSnapshotCreateXML, self.dom, xml % i,
                                 lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT))
            lf.blockSnapshotLookupByName(self.dom, f"c{i}").delete()
        a, b = statistics.median(plain) * 1000, statistics.median(with_cp) * 1000
        self.row(f"6. snapshot of 1 disk, no checkpoint (median of {n})", f"{a:.0f} ms")
        self.row(f"6. snapshot of 1 disk, with a checkpoint (median of {n})", f"{b:.0f} ms",
                 f"{b / a:.2f}x without", "~1x")
        lf.blockSnapshotCreateXML(self.dom, xml % 99_999)
        t = timed(lf.blockExportStart, self.dom,
                  f"<domainblockexport type='nbd'><address type='unix' socket="
                  f"'{self.work}/cp.sock'/><disk name='{dev}' snapshot='c99999' "
                  f"checkpoint='c0'/></domainblockexport>")
        self.row(f"6. export from the oldest of {n} checkpoints", f"{t * 1000:.0f} ms", "",
                 "<< 1 s")
        lf.blockSnapshotLookupByName(self.dom, "c99999").delete(
            lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
        for c in reversed(lf.blockCheckpointList(self.dom)):
            if c.getName().startswith("c"):
                c.delete()

    # --- 5 ----------------------------------------------------------------------------
    def guest_writes(self) -> None:
        total = self.s["guest_write"]
        chunk = 4 * MiB

        def write_all(pattern: int) -> float:
            t = time.monotonic()
            for off in range(0, total, chunk):
                hmp(self.dom, f'qemu-io -d {self.qdev("vda")} '
                              f'"write -P {pattern} {off} {chunk}"')
            return time.monotonic() - t

        write_all(1)            # allocate the range first: both runs overwrite
        without = min(write_all(2), write_all(3))
        lf.blockSnapshotCreateXML(self.dom, "<domainblocksnapshot><name>w</name>"
                                            "<disk name='vda'/></domainblocksnapshot>")
        try:
            with_snap = write_all(4)
        finally:
            lf.blockSnapshotLookupByName(self.dom, "w").delete()
        mb = total / MiB
        self.row(f"5. guest writes, {mb:.0f} MiB, no snapshot", f"{mb / without:.0f} MiB/s")
        self.row(f"5. guest writes, {mb:.0f} MiB, snapshot (copy-before-write)",
                 f"{mb / with_snap:.0f} MiB/s", f"{with_snap / without:.2f}x the time")

    def table(self) -> str:
        head = ("measurement", "result", "ratio", "target")
        widths = [max(len(r[i]) for r in self.rows + [head]) for i in range(4)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), "-" * (sum(widths) + 6)] + [line(r) for r in self.rows])


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) // 1024 for ln in open("/proc/meminfo")
               if ln.startswith("MemTotal"))
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem / 1024:.0f} GiB RAM, "
            f"{'KVM' if vmlib.kvm_usable() else 'TCG'}, {platform.platform()}, "
            f"qemu-img {run(['qemu-img', '--version']).stdout.split()[2]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="small sizes (seconds, for CI)")
    p.add_argument("--workdir", default="/var/tmp",
                   help="where backups and scratch files go (default /var/tmp)")
    args = p.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("qemu:///system")
    work = tempfile.mkdtemp(prefix="fleece-bench-", dir=args.workdir)
    os.chmod(work, 0o755)       # qemu (not root) opens libvirt's scratch files in here
    b = Bench(conn, size, work)
    try:
        b.setup()
        b.full_and_incremental()
        b.sparse()
        b.latency()
        b.checkpoint_cost()
        b.guest_writes()
    finally:
        b.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"run: {'smoke' if args.smoke else 'full'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: "
          f"{load}")
    print(b.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
