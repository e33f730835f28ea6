# SPDX-License-Identifier: LGPL-2.1-or-later
"""The plugin's state, kept as one namespaced document in the domain's <metadata>.

Snapshots, the NBD server and its exports live only as long as the qemu
process, so they are stored in the LIVE metadata (which libvirt drops when
qemu stops). Each record carries a ``state``: ``creating`` and ``deleting``
mark work in progress, which the next call on the domain finishes or undoes
(see :mod:`.steps.reconcile`).

Document (validated against ``xml-metadata/metadata.rng``)::

    <state version='1'>
      <snapshot name='nightly-1' id='3fa2c91b' state='ready' created='1764450000'>
        <disk name='vda' file='/var/lib/libvirt/fleece/vm1.nightly-1.vda.qcow2'
              qdev='/machine/peripheral/virtio-disk0/virtio-backend'
              base='libvirt-2-format' below='libvirt-2-format'
              fleece-node='fleece-3fa2c91b-0-img' filter-node='fleece-3fa2c91b-0-cbw'
              access-node='fleece-3fa2c91b-0-acc' fdset='2041741347' capacity='67108864'/>
      </snapshot>
      <server state='ready' type='unix' socket='/run/libvirt-fleece/vm1.sock' fdname='fleece-nbd'>
        <export id='fleece-3fa2c91b-0-exp' disk='vda' snapshot='nightly-1'
                name='vda-nightly-1' state='ready'/>
      </server>
    </state>
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import libvirt
from lxml import etree

from . import errors, virt, xmlutil

log = logging.getLogger(__name__)

NS_URI = "http://libvirt-fleece.org/xmlns/state/1"
NS_PREFIX = "fleece"
VERSION = "1"

CREATING = "creating"
READY = "ready"
DELETING = "deleting"
BROKEN = "broken"          # snapshots only: stopped, reads refused; see ``reason``
IN_PROGRESS = (CREATING, DELETING)


@dataclasses.dataclass
class DiskRecord:
    name: str
    file: str
    qdev: str
    base: str             # libvirt's own format node of the disk
    below: str            # node the filter sits on (base, or an older snapshot's filter)
    fleece_node: str
    filter_node: str
    access_node: str
    fdset: int
    capacity: int
    anchor_seq: int = 0             # newest checkpoint of the disk at snapshot time (0: none)
    frozen: Optional[str] = None    # bitmap: changes from that checkpoint to the snapshot
    disabled: Optional[str] = None  # checkpoint bitmap this snapshot's checkpoint disabled (0.2)
    frozen_seqs: Optional[str] = None   # hex seqs of the older checkpoints frozen too (0.3)
    frozen_delta: Optional[str] = None  # bitmap: writes from the copies to the instant (0.3)


@dataclasses.dataclass
class SnapshotRecord:
    name: str
    id: str
    state: str
    created: int
    checkpoint: Optional[str] = None   # name of the checkpoint made with the snapshot
    checkpoint_seq: int = 0
    limit: Optional[int] = None        # bytes each fleece image may grow to
    reason: Optional[str] = None       # why a broken snapshot broke
    readpath: str = "snapshot-access"  # how exports read it (see readpath.py); absent: 0.1.x
    disks: list[DiskRecord] = dataclasses.field(default_factory=list)

    def disk(self, name: str) -> Optional[DiskRecord]:
        return next((d for d in self.disks if d.name == name), None)

    def needed_nodes(self) -> set[str]:
        """The qemu nodes a ready snapshot of this read path consists of."""
        return {n for d in self.disks for n in (d.filter_node, d.fleece_node) +
                ((d.access_node,) if self.readpath == "snapshot-access" else ())}

    def export_node(self, disk: DiskRecord) -> str:
        """The node an export of ``disk`` serves."""
        return disk.access_node if self.readpath == "snapshot-access" else disk.fleece_node


@dataclasses.dataclass
class ExportRecord:
    id: str
    disk: str
    snapshot: str
    name: str
    state: str
    checkpoint: Optional[str] = None
    bitmap: Optional[str] = None       # temporary bitmap exported as qemu:dirty-bitmap:...
    node: Optional[str] = None         # node holding that bitmap


@dataclasses.dataclass
class ServerRecord:
    state: str
    type: str                      # unix | ip
    fdname: str
    socket: Optional[str] = None   # unix
    host: Optional[str] = None     # ip
    port: Optional[int] = None     # ip
    tls: Optional[str] = None      # id of the tls-creds-x509 object (ip only)
    exports: list[ExportRecord] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class State:
    snapshots: list[SnapshotRecord] = dataclasses.field(default_factory=list)
    server: Optional[ServerRecord] = None

    def snapshot(self, name: str) -> Optional[SnapshotRecord]:
        return next((s for s in self.snapshots if s.name == name), None)

    def exports(self) -> list[ExportRecord]:
        return list(self.server.exports) if self.server else []


_DISK_ATTRS = {"fleece_node": "fleece-node", "filter_node": "filter-node",
               "access_node": "access-node", "anchor_seq": "anchor-seq",
               "frozen_seqs": "frozen-seqs", "frozen_delta": "frozen-delta",
               "checkpoint_seq": "checkpoint-seq", "readpath": "read-path"}


def _attr_name(field: str) -> str:
    return _DISK_ATTRS.get(field, field)


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Record = TypeVar("_Record", bound="DataclassInstance")


def _record_to_element(tag: str, record: DataclassInstance,
                       skip: tuple[str, ...] = ()) -> etree._Element:
    el = etree.Element(tag)
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if field.name in skip or value is None or isinstance(value, list):
            continue
        el.set(_attr_name(field.name), str(value))
    return el


def _record_from_element(cls: type[_Record], el: etree._Element, **extra: Any) -> _Record:
    kwargs = dict(extra)
    for field in dataclasses.fields(cls):
        if field.name in kwargs:
            continue
        raw = el.get(_attr_name(field.name))
        if raw is None:
            continue
        kwargs[field.name] = int(raw) if field.type in ("int", "Optional[int]") else raw
        if field.type == "int" and kwargs[field.name] < 0:
            raise ValueError(f"negative {field.name}")
        if field.type == "Optional[int]" and kwargs[field.name] is not None \
                and kwargs[field.name] < 0:
            raise ValueError(f"negative {field.name}")
    return cls(**kwargs)


def dumps(state: State) -> str:
    """Serialize the state document (without namespace; libvirt adds it)."""
    root = etree.Element("state", version=VERSION)
    for snap in state.snapshots:
        el = _record_to_element("snapshot", snap)
        for disk in snap.disks:
            el.append(_record_to_element("disk", disk))
        root.append(el)
    if state.server:
        el = _record_to_element("server", state.server)
        for exp in state.server.exports:
            el.append(_record_to_element("export", exp))
        root.append(el)
    return etree.tostring(root, encoding="unicode")


def loads(text: str) -> State:
    """Parse a state document. Raises InvalidArgument when it is not one."""
    root = xmlutil.parse(text, "libvirt-fleece metadata")
    xmlutil.strip_namespaces(root)
    xmlutil.validate(root, "metadata", "libvirt-fleece metadata")
    try:
        state = State()
        for el in root.findall("snapshot"):
            disks = [_record_from_element(DiskRecord, d) for d in el.findall("disk")]
            state.snapshots.append(_record_from_element(SnapshotRecord, el, disks=disks))
        srv = root.find("server")
        if srv is not None:
            exports = [_record_from_element(ExportRecord, e) for e in srv.findall("export")]
            state.server = _record_from_element(ServerRecord, srv, exports=exports)
    except (TypeError, ValueError) as e:
        raise errors.InvalidArgument(f"libvirt-fleece metadata is not usable: {e}") from e
    return state


def load(dom: libvirt.virDomain) -> State:
    """Read the live state of the domain; absent metadata is an empty state.

    Raises LibvirtError when libvirt fails, InvalidArgument when the stored
    document is not a valid state document.
    """
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS_URI,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return State()
        raise virt.translate(e, f"cannot read the metadata of domain {dom.name()!r}") from e
    return loads(text)


def save(dom: libvirt.virDomain, state: State) -> None:
    """Replace the live state document (removing it when the state is empty)."""
    empty = not state.snapshots and state.server is None
    text = None if empty else dumps(state)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text,
                        None if empty else NS_PREFIX, NS_URI,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise virt.translate(e, f"cannot write the metadata of domain {dom.name()!r}") from e
    log.debug("metadata of %s: %s", dom.name(), text)


# --- the checkpoint mirror -------------------------------------------------------------
# Checkpoints live in the images (:mod:`.steps.checkpoint` rebuilds them from the bitmap
# names); a mirror of them, per disk as the RFC shows, is kept in its own namespace of
# the LIVE and, for a persistent domain, CONFIG metadata (it outlives qemu).

CHECKPOINTS_NS_URI = "http://libvirt-fleece.org/xmlns/checkpoints/1"
CHECKPOINTS_NS_PREFIX = "fleececp"

_COMPARE = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True,
                           load_dtd=False)


def load_checkpoint_mirror(dom: libvirt.virDomain) -> Optional[str]:
    """The mirror document (LIVE, else CONFIG); None when there is none.
    Raises LibvirtError when libvirt fails otherwise."""
    for flag in (libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
        try:
            return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CHECKPOINTS_NS_URI,
                                    flag))
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_METADATA,
                                      libvirt.VIR_ERR_OPERATION_INVALID,
                                      libvirt.VIR_ERR_INVALID_ARG):
                continue
            raise virt.translate(e, "cannot read the checkpoint metadata") from e
    return None


def save_checkpoint_mirror(dom: libvirt.virDomain, text: Optional[str]) -> None:
    """Store the mirror document (None removes it) unless the LIVE one says the same.
    Raises LibvirtError."""
    try:
        current = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, CHECKPOINTS_NS_URI,
                               libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError:
        current = None
    if current is not None and text is not None and _same_document(current, text):
        return
    if current is None and text is None:
        return
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
    if dom.isPersistent():
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, text,
                        CHECKPOINTS_NS_PREFIX if text else None, CHECKPOINTS_NS_URI, flags)
    except libvirt.libvirtError as e:
        raise virt.translate(e, "cannot write the checkpoint metadata") from e


def _same_document(a: str, b: str) -> bool:
    """Whether two documents say the same (libvirt gives ours back indented)."""
    def canon(t: str) -> bytes:
        root = xmlutil.strip_namespaces(etree.fromstring(t.encode(), _COMPARE))
        return etree.tostring(root, method="c14n")
    try:
        return canon(a) == canon(b)
    except etree.XMLSyntaxError:
        return False
