# SPDX-License-Identifier: LGPL-2.1-or-later
"""Dirty bitmaps: reading them and the QMP transaction actions on them.

Their names are :mod:`.names`'s: persistent checkpoint bitmaps and the
plugin's temporary ones. Bitmaps with other names (libvirt's checkpoints,
other tools) are never touched.
"""

from __future__ import annotations

import dataclasses

import libvirt

from . import qmp


@dataclasses.dataclass(frozen=True)
class Bitmap:
    node: str
    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    count: int
    granularity: int


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
