# SPDX-License-Identifier: LGPL-2.1-or-later
"""Which read path is right in this qemu: decided by a self-test, once per qemu process.

A snapshot's data can be read two ways:

- ``snapshot-access`` (QEMU 8.0 and newer): a snapshot-access node on the
  copy-before-write filter, which picks per cluster the fleece image or the
  disk. QEMU 7.2's ``hbitmap_status()`` (fixed upstream by a4d5224c2cb6, first
  in 8.0.0) makes that node return the live disk for a read or a block-status
  query that starts in a cluster already copied to the fleece and goes on into
  one that was not: exports served live data.
- ``overlay`` (right on every QEMU): the fleece image is a qcow2 overlay whose
  backing is the node below the filter, and is exported itself. Its clusters
  hold the copied old data; the rest falls through to the disk, which the
  filter keeps unchanged there. The filter must then fail a guest write whose
  old data cannot be copied (``on-cbw-error=break-guest-write``), so such
  snapshots always carry a size limit (:mod:`..steps.health`).

The verdict comes from what qemu does, not its version: scratch nodes on
unnamed files in the state directory (never the guest's disks) reproduce the
failing read inside the same qemu process; a mirror job copies the scratch
snapshot into a scratch file that the plugin then compares. The verdict is
kept in the root-only state directory, keyed by qemu's pid and start time
(never in the domain's metadata, which others can write). When the test
cannot run, the overlay path is taken.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import time
from typing import Optional

import libvirt

from . import blockgraph, names, qmp
from .. import errors, fsutil
from ..faults import killpoint

log = logging.getLogger(__name__)

SNAPSHOT_ACCESS = "snapshot-access"
OVERLAY = "overlay"
READ_PATHS = (SNAPSHOT_ACCESS, OVERLAY)

CLUSTER = 64 * 1024
_CLUSTERS = 16                     # 1 MiB of scratch disk
_OLD, _NEW = 0x5A, 0x66
_COPIED, _ZEROED = 1, 5            # clusters the scratch "guest" overwrites after the snapshot
_JOB_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    readpath: str          # SNAPSHOT_ACCESS or OVERLAY
    reason: str            # what decided it, for logs and docs
    qemu: str              # qemu's version, e.g. "7.2.22"


def qemu_version(dom: libvirt.virDomain) -> str:
    """qemu's version as "major.minor.micro". Raises QMPError, LibvirtError."""
    v = qmp.execute(dom, "query-version")["qemu"]
    return f"{v['major']}.{v['minor']}.{v['micro']}"


# --- the cache, keyed by qemu process --------------------------------------------

def _qemu_identity(dom: libvirt.virDomain) -> Optional[str]:
    """"pid-starttime" of the domain's qemu process, or None when it cannot be proven."""
    try:
        with open(f"/run/libvirt/qemu/{dom.name()}.pid", encoding="ascii") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, ValueError, IndexError):
        return None
    if f"guest={dom.name()}".encode() not in b",".join(cmdline):
        return None
    return f"{pid}-{start}"


def _cache_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "qemu")


def _alive(identity: str) -> bool:
    pid, start = identity.split("-", 1)
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19] == start
    except (OSError, ValueError, IndexError):
        return False


def _load_cached(state_dir: str, identity: str) -> Optional[Verdict]:
    path = os.path.join(_cache_dir(state_dir), identity + ".json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_uid == 0 and st.st_size < 4096):
            return None
        data = json.loads(os.read(fd, 4096))
        verdict = Verdict(readpath=data["readpath"], reason=str(data["reason"]),
                          qemu=str(data["qemu"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)
    return verdict if verdict.readpath in READ_PATHS else None


def _store(state_dir: str, identity: str, verdict: Verdict) -> None:
    directory = _cache_dir(state_dir)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".json") and not _alive(name[:-5]):
                os.unlink(os.path.join(directory, name))
        fsutil.write_atomic(os.path.join(directory, identity + ".json"),
                            json.dumps(dataclasses.asdict(verdict)).encode(), mode=0o600)
    except OSError as e:
        log.warning("cannot keep the read-path verdict in %s: %s", directory, e)


# --- the self-test -------------------------------------------------------------------

def _scratch_file(state_dir: str, fill: Optional[int], size: int) -> int:
    """An unnamed root-only file (gone with its last fd), ``size`` bytes of ``fill``."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    fd = os.open(state_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    if fill is not None:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


def _wait_job(dom: libvirt.virDomain, job: str, states: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + _JOB_TIMEOUT
    while True:
        info = next((j for j in qmp.execute(dom, "query-jobs", fresh=True) if j["id"] == job),
                    None)
        if info is None:
            raise errors.InternalError(f"self-test job {job} vanished")
        if info["status"] in states:
            return info
        if info["status"] == "concluded" or time.monotonic() > deadline:
            raise errors.InternalError(
                f"self-test job {job} ended as {info['status']}: {info.get('error')}")
        time.sleep(0.01)


def _run_self_test(dom: libvirt.virDomain, state_dir: str) -> list[int]:
    """Reproduce QEMU 7.2's failing snapshot read on scratch nodes.

    Returns the scratch clusters that a snapshot-access read got wrong (empty:
    right). Raises Error subclasses when the test cannot run; removes every
    scratch node, job and fdset it made in any case.
    """
    size = _CLUSTERS * CLUSTER
    tid = secrets.token_hex(3)
    node, job = names.scratch_names(tid)
    used = blockgraph.fdset_ids(dom)
    fds: dict[str, int] = {}
    fdsets: dict[str, int] = {}
    added: list[str] = []
    try:
        for name, fill in (("src", _OLD), ("tgt", None), ("out", None)):
            fds[name] = _scratch_file(state_dir, fill, size)
            fdsets[name] = names.new_fdset_id(used | set(fdsets.values()))
            blockgraph.add_fd(dom, fds[name], fdsets[name], f"libvirt-fleece self-test {tid}")
        for name in ("src", "tgt", "out"):
            qmp.execute(dom, "blockdev-add", {"driver": "file", "node-name": node[name],
                                              "filename": f"/dev/fdset/{fdsets[name]}"})
            added.append(node[name])
        blockgraph.add_filter(dom, node["cbw"], node["src"], node["tgt"])
        added.append(node["cbw"])
        blockgraph.add_access(dom, node["acc"], node["cbw"])
        added.append(node["acc"])
        killpoint("readpath:self-test-started")
        for cmd in (f"write -P 0x{_NEW:x} {_COPIED * CLUSTER} {CLUSTER}",
                    f"write -z {_ZEROED * CLUSTER} {CLUSTER}"):
            out = qmp.execute(dom, "human-monitor-command",
                              {"command-line": f'qemu-io {node["cbw"]} "{cmd}"'})
            if out.strip():
                raise errors.InternalError(f"self-test write failed: {out.strip()}")
        # a mirror job reads the snapshot in 1 MiB requests, as an NBD client would
        qmp.execute(dom, "blockdev-mirror", {
            "job-id": job, "device": node["acc"], "target": node["out"], "sync": "full",
            "granularity": size, "buf-size": size, "auto-dismiss": False})
        try:
            _wait_job(dom, job, ("ready",))
        finally:
            _end_job(dom, job)
        data = os.pread(fds["out"], size, 0)
        return [i for i in range(_CLUSTERS)
                if data[i * CLUSTER:(i + 1) * CLUSTER] != bytes([_OLD]) * CLUSTER]
    finally:
        for name in reversed(added):
            try:
                qmp.execute(dom, "blockdev-del", {"node-name": name})
            except errors.Error as e:
                log.warning("self-test: cannot remove scratch node %s: %s", name, e)
        for fid in fdsets.values():
            try:
                blockgraph.remove_fdset(dom, fid)
            except errors.Error as e:
                log.warning("self-test: cannot remove fdset %s: %s", fid, e)
        for fd in fds.values():
            os.close(fd)


def _end_job(dom: libvirt.virDomain, job: str) -> None:
    """Cancel and dismiss a scratch job, whatever state it is in."""
    try:
        if any(j["id"] == job for j in qmp.execute(dom, "query-jobs", fresh=True)):
            qmp.execute(dom, "job-cancel", {"id": job})
            _wait_job(dom, job, ("concluded",))
    except errors.Error as e:
        if "concluded" not in str(e):
            log.warning("self-test: cancelling job %s: %s", job, e)
    try:
        qmp.execute(dom, "job-dismiss", {"id": job})
    except errors.Error:
        pass


def remove_leftover_jobs(dom: libvirt.virDomain) -> list[str]:
    """Cancel and dismiss self-test jobs a killed process left behind."""
    done = []
    for j in qmp.execute(dom, "query-jobs"):
        if j["id"].startswith(names.SCRATCH_PREFIX):
            _end_job(dom, j["id"])
            done.append(f"removed leftover self-test job {j['id']}")
    return done


def _test(dom: libvirt.virDomain, state_dir: str, version: str) -> tuple[Verdict, bool]:
    """(verdict, whether it may be kept for this qemu process)."""
    try:
        wrong = _run_self_test(dom, state_dir)
    except (errors.Error, OSError) as e:
        return Verdict(OVERLAY, f"the read self-test could not run ({e}); the overlay "
                       f"read path is right on every QEMU", version), False
    if wrong:
        return Verdict(OVERLAY, f"QEMU {version} served live data through snapshot-access in "
                       f"the read self-test (scratch clusters {wrong}): it lacks the "
                       f"hbitmap_status fix of QEMU 8.0", version), True
    return Verdict(SNAPSHOT_ACCESS, f"QEMU {version} passed the read self-test", version), True


def verdict(dom: libvirt.virDomain, state_dir: str) -> Verdict:
    """The read path for this domain's qemu process: cached, or tested now.

    Raises QMPError or LibvirtError only when qemu cannot even say its version.
    """
    identity = _qemu_identity(dom)
    if identity is not None:
        cached = _load_cached(state_dir, identity)
        if cached is not None:
            return cached
    version = qemu_version(dom)
    result, keep = _test(dom, state_dir, version)
    log.info("domain %s: read path %s: %s", dom.name(), result.readpath, result.reason)
    if keep and identity is not None:
        _store(state_dir, identity, result)
    return result


def choose(dom: libvirt.virDomain, state_dir: str, configured: str) -> Verdict:
    """The read path for a new snapshot: ``configured`` "overlay" forces it, "auto" tests."""
    found = verdict(dom, state_dir)
    if configured == OVERLAY and found.readpath != OVERLAY:
        return Verdict(OVERLAY, "read_path: overlay in the configuration", found.qemu)
    return found
