# SPDX-License-Identifier: LGPL-2.1-or-later
"""The public XML documents: snapshot and export requests, and their descriptions.

Parsing validates against the RelaxNG schemas in ``xml-metadata/`` and then
checks what a schema cannot say (duplicates). Formatting builds the
documents ``getXMLDesc`` and ``blockExportList`` return.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from lxml import etree

from . import errors, xmlutil


@dataclasses.dataclass
class SnapshotDiskSpec:
    name: str
    fleece: Optional[str] = None


@dataclasses.dataclass
class SnapshotSpec:
    name: Optional[str]
    disks: list[SnapshotDiskSpec]
    size_limit: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Address:
    type: str                       # unix | ip
    socket: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    tls: bool = False

    def describe(self) -> str:
        if self.type == "unix":
            return f"unix socket {self.socket}" if self.socket else "a unix socket"
        return f"{self.host}:{self.port}" + (" with TLS" if self.tls else "")


@dataclasses.dataclass
class ExportDiskSpec:
    name: str
    snapshot: str
    exportname: Optional[str] = None
    checkpoint: Optional[str] = None


@dataclasses.dataclass
class ExportSpec:
    address: Optional[Address]
    disks: list[ExportDiskSpec]


def _no_duplicates(values: list, what: str, doc: str) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise errors.InvalidArgument(f"{doc}: {what} {v!r} is given twice")
        seen.add(v)


NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:@-]{0,127}\Z")


def check_name(name: Optional[str], what: str) -> None:
    """Raises InvalidArgument, saying the rule, for a name the schema would refuse."""
    if name is not None and not NAME_RULE.match(name):
        raise errors.InvalidArgument(
            f"{what} {name!r} is not a valid name: use 1 to 128 letters, digits and "
            f"'._+:@-', starting with a letter or digit")


def parse_snapshot(xml: str) -> SnapshotSpec:
    """Parse a <domainblocksnapshot> request. Raises InvalidArgument."""
    doc = "snapshot XML"
    root = xmlutil.parse(xml, doc)
    check_name(root.findtext("name"), "snapshot name")
    xmlutil.validate(root, "domainblocksnapshot", doc)
    disks = []
    for el in root.findall("disk"):
        fleece = el.find("fleece")
        disks.append(SnapshotDiskSpec(xmlutil.required(el, "name"),
                                      fleece.get("file") if fleece is not None else None))
    _no_duplicates([d.name for d in disks], "disk", doc)
    _no_duplicates([d.fleece for d in disks if d.fleece], "fleece file", doc)
    name = root.findtext("name")
    limit = root.findtext("sizeLimit")
    return SnapshotSpec(name=name, disks=disks, size_limit=int(limit) if limit else None)


def parse_address(el: Optional[etree._Element]) -> Optional[Address]:
    if el is None:
        return None
    port = el.get("port")
    return Address(type=xmlutil.required(el, "type"), socket=el.get("socket"), host=el.get("host"),
                   port=int(port) if port is not None else None, tls=el.get("tls") == "yes")


def parse_export(xml: str) -> ExportSpec:
    """Parse a <domainblockexport> request. Raises InvalidArgument."""
    doc = "export XML"
    root = xmlutil.parse(xml, doc)
    if root.tag != "domainblockexport":
        raise errors.InvalidArgument(f"{doc}: expected <domainblockexport>, got <{root.tag}>")
    for el in root.findall("disk"):
        for attr in ("snapshot", "checkpoint", "exportname"):
            check_name(el.get(attr), attr)
    xmlutil.validate(root, "domainblockexport", doc)
    disks = [ExportDiskSpec(xmlutil.required(el, "name"), xmlutil.required(el, "snapshot"),
                            el.get("exportname"), el.get("checkpoint"))
             for el in root.findall("disk")]
    _no_duplicates([d.exportname or f"{d.name}-{d.snapshot}" for d in disks],
                   "export name", doc)
    return ExportSpec(address=parse_address(root.find("address")), disks=disks)


def address_element(addr: Address) -> etree._Element:
    el = etree.Element("address", type=addr.type)
    if addr.type == "unix":
        el.set("socket", addr.socket or "")
    else:
        el.set("host", addr.host or "")
        if addr.port is not None:
            el.set("port", str(addr.port))
        if addr.tls:
            el.set("tls", "yes")
    return el


def snapshot_document(name: str, created: int, disks: list[dict], state: str = "ready",
                      reason: Optional[str] = None, checkpoint: Optional[str] = None,
                      size_limit: Optional[int] = None) -> str:
    """The filled-in <domainblocksnapshot>; ``disks`` hold name, file, capacity, allocation."""
    root = etree.Element("domainblocksnapshot")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "creationTime").text = str(created)
    etree.SubElement(root, "state").text = state
    if reason:
        etree.SubElement(root, "reason").text = reason
    if checkpoint:
        etree.SubElement(root, "checkpoint").text = checkpoint
    if size_limit:
        etree.SubElement(root, "sizeLimit").text = str(size_limit)
    for d in disks:
        el = etree.SubElement(root, "disk", name=d["name"], type="file")
        etree.SubElement(el, "fleece", file=d["file"], capacity=str(d["capacity"]),
                         allocation=str(d["allocation"]))
    return xmlutil.tostring(root)


def export_list_document(address: Address, exports: list[dict]) -> str:
    """The live <blockexport>; ``exports`` hold name (disk), snapshot, exportname."""
    root = etree.Element("blockexport", type="nbd")
    root.append(address_element(address))
    for e in exports:
        etree.SubElement(root, "disk", **{k: v for k, v in e.items() if v is not None})
    return xmlutil.tostring(root)
