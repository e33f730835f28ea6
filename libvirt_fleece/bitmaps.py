# SPDX-License-Identifier: LGPL-2.1-or-later
"""Dirty bitmaps: the plugin's names for them and the QMP actions on them.

Checkpoint bitmaps are persistent (stored in the qcow2 image) and named::

    fleece-cp.<creation time, ns, 16 hex>.<disk size, hex>.<checkpoint name>

so the chain (order, names, creation times) and the disk size each covers
can be rebuilt from the images alone. Everything else the plugin creates
is a temporary, non-persistent bitmap named ``fleece-<snapshot id>-...``.
Bitmaps with other names (libvirt's checkpoints, other tools) are never
touched.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

import libvirt

from . import errors, qmp

CHECKPOINT_PREFIX = "fleece-cp."
TEMP_PREFIX = "fleece-"
_NAME = re.compile(r"fleece-cp\.([0-9a-f]{16})\.([0-9a-f]{1,16})\.(.+)\Z")


@dataclasses.dataclass(frozen=True)
class Bitmap:
    node: str
    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    count: int
    granularity: int


def checkpoint_bitmap_name(seq: int, size: int, checkpoint: str) -> str:
    return f"{CHECKPOINT_PREFIX}{seq:016x}.{size:x}.{checkpoint}"


def parse_checkpoint_bitmap(name: str) -> Optional[tuple[int, int, str]]:
    """(seq, size, checkpoint name) of one of our checkpoint bitmaps, else None."""
    m = _NAME.match(name)
    return (int(m.group(1), 16), int(m.group(2), 16), m.group(3)) if m else None


def checkpoint_parts(name: str) -> tuple[int, int, str]:
    """(seq, size, checkpoint name) of a name already known to be one of our
    checkpoint bitmaps. Raises InternalError when it is not."""
    parsed = parse_checkpoint_bitmap(name)
    if parsed is None:
        raise errors.InternalError(f"{name!r} is not a checkpoint bitmap of libvirt-fleece")
    return parsed


def by_node(dom: libvirt.virDomain) -> dict[str, list[Bitmap]]:
    """Every named bitmap in qemu, by node name."""
    result: dict[str, list[Bitmap]] = {}
    for n in qmp.execute(dom, "query-named-block-nodes", {"flat": True}):
        for b in n.get("dirty-bitmaps") or []:
            if not b.get("name"):
                continue
            result.setdefault(n["node-name"], []).append(Bitmap(
                node=n["node-name"], name=b["name"], recording=b.get("recording", False),
                persistent=b.get("persistent", False), inconsistent=b.get("inconsistent", False),
                count=b.get("count", 0), granularity=b.get("granularity", 0)))
    return result


def add(node: str, name: str, persistent: bool = False, disabled: bool = False) -> dict:
    return {"type": "block-dirty-bitmap-add",
            "data": {"node": node, "name": name, "persistent": persistent, "disabled": disabled}}


def merge(node: str, target: str, sources: list[str]) -> dict:
    return {"type": "block-dirty-bitmap-merge",
            "data": {"node": node, "target": target, "bitmaps": sources}}


def disable(node: str, name: str) -> dict:
    return {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}


def enable(node: str, name: str) -> dict:
    return {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": name}}


def remove(node: str, name: str) -> dict:
    return {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": name}}


def run(dom: libvirt.virDomain, actions: list[dict]) -> None:
    """Apply bitmap actions atomically (one transaction); nothing to do is fine."""
    if actions:
        qmp.transaction(dom, actions)
