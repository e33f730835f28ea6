# SPDX-License-Identifier: LGPL-2.1-or-later
"""Keep a guest from staying paused when the process that paused it dies.

Before the plugin pauses a guest's vCPUs (to insert several disks' filters
at one instant) it starts a detached guard process with a pipe on its
stdin. The plugin writes ``paused`` after pausing and ``resumed`` after
resuming. If the pipe closes (the plugin died) or the timeout passes while
the guest is paused by us, the guard resumes the guest itself. A guest the
user had paused is never paused or resumed by the plugin at all.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from typing import IO, Iterator, Optional

from . import detached

log = logging.getLogger(__name__)


def marker_path(state_dir: str, domain_uuid: str) -> str:
    """A file that exists while a plugin process has the guest paused: if the next
    call finds it (the process died and the guard could not resume), it resumes."""
    return os.path.join(state_dir, f"{domain_uuid}.paused")


_marker_dirs: dict[str, str] = {}


def remove_marker_for(domain_uuid: str) -> None:
    path = _marker_dirs.get(domain_uuid)
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class PauseGuard:
    """Context manager around the short pause: ``with PauseGuard(dom, t) as g: ...``."""

    def __init__(self, uri: str, domain_uuid: str, timeout: float, marker: str) -> None:
        # the command line a pause guard of any version is started with: keep it
        self._proc = detached.start(
            [sys.executable, "-c", "import sys; from libvirt_fleece import pauseguard; "
             "sys.exit(pauseguard.main(sys.argv[1:]))", uri, domain_uuid, str(timeout), marker],
            stdin=subprocess.PIPE)
        assert self._proc.stdin is not None     # stdin=PIPE
        self._stdin: IO[bytes] = self._proc.stdin

    def _say(self, word: str) -> None:
        try:
            self._stdin.write(word.encode() + b"\n")
            self._stdin.flush()
        except OSError:
            log.warning("pause guard is gone; resuming is up to this process")

    def paused(self) -> None:
        self._say("paused")

    def resumed(self) -> None:
        self._say("resumed")

    def close(self) -> None:
        """Let the guard go: it exits on EOF (not waited for; subprocess reaps it)."""
        try:
            self._stdin.close()
        except OSError:
            pass

    def __enter__(self) -> "PauseGuard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_words(fd: int, timeout: float) -> Iterator[Optional[str]]:
    """Yield words from the pipe; yield None on timeout, stop on EOF."""
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            yield None
            continue
        chunk = os.read(fd, 256)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace").strip()


RESUME_PATIENCE = 60.0      # seconds to keep trying (libvirtd may be restarting)


def _resume_once(uri: str, domain_uuid: str) -> bool:
    """True when the domain runs (resumed now or already) or is gone."""
    import libvirt
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByUUIDString(domain_uuid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER:
        dom.resume()
        log.warning("resumed domain %s left paused by a libvirt-fleece process", dom.name())
    conn.close()
    return True


def _resume(uri: str, domain_uuid: str) -> None:
    """Resume, retrying while libvirtd is unreachable (a restart), up to RESUME_PATIENCE."""
    deadline = time.monotonic() + RESUME_PATIENCE
    while True:
        try:
            if _resume_once(uri, domain_uuid):
                remove_marker_for(domain_uuid)
                return
        except Exception:  # noqa: BLE001 - libvirtd restarting: try again
            if time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    uri, domain_uuid, timeout = argv[0], argv[1], float(argv[2])
    if len(argv) > 3:
        _marker_dirs[domain_uuid] = argv[3]
    paused = False
    paused_at = 0.0
    for word in _read_words(0, 0.1):
        if word == "paused":
            paused, paused_at = True, time.monotonic()
        elif word == "resumed":
            paused = False
        if paused and time.monotonic() - paused_at > timeout:
            break
    if paused:
        try:
            _resume(uri, domain_uuid)
        except Exception:  # noqa: BLE001 - last resort, must not raise
            log.exception("could not resume domain %s", domain_uuid)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
