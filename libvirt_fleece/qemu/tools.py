# SPDX-License-Identifier: LGPL-2.1-or-later
"""Running ``qemu-img`` and ``qemu-nbd``: one way to start them, one error when they fail.

Files reach the tools as ``/dev/fd/N`` or ``/proc/PID/fd/N`` paths (the caller
passes the descriptors in ``pass_fds``), never by a name someone else could
swap. A tool that fails, or cannot be started, raises
:class:`..errors.ToolError` naming the command and its message.
"""

from __future__ import annotations

import subprocess
from typing import Optional, Sequence

from .. import errors

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"
_INSTALL = "install qemu-utils"


def _start(cmd: list[str], pass_fds: Sequence[int]) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(cmd, pass_fds=tuple(pass_fds), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise errors.ToolError(cmd, f"cannot run {cmd[0]}: {e.strerror} ({_INSTALL})") from e


def _finish(cmd: list[str], proc: subprocess.Popen[str], ok: Sequence[int],
            timeout: Optional[float]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise errors.ToolError(cmd, f"no answer within {timeout:.0f} s") from e
    if proc.returncode not in ok:
        raise errors.ToolError(cmd, (err or out).strip()[:2000] or
                               f"exit status {proc.returncode}", proc.returncode)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def qemu_img(args: Sequence[str], pass_fds: Sequence[int] = (), ok: Sequence[int] = (0,),
             timeout: Optional[float] = None) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-img ARGS``; ``ok`` lists the exit statuses that are success.
    Raises ToolError."""
    cmd = [QEMU_IMG, *args]
    return _finish(cmd, _start(cmd, pass_fds), ok, timeout)


def qemu_img_many(jobs: Sequence[tuple[Sequence[str], Sequence[int]]]) -> None:
    """Run several ``qemu-img`` commands (args, pass_fds) at once and wait for all.
    Raises ToolError for the first that failed."""
    started = []
    try:
        for args, fds in jobs:
            cmd = [QEMU_IMG, *args]
            started.append((cmd, _start(cmd, fds)))
    finally:
        failures = []
        for cmd, proc in started:
            try:
                _finish(cmd, proc, (0,), None)
            except errors.ToolError as e:
                failures.append(e)
    if failures:
        raise failures[0]


def qemu_nbd_argv(path: str, options: Sequence[str]) -> list[str]:
    """The command line of a ``qemu-nbd`` serving the qcow2 file ``path`` (libnbd
    starts it with systemd socket activation; it exits when the client disconnects)."""
    return [QEMU_NBD, "--format=qcow2", *options, path]
