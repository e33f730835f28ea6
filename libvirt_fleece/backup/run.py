# SPDX-License-Identifier: LGPL-2.1-or-later
"""One backup run: decide full or incremental, snapshot, export, copy, tear down.

Each backup takes a block snapshot with a checkpoint (named
``backup-<UTC time>``), exports it read-only on a unix socket in a fresh
root-only directory, copies the data (:mod:`.copy`, one thread per disk) and
tears the export and snapshot down again, on errors, Ctrl-C and SIGTERM too;
a detached guard (:mod:`.guard`) does it if the process is killed
(:mod:`.recovery`). The checkpoint stays: it is the base of the next
incremental backup. Older checkpoints are not deleted (each costs a bitmap
of about 2 MiB per TiB of disk in the image); delete them with
``blockCheckpointList`` / ``BlockCheckpoint.delete`` or ``virsh-fleece
blockcheckpoint-delete`` when you no longer want incrementals from them.

Each point records what wrote it (plugin and qemu version, read path; see
:mod:`.writer`); ``auto`` takes a full backup rather than build on a point
an affected version wrote. The directory layout is described in
:mod:`.manifest`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Iterator, NoReturn, Optional

import libvirt
from lxml import etree

from .. import __version__
from . import copy as backup_copy, files, recovery
from .. import checkpoints, disks as disklib, errors, exports, faults, snapshots, virt
from ..qemu import readpath, tools
from .chain import OpenChain
from .digest import LayerDigest
from .dir import BackupDir, fd_path
from .guard import Guard
from .manifest import (BackupTargetError, DirLock, DiskEntry, Journal, Manifest, Point,
                       Writer)
from .progress import Counter, ProgressCallback, ProgressEvent
from ..units import human_size
from .writer import suspect_reason
from . import manifest as mf

if TYPE_CHECKING:
    import nbd

log = logging.getLogger(__name__)

MODES = ("auto", "full", "incremental")
NAME_PREFIX = "backup-"


class NoValidChain(errors.OperationInvalid):
    """An incremental backup was asked for, but the directory has no usable chain."""


@dataclasses.dataclass
class BackupResult:
    point: Point
    reason: str
    directory: str

    @property
    def mode(self) -> str:
        return self.point.mode

    @property
    def copied(self) -> int:
        return sum(d.copied for d in self.point.disks)


# --- deciding what to do -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Disk:
    name: str
    size: int


def _domain_disks(dom: libvirt.virDomain, wanted: Optional[list[str]]) -> list[_Disk]:
    """The disks to back up with their sizes. Raises NotFound or InvalidArgument."""
    all_disks = disklib.parse_domain_disks(virt.domain_xml(dom))
    by_name = {d.target: d for d in all_disks}
    if wanted:
        if len(set(wanted)) != len(wanted):
            raise errors.InvalidArgument("a disk is named twice")
        chosen = []
        for name in wanted:
            if name not in by_name:
                raise errors.NotFound(f"disk {name!r} not found in domain {dom.name()!r} "
                                      f"(its disks: {', '.join(by_name) or 'none'})")
            reason = by_name[name].unsupported_reason()
            if reason:
                raise errors.InvalidArgument(f"disk {name!r} cannot be backed up: {reason}")
            chosen.append(by_name[name])
    else:
        chosen = [d for d in all_disks if d.unsupported_reason() is None]
        if not chosen:
            raise errors.OperationInvalid(f"domain {dom.name()!r} has no disk that can be "
                                          f"backed up")
    for d in chosen:
        if d.format != "qcow2":
            raise errors.InvalidArgument(
                f"disk {d.target!r} is {d.format}: backups need checkpoints, which live in "
                f"qcow2 images; leave it out by naming the other disks with --disk")
    result = []
    for d in chosen:
        try:
            size = dom.blockInfo(d.target)[0]
        except libvirt.libvirtError as e:
            raise virt.translate(e, f"cannot get the size of disk {d.target!r}") from e
        result.append(_Disk(d.target, int(size)))
    return result


def _checkpoint_problem(dom: libvirt.virDomain, name: str) -> Optional[str]:
    """Why checkpoint ``name`` cannot be the base of an incremental (None: it can)."""
    try:
        xml = checkpoints.BlockCheckpoint(dom, name).getXMLDesc()     # one call, not two
    except errors.NotFound:
        return (f"checkpoint {name} of the last backup no longer exists (deleted, or the "
                f"domain's images were replaced)")
    root = etree.fromstring(xml.encode())
    if root.findtext("valid") == "yes":
        return None
    reasons = sorted({f"{d.get('name')}: {d.get('reason')}" for d in root.findall("disk")
                      if d.get("valid") == "no" and d.get("reason")})
    return f"checkpoint {name} of the last backup is invalid ({'; '.join(reasons) or 'unknown'})"


def _decide(dom: libvirt.virDomain, bdir: BackupDir, manifest: Manifest, disks: list[_Disk],
            mode: str) -> tuple[str, str, Optional[Point]]:
    """(mode, why, base point) for this run. Raises NoValidChain for an impossible
    incremental."""
    if mode == "full":
        return "full", "a full backup was asked for", None
    problem: Optional[str] = None
    last = manifest.points[-1] if manifest.points else None
    if last is None:
        problem = f"{bdir.path} holds no backup yet"
    else:
        before = {d.name: d.size for d in last.disks}
        now = {d.name: d.size for d in disks}
        if set(before) != set(now):
            problem = (f"the disks changed since point {last.index} (then "
                       f"{','.join(sorted(before))}, now {','.join(sorted(now))})")
        else:
            resized = [f"{n} from {before[n]} to {now[n]} bytes" for n in sorted(now)
                       if before[n] != now[n]]
            if resized:
                problem = f"disks were resized since point {last.index}: {', '.join(resized)}"
        if problem is None:
            missing = [d.file for d in last.disks if not bdir.exists(d.file)]
            if missing:
                problem = f"files of point {last.index} are missing: {', '.join(missing)}"
        if problem is None:
            problem = _checkpoint_problem(dom, last.checkpoint)
        if problem is None and mode == "auto":
            problem = suspect_reason(manifest, last)    # a fresh full one rather than build on it
        if problem is None:
            return ("incremental", f"checkpoint {last.checkpoint} of point {last.index} is valid",
                    last)
    if mode == "incremental":
        raise NoValidChain(f"cannot take an incremental backup: {problem}; take a full one "
                           f"(--full, or --auto which picks it)")
    return "full", problem, None


# --- the run -----------------------------------------------------------------------

def _utc() -> tuple[str, str]:
    now = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))


def _export_xml(sock: str, name: str, disks: list[_Disk], base: Optional[Point]) -> str:
    root = etree.Element("domainblockexport", type="nbd")
    etree.SubElement(root, "address", type="unix", socket=sock)
    for d in disks:
        attrs = {"name": d.name, "snapshot": name, "exportname": d.name}
        if base is not None:
            attrs["checkpoint"] = base.checkpoint
        etree.SubElement(root, "disk", attrs)
    return etree.tostring(root, encoding="unicode")


def _exported(dom: libvirt.virDomain, snapshot: str) -> dict[str, dict[str, str]]:
    """Disk -> the attributes of its <disk> in blockExportList's live document, for
    the exports of ``snapshot`` (one call serves the bitmaps and the read path).
    Raises the plugin's export errors."""
    out: dict[str, dict[str, str]] = {}
    for doc in exports.list_all(dom):
        for d in etree.fromstring(doc.encode()).findall("disk"):
            name = d.get("name")
            if d.get("snapshot") == snapshot and name:
                # lxml's attributes are str on Python 3 (its stubs also allow bytes)
                out[name] = {str(k): str(v) for k, v in d.attrib.items()}
    return out


def _bitmaps(exported: dict[str, dict[str, str]]) -> dict[str, str]:
    """Disk -> dirty bitmap name of our exports."""
    return {name: a["bitmap"] for name, a in exported.items() if a.get("bitmap")}


def _read_path(exported: dict[str, dict[str, str]]) -> Optional[str]:
    """How the exports read the snapshot (their ``readPath``): one value when all
    disks agree, "vda=overlay, vdb=snapshot-access" when not, None when no export
    says (versions whose exports do not record it)."""
    paths = {name: a.get("readPath") for name, a in sorted(exported.items())}
    if not any(paths.values()):
        return None
    if len(set(paths.values())) == 1:
        return next(iter(paths.values()))
    return ", ".join(f"{name}={path or 'unknown'}" for name, path in paths.items())


def _qemu_version(dom: libvirt.virDomain) -> Optional[str]:
    """The domain's qemu version from ``query-version`` ("7.2.22"); None, logged,
    when qemu cannot be asked (the record is informational; the backup goes on)."""
    try:
        return readpath.qemu_version(dom)
    except (errors.Error, KeyError, TypeError, ValueError) as e:
        log.warning("cannot ask domain %s for its qemu version (%s); the backup point "
                    "records none", dom.name(), e)
        return None


def _writer_info(dom: libvirt.virDomain, exported: dict[str, dict[str, str]]) -> Writer:
    """The point's writer record: this package, the domain's qemu, the read path."""
    return Writer(libvirt_fleece=__version__, qemu=_qemu_version(dom),
                  read_path=_read_path(exported))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into KeyboardInterrupt so teardown runs."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Optional[FrameType]) -> NoReturn:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _say(progress: Optional[ProgressCallback], text: str) -> None:
    log.info("%s", text)
    if progress is not None:
        progress(ProgressEvent("message", text=text))


def backup(dom: libvirt.virDomain, target_dir: str, mode: str = "auto",
           disks: Optional[list[str]] = None,
           progress: Optional[ProgressCallback] = None,
           in_flight: int = backup_copy.IN_FLIGHT) -> BackupResult:
    """Back up the domain's disks into ``target_dir`` (created if missing).

    ``mode``: ``full``, ``incremental`` (since the directory's newest point) or
    ``auto`` (incremental when the chain is usable, else full; the result says
    why). ``disks``: target names (default: every disk). ``progress`` gets
    :class:`ProgressEvent` objects.

    Raises BackupTargetError (not writable, foreign files, another domain's
    backups), BackupBusy, NoValidChain, NotFound / InvalidArgument (disks),
    CopyError, Cancelled, and the plugin's snapshot and export errors. On any
    failure the snapshot and export are gone and no file looks like a backup.
    """
    if mode not in MODES:
        raise errors.InvalidArgument(f"mode {mode!r} is not one of {', '.join(MODES)}")
    virt.check_domain(dom)
    directory = mf.check_target(target_dir, create=True)
    with BackupDir(directory) as bdir:      # every file through this descriptor
        return _backup_in(dom, bdir, mode, disks, progress, in_flight)


def _backup_in(dom: libvirt.virDomain, bdir: BackupDir, mode: str,
               disks: Optional[list[str]], progress: Optional[ProgressCallback],
               in_flight: int) -> BackupResult:
    """backup() in the opened directory ``bdir``; raises what backup() raises."""
    directory = bdir.path
    lock = DirLock(bdir, wait=30.0)
    try:
        recovery.recover(bdir, dom.connect())
        manifest = mf.load(bdir)
        uuid = dom.UUIDString()
        if manifest is not None and manifest.domain_uuid != uuid:
            raise BackupTargetError(
                f"{directory} holds the backups of domain {manifest.domain_name!r} "
                f"(UUID {manifest.domain_uuid}), not of {dom.name()!r} (UUID {uuid}); "
                f"use one directory per domain")
        foreign = mf.foreign_files(bdir, manifest)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise BackupTargetError(
                f"{directory} holds files that are not part of a backup ({shown}); use an "
                f"empty directory or one that this tool wrote")
        if manifest is None:
            manifest = Manifest(domain_name=dom.name(), domain_uuid=uuid)
        chosen = _domain_disks(dom, disks)
        mode, reason, base = _decide(dom, bdir, manifest, chosen, mode)
        files.tighten(bdir, manifest)
        _say(progress, f"{mode} backup of {dom.name()} ({', '.join(d.name for d in chosen)}): "
                       f"{reason}")
        with _sigterm_as_interrupt():
            guard = Guard(directory, lock.fd, bdir.fd)
            try:
                point = _run(dom, bdir, manifest, chosen, mode, reason, base, progress,
                             in_flight)
            finally:
                guard.done()
        return BackupResult(point=point, reason=reason, directory=directory)
    finally:
        lock.release()


def _run(dom: libvirt.virDomain, bdir: BackupDir, manifest: Manifest, disks: list[_Disk],
         mode: str, reason: str, base: Optional[Point], progress: Optional[ProgressCallback],
         in_flight: int) -> Point:
    started = time.monotonic()
    when, stamp = _utc()
    name = f"{NAME_PREFIX}{stamp}"
    index = manifest.points[-1].index + 1 if manifest.points else 0
    journal = Journal(uri=dom.connect().getURI(), domain_uuid=dom.UUIDString(),
                      snapshot=name, checkpoint=name,
                      parts=[mf.file_name(d.name, index, part=True) for d in disks],
                      started=time.time())
    recovery.save_journal(bdir, journal)
    faults.stoppoint("backup:journal-saved")
    sockdir = tempfile.mkdtemp(prefix="libvirt-fleece-backup-")     # mode 0700
    sock = os.path.join(sockdir, "nbd.sock")
    committed = False
    try:
        for attempt in range(2, 100):
            try:
                snapshots.create(dom, "<domainblocksnapshot><name>%s</name>%s"
                                 "</domainblocksnapshot>" % (name, "".join(
                                     f"<disk name='{d.name}'/>" for d in disks)),
                                 snapshots.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT)
                break
            except errors.AlreadyExists:        # two backups within one second
                if attempt == 99:
                    raise
                name = f"{NAME_PREFIX}{stamp}.{attempt}"
                journal.snapshot = journal.checkpoint = name
                recovery.save_journal(bdir, journal)
        exports.start(dom, _export_xml(sock, name, disks, base))
        exported = _exported(dom, name)
        bitmaps = _bitmaps(exported) if base is not None else {}
        writer = _writer_info(dom, exported)
        t_setup = time.monotonic()
        entries = _copy_all(bdir, manifest, disks, index, base, sock, bitmaps, progress,
                            in_flight)
        t_copy = time.monotonic()
        dom = _alive(dom, journal)
        recovery.teardown(dom, name)
        log.debug("backup %s: set-up %.2f s, copy %.2f s, teardown %.2f s",
                  name, t_setup - started, t_copy - t_setup, time.monotonic() - t_copy)
        point = Point(index=index, time=when, mode=mode, checkpoint=name, disks=entries,
                      reason=reason, duration=round(time.monotonic() - started, 3),
                      writer=writer)
        manifest.points.append(point)
        mf.save(bdir, manifest)       # from here on the point exists (roll forward)
        committed = True
        for e in entries:
            bdir.rename(e.file + ".part", e.file)
        bdir.fsync()
        recovery.remove_journal(bdir)
        _say(progress, f"point {index} ({mode}) done: {_human(point_copied(point))} copied "
                       f"in {point.duration:.1f} s")
        return point
    except BaseException:
        if committed:
            raise
        log.info("backup of %s failed; cleaning up", dom.name())
        try:
            recovery.cleanup(_alive(dom, journal), bdir, journal, delete_checkpoint=True)
        except Exception:  # noqa: BLE001 - the guard / next run retries; keep the cause
            log.exception("cleaning up after the failed backup failed; the next backup "
                          "into %s retries", bdir.path)
        raise
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def point_copied(point: Point) -> int:
    return sum(d.copied for d in point.disks)


def _human(n: float) -> str:
    return human_size(n, fixed=True)    # as the progress lines write sizes


def _copy_all(bdir: BackupDir, manifest: Manifest, disks: list[_Disk], index: int,
              base: Optional[Point],
              sock: str, bitmaps: dict[str, str], progress: Optional[ProgressCallback],
              in_flight: int) -> list[DiskEntry]:
    """Plan every disk, then copy all of them in parallel threads."""
    plans: list[tuple[_Disk, nbd.NBD, list[backup_copy.Extent]]] = []
    try:
        for d in disks:
            ctx = f"qemu:dirty-bitmap:{bitmaps[d.name]}" if base is not None else None
            if base is not None and d.name not in bitmaps:
                raise errors.InternalError(f"the export of disk {d.name!r} has no bitmap")
            t = time.monotonic()
            src = backup_copy.connect_source(sock, d.name, (ctx,) if ctx else ())
            plans.append((d, src, backup_copy.plan_incremental(src, ctx) if ctx
                          else backup_copy.plan_full(src)))
            log.debug("disk %s: %d extents, %d bytes to copy, planned in %.3f s", d.name,
                      len(plans[-1][2]), backup_copy.data_bytes(plans[-1][2]),
                      time.monotonic() - t)
        counter = Counter(progress, sum(backup_copy.data_bytes(p[2]) for p in plans))
        cancel = threading.Event()

        def one(d: _Disk, src: nbd.NBD, extents: list[backup_copy.Extent]) -> DiskEntry:
            file = mf.file_name(d.name, index)
            backing = None
            if base is not None:
                base_disk = base.disk(d.name)
                if base_disk is None:       # _decide compared the disk sets
                    raise errors.InternalError(f"point {base.index} has no disk {d.name!r}")
                backing = base_disk.file
            chain = manifest.chain(base, d.name) if base is not None else []
            fd = bdir.create(file + ".part", files.image_mode())     # O_EXCL, never a link
            try:
                files.own_image(fd)
                args = ["create", "-q", "-f", "qcow2", "-u",
                        "-o", f"cluster_size={backup_copy.CLUSTER}"]
                if backing:
                    args += ["-b", backing, "-F", "qcow2"]     # the name, for qemu-img users
                tools.qemu_img(args + [fd_path(fd), str(d.size)])
                with OpenChain(bdir, chain, files.max_size(), top_fd=fd) as opened:
                    dst = backup_copy.connect_target(opened.address)
                    digest = LayerDigest()
                    try:
                        copied = backup_copy.copy(src, dst, extents, counter.add, cancel,
                                                  digest, in_flight)
                        dst.shutdown()
                    finally:
                        del dst     # waits for qemu-nbd, which closes the image cleanly
                os.fsync(fd)
            finally:
                os.close(fd)
            return DiskEntry(name=d.name, file=file, size=d.size, copied=copied,
                             layer_sha256=digest.hexdigest(), backing=backing)

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(plans)) as pool:
            futures = [pool.submit(one, *p) for p in plans]
            try:
                while True:
                    done, pending = concurrent.futures.wait(
                        futures, timeout=0.2,
                        return_when=concurrent.futures.FIRST_EXCEPTION)
                    if any(f.exception() for f in done) or not pending:
                        break
            except BaseException:
                cancel.set()
                raise
            finally:
                if any(not f.done() or f.exception() for f in futures):
                    cancel.set()
            entries = [f.result() for f in futures]     # raises the first failure
        counter.finish()
        return entries
    finally:
        for p in plans:
            backup_copy.close(p[1])


def _alive(dom: libvirt.virDomain, journal: Journal) -> libvirt.virDomain:
    """``dom``, or the same domain through a new connection when libvirtd restarted
    while the copy ran (the copy reads the NBD socket, not libvirt: it goes on, but the
    old connection is dead). Raises LibvirtError when libvirtd cannot be reached."""
    try:
        dom.isActive()                  # a round trip: isAlive() can say yes on a dead one
        return dom
    except libvirt.libvirtError:
        pass
    log.warning("the libvirt connection died during the backup (libvirtd restarted?); "
                "reconnecting to %s", journal.uri)
    try:
        return libvirt.open(journal.uri).lookupByUUIDString(journal.domain_uuid)
    except libvirt.libvirtError as e:
        raise virt.translate(e, f"cannot reach the domain again at {journal.uri}") from e


# --- reading a backup ------------------------------------------------------------------
