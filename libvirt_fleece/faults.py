# SPDX-License-Identifier: LGPL-2.1-or-later
"""Kill points and stop points for fault-injection tests.

Every multi-step operation calls :func:`killpoint` after each step that
changes qemu, a file or the metadata. When ``$LIBVIRT_FLEECE_KILL_AT``
names that step, the process kills itself with SIGKILL on the spot, as a
crash or ``kill -9`` would; tests then check that the next call cleans up.

:func:`stoppoint` makes races deterministic: when ``$LIBVIRT_FLEECE_STOP_AT``
names the step, the process creates ``NAME.reached`` in
``$LIBVIRT_FLEECE_STOP_DIR`` and waits (at most :data:`STOP_TIMEOUT` seconds)
until the test, having done its move (a swapped directory, a planted link),
creates ``NAME.go`` there.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "LIBVIRT_FLEECE_KILL_AT"
STOP_ENV = "LIBVIRT_FLEECE_STOP_AT"
STOP_DIR_ENV = "LIBVIRT_FLEECE_STOP_DIR"
STOP_TIMEOUT = 60.0

# Every stop point (a step after which an attacker of a backup directory may move).
STOP_POINTS = (
    "backup:journal-saved",
    "restore:target-created",
)

# Every kill point, in the order the operations reach them.
KILL_POINTS = (
    "readpath:self-test-started",
    "snapshot-create:recorded",
    "snapshot-create:file-created",
    "snapshot-create:fd-added",
    "snapshot-create:fleece-node-added",
    "snapshot-create:filter-added",
    "snapshot-create:bitmaps-copied",
    "snapshot-create:guest-paused",
    "snapshot-create:bitmaps-changed",
    "snapshot-create:filter-inserted",
    "snapshot-create:read-path-built",
    "snapshot-create:ready",
    "snapshot-delete:recorded",
    "snapshot-delete:access-node-removed",
    "snapshot-delete:filter-removed",
    "snapshot-delete:fleece-node-removed",
    "snapshot-delete:file-removed",
    "export-start:recorded",
    "export-start:socket-bound",
    "export-start:server-started",
    "export-start:export-added",
    "export-stop:recorded",
    "export-stop:export-removed",
    "export-stop:server-stopped",
    "checkpoint-delete:recorded",
    "checkpoint-delete:bitmaps-merged",
)


def killpoint(name: str) -> None:
    """Die here (SIGKILL) if the fault-injection variable names this step."""
    assert name in KILL_POINTS, name
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def stoppoint(name: str) -> None:
    """Wait here for the test's go-ahead if the stop variable names this step."""
    assert name in STOP_POINTS, name
    if os.environ.get(STOP_ENV) != name:
        return
    where = os.environ.get(STOP_DIR_ENV, "/tmp")
    with open(os.path.join(where, f"{name}.reached"), "w"):
        pass
    deadline = time.monotonic() + STOP_TIMEOUT
    while not os.path.exists(os.path.join(where, f"{name}.go")) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
