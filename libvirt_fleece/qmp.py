# SPDX-License-Identifier: LGPL-2.1-or-later
"""QMP transport: commands sent through libvirt's monitor passthrough.

Everything above this module speaks Python dicts; this module turns them
into JSON, sends them with ``virDomainQemuMonitorCommand`` and turns qemu's
answer back into the ``return`` value or a :class:`~.errors.QMPError`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Sequence

import libvirt
import libvirt_qemu

from . import errors, virt

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


def execute(dom: libvirt.virDomain, command: str,
            arguments: Optional[dict] = None) -> Any:
    """Run one QMP command on the domain's monitor and return its result.

    Raises QMPError when qemu refuses the command, OperationInvalid when the
    domain is not running, LibvirtError for other libvirt failures.
    """
    text = _command_json(command, arguments)
    log.debug("QMP %s -> %s", dom.name(), text)
    try:
        reply = libvirt_qemu.qemuMonitorCommand(dom, text, 0)
    except libvirt.libvirtError as e:
        raise virt.translate(e, f"cannot send {command} to domain {dom.name()!r}") from e
    log.debug("QMP %s <- %s", dom.name(), reply)
    return _parse_reply(command, arguments, reply)


def execute_with_fd(dom: libvirt.virDomain, command: str,
                    arguments: Optional[dict], fds: Sequence[int]) -> Any:
    """Like :func:`execute`, passing open file descriptors along (SCM_RIGHTS).

    Used with ``add-fd`` and ``getfd`` so that qemu uses files and sockets the
    plugin opened itself. Raises as :func:`execute`.
    """
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
