# SPDX-License-Identifier: LGPL-2.1-or-later
"""Errors raised by libvirt-fleece.

Every failure a caller can cause or meet is an :class:`Error`::

    Error
     +-- InvalidArgument        bad XML, names, paths, flags (nothing was changed)
     |    +-- NotFound          unknown domain, disk, snapshot, export
     |    +-- AlreadyExists     duplicate name, existing fleece file, address in use
     +-- OperationInvalid      the domain's state forbids it (not running, busy, order)
     +-- ConnectionError       remote URI, missing rights, libvirt unreachable
     +-- QMPError              qemu refused a command (keeps command, class, desc)
     +-- LibvirtError          any other libvirt failure (keeps the libvirt error code)
     +-- InternalError         an invariant of the plugin did not hold
"""

from __future__ import annotations

from typing import Any


class Error(Exception):
    """Root of all libvirt-fleece errors.

    Subclasses set ``msg`` as a template formatted with the keyword
    arguments given to the constructor, so each field stays available as an
    attribute (``err.disk``) for programs and the text reads well for people.
    """

    msg = "{reason}"
    MAX_MESSAGE = 1000          # hostile input is quoted in messages: keep them readable

    def __init__(self, reason: str = "", **fields: Any) -> None:
        self.reason = reason
        for key, value in fields.items():
            setattr(self, key, value)
        text = self.msg.format(self=self, reason=reason, **fields)
        if len(text) > self.MAX_MESSAGE:      # keep the head and the advice at the end
            half = self.MAX_MESSAGE // 2
            text = f"{text[:half]}...({len(text) - 2 * half} characters left out)...{text[-half:]}"
        super().__init__(text)


class InvalidArgument(Error):
    """The caller's input is wrong; nothing was changed."""


class NotFound(InvalidArgument):
    """A named object does not exist."""


class AlreadyExists(InvalidArgument):
    """A name, file or address is already taken."""


class OperationInvalid(Error):
    """The operation is not possible in the current state."""


class ConnectionError(Error):  # noqa: A001 - deliberate, scoped to this package
    """The connection to libvirt cannot be used by the plugin."""


class QMPError(Error):
    """QEMU answered a QMP command with an error."""

    msg = "qemu refused {command}: {desc} ({error_class})"
    command: str
    error_class: str
    desc: str
    arguments: Any

    def __init__(self, command: str, error_class: str, desc: str,
                 arguments: Any = None) -> None:
        super().__init__(command=command, error_class=error_class, desc=desc,
                         arguments=arguments)


class LibvirtError(Error):
    """A libvirt call failed for a reason the plugin does not translate."""

    msg = "{reason} (libvirt error {code})"
    code: int

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(reason, code=code)


class InternalError(Error):
    """An invariant of the plugin did not hold; please report it."""


class ToolError(Error):
    """``qemu-img`` or ``qemu-nbd`` failed or could not be run; the message has
    the command and what the tool said."""

    def __init__(self, cmd: list[str], reason: str, returncode: "int | None" = None) -> None:
        super().__init__(f"{' '.join(cmd)} failed: {reason}")
        self.cmd = cmd
        self.reason = reason
        self.returncode = returncode        # None: it did not run, or did not finish
