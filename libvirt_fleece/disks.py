# SPDX-License-Identifier: LGPL-2.1-or-later
"""The disks of a domain, from its live XML, and which of them can be snapshotted."""

from __future__ import annotations

import dataclasses
from typing import Optional

from lxml import etree

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)

SUPPORTED_TYPES = ("file", "block")
SUPPORTED_FORMATS = ("qcow2", "raw")


@dataclasses.dataclass(frozen=True)
class DomainDisk:
    target: str
    alias: Optional[str]
    type: str
    device: str
    format: Optional[str]
    source: Optional[str]
    readonly: bool
    shareable: bool

    def unsupported_reason(self) -> Optional[str]:
        """Why this disk cannot be snapshotted, or None when it can."""
        if self.device not in ("disk", "lun"):
            return f"it is a {self.device}, not a disk"
        if self.source is None:
            return "it has no medium"
        if self.type not in SUPPORTED_TYPES:
            return f"its type {self.type!r} is not supported (file and block are)"
        if self.format not in SUPPORTED_FORMATS:
            return f"its format {self.format!r} is not supported (qcow2 and raw are)"
        if self.readonly:
            return "it is read-only"
        if self.shareable:
            return "it is shareable (another VM may write it behind qemu's back)"
        if not self.alias:
            return "libvirt gave it no alias (is the domain running?)"
        return None

    def matches_qdev(self, qdev: str) -> bool:
        """Whether a ``query-block`` entry's ``qdev`` is this disk's device."""
        return bool(self.alias) and (
            qdev == self.alias or qdev.startswith(f"/machine/peripheral/{self.alias}/"))


def parse_domain_disks(xml: str) -> list[DomainDisk]:
    """All <disk> elements of a domain XML, in document order."""
    root = etree.fromstring(xml.encode("utf-8"), _PARSER)
    result = []
    for el in root.findall("./devices/disk"):
        target = el.find("target")
        dev = target.get("dev") if target is not None else None
        if not dev:
            continue
        source = el.find("source")
        src = None
        if source is not None:
            src = source.get("file") or source.get("dev") or source.get("name") \
                or source.get("volume")
        driver = el.find("driver")
        alias = el.find("alias")
        result.append(DomainDisk(
            target=dev,
            alias=alias.get("name") if alias is not None else None,
            type=el.get("type", "file"),
            device=el.get("device", "disk"),
            format=driver.get("type") if driver is not None else None,
            source=src,
            readonly=el.find("readonly") is not None,
            shareable=el.find("shareable") is not None,
        ))
    return result
