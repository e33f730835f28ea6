# SPDX-License-Identifier: LGPL-2.1-or-later
"""Per-domain serialization of the plugin's operations.

libvirt's metadata has no compare-and-swap, so every operation that reads
and writes the state holds an exclusive ``flock`` on
``<state_dir>/<domain uuid>.lock`` from its first read to its last write.
The kernel drops the lock when the holder dies, so a killed process never
blocks the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

from . import errors
from .config import Config

DEFAULT_TIMEOUT = 120.0


@contextlib.contextmanager
def domain_lock(cfg: Config, domain_uuid: str, domain_name: str,
                timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Hold the domain's lock; raises OperationInvalid after ``timeout`` seconds."""
    os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(cfg.state_dir, f"{domain_uuid}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise errors.OperationInvalid(
                        f"another libvirt-fleece operation on domain {domain_name!r} has "
                        f"held its lock for {timeout:.0f} s; try again later") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)
