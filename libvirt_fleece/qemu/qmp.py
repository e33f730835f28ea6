# SPDX-License-Identifier: LGPL-2.1-or-later
"""QMP transport: commands sent through libvirt's monitor passthrough.

Everything above this module speaks Python dicts; this module turns them
into JSON, sends them with ``virDomainQemuMonitorCommand`` and turns qemu's
answer back into the ``return`` value or a :class:`~.errors.QMPError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import libvirt
import libvirt_qemu

from .. import errors, virt
from . import names

log = logging.getLogger(__name__)


def _command_json(command: str, arguments: Optional[dict]) -> str:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg)


def _parse_reply(command: str, arguments: Optional[dict], reply: str) -> Any:
    try:
        parsed = json.loads(reply)
    except ValueError as e:
        raise errors.InternalError(
            f"qemu's reply to {command} is not JSON: {reply[:200]!r}") from e
    if "error" in parsed:
        err = parsed["error"]
        raise errors.QMPError(command, err.get("class", "GenericError"),
                              err.get("desc", "unknown error"), arguments)
    return parsed.get("return")


# Within one API call (which holds the domain's lock) the same queries are asked
# several times; their answers are reused until the call sends anything else.
# The cache keeps qemu's reply text: parsing it again (C) costs a tenth of a
# deepcopy of the parsed answer (Python) on a domain with 19 disks.
CACHEABLE = frozenset({"query-named-block-nodes", "query-block", "query-block-exports",
                       "query-fdsets"})
_local = threading.local()


@contextlib.contextmanager
def cached_queries(dom: libvirt.virDomain) -> Iterator[None]:
    """Reuse CACHEABLE answers for ``dom`` in this thread until any other command."""
    caches = _local.__dict__.setdefault("caches", {})
    key = dom.UUIDString()
    outer = key in caches
    caches.setdefault(key, {})
    try:
        yield
    finally:
        if not outer:
            caches.pop(key, None)


def _cache_for(dom: libvirt.virDomain) -> Optional[dict]:
    caches = getattr(_local, "caches", None)
    return caches.get(dom.UUIDString()) if caches else None


def execute(dom: libvirt.virDomain, command: str,
            arguments: Optional[dict] = None, fresh: bool = False) -> Any:
    """Run one QMP command on the domain's monitor and return its result.

    ``fresh`` asks qemu even when a cached answer exists (polling).
    Raises QMPError when qemu refuses the command, OperationInvalid when the
    domain is not running, LibvirtError for other libvirt failures.
    """
    cache = _cache_for(dom)
    text = _command_json(command, arguments)
    if cache is not None:
        if command in CACHEABLE:
            if not fresh and text in cache:
                return _parse_reply(command, arguments, cache[text])
        else:
            cache.clear()
    if command in WALKS_EVERY_NODE:
        wait_for_settled_jobs(dom)
    reply = _send(dom, command, text)
    if cache is not None and command in CACHEABLE:
        cache[text] = reply
    return _parse_reply(command, arguments, reply)


# QEMU 7.2 aborts (a NULL child in bdrv_refresh_filename) when query-named-block-nodes
# runs while block-stream's job is concluded and not yet dismissed: its implicit
# copy-on-read filter then lingers without a child (reproduced here with QMP alone;
# libvirt 9.0 dismisses its jobs within milliseconds of their end, but a plugin call or
# the watcher can land in that window). So these queries wait until no job is between
# its end and its dismissal.
WALKS_EVERY_NODE = frozenset({"query-named-block-nodes"})
ENDING = frozenset({"waiting", "pending", "aborting", "concluded"})
# A stream job can conclude between our query-jobs and the query itself (a small pull
# takes milliseconds; the watcher's teardown lost that race once under load): while one
# exists at all, the plugin does not walk the graph.
DROPS_ITS_FILTER = frozenset({"stream"})
SETTLE_TIMEOUT = 10.0


def wait_for_settled_jobs(dom: libvirt.virDomain, timeout: Optional[float] = None) -> None:
    """Wait until no qemu job of the domain is ending (concluded and not dismissed,
    or on its way there); a concluded job of the plugin's own is dismissed at once.

    Raises OperationInvalid naming the jobs when that takes longer than ``timeout``
    seconds (default SETTLE_TIMEOUT; someone left a job concluded), and as :func:`execute`."""
    deadline = time.monotonic() + (SETTLE_TIMEOUT if timeout is None else timeout)
    while True:
        jobs = _parse_reply("query-jobs", None,
                            _send(dom, "query-jobs", _command_json("query-jobs", None)))
        ending = [j for j in jobs or [] if j.get("status") in ENDING
                  or j.get("type") in DROPS_ITS_FILTER]
        if not ending:
            return
        for j in ending:
            own = str(j.get("id", "")).startswith(names.OWN_JOB_PREFIX)
            if j["status"] == "concluded" and own:
                log.warning("domain %s: dismissing the plugin's concluded job %s",
                            dom.name(), j["id"])
                with contextlib.suppress(errors.QMPError):     # its owner was quicker
                    _parse_reply("job-dismiss", None, _send(dom, "job-dismiss", _command_json(
                        "job-dismiss", {"id": j["id"]})))
        if time.monotonic() >= deadline:
            described = ", ".join(f"{j.get('type')} job {j.get('id')!r} ({j.get('status')})"
                                  for j in ending)
            raise errors.OperationInvalid(
                f"domain {dom.name()!r}: {described} is running or ended and not dismissed "
                f"(libvirt's blockpull is a stream job); reading qemu's block graph then "
                f"can crash QEMU 7.2, so the plugin waits: try again when it is gone "
                f"(`virsh blockjob`, or `virsh qemu-monitor-command` with job-dismiss if "
                f"its owner died)")
        time.sleep(0.02)


def _send(dom: libvirt.virDomain, command: str, text: str) -> str:
    """qemu's reply text to the command ``text``. Raises as :func:`execute`."""
    log.debug("QMP %s -> %s", dom.name(), text)
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
    except libvirt.libvirtError as e:
        raise virt.translate(e, f"cannot send {command} to domain {dom.name()!r}") from e
    log.debug("QMP %s <- %s", dom.name(), reply)
    return reply


def execute_with_fd(dom: libvirt.virDomain, command: str,
                    arguments: Optional[dict], fds: Sequence[int]) -> Any:
    """Like :func:`execute`, passing open file descriptors along (SCM_RIGHTS).

    Used with ``add-fd`` and ``getfd`` so that qemu uses files and sockets the
    plugin opened itself. Raises as :func:`execute`.
    """
    cache = _cache_for(dom)
    if cache is not None:
        cache.clear()
    text = _command_json(command, arguments)
    log.debug("QMP %s -> %s (fds %s)", dom.name(), text, list(fds))
    try:
        result = libvirt_qemu.qemuMonitorCommandWithFiles(dom, text, list(fds), 0)
    except libvirt.libvirtError as e:
        raise virt.translate(e, f"cannot send {command} to domain {dom.name()!r}") from e
    reply = result[0] if isinstance(result, (tuple, list)) else result
    log.debug("QMP %s <- %s", dom.name(), reply)
    return _parse_reply(command, arguments, reply)


def transaction(dom: libvirt.virDomain, actions: list[dict]) -> Any:
    """Run several actions atomically; all or none of them take effect."""
    return execute(dom, "transaction", {"actions": actions})
