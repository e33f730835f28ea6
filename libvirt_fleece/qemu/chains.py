# SPDX-License-Identifier: LGPL-2.1-or-later
"""Backing chains and the checkpoint bitmaps spread down them.

libvirt's own graph changes move the plugin's checkpoint bitmaps between the
layers of a disk's backing chain (checked on libvirt 9.0 / QEMU 7.2). libvirt
acts only on bitmaps its rules call a valid chain (qemuBlockBitmapChainIsValid:
a copy in the top image, no gap below it, every copy recording and consistent).
Since 0.3.0 every checkpoint bitmap records until it is deleted, as libvirt's
own do, so all of them are carried; a bitmap an older version disabled (an
older checkpoint made by 0.1/0.2) is never carried or merged:

- an external snapshot adds, in the new overlay, an empty recording bitmap of
  the same name as each *recording* bitmap of the old top image; the old copies
  keep the writes made before it, in a now read-only layer;
- a commit (active or not) merges such chains into the base; qemu's commit job
  also dirties the base's enabled bitmaps with every cluster it copies;
- a blockpull merges such chains of the layers it drops into the top (the
  pulled data does not dirty bitmaps); other bitmaps go with their layer;
- a blockcopy carries such chains to the copy (a shallow copy gets empty ones
  above the kept backing chain).

So the changes since a checkpoint are the union of the same-named bitmaps
down the chain, and a checkpoint's history is whole only when every layer from
where it was made up to where it stopped recording (the top, for a bitmap
that still records) holds a copy. The functions here are pure (on qemu's
recorded answers) except :func:`read`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import libvirt

from .. import errors
from . import qmp


@dataclasses.dataclass(frozen=True)
class Layer:
    node: str
    file: str
    read_only: bool


@dataclasses.dataclass(frozen=True)
class BlockView:
    """qemu's named nodes and their backing links, at one moment."""
    nodes: dict[str, dict]           # query-named-block-nodes entries by node name
    backing: dict[str, str]          # node -> its backing node

    def chain(self, top: str) -> list[Layer]:
        """The layers from ``top`` down its backing links (top first)."""
        layers: list[Layer] = []
        node: Optional[str] = top
        while node is not None and node in self.nodes and \
                all(la.node != node for la in layers):
            n = self.nodes[node]
            layers.append(Layer(node=node, file=n.get("file", ""),
                                read_only=bool(n.get("ro", False))))
            node = self.backing.get(node)
        return layers

    def bitmap_names(self, node: str) -> dict[str, dict]:
        """The named bitmaps of one node, by name."""
        return {b["name"]: b for b in self.nodes.get(node, {}).get("dirty-bitmaps") or []
                if b.get("name")}


def view(named_nodes: list[dict], graph: Optional[dict]) -> BlockView:
    """A BlockView from ``query-named-block-nodes {flat: true}`` and
    ``x-debug-query-block-graph`` answers (None: no graph, see :func:`_by_filename`)."""
    if graph is None:
        return BlockView(nodes={n["node-name"]: n for n in named_nodes},
                         backing=_by_filename(named_nodes))
    ids = {n["id"]: n["name"] for n in graph.get("nodes", [])}
    backing = {ids[e["parent"]]: ids[e["child"]] for e in graph.get("edges", [])
               if e.get("name") == "backing" and e["parent"] in ids and e["child"] in ids}
    return BlockView(nodes={n["node-name"]: n for n in named_nodes}, backing=backing)


def _by_filename(named_nodes: list[dict]) -> dict[str, str]:
    """Backing links guessed from file names (a node's ``backing_file`` is the
    ``file`` of exactly one format node), for a qemu without the debug graph."""
    formats = [n for n in named_nodes if n.get("drv") not in ("file", "host_device")]
    links = {}
    for n in formats:
        below = [m["node-name"] for m in formats
                 if n.get("backing_file") and m.get("file") == n["backing_file"]]
        if len(below) == 1:
            links[n["node-name"]] = below[0]
    return links


def read(dom: libvirt.virDomain) -> BlockView:
    """qemu's graph now. Raises QMPError."""
    nodes = qmp.execute(dom, "query-named-block-nodes", {"flat": True})
    try:
        graph = qmp.execute(dom, "x-debug-query-block-graph")
    except errors.QMPError as e:
        if e.error_class != "CommandNotFound":
            raise
        graph = None
    return view(nodes, graph)


@dataclasses.dataclass(frozen=True)
class Spread:
    """Where one bitmap name lives in a chain."""
    name: str
    layers: list[Layer]              # the layers holding it, top first
    depth: list[int]                 # their indexes in the chain
    granularity: int = 0             # of the topmost copy
    nonempty: int = 0                # copies with at least one dirty cluster
    recording: bool = False          # whether the topmost copy records
    any_recording: bool = False      # whether some copy records

    @property
    def in_top(self) -> bool:
        return bool(self.depth) and self.depth[0] == 0

    def sources(self) -> list[dict]:
        """``block-dirty-bitmap-merge`` sources: every copy down the chain."""
        return [{"node": la.node, "name": self.name} for la in self.layers]


def spreads(v: BlockView, chain: list[Layer],
            wanted: Callable[[str], bool]) -> dict[str, Spread]:
    """Every bitmap name for which ``wanted(name)`` holds, anywhere in ``chain``."""
    found: dict[str, tuple[list[Layer], list[int]]] = {}
    for i, la in enumerate(chain):
        for name in v.bitmap_names(la.node):
            if wanted(name):
                layers, depth = found.setdefault(name, ([], []))
                layers.append(la)
                depth.append(i)
    return {name: Spread(name, layers, depth,
                         v.bitmap_names(layers[0].node)[name].get("granularity", 0),
                         sum(1 for la in layers
                             if v.bitmap_names(la.node)[name].get("count", 0) > 0),
                         bool(v.bitmap_names(layers[0].node)[name].get("recording", False)),
                         any(v.bitmap_names(la.node)[name].get("recording", False)
                             for la in layers))
            for name, (layers, depth) in found.items()}


def _layer(chain: list[Layer], i: int) -> str:
    where = "the top image" if i == 0 else "the backing image"
    return f"{where} {chain[i].file or chain[i].node}"


def broken_reason(disk: str, chain: list[Layer], s: Spread, reach: int) -> str:
    """Why the chain lost part of a bitmap's history ("" when it is whole).

    A checkpoint's bitmap is made in one layer and copied into each overlay
    libvirt adds while it records; it stops recording when the next checkpoint
    is made. So its copies must fill every layer from the deepest one up to
    ``reach``: the top (index 0) for the newest checkpoint, else the deepest
    layer of the next newer checkpoint's bitmap."""
    if not s.depth:
        return ""
    wanted = range(min(reach, s.depth[0]), s.depth[-1] + 1)
    lost = next((i for i in wanted if i not in s.depth), None)
    if lost is None:
        return ""
    return (f"the backing chain of {disk} changed since the checkpoint and its bitmap in "
            f"{_layer(chain, lost)} is missing (an image was replaced, or a layer dropped "
            f"without merging its bitmaps): take a full backup")


def broken_reasons(disk: str, chain: list[Layer], newest_first: list[Spread]) -> dict[str, str]:
    """:func:`broken_reason` of each of one disk's checkpoint bitmaps, given newest
    first. A bitmap that records in the top image must hold a copy in every layer
    down to where it was made; one that stopped (0.1/0.2 disabled all but the
    newest) only down from the layer the next newer one was made in. Without a top
    copy the kind cannot be told (a lower copy of a disabled bitmap may still record:
    read-only layers were never disabled), and the older rule is used."""
    reasons = {}
    reach = 0
    for s in newest_first:
        reasons[s.name] = broken_reason(disk, chain, s, 0 if s.recording and s.in_top else reach)
        if s.depth:
            reach = s.depth[-1]
    return reasons
