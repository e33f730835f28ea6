#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Snapshot creation time and the guest's pause against the number of checkpoints.

One throwaway domain (a 1 GiB qcow2 disk), checkpoints added 0, 10, 50, 100; at each
count five snapshots without a checkpoint are made and deleted. Prints the median
creation time and the median pause (from the plugin's "guest paused" debug line).
Needs root and the real libvirtd; run from a checkout:
``.venv/bin/python bench/checkpoint_pause.py``.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import libvirt  # noqa: E402

import libvirt_fleece as lf  # noqa: E402
import vm as vmlib  # noqa: E402

SNAP = "<domainblocksnapshot><name>%s</name><disk name='vda'/></domainblocksnapshot>"


class PauseLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.pauses: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = record.getMessage()
        if "guest paused" in m:
            self.pauses.append(float(m.split("guest paused ")[1].split()[0]))


def main() -> int:
    pauses = PauseLog()
    log = logging.getLogger("libvirt_fleece.snapshots")
    log.setLevel(logging.DEBUG)
    log.addHandler(pauses)
    t = vmlib.TestVM(libvirt.open("qemu:///system"), disks=1, size_mib=1024, tag="pause-")
    t.start()
    try:
        made = 0
        for n in (0, 10, 50, 100):
            while made < n:
                lf.blockSnapshotCreateXML(t.dom, SNAP % f"c{made}",
                                          lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT)
                lf.blockSnapshotLookupByName(t.dom, f"c{made}").delete()
                made += 1
            times = []
            pauses.pauses.clear()
            for _ in range(5):
                start = time.monotonic()
                lf.blockSnapshotCreateXML(t.dom, SNAP % "s")
                times.append(time.monotonic() - start)
                lf.blockSnapshotLookupByName(t.dom, "s").delete()
            pause = statistics.median(pauses.pauses) if pauses.pauses else 0.0
            print(f"{n:4d} checkpoints: snapshot create median "
                  f"{statistics.median(times) * 1000:.0f} ms, guest paused median {pause:.1f} ms",
                  flush=True)
    finally:
        t.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
