# SPDX-License-Identifier: LGPL-2.1-or-later
"""Steps on qemu's block graph, each a small function next to its undo.

The names are :mod:`.names`'s; the ``remove_*`` functions
tolerate an object that is already gone, so teardown can run after any
partial failure and after a crash.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import libvirt

from .. import errors
from ..virt import wait_until
from . import names, qmp

log = logging.getLogger(__name__)


def node_names(dom: libvirt.virDomain) -> set[str]:
    nodes = qmp.execute(dom, "query-named-block-nodes", {"flat": True})
    return {n["node-name"] for n in nodes}


def devices(dom: libvirt.virDomain) -> dict[str, dict]:
    """``query-block`` entries with a medium, by qdev path."""
    return {b["qdev"]: b for b in qmp.execute(dom, "query-block")
            if b.get("qdev") and b.get("inserted")}


def fdset_ids(dom: libvirt.virDomain) -> set[int]:
    return {f["fdset-id"] for f in qmp.execute(dom, "query-fdsets")}


def add_fd(dom: libvirt.virDomain, fd: int, fdset_id: int, opaque: str) -> None:
    qmp.execute_with_fd(dom, "add-fd", {"fdset-id": fdset_id, "opaque": opaque}, [fd])


def remove_fdset(dom: libvirt.virDomain, fdset_id: int) -> None:
    if fdset_id in fdset_ids(dom):
        qmp.execute(dom, "remove-fd", {"fdset-id": fdset_id})


def add_fleece_node(dom: libvirt.virDomain, node: str, fdset_id: int,
                    backing: Optional[str] = None) -> None:
    """The fleece image as a qcow2 node, opened through the fdset (never by path).

    With ``backing`` the image reads through to that node wherever it holds no
    copied data (what the overlay read path exports); qemu's copy job then
    serializes its copies with reads of the image (block-copy's "fleecing"
    mode), and the backing link puts qemu's op blocker on that node, so graph
    changes of others (external snapshot, commit, mirror, resize) are refused."""
    args: dict = {
        "driver": "qcow2", "node-name": node, "discard": "unmap",
        "file": {"driver": "file", "node-name": names.protocol_node(node),
                 "filename": f"/dev/fdset/{fdset_id}"}}
    if backing is not None:
        args["backing"] = backing
    qmp.execute(dom, "blockdev-add", args)


def add_filter(dom: libvirt.virDomain, node: str, below: str, target: str,
               break_guest_write: bool = False) -> None:
    """A copy-before-write filter.

    By default it never fails guest writes: a full fleece breaks the snapshot
    (reads through snapshot-access fail) instead of the guest's write. The
    overlay read path cannot see a broken snapshot, so there a failed copy
    must fail the guest's write (``break_guest_write``)."""
    qmp.execute(dom, "blockdev-add", {
        "driver": "copy-before-write", "node-name": node, "file": below, "target": target,
        "on-cbw-error": "break-guest-write" if break_guest_write else "break-snapshot"})


def add_access(dom: libvirt.virDomain, node: str, filter_node: str) -> None:
    qmp.execute(dom, "blockdev-add", {"driver": "snapshot-access", "node-name": node,
                                      "file": filter_node})


def foreign_jobs(dom: libvirt.virDomain, disk: str, nodes: set[str]) -> list[str]:
    """Ids of qemu jobs that are not ours and concern ``disk`` or one of ``nodes``.

    libvirt names its jobs after the disk and node (``backup-vda-libvirt-1-format``,
    ``commit-vda-...``)."""
    found = []
    for job in qmp.execute(dom, "query-jobs"):
        jid = job["id"]
        if jid.startswith(names.PREFIX):
            continue
        if f"-{disk}-" in f"-{jid}-" or any(n and n in jid for n in nodes):
            found.append(f"{jid} ({job.get('type', 'job')}, {job.get('status', '?')})")
    return found


def _edges(dom: libvirt.virDomain) -> list[tuple[str, str, str]]:
    """(parent, link name, child) of qemu's block graph as it is now ("" for a
    parent without a node name, such as a device or an export)."""
    graph = qmp.execute(dom, "x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    return [(names.get(e["parent"], ""), e["name"], names.get(e["child"], ""))
            for e in graph["edges"]]


def file_children(dom: libvirt.virDomain) -> dict[str, str]:
    """node -> its ``file`` child, as qemu's graph is now."""
    return {parent: child for parent, link, child in _edges(dom)
            if link == "file" and parent and child}


def parents(dom: libvirt.virDomain) -> dict[str, set[str]]:
    """node -> whatever holds it now (node names, "" for devices and exports)."""
    found: dict[str, set[str]] = {}
    for parent, _link, child in _edges(dom):
        found.setdefault(child, set()).add(parent)
    return found


def set_drive(dom: libvirt.virDomain, qdev: str, node: str) -> None:
    """Point the guest device at another node (the filter, or back below it)."""
    qmp.execute(dom, "qom-set", {"path": qdev, "property": "drive", "value": node})


def delete_node(dom: libvirt.virDomain, node: str) -> None:
    """``blockdev-del`` of one node. Raises QMPError when qemu refuses (in use, gone)."""
    qmp.execute(dom, "blockdev-del", {"node-name": node})


def remove_node(dom: libvirt.virDomain, node: str, existing: set[str]) -> None:
    """Delete one of our nodes if it exists (its inline children go with it)."""
    if node in existing:
        try:
            delete_node(dom, node)
        except errors.QMPError as e:
            if "Failed to find node" not in e.desc:
                raise
        existing.discard(node)


def highest_offsets(dom: libvirt.virDomain) -> dict[str, int]:
    """The highest offset written so far, by node name (``query-blockstats``)."""
    stats = qmp.execute(dom, "query-blockstats", {"query-nodes": True})
    return {s["node-name"]: s["stats"].get("wr_highest_offset", 0)
            for s in stats if s.get("node-name")}


# --- NBD server and exports --------------------------------------------------

def add_tls_creds(dom: libvirt.virDomain, object_id: str, directory: str) -> None:
    """The x509 server credentials in ``directory`` as qemu object ``object_id``
    (peers must present a certificate of the CA there)."""
    qmp.execute(dom, "object-add", {"qom-type": "tls-creds-x509", "id": object_id,
                                    "dir": directory, "endpoint": "server",
                                    "verify-peer": True})


def remove_object(dom: libvirt.virDomain, object_id: str) -> None:
    """``object-del``; tolerate an object that is gone."""
    with contextlib.suppress(errors.QMPError):
        qmp.execute(dom, "object-del", {"id": object_id})


def getfd(dom: libvirt.virDomain, fd: int, fdname: str) -> None:
    qmp.execute_with_fd(dom, "getfd", {"fdname": fdname}, [fd])


def closefd(dom: libvirt.virDomain, fdname: str) -> None:
    try:
        qmp.execute(dom, "closefd", {"fdname": fdname})
    except errors.QMPError:
        pass  # already consumed or never passed


def nbd_server_start(dom: libvirt.virDomain, fdname: str,
                     tls_creds: Optional[str] = None) -> None:
    """Start qemu's (only) NBD server on a listening socket passed as ``fdname``.

    Raises OperationInvalid when another NBD server (libvirt's backup or
    migration) already runs in this qemu.
    """
    args: dict = {"addr": {"type": "fd", "data": {"str": fdname}}}
    if tls_creds:
        args["tls-creds"] = tls_creds
    try:
        qmp.execute(dom, "nbd-server-start", args)
    except errors.QMPError as e:
        if "already running" in e.desc:
            raise errors.OperationInvalid(
                f"qemu of domain {dom.name()!r} already runs an NBD server that is not "
                f"libvirt-fleece's (a libvirt backup or storage migration?); wait until it "
                f"finishes") from e
        raise


def nbd_server_stop(dom: libvirt.virDomain) -> None:
    try:
        qmp.execute(dom, "nbd-server-stop")
    except errors.QMPError as e:
        if "not running" not in e.desc:
            raise


def export_ids(dom: libvirt.virDomain, fresh: bool = False) -> set[str]:
    return {e["id"] for e in qmp.execute(dom, "query-block-exports", fresh=fresh)}


def export_add(dom: libvirt.virDomain, eid: str, node: str, name: str,
               bitmaps: Optional[list] = None) -> None:
    args = {"type": "nbd", "id": eid, "node-name": node, "name": name, "writable": False}
    if bitmaps:
        args["bitmaps"] = bitmaps
    qmp.execute(dom, "block-export-add", args)


def export_del(dom: libvirt.virDomain, eid: str, force: bool = False) -> None:
    """Remove an export and wait until qemu has let go of it.

    Raises OperationInvalid when clients are connected and ``force`` is false.
    """
    if eid not in export_ids(dom):
        return
    try:
        qmp.execute(dom, "block-export-del", {"id": eid, "mode": "hard" if force else "safe"})
    except errors.QMPError as e:
        if "in use" in e.desc:
            raise errors.OperationInvalid(
                f"export {eid} has connected NBD clients; wait until they disconnect "
                f"or force the stop") from e
        if "not found" not in e.desc:
            raise
    if not wait_until(lambda: eid not in export_ids(dom, fresh=True), timeout=10):
        raise errors.OperationInvalid(f"qemu did not release export {eid} within 10 s")


def set_write_threshold(dom: libvirt.virDomain, node: str, threshold: int) -> None:
    """Make qemu send BLOCK_WRITE_THRESHOLD once ``node`` is written past ``threshold``."""
    qmp.execute(dom, "block-set-write-threshold",
                {"node-name": node, "write-threshold": threshold})
