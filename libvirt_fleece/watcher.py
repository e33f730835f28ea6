# SPDX-License-Identifier: LGPL-2.1-or-later
"""The per-domain watcher: acts on qemu's BLOCK_WRITE_THRESHOLD while nobody calls the plugin.

A snapshot with a size limit arms qemu's write threshold on its fleece
images (:mod:`.steps.health`). qemu reports crossing it with a QMP event, which
only a process listening at that moment receives. So every call on a domain
with a limited snapshot makes sure one detached watcher runs
(:mod:`.steps.watching`; a ``flock`` on ``<state_dir>/<uuid>.watcher2`` keeps
it single): it listens through
libvirt's event loop and on the event runs the plugin's reconcile, which
breaks the snapshot cleanly before the host filesystem fills. It exits
when the domain stops or has no limited snapshot left.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from typing import Any, Optional

import libvirt
import libvirt_qemu

from . import calls, config, metadata
from .steps.watching import lock_path, needed, try_lock

log = logging.getLogger(__name__)

CHECK_INTERVAL = 2.0


def _still_needed(dom: libvirt.virDomain) -> bool:
    try:
        if dom.state()[0] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            return False
        state = metadata.load(dom)
    except Exception:  # noqa: BLE001 - domain gone or unreadable: nothing to watch
        return False
    return needed(state)


def main(uri: str, domain_uuid: str, lock_fd: Optional[str] = None) -> int:
    """Watch the domain until it needs no watcher. ``lock_fd``: the descriptor of the
    watcher's lock, taken by the process that started this one (so no second watcher
    starts while this one is still starting); without it, take the lock here."""
    handler = logging.handlers.SysLogHandler("/dev/log") if os.path.exists("/dev/log") \
        else logging.StreamHandler()
    logging.basicConfig(level=logging.INFO, handlers=[handler],
                        format="libvirt-fleece-watcher[%(process)d]: %(message)s")
    cfg = config.load()
    path = lock_path(cfg.state_dir, domain_uuid)
    fd = int(lock_fd) if lock_fd is not None else try_lock(path)
    if fd is None:
        return 0
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    libvirt.virEventRegisterDefaultImpl()
    conn = libvirt.open(uri)
    dom = conn.lookupByUUIDString(domain_uuid)
    pending: list[dict] = []

    def on_event(_conn: libvirt.virConnect, _dom: libvirt.virDomain, event: str, _secs: int,
                 _usecs: int, details: Any, _opaque: object) -> None:
        try:
            data = json.loads(details) if isinstance(details, str) else (details or {})
        except ValueError:
            data = {}
        if event == "BLOCK_WRITE_THRESHOLD" and \
                str(data.get("node-name", "")).startswith("fleece-"):
            pending.append(data)
        elif event == "DEVICE_DELETED":          # a hot-unplug: follow it (unplug.py)
            pending.append({"node-name": f"(device {data.get('device')} deleted)"})

    libvirt_qemu.qemuMonitorEventRegister(conn, dom, "BLOCK_WRITE_THRESHOLD", on_event, None, 0)
    libvirt_qemu.qemuMonitorEventRegister(conn, dom, "DEVICE_DELETED", on_event, None, 0)
    libvirt.virEventAddTimeout(int(CHECK_INTERVAL * 1000), lambda _t, _o: None, None)
    log.info("watching domain %s for fleece size limits", dom.name())
    # a threshold crossed before we listened sent its event to nobody: look once now
    pending.append({"node-name": "(crossed before the watcher listened)"})
    last_check = time.monotonic()
    while True:
        libvirt.virEventRunDefaultImpl()
        if pending:
            log.warning("domain %s: looking after qemu's event (%s)", dom.name(),
                        pending[-1].get("node-name"))
            pending.clear()
            try:
                for line in calls.repair(dom):
                    log.warning("domain %s: %s", dom.name(), line)
            except Exception:  # noqa: BLE001 - keep watching; the next call retries
                log.exception("domain %s: could not break the snapshot", dom.name())
        if time.monotonic() - last_check >= CHECK_INTERVAL:
            last_check = time.monotonic()
            if not _still_needed(dom):
                log.info("domain %s: no limited snapshot left; watcher exits", dom.name())
                return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
