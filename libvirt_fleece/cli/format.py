# SPDX-License-Identifier: LGPL-2.1-or-later
"""The pure parts of ``virsh-fleece``: ``--disk`` parsing, the request XML it
builds, and the parsing and formatting of what the library returns (tables,
times (sizes: :mod:`..units`), NBD URIs). No libvirt here; unit-tested on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence
from urllib.parse import quote

from lxml import etree

from .. import errors

SNAPSHOT_DISK_KEYS = ("fleece",)
EXPORT_START_DISK_KEYS = ("snapshot", "exportname", "checkpoint")
EXPORT_STOP_DISK_KEYS = ("snapshot", "exportname")


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """One ``--disk`` option: the disk's target name and its key=value options."""
    name: str
    options: dict

    def get(self, key: str) -> Optional[str]:
        return self.options.get(key)


def _split_fields(text: str) -> list[str]:
    """Split on commas; ``,,`` stands for a literal comma (as in virsh and qemu)."""
    fields, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            fields.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    fields.append("".join(current))
    return fields


def parse_disk_spec(text: str, keys: Sequence[str] = (),
                    required: Sequence[str] = ()) -> DiskSpec:
    """Parse ``vda[,key=value]...`` into a DiskSpec.

    The first field is the disk name; then ``key=value`` pairs with keys from
    ``keys``; keys in ``required`` must be present. A comma inside a value is
    written ``,,``. Raises argparse.ArgumentTypeError naming the problem.
    """
    fields = _split_fields(text)
    name = fields[0]
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: the disk name (such as vda) comes first")
    if "=" in name:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the first field must be the disk name (such as vda), not {name!r}")
    options: dict[str, str] = {}
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: {field!r} is not key=value")
        if key not in keys:
            known = ", ".join(keys) if keys else "none"
            raise argparse.ArgumentTypeError(
                f"{text!r}: unknown key {key!r} (known keys: {known})")
        if not value:
            raise argparse.ArgumentTypeError(f"{text!r}: empty value for {key!r}")
        if key in options:
            raise argparse.ArgumentTypeError(f"{text!r}: key {key!r} is given twice")
        options[key] = value
    missing = [k for k in required if k not in options]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text!r}: missing {', '.join(k + '=' for k in missing)}")
    return DiskSpec(name, options)


def disk_spec_type(keys: Sequence[str], required: Sequence[str] = ()) -> Callable[[str], DiskSpec]:
    """An argparse ``type=`` for ``--disk`` with these keys."""
    def convert(text: str) -> DiskSpec:
        return parse_disk_spec(text, keys, required)
    convert.__name__ = "disk spec"     # argparse names the type in some messages
    return convert


def _tostring(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def _xml_safe(build: Callable[..., str]) -> Callable[..., str]:
    """Turn lxml's refusal of control characters into a clear InvalidArgument."""
    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        try:
            return build(*args, **kwargs)
        except ValueError as e:
            raise errors.InvalidArgument(
                f"a name or path contains characters XML cannot carry ({e})") from None
    return wrapper


@_xml_safe
def snapshot_xml(name: Optional[str], disks: Sequence[DiskSpec],
                 size_limit: Optional[int] = None) -> str:
    """A <domainblocksnapshot> request (no disks: all disks that can be snapshotted)."""
    root = etree.Element("domainblocksnapshot")
    if name is not None:
        etree.SubElement(root, "name").text = name
    for d in disks:
        el = etree.SubElement(root, "disk", name=d.name)
        fleece = d.get("fleece")
        if fleece:
            etree.SubElement(el, "fleece", file=fleece)
    if size_limit is not None:
        etree.SubElement(root, "sizeLimit").text = str(size_limit)
    return _tostring(root)


@_xml_safe
def export_xml(disks: Sequence[DiskSpec], socket: Optional[str] = None,
               host: Optional[str] = None, port: Optional[int] = None,
               tls: bool = False) -> str:
    """A <domainblockexport type='nbd'> request; no socket and no host: the default socket."""
    root = etree.Element("domainblockexport", type="nbd")
    if socket is not None:
        etree.SubElement(root, "address", type="unix", socket=socket)
    elif host is not None:
        addr = etree.SubElement(root, "address", type="ip", host=host)
        if port is not None:
            addr.set("port", str(port))
        if tls:
            addr.set("tls", "yes")
    for d in disks:
        attrs = {"name": d.name}
        for key in EXPORT_START_DISK_KEYS:
            value = d.get(key)
            if value:
                attrs[key] = value
        etree.SubElement(root, "disk", attrs)
    return _tostring(root)


@dataclasses.dataclass(frozen=True)
class ExportRow:
    exportname: str
    disk: str
    snapshot: str
    address: str
    uri: str
    checkpoint: Optional[str] = None
    bitmap: Optional[str] = None        # the export's dirty bitmap (with a checkpoint)

    @property
    def meta_context(self) -> Optional[str]:
        """The NBD meta context of the changed blocks: ``nbdinfo --map=CONTEXT URI``."""
        return f"qemu:dirty-bitmap:{self.bitmap}" if self.bitmap else None


def nbd_uri(exportname: str, socket: Optional[str] = None, host: Optional[str] = None,
            port: Optional[int] = None) -> str:
    """The NBD URI of an export (as nbdinfo, nbdcopy and qemu-img accept it)."""
    name = quote(exportname, safe="+:@")
    if socket is not None:
        return f"nbd+unix:///{name}?socket={quote(socket, safe='/')}"
    if host and ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"nbd://{host}:{port}/{name}" if port is not None else f"nbd://{host}/{name}"


def parse_export_list(documents: Sequence[str]) -> list[ExportRow]:
    """Rows of the <blockexport> documents blockExportList returns."""
    rows = []
    for doc in documents:
        root = etree.fromstring(doc.encode("utf-8"))
        addr = root.find("address")
        socket: Optional[str] = None
        host: Optional[str] = None
        port: Optional[int] = None
        if addr is not None and addr.get("type") == "unix":
            socket = addr.get("socket")
            address = f"unix:{socket}"
        elif addr is not None:
            host = addr.get("host")
            port_text = addr.get("port")
            port = int(port_text) if port_text else None
            address = f"{host}:{port}" if port is not None else str(host)
        else:
            address = "-"
        for d in root.findall("disk"):
            name = d.get("exportname") or ""
            rows.append(ExportRow(name, d.get("name") or "", d.get("snapshot") or "",
                                  address, nbd_uri(name, socket, host, port),
                                  d.get("checkpoint"), d.get("bitmap")))
    return rows


@dataclasses.dataclass(frozen=True)
class SnapshotRow:
    name: str
    created: Optional[int]
    disks: list
    allocation: int


def parse_snapshot_desc(xml: str) -> SnapshotRow:
    """The list row of a snapshot's getXMLDesc() document."""
    root = etree.fromstring(xml.encode("utf-8"))
    created = root.findtext("creationTime")
    disks, allocation = [], 0
    for d in root.findall("disk"):
        disks.append(d.get("name"))
        fl = d.find("fleece")
        fleece_allocation = fl.get("allocation") if fl is not None else None
        if fleece_allocation:
            allocation += int(fleece_allocation)
    return SnapshotRow(root.findtext("name") or "", int(created) if created else None,
                       disks, allocation)


@dataclasses.dataclass(frozen=True)
class CheckpointRow:
    name: str
    created: Optional[int]
    valid: bool
    disks: list
    reasons: list           # (disk, why it cannot be used) of each invalid disk
    changed: dict           # disk -> bytes written since the checkpoint (valid disks)


def parse_checkpoint_desc(xml: str) -> CheckpointRow:
    """The list row of a checkpoint's getXMLDesc() document."""
    root = etree.fromstring(xml.encode("utf-8"))
    created = root.findtext("creationTime")
    disks, reasons, changed = [], [], {}
    for d in root.findall("disk"):
        disks.append(d.get("name"))
        if d.get("valid") == "no":
            reasons.append((d.get("name"), d.get("reason") or "unknown reason"))
        changed_bytes = d.get("changed")
        if changed_bytes is not None:
            changed[d.get("name")] = int(changed_bytes)
    return CheckpointRow(root.findtext("name") or "", int(created) if created else None,
                         root.findtext("valid") == "yes", disks, reasons, changed)


def checkpoint_table(rows: Sequence[CheckpointRow], header: bool = True) -> str:
    """Name, Creation Time, Valid, Disks; under an invalid checkpoint one line
    per unusable disk saying why."""
    cells = [(r.name, format_time(r.created), "yes" if r.valid else "no", ",".join(r.disks))
             for r in rows]
    lines = format_table(("Name", "Creation Time", "Valid", "Disks"), cells,
                         header=header).splitlines()
    body = lines[2:] if header else lines
    out = lines[:2] if header else []
    for line, r in zip(body, rows):
        out.append(line)
        out += [f"     {disk}: {reason}" for disk, reason in r.reasons]
    return "\n".join(out)


def export_table(rows: Sequence[ExportRow], header: bool = True) -> str:
    """The export list; a "Dirty bitmap context" column when an export has a checkpoint."""
    headers = ["Export name", "Disk", "Snapshot", "Checkpoint", "Address", "URI"]
    cells = [[r.exportname, r.disk, r.snapshot, r.checkpoint or "-", r.address, r.uri]
             for r in rows]
    if any(r.meta_context for r in rows):
        headers.append("Dirty bitmap context")
        for c, r in zip(cells, rows):
            c.append(r.meta_context or "-")
    return format_table(headers, cells, header=header)


def format_time(epoch: Optional[int]) -> str:
    """Local time like virsh snapshot-list: ``2026-11-29 21:00:00 +0000``."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 header: bool = True) -> str:
    """A table like ``virsh list``: a leading space, columns three spaces apart."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return (" " + "   ".join(c.ljust(w) for c, w in zip(cells, widths))).rstrip()

    out = []
    if header:
        head = line(headers)
        out += [head, "-" * (len(head) + 2)]
    out += [line(r) for r in rows]
    return "\n".join(out)
