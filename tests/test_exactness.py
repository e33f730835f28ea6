# SPDX-License-Identifier: LGPL-2.1-or-later
"""Exactness tier: every reader of a snapshot gets, byte for byte, the disk at the snapshot's
instant, while the guest writes, zeroes and discards around it (issue #10).

The guest's I/O goes through the real device path (HMP qemu-io). A bytearray model of each disk
follows it: a snapshot's model is a copy of the live model taken at the snapshot's instant and
never changes afterwards. Readers: libnbd with structured replies on and off (fixed, seeded list
of reads from 512 bytes to 8 MiB), block status (base:allocation), ``qemu-img convert``,
``nbdcopy``, and the backup client's points. Every check runs and the test fails at the end with
the list of failed checks and the seed: ``FLEECE_EXACTNESS_SEED=N`` replays a run.
"""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
import subprocess
import threading
import time
from typing import Callable, Optional

import libvirt_qemu
import nbd
import pytest
from lxml import etree

import libvirt_fleece as lf
from libvirt_fleece import backup as bk
from libvirt_fleece import snapshots as snapshots_mod
from conftest import plugin_leftovers
from vm import dirty_clusters

pytestmark = [pytest.mark.integration, pytest.mark.exactness]

KiB = 1024
MiB = 1 << 20
CL = 64 * KiB               # qcow2 cluster (and dirty-bitmap granularity)
SIZE = 32 * MiB
READS = 60                  # random libnbd reads per connection (fixed: replayable)
STATUS_QUERIES = 40         # random block-status queries per export
HOLE_OR_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO
CHECKPOINT = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT
STOP_EXPORTS = lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS


# --- seed and the list of checks ----------------------------------------------------------------

@pytest.fixture(scope="module")
def seed(request) -> int:
    """FLEECE_EXACTNESS_SEED, or a fresh one; shown in the output with and without -s."""
    env = os.environ.get("FLEECE_EXACTNESS_SEED")
    value = int(env) if env else secrets.randbelow(1_000_000)
    line = f"exactness seed: {value} (replay: FLEECE_EXACTNESS_SEED={value})"
    print(line)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    return value


@pytest.fixture
def rng(seed, request) -> random.Random:
    """One stream per test, so that a test replays alone (-k) as in the whole tier."""
    return random.Random(f"{seed}:{request.node.name}")


class Checks:
    """Named checks of one test; all run, the test fails at the end listing the failed ones."""

    def __init__(self, seed: int, test: str) -> None:
        self.seed, self.test = seed, test
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.last = time.monotonic()

    def expect(self, name: str, problems: list[str]) -> None:
        took, self.last = time.monotonic() - self.last, time.monotonic()
        name_t = f"{name} ({took:.1f} s)"
        if problems:
            shown = problems[:4] + ([f"... {len(problems) - 4} more"] if len(problems) > 4 else [])
            self.failed.append(f"{name}: " + "; ".join(shown))
            print(f"FAIL {name_t}: {shown}")
        else:
            self.passed.append(name)
            print(f"ok   {name_t}")

    def finish(self) -> None:
        if self.failed:
            pytest.fail(f"exactness seed: {self.seed} (replay: FLEECE_EXACTNESS_SEED={self.seed})"
                        f"\n{len(self.failed)} of {len(self.failed) + len(self.passed)} checks "
                        f"of {self.test} failed:\n  " + "\n  ".join(self.failed), pytrace=False)


@pytest.fixture
def checks(seed, request) -> Checks:
    print(f"exactness seed: {seed}")
    return Checks(seed, request.node.name)


# --- the model ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Op:
    """One guest request: write (pattern), zero, zero-unmap or discard of [off, off + n)."""
    kind: str
    off: int
    n: int
    pattern: int = 0

    def qemu_io(self) -> str:
        return {"write": f"write -P 0x{self.pattern:02x} {self.off} {self.n}",
                "zero": f"write -z {self.off} {self.n}",
                "zero-unmap": f"write -z -u {self.off} {self.n}",
                "discard": f"discard {self.off} {self.n}"}[self.kind]

    def clusters(self) -> set[int]:
        return set(range(self.off // CL, (self.off + self.n - 1) // CL + 1))

    def __str__(self) -> str:
        return f"{self.kind}@{self.off}+{self.n}"


class Model:
    """What a disk holds. A discard may or may not take effect (qcow2 drops only whole clusters,
    a filter may ignore it): its bytes are marked ``maybe_zero``, valid as before or as zero,
    until a reader's answer settles them (:meth:`settle`)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.maybe_zero = bytearray(size)

    def copy(self) -> "Model":
        m = Model(0)
        m.data, m.maybe_zero = bytearray(self.data), bytearray(self.maybe_zero)
        return m

    def apply(self, op: Op) -> None:
        end = op.off + op.n
        if op.kind == "discard":
            self.maybe_zero[op.off:end] = b"\1" * op.n
        else:
            self.data[op.off:end] = bytes([op.pattern]) * op.n
            self.maybe_zero[op.off:end] = bytes(op.n)

    def wrong(self, got: bytes, off: int) -> list[tuple[int, int, int, int]]:
        """Ranges [start, end) of ``got`` (read at ``off``) that the model rules out, with the
        expected and the read value of their first byte."""
        exp = self.data[off:off + len(got)]
        if exp == got:
            return []
        out: list[tuple[int, int, int, int]] = []
        step = 4096
        for i in range(0, len(got), step):
            g, e = got[i:i + step], exp[i:i + step]
            if g == e:
                continue
            mz = self.maybe_zero[off + i:off + i + len(g)]
            for j in range(len(g)):
                if g[j] != e[j] and not (g[j] == 0 and mz[j]):
                    pos = off + i + j
                    if out and out[-1][1] == pos:
                        out[-1] = (out[-1][0], pos + 1, out[-1][2], out[-1][3])
                    else:
                        out.append((pos, pos + 1, e[j], g[j]))
        return out

    def settle(self, got: bytes, off: int) -> None:
        """Take a checked answer as the value of the undecided bytes it covers."""
        for i in range(0, len(got), CL):
            mz = self.maybe_zero[off + i:off + i + CL]
            if any(mz):
                for j, undecided in enumerate(mz):
                    if undecided:
                        self.data[off + i + j] = got[i + j]
                self.maybe_zero[off + i:off + i + len(mz)] = bytes(len(mz))

    def may_read_zero(self, off: int, n: int) -> bool:
        return not self.wrong(bytes(n), off)


def describe(wrong: list[tuple[int, int, int, int]], limit: int = 3) -> str:
    parts = [f"[{a}, {b}) clusters {a // CL}-{(b - 1) // CL} expected 0x{e:02x} got 0x{g:02x}"
             for a, b, e, g in wrong[:limit]]
    more = f" (+{len(wrong) - limit} ranges)" if len(wrong) > limit else ""
    return ", ".join(parts) + more


# --- guest I/O ----------------------------------------------------------------------------------

class GuestDisk:
    """A disk of a test domain and the model of its live content."""

    def __init__(self, t, dev: str, size: int) -> None:
        self.t, self.dev = t, dev
        self.live = Model(size)
        self.lock = threading.Lock()

    def do(self, ops: list[Op], pause: float = 0.0) -> None:
        for op in ops:
            cmd = f'qemu-io -d {self.t.qdev(self.dev)} "{op.qemu_io()}"'
            with self.lock:
                out = libvirt_qemu.qemuMonitorCommand(
                    self.t.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
                if out.strip():
                    raise AssertionError(f"guest {op} failed: {out.strip()}")
                self.live.apply(op)
            if pause:
                time.sleep(pause)


class Writer(threading.Thread):
    """Runs a fixed list of guest requests in the background, all of them, in order."""

    def __init__(self, disk: GuestDisk, ops: list[Op]) -> None:
        super().__init__(daemon=True)
        self.disk, self.ops = disk, ops
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.disk.do(self.ops, pause=0.005)
        except BaseException as e:  # noqa: BLE001 - re-raised by finish()
            self.error = e

    def finish(self) -> None:
        self.join(120)
        assert not self.is_alive(), "the background guest writer hangs"
        if self.error:
            raise self.error


def random_op(rng: random.Random, size: int, kinds=("write", "zero", "zero-unmap", "discard")
              ) -> Op:
    """A request aligned to clusters, to 512 bytes on or across a cluster boundary, or odd."""
    kind = rng.choice(kinds)
    shape = rng.choice(("cluster", "sector", "odd"))
    if shape == "cluster":
        off, n = rng.randrange(size // CL) * CL, CL * rng.randint(1, 3)
    elif shape == "sector":
        off = max(0, rng.randrange(1, size // CL) * CL + rng.randint(-64, 63) * 512)
        n = 512 * rng.randint(1, 3 * CL // 512)
    else:
        off, n = rng.randrange(size - 1), rng.randint(1, 3 * CL)
    return Op(kind, off, min(n, size - off), rng.randint(1, 255) if kind == "write" else 0)


def random_ops(rng: random.Random, count: int, size: int = SIZE, **kw) -> list[Op]:
    return [random_op(rng, size, **kw) for _ in range(count)]


def fill_ops(rng: random.Random, size: int = SIZE) -> list[Op]:
    """Data before a snapshot: 32 clusters of distinct patterns at the start (the issue's
    clusters), big extents elsewhere, then small writes and zeroes on top."""
    ops = [Op("write", i * CL, CL, 0x80 + i) for i in range(32)]
    for _ in range(8):
        n = rng.randrange(4, 33) * CL
        ops.append(Op("write", rng.randrange(2 * MiB, size - n, 512), n, rng.randint(1, 255)))
    return ops + random_ops(rng, 24, size, kinds=("write", "write", "zero", "zero-unmap"))


def issue_ops(base: int = 0) -> list[Op]:
    """Issue #10: overwrite cluster 1, zero cluster 5 (with and without unmap, discard)."""
    return [Op("write", base + CL, CL, 0x5A), Op("zero", base + 5 * CL, CL),
            Op("zero-unmap", base + 9 * CL, CL), Op("discard", base + 13 * CL, CL),
            Op("write", base + 17 * CL + 512, 3 * 512, 0x5B),
            Op("zero", base + 21 * CL + 1000, 777)]


# --- readers ------------------------------------------------------------------------------------

def connect(sock: str, name: str, structured: bool = True, contexts=()) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(name)
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_unix(sock)
    return h


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def settle_by_clusters(sock: str, name: str, model: Model) -> list[str]:
    """Read the export one cluster per request (right on QEMU 7.2, field notes), check it and
    settle the model's undecided (discarded) bytes with it."""
    h = connect(sock, name, structured=False)
    try:
        problems = []
        for off in range(0, h.get_size(), CL):
            got = h.pread(CL, off)
            w = model.wrong(got, off)
            if w:
                problems.append(f"cluster {off // CL}: {describe(w)}")
            else:
                model.settle(got, off)
        return problems
    finally:
        h.shutdown()


def read_plan(rng: random.Random, size: int, count: int, hot: list[int]) -> list[tuple[int, int]]:
    """Reads that start in each ``hot`` cluster and run into the next ones (the issue's shape),
    then ``count`` random ones, 512 bytes to 8 MiB, 512-aligned or odd."""
    plan = []
    for c in hot:
        plan += [(c * CL, 2 * CL), (c * CL + 512, CL), (max(0, (c - 1) * CL), 3 * CL)]
    for _ in range(count):
        n = int(2 ** rng.uniform(9, 23))
        if rng.random() < 0.6:
            n = max(512, n // 512 * 512)
            off = rng.randrange(0, size - 511, 512)
        else:
            off = rng.randrange(size - 1)
        plan.append((off, min(n, size - off)))
    return [(o, min(n, size - o)) for o, n in plan if o < size]


def check_reads(sock: str, name: str, model: Model, plan: list[tuple[int, int]],
                structured: bool, between: Optional[Callable[[int], None]] = None) -> list[str]:
    """Read every (offset, length) of ``plan`` on one connection; ``between(i)`` runs before
    read i (guest I/O while the export is read)."""
    h = connect(sock, name, structured)
    problems = []
    try:
        for i, (off, n) in enumerate(plan):
            if between:
                between(i)
            w = model.wrong(h.pread(n, off), off)
            if w:
                problems.append(f"read {off}+{n}: {describe(w)}")
    finally:
        h.shutdown()
    return problems


def extents(h: nbd.NBD, ctx: str, off: int, end: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of meta context ``ctx`` from ``off`` to at least ``end``."""
    out: list[tuple[int, int, int]] = []
    pos = off
    while pos < end:
        got: list[tuple[int, int, int]] = []

        def cb(meta, start, entries, err):
            if meta == ctx:
                p = start
                for length, flags in zip(entries[::2], entries[1::2]):
                    got.append((p, length, flags))
                    p += length
            return 0

        h.block_status(end - pos, pos, cb)
        assert got and got[0][0] == pos, f"block status at {pos} answered {got[:1]}"
        out += got
        pos = got[-1][0] + got[-1][1]
    return out


def check_block_status(sock: str, name: str, model: Model, rng: random.Random,
                       hot: list[int]) -> list[str]:
    """No range the model says holds non-zero data is reported as a hole or as zero: over the
    whole export, from each hot cluster over two clusters, and at random ranges."""
    ctx = "base:allocation"
    h = connect(sock, name, contexts=(ctx,))
    size = h.get_size()
    queries = [(0, size)] + [(c * CL, c * CL + 2 * CL) for c in hot]
    for _ in range(STATUS_QUERIES):
        off = rng.randrange(0, size - 512, 512)
        queries.append((off, min(size, off + int(2 ** rng.uniform(9, 24)))))
    problems = []
    try:
        for off, end in queries:
            for pos, length, flags in extents(h, ctx, off, end):
                if flags & HOLE_OR_ZERO and not model.may_read_zero(pos, length):
                    kind = "zero" if flags & nbd.STATE_ZERO else "hole"
                    problems.append(f"query {off}..{end}: {pos}+{length} reported {kind} "
                                    f"(flags {flags}) but holds data at "
                                    f"{describe(model.wrong(bytes(length), pos), 1)}")
    finally:
        h.shutdown()
    return problems


def check_file(path: str, model: Model) -> list[str]:
    with open(path, "rb") as f:
        got = f.read()
    if len(got) != len(model.data):
        return [f"{len(got)} bytes instead of {len(model.data)}"]
    w = model.wrong(got, 0)
    return [describe(w, 5)] if w else []


def check_tool(cmd: list[str], out: str, model: Model) -> list[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode:
        return [f"{' '.join(cmd)} failed: {r.stderr.strip()}"]
    problems = check_file(out, model)
    os.unlink(out)
    return problems


def check_export(checks: Checks, label: str, sock: str, name: str, model: Model,
                 rng: random.Random, disk: GuestDisk, hot: list[int], tmp: str) -> None:
    """Every reader of export ``name`` against ``model``; the guest keeps writing during the
    interleaved reads and the whole-disk copies (the model stays that of the instant)."""
    size = len(model.data)
    checks.expect(f"{label}: one-cluster reads", settle_by_clusters(sock, name, model))
    for structured in (True, False):
        sr = "on" if structured else "off"
        plan = read_plan(rng, size, READS, hot)
        checks.expect(f"{label}: libnbd reads, structured replies {sr}",
                      check_reads(sock, name, model, plan, structured))
        ops = random_ops(rng, READS // 4)
        plan = read_plan(rng, size, READS, [])

        def between(i, ops=ops):
            if i % 4 == 0 and i // 4 < len(ops):
                disk.do([ops[i // 4]])

        checks.expect(f"{label}: libnbd reads between guest requests, structured replies {sr}",
                      check_reads(sock, name, model, plan, structured, between))
    checks.expect(f"{label}: block status base:allocation",
                  check_block_status(sock, name, model, rng, hot))
    out = os.path.join(tmp, f"{name}.raw")
    writer = Writer(disk, random_ops(rng, 20))
    writer.start()
    checks.expect(f"{label}: qemu-img convert while the guest writes",
                  check_tool(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock, name),
                              out], out, model))
    writer.finish()
    checks.expect(f"{label}: qemu-img convert -W -m 16 -S 64k",
                  check_tool(["qemu-img", "convert", "-W", "-m", "16", "-S", "64k", "-f", "raw",
                              "-O", "raw", uri(sock, name), out], out, model))
    writer = Writer(disk, random_ops(rng, 20))
    writer.start()
    checks.expect(f"{label}: nbdcopy while the guest writes",
                  check_tool(["nbdcopy", uri(sock, name), out], out, model))
    writer.finish()
    checks.expect(f"{label}: nbdcopy --requests=16 --request-size=4M",
                  check_tool(["nbdcopy", "--requests=16", "--request-size=4194304",
                              uri(sock, name), out], out, model))


# --- plugin helpers -----------------------------------------------------------------------------

def snapshot(dom, name: str, flags: int = 0):
    return lf.blockSnapshotCreateXML(
        dom, f"<domainblocksnapshot><name>{name}</name><disk name='vda'/>"
             f"</domainblocksnapshot>", flags)


def export(dom, snap: str, since: Optional[str] = None) -> tuple[str, str, Optional[str]]:
    """Export vda of ``snap``; return (socket, export name, dirty bitmap or None)."""
    cp = f" checkpoint='{since}'" if since else ""
    lf.blockExportStart(dom, f"<domainblockexport type='nbd'><disk name='vda' "
                             f"snapshot='{snap}'{cp}/></domainblockexport>")
    live = etree.fromstring(lf.blockExportList(dom)[0])
    disk = live.find(f"disk[@snapshot='{snap}']")
    return live.find("address").get("socket"), disk.get("exportname"), disk.get("bitmap")


def hot_clusters(ops: list[Op], limit: int = 24) -> list[int]:
    return sorted({c for op in ops for c in op.clusters()})[:limit]


def assert_clean(dom) -> None:
    assert lf.blockSnapshotList(dom) == [] and lf.blockExportList(dom) == []
    assert plugin_leftovers(dom) == {}


# --- the tests ----------------------------------------------------------------------------------

def test_snapshot_export_equals_its_instant_for_every_reader(make_vm, rng, checks, tmp_path):
    """After the snapshot the guest writes, zeroes (with and without unmap) and discards,
    aligned, 512-byte and odd, on and across cluster boundaries, also while the export is read:
    every libnbd read (structured replies on and off), block status, qemu-img convert and
    nbdcopy still give the disk at the snapshot's instant."""
    t = make_vm(disks=1, size_mib=SIZE // MiB, discard=True, tag="exact")
    disk = GuestDisk(t, "vda", SIZE)
    disk.do(fill_ops(rng))
    snapshot(t.dom, "s")
    at_snapshot = disk.live.copy()
    after = issue_ops() + random_ops(rng, 40)
    disk.do(after)
    sock, name, _ = export(t.dom, "s")
    check_export(checks, "snapshot s", sock, name, at_snapshot, rng, disk,
                 hot_clusters(after), str(tmp_path))
    lf.blockSnapshotLookupByName(t.dom, "s").delete(STOP_EXPORTS)
    assert_clean(t.dom)
    checks.finish()


def test_stacked_snapshots_each_equal_their_own_instant(make_vm, rng, checks, tmp_path):
    """Two snapshots of one disk, both exported: each reads as the disk at its own instant,
    with the guest writing, zeroing and discarding after both and during the reads."""
    t = make_vm(disks=1, size_mib=SIZE // MiB, discard=True, tag="exact")
    disk = GuestDisk(t, "vda", SIZE)
    disk.do(fill_ops(rng))
    snapshot(t.dom, "older")
    at_older = disk.live.copy()
    between = issue_ops() + random_ops(rng, 30)
    disk.do(between)
    snapshot(t.dom, "newer")
    at_newer = disk.live.copy()
    after = issue_ops(base=2 * CL) + random_ops(rng, 30)
    disk.do(after)
    sock, old_name, _ = export(t.dom, "older")
    _, new_name, _ = export(t.dom, "newer")
    hot = hot_clusters(between + after)
    check_export(checks, "older snapshot", sock, old_name, at_older, rng, disk, hot,
                 str(tmp_path))
    check_export(checks, "newer snapshot", sock, new_name, at_newer, rng, disk, hot,
                 str(tmp_path))
    for s in ("newer", "older"):
        lf.blockSnapshotLookupByName(t.dom, s).delete(STOP_EXPORTS)
    assert_clean(t.dom)
    checks.finish()


def test_dirty_map_covers_every_change_since_the_checkpoint(make_vm, rng, checks, tmp_path):
    """The export of a snapshot since a checkpoint marks dirty every cluster the guest wrote or
    zeroed since, and every discarded one whose content changed: the checkpoint's image patched
    with the dirty clusters is the snapshot. Its data is exact too, while the guest goes on."""
    t = make_vm(disks=1, size_mib=SIZE // MiB, discard=True, tag="exact")
    disk = GuestDisk(t, "vda", SIZE)
    disk.do(fill_ops(rng))
    snapshot(t.dom, "c0", CHECKPOINT).delete()
    at_c0 = disk.live.copy()
    since = issue_ops(base=CL) + random_ops(rng, 40)
    disk.do(since)
    snapshot(t.dom, "c1", CHECKPOINT)
    at_c1 = disk.live.copy()
    after = issue_ops() + random_ops(rng, 30)
    disk.do(after)
    sock, name, bitmap = export(t.dom, "c1", since="c0")
    checks.expect("export c1 since c0 names a bitmap", [] if bitmap else ["no bitmap"])
    checks.expect("snapshot c1: one-cluster reads", settle_by_clusters(sock, name, at_c1))
    dirty = dirty_clusters(sock, name, bitmap)
    must = {c for op in since if op.kind != "discard" for c in op.clusters()}
    changed = {off // CL for off in range(0, SIZE, CL)
               if at_c1.data[off:off + CL] != at_c0.data[off:off + CL]}
    checks.expect("dirty map covers every cluster written or zeroed since c0",
                  [f"cluster {c} not dirty" for c in sorted(must - dirty)])
    checks.expect("dirty map covers every cluster changed since c0 (discards included)",
                  [f"cluster {c} changed, not dirty" for c in sorted(changed - dirty)])
    checks.expect("dirty map: only clusters the guest touched",
                  [f"cluster {c} dirty, untouched" for c in
                   sorted(dirty - {c for op in since for c in op.clusters()})])
    h = connect(sock, name)
    patched = at_c0.copy()
    for c in sorted(dirty):
        patched.data[c * CL:(c + 1) * CL] = h.pread(CL, c * CL)
    h.shutdown()
    checks.expect("c0 patched with the dirty clusters equals c1",
                  [describe(w)] if (w := at_c1.wrong(bytes(patched.data), 0)) else [])
    plan = read_plan(rng, SIZE, READS, hot_clusters(after))
    for structured in (True, False):
        checks.expect(f"snapshot c1 (exported with a bitmap): libnbd reads, structured replies "
                      f"{'on' if structured else 'off'}",
                      check_reads(sock, name, at_c1, plan, structured))
    checks.expect("snapshot c1 (exported with a bitmap): block status",
                  check_block_status(sock, name, at_c1, rng, hot_clusters(after)))
    lf.blockSnapshotLookupByName(t.dom, "c1").delete(STOP_EXPORTS)
    assert_clean(t.dom)
    checks.finish()


def test_backup_points_restore_to_their_instants(make_vm, rng, checks, tmp_path, monkeypatch):
    """A full and two incremental backups, each with guest writes, zeroes and discards right
    after its snapshot (before the copy is planned) and during the copy: every point restores
    byte for byte to the disk at its snapshot's instant."""
    t = make_vm(disks=1, size_mib=SIZE // MiB, discard=True, tag="exact")
    disk = GuestDisk(t, "vda", SIZE)
    disk.do(fill_ops(rng))
    target = str(tmp_path / "backup")
    real_create = snapshots_mod.create
    step: dict = {}

    def create(dom, xml, flags=0):
        """The backup's snapshot, then guest I/O at once and in the background."""
        snap = real_create(dom, xml, flags)
        if dom.UUIDString() == t.dom.UUIDString() and "model" not in step:
            step["model"] = disk.live.copy()
            disk.do(step["after"])
            step["writer"] = Writer(disk, step["during"])
            step["writer"].start()
        return snap

    monkeypatch.setattr(snapshots_mod, "create", create)
    points = []
    for i, mode in enumerate(("full", "incremental", "incremental")):
        base = i * 24 * CL
        disk.do([Op("write", base + c * CL, CL, 0x30 + i * 8 + c % 8) for c in range(24)])
        step.clear()
        step["after"] = issue_ops(base) + random_ops(rng, 12)
        step["during"] = random_ops(rng, 40)
        result = bk.backup(t.dom, target, mode=mode)
        assert "writer" in step, "the backup's snapshot was not taken through snapshots.create"
        step["writer"].finish()
        checks.expect(f"backup {i} is {mode}",
                      [] if result.mode == mode else [f"it is {result.mode}"])
        points.append(step["model"])
    assert_clean(t.dom)
    for i, model in enumerate(points):
        out = str(tmp_path / f"point{i}.raw")
        bk.restore(target, "vda", out, point=i)
        checks.expect(f"backup point {i} restores to its instant", check_file(out, model))
    checks.finish()
