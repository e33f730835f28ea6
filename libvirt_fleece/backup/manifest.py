# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backup directory: its manifest, its lock, its journal and its naming rules.

A backup directory holds, per disk, a chain of qcow2 files (each incremental
an overlay whose backing file is the previous point's file, by relative
name) and ``manifest.json``::

    manifest.json                 {format, domain: {name, uuid}, points: [...]}
    vda.0000.qcow2                point 0 (full)
    vda.0001.qcow2                point 1 (incremental, backing vda.0000.qcow2)
    .libvirt-fleece-backup.lock   flock()ed while a backup writes here
    .libvirt-fleece-backup.journal  what a running backup created (for cleanup)

Each disk of a point records ``layer_sha256``, the digest of what its file
holds of the disk (:mod:`.digest`), computed while the data is copied.
Points written since 0.2.0 record their ``writer`` (:class:`Writer`): the
plugin's version, qemu's version and the read path of the snapshot exports.
The field is optional within format /2: points written before have none, and
readers that do not know it (0.1.x) read everything else unchanged; see
:mod:`.writer` for what a missing record means.

Files are written as ``NAME.part`` and renamed into place only after their
data is complete and flushed and the manifest lists them. The journal names
every ``.part`` file, snapshot and checkpoint a run creates before it
creates them, so the next run (holding the lock, hence sure the writer is
gone) removes exactly those and nothing else.

Everything in a backup directory is untrusted input (issue #12): whoever can
write there may forge the manifest, the journal and every qcow2 header. So
the manifest's fields are checked against the directory's own rules when it is
read (:func:`_from_json`: file names of this directory only, increasing
indexes, backing files of earlier points, bounded sizes and JSON), files are
reached only through the directory's descriptor (:mod:`.dir`), qemu
gets the manifest's chain, never a header's (:mod:`.chain`), and the
journal is a hint next to the root-only record of :mod:`.state`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import tempfile
import time
from typing import Any, Iterator, Optional

from .. import config, errors
from .dir import BackupDir, UnsafeFile

log = logging.getLogger(__name__)

FORMAT = "libvirt-fleece-backup/2"
READABLE = (FORMAT, "libvirt-fleece-backup/1")     # /1: a checksum of each file's bytes
MANIFEST = "manifest.json"
LOCK = ".libvirt-fleece-backup.lock"
JOURNAL = ".libvirt-fleece-backup.journal"
FILE_RE = re.compile(r"(?P<disk>[A-Za-z0-9_-]+)\.(?P<index>\d{4,})\.qcow2(?P<part>\.part)?\Z")
TMP_RE = re.compile(r"\.(manifest\.json|libvirt-fleece-backup\.journal)\.[A-Za-z0-9_]+\.tmp\Z")
IGNORED = {"lost+found"}
# the snapshots and checkpoints of backup runs
NAME_RE = re.compile(r"backup-[0-9]{8}T[0-9]{6}Z(\.[0-9]{1,2})?")
DISK_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_INDEX = 999999          # file names hold the index in 4 to 6 digits
MAX_POINTS = 100000
MAX_DISKS = 256
MAX_DEPTH = 16              # JSON nesting of a manifest or journal (ours is 5 deep)
DEFAULT_MAX_BYTES = 16 << 20


class BackupTargetError(errors.InvalidArgument):
    """The backup directory cannot be used (not writable, foreign files, another domain)."""


class BackupBusy(errors.OperationInvalid):
    """Another backup is writing into the same directory."""


class BackupCorrupt(errors.OperationInvalid):
    """A file of the backup does not match the manifest."""


@dataclasses.dataclass
class DiskEntry:
    name: str
    file: str
    size: int               # virtual size in bytes
    copied: int             # bytes read from the export and written
    layer_sha256: str = ""  # the layer digest (backup_digest); "" in format /1
    sha256: Optional[str] = None    # format /1: SHA-256 of the file's bytes
    backing: Optional[str] = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()       # one checksum
                if k == "backing" or v not in (None, "")}


@dataclasses.dataclass
class Writer:
    """What wrote a point: this package's version, the domain's qemu version
    (``query-version``, such as "7.2.22"; None when it could not be asked) and how
    the snapshots were read ("overlay", "snapshot-access"; None when the export did
    not say)."""
    libvirt_fleece: str
    qemu: Optional[str] = None
    read_path: Optional[str] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: Any) -> Optional["Writer"]:
        """The record of a manifest, None when it is missing or unusable (a point
        without a usable record is treated as one written by 0.1.x)."""
        if not isinstance(data, dict) or not isinstance(data.get("libvirt_fleece"), str):
            return None
        return Writer(libvirt_fleece=data["libvirt_fleece"],
                      qemu=_optional_str(data.get("qemu")),
                      read_path=_optional_str(data.get("read_path")))


def _optional_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


@dataclasses.dataclass
class Point:
    index: int
    time: str               # UTC, ISO 8601
    mode: str               # full | incremental
    checkpoint: str
    disks: list[DiskEntry]
    reason: str = ""
    duration: float = 0.0
    writer: Optional[Writer] = None     # None: written before 0.2.0 (no record)

    def disk(self, name: str) -> Optional[DiskEntry]:
        return next((d for d in self.disks if d.name == name), None)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["disks"] = [x.to_json() for x in self.disks]
        if self.writer is None:
            del d["writer"]             # never invent a record for an old point
        else:
            d["writer"] = self.writer.to_json()
        return d


@dataclasses.dataclass
class Manifest:
    domain_name: str
    domain_uuid: str
    points: list[Point] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": FORMAT,
                "domain": {"name": self.domain_name, "uuid": self.domain_uuid},
                "points": [p.to_json() for p in self.points]}

    def point(self, index: Optional[int]) -> Point:
        """A point by index (the newest for None). Raises NotFound."""
        if not self.points:
            raise errors.NotFound("the backup directory holds no backup point yet")
        if index is None:
            return self.points[-1]
        found = next((p for p in self.points if p.index == index), None)
        if found is None:
            raise errors.NotFound(f"no backup point {index} (points: "
                                  f"{', '.join(str(p.index) for p in self.points)})")
        return found

    def chain(self, point: Point, disk: str) -> list[DiskEntry]:
        """The files that make up ``disk`` at ``point``, base first."""
        entry = point.disk(disk)
        if entry is None:
            raise errors.NotFound(f"backup point {point.index} has no disk {disk!r} (it has "
                                  f"{', '.join(d.name for d in point.disks)})")
        by_file = {d.file: d for p in self.points for d in p.disks if d.name == disk}
        chain = [entry]
        while chain[-1].backing:
            nxt = by_file.get(chain[-1].backing)
            if nxt is None:
                raise BackupCorrupt(f"{chain[-1].file} is backed by {chain[-1].backing}, "
                                    f"which the manifest does not list")
            chain.append(nxt)
        return list(reversed(chain))


def file_name(disk: str, index: int, part: bool = False) -> str:
    return f"{disk}.{index:04d}.qcow2" + (".part" if part else "")


def _from_json(data: Any, path: str,
               max_virtual_size: Optional[int] = None) -> Manifest:
    """A manifest from parsed JSON, every field checked against the directory's
    rules (:func:`check_disk_name`, :func:`file_name`, increasing indexes, backing
    files of earlier points). Raises BackupCorrupt naming the offending field."""
    limit = max_virtual_size if max_virtual_size is not None else _max_virtual_size()
    try:
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        if data.get("format") not in READABLE:
            raise ValueError(f"format {_short(data.get('format'))} is not one of "
                             f"{', '.join(READABLE)}")
        domain = data["domain"]
        if not isinstance(domain, dict):
            raise ValueError("domain is not an object")
        m = Manifest(domain_name=_text(domain["name"], "domain name"),
                     domain_uuid=_text(domain["uuid"], "domain uuid"))
        points = data["points"]
        if not isinstance(points, list) or len(points) > MAX_POINTS:
            raise ValueError(f"points is not a list of at most {MAX_POINTS} points")
        files: dict[str, int] = {}      # file -> index of its point
        for p in points:
            m.points.append(_point(p, m.points[-1].index if m.points else -1, files, limit))
        return m
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise BackupCorrupt(f"{path} is not a valid backup manifest ({e})") from e


def _short(value: Any) -> str:
    """``value`` quoted for a message: printable and short (it is hostile input)."""
    text = repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Any, what: str, limit: int = 256) -> str:
    """A string field of at most ``limit`` characters. Raises ValueError."""
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{what} {_short(value)} is not a string of at most {limit} "
                         f"characters")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    """An integer field (a JSON number without fraction, not a boolean) in
    [low, high]. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} {_short(value)} is not an integer in [{low}, {high}]")
    return value


def check_disk_name(name: Any) -> str:
    """A disk name as the directory's file names allow it. Raises ValueError."""
    if not isinstance(name, str) or not DISK_RE.fullmatch(name):
        raise ValueError(f"disk name {_short(name)} is not a disk target name "
                         f"({DISK_RE.pattern})")
    return name


def check_file_name(name: Any, part: bool = False) -> str:
    """A file name of the directory's own kind (``vda.0003.qcow2``, with ``.part``
    when ``part``): no "/", no protocol, no ``json:``. Raises ValueError."""
    m = FILE_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None or bool(m.group("part")) != part or len(name) > 128:
        raise ValueError(f"file name {_short(name)} is not a backup file name of this "
                         f"directory (DISK.NNNN.qcow2{'.part' if part else ''})")
    return name


def _point(p: Any, previous: int, files: dict[str, int], max_size: int) -> Point:
    """One point of the manifest; ``files`` collects the files of the points
    before it (a backing file must be one of those, of the same disk).
    Raises ValueError, KeyError, TypeError."""
    if not isinstance(p, dict):
        raise ValueError("a point is not an object")
    index = _int(p["index"], "point index", 0, MAX_INDEX)
    if index <= previous:
        raise ValueError(f"point index {index} does not follow {previous} (indexes "
                         f"increase, no duplicates)")
    mode = p["mode"]
    if mode not in ("full", "incremental"):
        raise ValueError(f"mode {_short(mode)} of point {index} is not full or incremental")
    duration = p.get("duration", 0.0)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or \
            not 0 <= duration < 1e9:
        raise ValueError(f"duration {_short(duration)} of point {index} is not a number "
                         f"of seconds")
    raw_disks = p["disks"]
    if not isinstance(raw_disks, list) or len(raw_disks) > MAX_DISKS:
        raise ValueError(f"disks of point {index} is not a list of at most {MAX_DISKS} "
                         f"disks")
    disks = [_disk(d, index, files, max_size) for d in raw_disks]
    if len({d.name for d in disks}) != len(disks):
        raise ValueError(f"point {index} names a disk twice")
    for d in disks:
        files[d.file] = index
    return Point(index=index, time=_text(p["time"], "time"), mode=mode,
                 checkpoint=_text(p["checkpoint"], "checkpoint"),
                 reason=_text(p.get("reason", ""), "reason", 4096),
                 duration=float(duration), writer=Writer.from_json(p.get("writer")),
                 disks=disks)


def _disk(d: Any, index: int, files: dict[str, int], max_size: int) -> DiskEntry:
    """One disk of point ``index``. Raises ValueError, KeyError, TypeError."""
    if not isinstance(d, dict):
        raise ValueError(f"a disk of point {index} is not an object")
    name = check_disk_name(d["name"])
    file = check_file_name(d["file"])
    if file != file_name(name, index):
        raise ValueError(f"file {_short(file)} of disk {name} is not this point's file "
                         f"{file_name(name, index)}")
    backing = d.get("backing")
    if backing is not None:
        m = FILE_RE.fullmatch(check_file_name(backing))
        if m is None or m.group("disk") != name or backing not in files:
            raise ValueError(f"backing file {_short(backing)} of {file} is not a file of "
                             f"an earlier point of disk {name}")
    return DiskEntry(name=name, file=file,
                     size=_int(d["size"], f"size of {file}", 0, max_size),
                     copied=_int(d["copied"], f"copied of {file}", 0, 1 << 62),
                     layer_sha256=_checksum(d, "layer_sha256", "sha256"),
                     sha256=_checksum(d, "sha256", "layer_sha256") or None,
                     backing=backing)


def _checksum(d: dict, key: str, other: str) -> str:
    """``d[key]`` as a SHA-256 in hex ("" when absent but ``other`` is there)."""
    value = d.get(key)
    if value is None and d.get(other):
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"{key} of {d.get('file')!r} is not a SHA-256")
    return value


def _max_virtual_size() -> int:
    return config.load().backup_max_virtual_size


def max_bytes() -> int:
    """The configured limit of a manifest or journal (``backup_manifest_max_bytes``)."""
    return config.load().backup_manifest_max_bytes


_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``raw`` (strings skipped)."""
    depth = deepest = 0
    for c in _STRING_RE.sub(b'""', raw).translate(None, delete=bytes(
            b for b in range(256) if b not in b"[]{}")):
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(raw: bytes, path: str) -> Any:
    """Bounded JSON: at most :data:`MAX_DEPTH` levels deep, UTF-8. Raises
    BackupCorrupt naming ``path``."""
    if json_depth(raw) > MAX_DEPTH:
        raise BackupCorrupt(f"{path} nests deeper than {MAX_DEPTH} levels; it is not a "
                            f"file of this tool")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise BackupCorrupt(f"cannot read {path}: {e}") from e


def _read(bdir: "BackupDir", name: str) -> Optional[bytes]:
    """The bounded content of ``name`` (None: absent). Raises BackupCorrupt."""
    try:
        return bdir.read(name, max_bytes())
    except UnsafeFile as e:
        raise BackupCorrupt(str(e)) from e
    except OSError as e:
        raise BackupCorrupt(f"cannot read {bdir.show(name)}: {e.strerror}") from e


def load(directory: "str | BackupDir") -> Optional[Manifest]:
    """The directory's manifest, None when there is none. Raises BackupCorrupt
    (also for a link, a FIFO, a file over ``backup_manifest_max_bytes``)."""
    with _opened(directory) as bdir:
        raw = _read(bdir, MANIFEST)
        if raw is None:
            return None
        return _from_json(parse_json(raw, bdir.show(MANIFEST)), bdir.show(MANIFEST))


@contextlib.contextmanager
def _opened(directory: "str | BackupDir") -> Iterator[BackupDir]:
    """``directory`` as a BackupDir (opened here and closed after, for a path)."""
    if isinstance(directory, BackupDir):
        yield directory
        return
    with BackupDir(directory) as bdir:
        yield bdir


def write_json_atomic(directory: "str | BackupDir", name: str, data: Any) -> None:
    """Write ``name`` in ``directory`` all or nothing, 0600 (BackupDir.write_atomic)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with _opened(directory) as bdir:
        bdir.write_atomic(name, text.encode("utf-8"), 0o600)


def save(directory: "str | BackupDir", manifest: Manifest) -> None:
    write_json_atomic(directory, MANIFEST, manifest.to_json())


def _open_for_hashing(path: str) -> int:
    """O_DIRECT when the filesystem allows it: a backup file just written with
    O_DIRECT is not in the page cache, and direct reads of it run about 2.5x faster
    than buffered ones here (1.4 vs 0.57 GB/s, measured on the development machine)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file (the checksum of format /1 manifests). A thread reads the
    next chunk while this one hashes (hashlib drops the GIL). Raises OSError."""
    h = hashlib.sha256()
    fd = _open_for_hashing(path)
    try:
        size = os.fstat(fd).st_size
        offsets = iter(range(0, size, chunk))
        pending: collections.deque = collections.deque()

        def read(buf: mmap.mmap, offset: int) -> int:
            want = min(chunk, size - offset)
            got = os.preadv(fd, [buf], offset)
            if got != want:
                raise OSError(errno.EIO, f"{path} changed while it was read "
                                         f"({got} of {want} bytes at offset {offset})")
            return got

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for _ in range(2):
                offset = next(offsets, None)
                if offset is None:
                    break
                buf = mmap.mmap(-1, chunk)      # page-aligned, as O_DIRECT needs
                pending.append((buf, pool.submit(read, buf, offset)))
            while pending:
                buf, future = pending.popleft()
                h.update(memoryview(buf)[:future.result()])
                offset = next(offsets, None)
                if offset is not None:
                    pending.append((buf, pool.submit(read, buf, offset)))
    finally:
        os.close(fd)
    return h.hexdigest()


# --- the directory as a target --------------------------------------------------------

def foreign_files(directory: "str | BackupDir", manifest: Optional[Manifest]) -> list[str]:
    """Entries of ``directory`` that no backup run of ours made."""
    known = {d.file for p in manifest.points for d in p.disks} if manifest else set()
    foreign = []
    with _opened(directory) as bdir:
        entries = sorted(bdir.listdir())
    for entry in entries:
        if entry in (MANIFEST, LOCK, JOURNAL) or entry in IGNORED or entry in known:
            continue
        if TMP_RE.match(entry):
            continue
        foreign.append(entry)
    return foreign


def check_target(directory: str, create: bool) -> str:
    """The absolute path of a usable backup directory (created when ``create``).

    Raises BackupTargetError saying what to do."""
    path = os.path.abspath(directory)
    if not os.path.exists(path):
        if not create:
            raise BackupTargetError(f"backup directory {path} does not exist")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise BackupTargetError(f"cannot create backup directory {path}: its parent "
                                    f"{parent} does not exist; create it first")
        try:
            os.mkdir(path, 0o700)
        except OSError as e:
            raise BackupTargetError(f"cannot create backup directory {path}: "
                                    f"{e.strerror}; choose a writable location") from e
        return path
    if not os.path.isdir(path):
        raise BackupTargetError(f"backup target {path} is not a directory; give a directory")
    if create and not _writable(path):
        raise BackupTargetError(f"backup directory {path} is not writable by this process "
                                f"(check its permissions, ownership and mount options)")
    return path


def _writable(path: str) -> bool:
    """Whether we can really create a file there (access() lies on read-only mounts)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=path)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


class DirLock:
    """An exclusive flock() on the directory's lock file, released when the holder dies.
    The lock file is opened or created relative to the directory's descriptor
    (never through a link). Raises BackupBusy, BackupCorrupt (an unsafe lock file)."""

    def __init__(self, directory: "str | BackupDir", wait: float = 0.0) -> None:
        with _opened(directory) as bdir:
            self.path = bdir.show(LOCK)
            try:
                self.fd = bdir.open_or_create(LOCK)
            except UnsafeFile as e:
                raise BackupCorrupt(str(e)) from e
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(self.fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise BackupBusy(
                        f"another backup is writing into {os.path.dirname(self.path)} (or "
                        f"its clean-up after an interrupted run is still going on); wait for "
                        f"it to finish") from e
                time.sleep(0.2)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the journal ---------------------------------------------------------------------------

@dataclasses.dataclass
class Journal:
    """What a running backup created; written before each thing is created.

    The directory's copy is a hint only: :mod:`.backup` acts on it where the
    root-only record in the state directory agrees."""
    uri: str
    domain_uuid: str
    snapshot: Optional[str] = None
    checkpoint: Optional[str] = None
    parts: list[str] = dataclasses.field(default_factory=list)
    started: float = 0.0        # epoch: checkpoints older than this are not the run's

    def save(self, directory: "str | BackupDir") -> None:
        write_json_atomic(directory, JOURNAL, dataclasses.asdict(self))

    @staticmethod
    def from_json(data: Any) -> "Journal":
        """A journal from parsed JSON, every field checked (``parts`` must be
        ``.part`` file names of the directory). Raises ValueError."""
        known = {f.name for f in dataclasses.fields(Journal)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError("not a journal object")
        started = data.get("started", 0.0)
        if isinstance(started, bool) or not isinstance(started, (int, float)):
            raise ValueError(f"started {_short(started)} is not a time")
        parts = data.get("parts", [])
        if not isinstance(parts, list) or len(parts) > MAX_DISKS:
            raise ValueError("parts is not a short list")
        return Journal(uri=_text(data.get("uri", ""), "uri"),
                       domain_uuid=_text(data.get("domain_uuid", ""), "domain_uuid"),
                       snapshot=_optional_name(data.get("snapshot"), "snapshot"),
                       checkpoint=_optional_name(data.get("checkpoint"), "checkpoint"),
                       parts=[check_file_name(x, part=True) for x in parts],
                       started=float(started))

    @staticmethod
    def load(directory: "str | BackupDir") -> Optional["Journal"]:
        """The directory's journal; None when absent; an empty one (nothing to act
        on), with a warning, when it is unusable (a link, a FIFO, too large, not
        a journal, a part that is not a ``.part`` file name)."""
        with _opened(directory) as bdir:
            try:
                raw = _read(bdir, JOURNAL)
                if raw is None:
                    return None
                return Journal.from_json(parse_json(raw, bdir.show(JOURNAL)))
            except (BackupCorrupt, ValueError, TypeError) as e:
                log.warning("ignoring the journal %s: %s", bdir.show(JOURNAL), e)
                return Journal(uri="", domain_uuid="")

    @staticmethod
    def remove(directory: "str | BackupDir") -> None:
        with _opened(directory) as bdir:
            if bdir.unlink(JOURNAL):
                bdir.fsync()


def _optional_name(value: Any, what: str) -> Optional[str]:
    """None, or a snapshot / checkpoint name of this tool's kind. Raises ValueError."""
    if value is None:
        return None
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(f"{what} {_short(value)} is not a backup's name")
    return value
