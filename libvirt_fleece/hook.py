# SPDX-License-Identifier: LGPL-2.1-or-later
"""The libvirt qemu hook: clean up fleece images on stop, rediscover checkpoints on start.

libvirt runs ``/etc/libvirt/hooks/qemu.d/libvirt-fleece`` (a shim installed
by :mod:`.hookinstall` from ``hooks/libvirt-fleece.in``) as ``HOOK DOMAIN
OPERATION SUBOP -`` with the live domain XML on stdin. The shim calls
:func:`run`, which configures logging and calls :func:`main`.

==============  =================================================================
operation       what the hook does
==============  =================================================================
``stopped``,    remove the fleece images recorded in the live state document,
``release``     and every image in ``fleece_dir`` marked for this domain (a record
                lost in a crash), each only when :func:`.fleecefile.remove` proves
                it ours by its ``trusted.libvirt-fleece`` mark; remove the NBD
                server's unix socket when it is a dead socket in ``socket_dir``
``started``,    spawn a fully detached worker (``python -m libvirt_fleece.hook
``reconnect``   --reconcile UUID``) that waits until libvirt is done with the
                domain and runs the plugin's reconcile in a session: checkpoints
                rediscovered from the images into the metadata (crashed ones
                invalid), interrupted operations finished or undone
``migrate``,    filters: print the domain XML without the live-only state
``restore``     document (snapshots and exports cannot follow the domain); the
                checkpoint mirror stays. Nothing printed = XML unchanged
anything else   nothing
==============  =================================================================

Rules (``field-notes.md``, "Hooks"): the hook never calls libvirt (libvirt
holds the domain while it runs), never fails (a failing ``reconnect`` hook
kills the domain; :func:`main` always returns 0 and never raises), never
blocks, and logs every line with the domain and operation: to syslog when
``/dev/log`` exists, else to ``hook_log_file`` (:mod:`.config`).

The metadata on stdin is editable by anyone allowed to change the domain's
XML, so it only *names* candidate files: a file is removed only when it is a
regular file (not a symlink) carrying the mark the plugin wrote when it
created it, ``<domain uuid>/<snapshot id>/<disk>``, in a ``trusted.*``
extended attribute that only root can write.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
import re
import signal
import socket
import stat
import sys
import time
from typing import Iterator, Optional, TextIO

from lxml import etree

from . import config, detached, errors, fleecefile, metadata, xmlutil

log = logging.getLogger(__name__)

OPERATIONS = ("stopped", "release", "started", "reconnect", "migrate", "restore")
MAX_INPUT = 16 << 20              # bytes of domain XML read from stdin
MAX_SWEEP = 100_000               # directory entries of fleece_dir looked at
SYSLOG_SOCKET = "/dev/log"
SYSLOG_IDENT = "libvirt-fleece-hook"
WORKER_URI = "qemu:///system"

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class BadInput(Exception):
    """The XML on stdin is not a usable domain document."""


# --- logging --------------------------------------------------------------------

_context = {"domain": "-", "operation": "-"}


class _ContextFilter(logging.Filter):
    """Puts the domain and operation of the current invocation on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.hook_domain = _context["domain"]
        record.hook_operation = _context["operation"]
        return True


@contextlib.contextmanager
def _logging_context(domain: str, operation: str) -> Iterator[None]:
    saved = dict(_context)
    _context.update(domain=_printable(domain), operation=_printable(operation))
    try:
        yield
    finally:
        _context.update(saved)


def _printable(text: object, limit: int = 200) -> str:
    s = str(text)[:limit]
    return "".join(c if c.isprintable() else "?" for c in s) or "-"


_LINE = "domain %(hook_domain)s, operation %(hook_operation)s: %(levelname)s: %(message)s"


def setup_logging(cfg: config.Config) -> logging.Handler:
    """Send the package's log records to syslog, else to ``cfg.hook_log_file``.

    Returns the handler (already attached to the root logger). Never raises:
    when neither works, the records are dropped.
    """
    handler: Optional[logging.Handler] = None
    if cfg.hook_syslog and _is_socket(SYSLOG_SOCKET):
        try:
            handler = logging.handlers.SysLogHandler(
                address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.ident = f"{SYSLOG_IDENT}[{os.getpid()}]: "
            handler.setFormatter(logging.Formatter(_LINE))
        except OSError:
            handler = None
    if handler is None:
        try:
            os.makedirs(os.path.dirname(cfg.hook_log_file), mode=0o750, exist_ok=True)
            handler = logging.handlers.WatchedFileHandler(cfg.hook_log_file, encoding="utf-8")
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s {SYSLOG_IDENT}[%(process)d]: {_LINE}"))
        except OSError:
            handler = logging.NullHandler()
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, cfg.hook_log_level.upper(), logging.INFO))
    return handler


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _load_config() -> config.Config:
    """The configuration; its defaults when the file is unusable (logged)."""
    try:
        return config.load()
    except errors.Error as e:
        log.error("configuration unusable, using the defaults: %s", e)
        return config.Config()


# --- entry points ----------------------------------------------------------------

def run(argv: list[str]) -> int:
    """What the installed shim calls with ``sys.argv[1:]``; always returns 0, never raises."""
    try:
        domain = argv[0] if len(argv) > 0 else "-"
        operation = argv[1] if len(argv) > 1 else "-"
        subop = argv[2] if len(argv) > 2 else "-"
        if operation not in OPERATIONS:
            return 0
        with _logging_context(domain, operation):
            cfg = _load_config()
            setup_logging(cfg)
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")
        stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="strict")
        try:
            main(domain, operation, subop, stdin, stdout)
            stdout.flush()
        finally:
            # give the buffers back, so closing the wrappers leaves sys.stdin/stdout intact
            stdin.detach()
            stdout.detach()
    except BaseException:   # noqa: BLE001 - libvirt kills a domain whose reconnect hook fails
        with contextlib.suppress(BaseException):
            log.exception("unexpected failure")
    return 0


def main(domain: str, operation: str, subop: str, stdin: TextIO, stdout: TextIO) -> int:
    """Handle one hook invocation; always returns 0, never raises, never calls libvirt."""
    if operation not in OPERATIONS:
        return 0
    started = time.monotonic()
    try:
        with _logging_context(domain, operation):
            try:
                cfg = _load_config()
                text = _read(stdin)
                if operation in ("stopped", "release"):
                    cleanup(text, cfg)
                elif operation in ("started", "reconnect"):
                    spawn_reconcile(text)
                else:
                    filter_state(text, stdout)
            except BadInput as e:
                log.error("ignoring unusable input: %s", e)
            except Exception:   # noqa: BLE001 - never fail a domain start or reconnect
                log.exception("unexpected failure (ignored)")
            finally:
                log.info("%s/%s handled in %.1f ms", operation, _printable(subop),
                         (time.monotonic() - started) * 1000)
    except BaseException:   # noqa: BLE001 - not even KeyboardInterrupt may escape
        pass
    return 0


def _read(stdin: TextIO) -> str:
    try:
        text = stdin.read(MAX_INPUT + 1)
    except (OSError, ValueError, UnicodeError) as e:
        raise BadInput(f"cannot read the domain XML: {e}") from e
    if not isinstance(text, str):
        raise BadInput("the domain XML is not text")
    if len(text) > MAX_INPUT:
        raise BadInput(f"domain XML larger than {MAX_INPUT} characters")
    return text


def parse_domain(text: str) -> etree._Element:
    """Parse the domain XML libvirt gives a hook. Raises BadInput.

    No DTD, no entities, no network, no huge trees."""
    if not text.strip():
        raise BadInput("no domain XML on stdin")
    try:
        # comments and processing instructions stay: a filter prints the document back
        root = xmlutil.parse(text, "domain XML", max_size=MAX_INPUT, keep_comments=True)
    except errors.InvalidArgument as e:
        raise BadInput(str(e)) from e
    if root is None or root.tag != "domain":
        raise BadInput("the document is not a <domain>")
    return root


def domain_uuid(root: etree._Element) -> str:
    """The domain's UUID (lower case). Raises BadInput."""
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not _UUID.match(uuid):
        raise BadInput(f"no usable <uuid> in the domain XML ({_printable(uuid, 60)!r})")
    return uuid


def _state_elements(root: etree._Element) -> list[etree._Element]:
    md = root.find("metadata")
    if md is None:
        return []
    return [el for el in md if isinstance(el.tag, str) and el.tag == f"{{{metadata.NS_URI}}}state"]


# --- stopped / release -------------------------------------------------------------

def recorded_files(state_el: etree._Element, uuid: str) -> list[tuple[str, bytes, str]]:
    """(path, owner tag, description) of every fleece image the state document names.

    A document that is not valid against the schema is still read, leniently:
    it only names candidates, the mark on each file decides."""
    try:
        state = metadata.loads(etree.tostring(state_el, encoding="unicode"))
        return [(d.file, fleecefile.owner_tag(uuid, s.id, d.name),
                 f"snapshot {s.name!r} disk {d.name!r}")
                for s in state.snapshots for d in s.disks]
    except errors.Error as e:
        log.warning("state document is not valid (%s); reading its file records anyway", e)
    result = []
    for snap in state_el:
        if not isinstance(snap.tag, str) or etree.QName(snap).localname != "snapshot":
            continue
        for disk in snap:
            if not isinstance(disk.tag, str) or etree.QName(disk).localname != "disk":
                continue
            sid, name, path = snap.get("id"), disk.get("name"), disk.get("file")
            if sid and name and path:
                result.append((path, fleecefile.owner_tag(uuid, sid, name),
                               f"snapshot {_printable(snap.get('name'))!r} disk "
                               f"{_printable(name)!r}"))
    return result


def recorded_socket(state_el: etree._Element) -> Optional[str]:
    for srv in state_el:
        if isinstance(srv.tag, str) and etree.QName(srv).localname == "server" and \
                srv.get("type") == "unix":
            return srv.get("socket")
    return None


def remove_image(path: str, tag: bytes, what: str) -> bool:
    """Remove one fleece image when it is provably ours; log the removal or the refusal."""
    problem = fleecefile.path_problem(path)
    if problem:
        log.warning("refusing to remove %r (%s): %s", _printable(path), what, problem)
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        log.debug("fleece image %s (%s) is already gone", path, what)
        return False
    except OSError as e:
        log.warning("refusing to remove %s (%s): cannot inspect it: %s", path, what, e.strerror)
        return False
    if not stat.S_ISREG(st.st_mode):
        # never even opened: opening a device node (a watchdog, a tape) can act on it
        log.warning("refusing to remove %s (%s): %s", path, what,
                    fleecefile.image_problem(path, tag))
        return False
    try:
        removed = fleecefile.remove(path, tag)
    except errors.Error as e:
        log.error("cannot remove fleece image %s (%s): %s", path, what, e)
        return False
    if removed:
        log.info("removed fleece image %s (%s)", path, what)
    elif os.path.lexists(path):
        log.warning("refusing to remove %s (%s): %s", path, what,
                    fleecefile.image_problem(path, tag) or "it changed while it was checked")
    return removed


def sweep(fleece_dir: str, uuid: str) -> int:
    """Remove the images in ``fleece_dir`` marked for this domain (records lost in a crash);
    at most :data:`MAX_SWEEP` entries are looked at (the hook must not block)."""
    try:
        marked = fleecefile.marked_files(fleece_dir, uuid, limit=MAX_SWEEP)
    except FileNotFoundError:
        return 0
    except OSError as e:
        log.warning("cannot list %s: %s", fleece_dir, e.strerror)
        return 0
    removed = 0
    for path, mark in marked:
        what = f"left in {fleece_dir}, mark {mark.decode('utf-8', 'replace')}"
        removed += remove_image(path, mark, what)
    return removed


def remove_socket(path: object, socket_dir: str, uuid: str) -> bool:
    """Remove the server's unix socket when it is a dead socket directly in ``socket_dir``
    that carries the domain's mark (fleecefile.socket_problem)."""
    if not isinstance(path, str) or fleecefile.path_problem(path) or \
            os.path.dirname(path) != os.path.normpath(socket_dir):
        log.warning("not removing socket %r: not in %s", _printable(path), socket_dir)
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        log.warning("not removing socket %s: %s", path, e.strerror)
        return False
    if not stat.S_ISSOCK(st.st_mode):
        log.warning("not removing %s: it is not a socket", path)
        return False
    problem = fleecefile.socket_problem(path, uuid)
    if problem:
        log.warning("not removing socket %s: %s", path, problem)
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        try:
            s.connect(path)
            log.warning("not removing socket %s: something still listens on it", path)
            return False
        except OSError:
            pass
    try:
        os.unlink(path)
    except OSError as e:
        log.warning("cannot remove socket %s: %s", path, e.strerror)
        return False
    log.info("removed socket %s", path)
    return True


def cleanup(text: str, cfg: config.Config) -> None:
    """``stopped``/``release``: qemu is gone, so are its snapshots: remove their files."""
    root = parse_domain(text)
    uuid = domain_uuid(root)
    states = _state_elements(root)
    removed = 0
    for state_el in states:
        for path, tag, what in recorded_files(state_el, uuid):
            removed += remove_image(path, tag, what)
    removed += sweep(cfg.fleece_dir, uuid)
    for state_el in states:
        sock = recorded_socket(state_el)
        if sock is not None:
            remove_socket(sock, cfg.socket_dir, uuid)
    if removed:
        log.info("removed %d fleece image(s) of domain %s", removed, uuid)


# --- migrate / restore -------------------------------------------------------------

def filter_state(text: str, stdout: TextIO) -> None:
    """Print the domain XML without the live-only state document (nothing when it has none)."""
    root = parse_domain(text)
    states = _state_elements(root)
    if not states:
        return
    for el in states:
        parent = el.getparent()
        if parent is None:      # never: they are children of <metadata>
            continue
        if el.tail and el.tail.strip() == "":
            prev = el.getprevious()
            # keep the indentation tidy: the element's tail belongs to the next sibling
            if prev is not None:
                prev.tail = el.tail
            else:
                parent.text = el.tail
        parent.remove(el)
    out = etree.tostring(root, encoding="unicode")
    stdout.write(out + ("\n" if not out.endswith("\n") else ""))
    log.info("dropped the live snapshot/export state (it cannot follow the domain)")


# --- started / reconnect -------------------------------------------------------------

def worker_command(uuid: str) -> list[str]:
    return [sys.executable, "-I", "-m", "libvirt_fleece.hook", "--reconcile", uuid]


def spawn_reconcile(text: str) -> None:
    """``started``/``reconnect``: hand the reconcile to a fully detached worker."""
    uuid = domain_uuid(parse_domain(text))
    # the installed package, as the shim found it: python -I ignores PYTHONPATH
    proc = detached.start(worker_command(uuid), cwd="/", package_path=False)
    log.info("reconcile handed to detached worker pid %d", proc.pid)


def reconcile_domain(uuid: str, timeout: float) -> int:
    """The worker: wait until the domain runs and libvirt lets go of it, then reconcile.

    Returns 0 when done, 1 when it gave up (logged)."""
    import libvirt

    from . import calls
    from . import virt  # noqa: F401 - importing it silences libvirt's stderr handler

    deadline = time.monotonic() + timeout
    started = time.monotonic()
    conn = None
    last: object = None
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None or not conn.isAlive():
                    conn = libvirt.open(WORKER_URI)
                dom = conn.lookupByUUIDString(uuid)
                _context["domain"] = _printable(dom.name())
                state = dom.state()[0]
                if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                    log.info("domain stopped before it could be reconciled; nothing to do")
                    return 0
                if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
                    with calls.session(dom):
                        pass
                    log.info("checkpoints and interrupted operations reconciled in %.1f s",
                             time.monotonic() - started)
                    return 0
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    log.info("domain is gone; nothing to reconcile")
                    return 0
                last = e.get_error_message()
                if conn is not None and e.get_error_domain() in (libvirt.VIR_FROM_RPC,
                                                                 libvirt.VIR_FROM_REMOTE):
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
            except errors.NotFound as e:
                log.info("domain is gone; nothing to reconcile (%s)", e)
                return 0
            except errors.Error as e:
                last = e
            log.debug("not yet: %s", last)
            time.sleep(0.25)
        log.error("gave up reconciling after %.0f s: %s", timeout, last)
        return 1
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def worker_main(argv: list[str]) -> int:
    """``python -m libvirt_fleece.hook --reconcile UUID`` (run detached by the hook)."""
    if len(argv) != 2 or argv[0] != "--reconcile" or not _UUID.match(argv[1]):
        print("usage: python -m libvirt_fleece.hook --reconcile UUID", file=sys.stderr)
        return 2
    uuid = argv[1]
    with _logging_context(uuid, "reconcile"):
        try:
            cfg = _load_config()
            setup_logging(cfg)
            # a hard limit: libvirt calls may wait for the domain's job on their own
            signal.alarm(int(cfg.hook_reconcile_timeout) + 60)
            return reconcile_domain(uuid, cfg.hook_reconcile_timeout)
        except Exception:   # noqa: BLE001 - a detached worker has nobody else to tell
            log.exception("unexpected failure")
            return 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
