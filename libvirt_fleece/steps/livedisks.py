# SPDX-License-Identifier: LGPL-2.1-or-later
"""The domain's disks as qemu runs them: device, top node, libvirt's format node, size."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..qemu import blockgraph
from .. import disks, virt
from ..session import Session


@dataclasses.dataclass(frozen=True)
class LiveDisk:
    disk: disks.DomainDisk
    qdev: Optional[str]
    top: Optional[str]       # node the guest device points at
    base: Optional[str]      # libvirt's format node (below our filters), None if foreign
    capacity: int

    @property
    def name(self) -> str:
        return self.disk.target


def live_disks(sess: Session) -> list[LiveDisk]:
    """Every disk of the domain with qemu's view of it, in domain XML order."""
    devs = blockgraph.devices(sess.dom)
    result = []
    for d in disks.parse_domain_disks(virt.domain_xml(sess.dom)):
        qdev = next((q for q in devs if d.matches_qdev(q)), None)
        top = base = None
        capacity = 0
        if qdev is not None:
            inserted = devs[qdev]["inserted"]
            top = inserted["node-name"]
            capacity = int(inserted.get("image", {}).get("virtual-size", 0))
            base = _base_of(sess, d.target, top)
        result.append(LiveDisk(disk=d, qdev=qdev, top=top, base=base, capacity=capacity))
    return result


def _base_of(sess: Session, disk: str, top: str) -> Optional[str]:
    for snap in sess.state.snapshots:
        rec = snap.disk(disk)
        if rec is not None and rec.filter_node == top:
            return rec.base
    return top if top.startswith("libvirt-") else None
