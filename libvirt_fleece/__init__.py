# SPDX-License-Identifier: LGPL-2.1-or-later
"""libvirt-fleece: temporary block snapshots, checkpoints and NBD exports for libvirt.

The public API mirrors the 2018 "Fleece API" RFC in libvirt-python's style.
Anything not listed in ``__all__`` is private.
"""

import logging

from .checkpoints import BlockCheckpoint
from .checkpoints import list_all as blockCheckpointList
from .checkpoints import lookup as blockCheckpointLookupByName
from .errors import (AlreadyExists, ConnectionError, Error, InternalError, InvalidArgument,
                     LibvirtError, NotFound, OperationInvalid, QMPError)
from .exports import VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE
from .exports import list_all as blockExportList
from .exports import start as blockExportStart
from .exports import stop as blockExportStop
from .reconcile import repair
from .snapshots import (VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT,
                        VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS, BlockSnapshot)
from .snapshots import create as blockSnapshotCreateXML
from .snapshots import list_all as blockSnapshotList
from .snapshots import lookup as blockSnapshotLookupByName

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    # snapshots
    "blockSnapshotCreateXML",
    "blockSnapshotList",
    "blockSnapshotLookupByName",
    "BlockSnapshot",
    "VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT",
    "VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS",
    # checkpoints
    "blockCheckpointList",
    "blockCheckpointLookupByName",
    "BlockCheckpoint",
    # exports
    "blockExportStart",
    "blockExportStop",
    "blockExportList",
    "VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE",
    # maintenance
    "repair",
    # errors
    "Error",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "OperationInvalid",
    "ConnectionError",
    "QMPError",
    "LibvirtError",
    "InternalError",
]
