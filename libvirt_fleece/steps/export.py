# SPDX-License-Identifier: LGPL-2.1-or-later
"""NBD exports of snapshots, served read-only by qemu's one NBD server.

The server starts lazily with the first export and stops with the last.
The plugin binds the listening socket itself (a unix socket with mode 0600,
or 0660 for ``socket_group``; or a TCP socket on exactly the address asked
for) and hands it to qemu with ``getfd``: the caller gets a clear error for
an address in use, and qemu needs no access to the socket's directory.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import os
import socket
import stat
from typing import Optional

from ..qemu import bitmaps, blockgraph, names, readpath
from .. import documents, errors, fleecefile, metadata
from . import checkpoint as checkpoints, tls
from ..config import Config
from ..documents import Address
from ..faults import killpoint
from ..metadata import ExportRecord, ServerRecord
from ..session import Session

log = logging.getLogger(__name__)


# --- the server ---------------------------------------------------------------

def default_socket_path(cfg: Config, domain_name: str) -> str:
    return os.path.join(cfg.socket_dir, f"{domain_name}.sock")


def _default_socket(sess: Session) -> str:
    os.makedirs(sess.cfg.socket_dir, mode=0o755, exist_ok=True)
    return default_socket_path(sess.cfg, sess.dom.name())


def _resolve_address(sess: Session, addr: Optional[Address]) -> Address:
    if addr is None or (addr.type == "unix" and not addr.socket):
        return Address(type="unix", socket=_default_socket(sess))
    if addr.type == "ip" and addr.port is None:
        return Address(type="ip", host=addr.host, port=10809, tls=addr.tls)
    return addr


def _server_address(server: ServerRecord) -> Address:
    return Address(type=server.type, socket=server.socket, host=server.host, port=server.port,
                   tls=bool(server.tls))


def _same_address(requested: Address, actual: Address) -> bool:
    """Whether a requested address is the server's; port 0 means "any port"."""
    if requested.type == "ip" and requested.port == 0:
        requested = Address(type="ip", host=requested.host, port=actual.port, tls=requested.tls)
    return requested == actual


def _check_unix_path(sess: Session, path: str) -> None:
    """Refuse a socket path that exists, except a dead socket we left in our own directory."""
    if os.path.normpath(path) != path or len(path.encode()) > 107:
        raise errors.InvalidArgument(
            f"socket path {path!r} must be normalized and at most 107 bytes long")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise errors.InvalidArgument(f"socket path {path!r} is not usable: {e.strerror}") from e
    ours = os.path.dirname(path) == sess.cfg.socket_dir and path.endswith(".sock")
    if ours and stat.S_ISSOCK(st.st_mode) and not _socket_alive(path):
        log.warning("removing stale socket %s", path)
        os.unlink(path)
        return
    raise errors.AlreadyExists(f"socket path {path!r} already exists (address in use)")


def _path(addr: Address) -> str:
    """The socket path of a unix address (resolved addresses and the server's have one)."""
    if addr.socket is None:
        raise errors.InternalError(f"{addr.describe()} has no path")
    return addr.socket


def _host(addr: Address) -> str:
    """The host of an ip address (the schema requires it), without IPv6 brackets."""
    if addr.host is None:
        raise errors.InternalError(f"{addr.describe()} has no host")
    return addr.host.strip("[]")


def _socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _bind(sess: Session, addr: Address) -> socket.socket:
    """Bind and listen on ``addr``. Raises AlreadyExists or InvalidArgument."""
    if addr.type == "unix":
        path = _path(addr)
        _check_unix_path(sess, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as e:
            sock.close()
            raise errors.InvalidArgument(f"cannot bind {path}: {e.strerror}") from e
        finally:
            os.umask(old)
        fleecefile.mark_socket(path, sess.uuid)     # the proof stop_server needs
        if sess.cfg.socket_group:
            os.chown(path, -1, grp.getgrnam(sess.cfg.socket_group).gr_gid)
            os.chmod(path, 0o660)
    else:
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(_host(addr)).version == 6 \
                else socket.AF_INET
        except ValueError as e:
            raise errors.InvalidArgument(f"host {addr.host!r} is not an IP address") from e
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_host(addr), addr.port))
        except OSError as e:
            sock.close()
            raise errors.AlreadyExists(
                f"cannot listen on {addr.describe()}: {e.strerror} (address in use?)") from e
    sock.listen(16)
    warning = exposure_warning(addr, sock.getsockname()[1] if addr.type == "ip" else 0)
    if warning:
        log.warning("NBD export of domain %s %s", sess.dom.name(), warning)
    return sock


def exposure_warning(addr: Address, port: int) -> Optional[str]:
    """What to shout when an export listens on TCP without TLS: on any address,
    loopback included (every local user can connect to 127.0.0.1; TCP has no
    file permissions)."""
    if addr.type != "ip" or addr.tls:
        return None
    if ipaddress.ip_address(_host(addr)).is_loopback:
        return (f"listens on {addr.host}:{port} WITHOUT encryption or authentication: every "
                f"local user can read the disks; use a unix socket (file permissions) or "
                f"tls='yes'")
    return (f"listens on {addr.host}:{port} WITHOUT encryption or authentication: anyone "
            f"who can reach it can read the disks; use tls='yes' or a unix socket")


def start_server(sess: Session, addr: Address) -> ServerRecord:
    """Record, bind and start the NBD server; its record. Undoes itself on failure."""
    dom = sess.dom
    server = ServerRecord(state=metadata.CREATING, type=addr.type, fdname=names.NBD_FDNAME,
                          socket=addr.socket, host=addr.host, port=addr.port)
    if addr.type == "unix":
        if addr.tls:
            raise errors.InvalidArgument("TLS is for TCP exports; a unix socket is "
                                         "protected by its file permissions")
        _check_unix_path(sess, _path(addr))
    sess.state.server = server
    sess.save()
    killpoint("export-start:recorded")
    try:
        sock = _bind(sess, addr)
        try:
            if addr.type == "ip":
                server.port = sock.getsockname()[1]
                sess.save()
            killpoint("export-start:socket-bound")
            blockgraph.getfd(dom, sock.fileno(), names.NBD_FDNAME)
        finally:
            sock.close()
        if addr.tls:
            server.tls = tls.setup(sess)
            sess.save()
        blockgraph.nbd_server_start(dom, names.NBD_FDNAME, server.tls)
        killpoint("export-start:server-started")
        server.state = metadata.READY
        sess.save()
    except BaseException:
        stop_server(sess)
        sess.save()
        raise
    log.info("domain %s: NBD server listening on %s", dom.name(), addr.describe())
    return server


def stop_server(sess: Session) -> None:
    """Stop our NBD server and remove its socket; tolerate a half-started one."""
    server = sess.state.server
    if server is None:
        return
    if _server_may_be_ours(sess):
        blockgraph.nbd_server_stop(sess.dom)
    blockgraph.closefd(sess.dom, server.fdname)
    if server.tls or server.type == "ip":
        tls.teardown(sess)
    if server.type == "unix" and server.socket:
        problem = fleecefile.socket_problem(server.socket, sess.uuid)
        if problem == "":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(server.socket)
        elif problem != "gone":     # the metadata names a socket we cannot prove ours
            log.warning("domain %s: not removing socket %r: %s", sess.dom.name(),
                        server.socket, problem)
    sess.state.server = None
    log.info("domain %s: NBD server stopped", sess.dom.name())


def _server_may_be_ours(sess: Session) -> bool:
    """Only stop qemu's NBD server when no export of someone else uses it."""
    foreign = [e for e in blockgraph.export_ids(sess.dom)
               if not e.startswith(names.PREFIX)]
    if foreign:
        log.warning("domain %s: not stopping the NBD server: exports %s are not ours",
                    sess.dom.name(), ", ".join(foreign))
        return False
    return True


# --- exports --------------------------------------------------------------------

def _plan_exports(sess: Session, spec: documents.ExportSpec
                  ) -> list[tuple[ExportRecord, str, list[dict]]]:
    """(record, node to export, bitmap actions) per requested disk. Changes nothing.

    Raises NotFound, AlreadyExists, and for checkpoints InvalidArgument or
    OperationInvalid."""
    existing = sess.state.exports()
    taken_names = {e.name for e in existing}
    taken_ids = {e.id for e in existing}
    planned = []
    for ds in spec.disks:
        snap = sess.state.snapshot(ds.snapshot)
        if snap is None:
            raise errors.NotFound(f"no snapshot {ds.snapshot!r} in domain {sess.dom.name()!r}")
        if snap.state == metadata.BROKEN:
            raise errors.OperationInvalid(
                f"snapshot {snap.name!r} is broken and cannot be read: {snap.reason}")
        _check_read_path(sess, snap)
        found = next(((i, d) for i, d in enumerate(snap.disks) if d.name == ds.name), None)
        if found is None:
            raise errors.NotFound(f"snapshot {ds.snapshot!r} has no disk {ds.name!r} (it has "
                                  f"{', '.join(d.name for d in snap.disks)})")
        index, disk = found
        name = ds.exportname or f"{ds.name}-{ds.snapshot}"
        if name in taken_names:
            raise errors.AlreadyExists(f"export name {name!r} is already in use")
        taken_names.add(name)
        serial = 0
        while names.export_id(snap.id, index, serial) in taken_ids:
            serial += 1
        eid = names.export_id(snap.id, index, serial)
        taken_ids.add(eid)
        rec = ExportRecord(id=eid, disk=ds.name, snapshot=ds.snapshot, name=name,
                           state=metadata.CREATING)
        actions: list[dict] = []
        if ds.checkpoint is not None:
            rec.checkpoint, rec.node = ds.checkpoint, disk.base
            rec.bitmap = names.export_bitmap(snap.id, index, serial)
            actions = checkpoints.export_bitmap_actions(sess, snap, disk, ds.checkpoint,
                                                        rec.bitmap)
        planned.append((rec, snap.export_node(disk), actions))
    return planned


def _check_read_path(sess: Session, snap: metadata.SnapshotRecord) -> None:
    """Refuse to export a snapshot-access snapshot on a qemu whose such reads are wrong.

    Raises OperationInvalid."""
    if snap.readpath != readpath.SNAPSHOT_ACCESS:
        return
    found = readpath.verdict(sess.dom, sess.cfg.state_dir)
    if found.readpath != readpath.SNAPSHOT_ACCESS:
        raise errors.OperationInvalid(
            f"snapshot {snap.name!r} reads through snapshot-access, which serves live data on "
            f"this qemu ({found.reason}); it was made by an older libvirt-fleece: delete it "
            f"and take a new one")


def start(sess: Session, spec: documents.ExportSpec) -> None:
    """Start the exports ``spec`` asks for, and the server with the first.

    Raises NotFound, AlreadyExists, InvalidArgument, OperationInvalid,
    QMPError; on any failure the exports started so far are removed."""
    dom = sess.dom
    planned = _plan_exports(sess, spec)
    server = sess.state.server
    if server is not None:
        if spec.address is not None and not _same_address(
                _resolve_address(sess, spec.address), _server_address(server)):
            raise errors.AlreadyExists(
                f"the NBD server of domain {dom.name()!r} already listens on "
                f"{_server_address(server).describe()} (qemu has only one); omit "
                f"<address> to join it, or stop its exports first")
    else:
        server = start_server(sess, _resolve_address(sess, spec.address))
    added = []
    try:
        for rec, _node, _actions in planned:
            server.exports.append(rec)
        sess.save()
        for rec, node, actions in planned:
            bitmaps.run(dom, actions)
            blockgraph.export_add(dom, rec.id, node, rec.name,
                                  [{"node": rec.node, "name": rec.bitmap}]
                                  if rec.bitmap else None)
            added.append(rec)
            killpoint("export-start:export-added")
        for rec in added:
            rec.state = metadata.READY
        sess.save()
    except BaseException:
        for rec, _node, _actions in planned:
            remove_export(sess, rec, force=True)
        if not server.exports:
            stop_server(sess)
        sess.save()
        raise
    log.info("domain %s: exported %s", dom.name(), ", ".join(p[0].name for p in planned))


def remove_export(sess: Session, rec: ExportRecord, force: bool) -> None:
    """Delete one export in qemu and from the state; tolerate a missing one."""
    blockgraph.export_del(sess.dom, rec.id, force=force)
    if rec.bitmap and rec.node is not None:        # set together
        present = {b.name for b in bitmaps.by_node(sess.dom).get(rec.node, [])}
        if rec.bitmap in present:
            bitmaps.run(sess.dom, [bitmaps.remove(rec.node, rec.bitmap)])
    server = sess.state.server
    if server is not None and rec in server.exports:
        server.exports.remove(rec)


def stop_exports(sess: Session, recs: list[ExportRecord], force: bool) -> None:
    """Remove exports and stop the server after the last one."""
    if not recs:
        return
    for rec in recs:
        rec.state = metadata.DELETING
    sess.save()
    killpoint("export-stop:recorded")
    for rec in recs:
        remove_export(sess, rec, force)
        killpoint("export-stop:export-removed")
    if sess.state.server is not None and not sess.state.server.exports:
        stop_server(sess)
        killpoint("export-stop:server-stopped")
    sess.save()


def stop(sess: Session, spec: documents.ExportSpec, force: bool) -> None:
    """Stop the exports ``spec`` names (the server after the last).

    Raises NotFound, InvalidArgument."""
    existing = sess.state.exports()
    chosen: list[ExportRecord] = []
    for ds in spec.disks:
        # without exportname=, every export of that disk of that snapshot
        recs = [e for e in existing if e.disk == ds.name and e.snapshot == ds.snapshot
                and ds.exportname in (None, e.name)]
        if not recs:
            what = f"export {ds.exportname!r}" if ds.exportname else "export"
            raise errors.NotFound(f"no {what} of disk {ds.name!r} of snapshot "
                                  f"{ds.snapshot!r} (blockExportList shows the exports)")
        chosen.extend(r for r in recs if r not in chosen)
    if spec.address is not None and sess.state.server is not None and not _same_address(
            _resolve_address(sess, spec.address), _server_address(sess.state.server)):
        raise errors.InvalidArgument(
            f"the exports listen on {_server_address(sess.state.server).describe()}, "
            f"not {spec.address.describe()}")
    stop_exports(sess, chosen, force=force)


def list_documents(sess: Session) -> list[str]:
    """The <domainblockexportlist> of the server (none without one)."""
    server = sess.state.server
    if server is None:
        return []
    return [documents.export_list_document(_server_address(server), [
        {"name": e.disk, "snapshot": e.snapshot, "checkpoint": e.checkpoint,
         "exportname": e.name, "bitmap": e.bitmap, "readPath": _read_path_of(sess, e)}
        for e in server.exports])]


def _read_path_of(sess: Session, rec: ExportRecord) -> Optional[str]:
    snap = sess.state.snapshot(rec.snapshot)
    return snap.readpath if snap is not None else None
