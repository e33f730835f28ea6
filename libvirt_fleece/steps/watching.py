# SPDX-License-Identifier: LGPL-2.1-or-later
"""Making sure a domain with a size-limited snapshot has its watcher (:mod:`..watcher`).

One detached watcher per domain: a ``flock`` on a file in the state directory keeps
it single; a call that finds the lock free starts one. Every public call does so
when a ready snapshot has a size limit, so a watcher that died (or one of an older
version, see below) is replaced at the next call.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Optional

from .. import detached, metadata
from ..session import Session

# Watchers of 0.3.0 and before hold ``<uuid>.watcher``. One that runs while the package is
# upgraded under it calls steps by names this version no longer has (its modules were
# loaded before the upgrade, their lazy imports load the new ones), so it does nothing
# any more: a watcher of this version takes a lock of its own and runs beside it.
LOCK_VERSION = 2


def lock_path(state_dir: str, domain_uuid: str) -> str:
    return os.path.join(state_dir, f"{domain_uuid}.watcher{LOCK_VERSION}")


def needed(state: metadata.State) -> bool:
    """Whether the domain's state calls for a watcher: a ready snapshot with a size limit."""
    return any(s.limit and s.state == metadata.READY for s in state.snapshots)


def try_lock(path: str) -> Optional[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def ensure_running(sess: Session) -> None:
    """Start the domain's watcher unless one runs already (the lock says so).
    Raises OSError when the state directory or the process cannot be made."""
    os.makedirs(sess.cfg.state_dir, mode=0o700, exist_ok=True)
    fd = try_lock(lock_path(sess.cfg.state_dir, sess.uuid))
    if fd is None:
        return                      # a watcher holds the lock
    try:    # the watcher inherits the lock: no second one starts while it starts up
        detached.start([sys.executable, "-c",
                        "import sys; from libvirt_fleece import watcher; "
                        "sys.exit(watcher.main(*sys.argv[1:]))",
                        sess.dom.connect().getURI(), sess.uuid, str(fd)], pass_fds=(fd,))
    finally:
        os.close(fd)
