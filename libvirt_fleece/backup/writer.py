# SPDX-License-Identifier: LGPL-2.1-or-later
"""Which backup points may hold data other than the disk's at the snapshot's instant.

Before 0.2.0 the snapshot exports read through a ``snapshot-access`` node on
the copy-before-write filter. On a QEMU before 8.0.0 without the upstream fix
a4d5224c2cb6 ("hbitmap: fix hbitmap_status() return value for first dirty bit
case"; Debian 12's 7.2+dfsg-7+deb12u18 does not carry it), a read that started
in a cluster the guest had overwritten since the snapshot and went on into one
it had not returned live data, and block status over such ranges reported the
live disk's allocation. A point written while the guest wrote, zeroed or
discarded blocks may therefore differ from the disk at the snapshot's
instant, and its checksum, computed from what was read, cannot tell (see
NEWS.md).

A point is *suspect* when the plugin that wrote it is older than
:data:`FIXED_IN` (a point without a writer record was written by 0.1.x) and
the qemu that served it is older than :data:`QEMU_FIXED` or unknown. A point
whose chain (the points its incremental files are backed by) holds a suspect
point is suspect too: restoring it reads their data.
"""

from __future__ import annotations

import re
from typing import Optional

from .. import errors
from .manifest import Manifest, Point, Writer

FIXED_IN = (0, 2, 0)        # the first libvirt-fleece whose snapshot reads are right
QEMU_FIXED = (8, 0, 0)      # the first QEMU with a4d5224c2cb6
_VERSION_RE = re.compile(r"(\d{1,6})\.(\d{1,6})(?:\.(\d{1,6}))?")
_TEXT_MAX = 80


def version_tuple(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """(major, minor, micro) of a version string such as "7.2.22" or "0.2.0.dev1"
    (micro 0 when absent); None for None or text that does not start with one."""
    if not isinstance(text, str):
        return None
    m = _VERSION_RE.match(text.strip())
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def affected_writer(writer: Optional[Writer]) -> bool:
    """Whether a point with this writer record may hold wrong data (None: no
    record, written by 0.1.x). An unreadable version counts as an old one."""
    if writer is not None:
        plugin = version_tuple(writer.libvirt_fleece)
        if plugin is not None and plugin >= FIXED_IN:
            return False
    qemu = version_tuple(writer.qemu) if writer is not None else None
    return qemu is None or qemu < QEMU_FIXED


def clean(text: object, limit: int = _TEXT_MAX) -> str:
    """``text`` safe to print on a terminal: control and other unprintable
    characters become "?", and it is cut to ``limit`` characters."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit - 3] + "..."


def describe_writer(writer: Optional[Writer]) -> str:
    """"libvirt-fleece 0.1.x on an unknown QEMU", "libvirt-fleece 0.1.0 on QEMU 7.2.22"."""
    if writer is None:
        return "libvirt-fleece 0.1.x on an unknown QEMU"
    qemu = f"QEMU {clean(writer.qemu)}" if writer.qemu else "an unknown QEMU"
    return f"libvirt-fleece {clean(writer.libvirt_fleece)} on {qemu}"


def _label(point: Point) -> str:
    """"3 (vda,vdb, 2026-11-01 12:00)" from the point's manifest entry."""
    disks = ",".join(d.name for d in point.disks)
    when = point.time.replace("T", " ")[:16] if isinstance(point.time, str) else ""
    return f"{point.index} ({clean(disks)}, {clean(when)})"


def _suspect_bases(manifest: Manifest, point: Point) -> list[Point]:
    """The suspect points (other than ``point``) whose files ``point``'s chains use."""
    owner = {(d.name, d.file): p for p in manifest.points for d in p.disks}
    found: dict[int, Point] = {}
    for disk in point.disks:
        try:
            chain = manifest.chain(point, disk.name)
        except errors.Error:       # a broken chain: verify and restore say so
            continue
        for entry in chain:
            base = owner.get((entry.name, entry.file))
            if base is not None and base is not point and affected_writer(base.writer):
                found[base.index] = base
    return [found[i] for i in sorted(found)]


_RISK = ("on QEMU before 8.0 {what} may differ from the disk at the snapshot's instant if the "
         "guest wrote during the backup, and verify cannot prove {it} right; take a new full "
         "backup (see NEWS.md)")


def point_warning(manifest: Manifest, point: Point) -> Optional[str]:
    """The warning for one point (None when it is not suspect), on one line."""
    if affected_writer(point.writer):
        return (f"WARNING: point {_label(point)} was written by "
                f"{describe_writer(point.writer)}: "
                + _RISK.format(what="its data", it="it"))
    bases = _suspect_bases(manifest, point)
    if not bases:
        return None
    writers = " / ".join(dict.fromkeys(describe_writer(b.writer) for b in bases))
    return (f"WARNING: point {_label(point)} builds on point"
            f"{'s' if len(bases) > 1 else ''} {', '.join(str(b.index) for b in bases)}, "
            f"written by {writers}: restoring it reads their data; "
            + _RISK.format(what="that data", it="it"))


def point_warnings(manifest: Manifest) -> list[str]:
    """One warning line per suspect point of the manifest, oldest first."""
    out = []
    for p in manifest.points:
        w = point_warning(manifest, p)
        if w is not None:
            out.append(w)
    return out


def suspect_reason(manifest: Manifest, point: Point) -> Optional[str]:
    """Why an incremental on top of ``point`` would inherit suspect data (None: it
    would not), short, for the reason of an ``auto`` backup."""
    if affected_writer(point.writer):
        return (f"point {point.index} was written by {describe_writer(point.writer)}, "
                f"which may be wrong on QEMU before 8.0 (see NEWS.md)")
    bases = _suspect_bases(manifest, point)
    if bases:
        return (f"point {point.index} builds on point {bases[0].index}, written by "
                f"{describe_writer(bases[0].writer)}, which may be wrong on QEMU before 8.0 "
                f"(see NEWS.md)")
    return None
