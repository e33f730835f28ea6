# SPDX-License-Identifier: LGPL-2.1-or-later
"""libvirt-fleece: temporary block snapshots, checkpoints and NBD exports for libvirt.

The public API mirrors the 2018 "Fleece API" RFC in libvirt-python's style.
Anything not listed in ``__all__`` is private.

The names are loaded on first use (PEP 562), so that the qemu hook and the
backup guard, which need a few modules only, start without importing
libvirt and the rest of the package.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.3.0"

# public name -> (module, name in it)
_PUBLIC = {
    # snapshots
    "blockSnapshotCreateXML": ("snapshots", "create"),
    "blockSnapshotList": ("snapshots", "list_all"),
    "blockSnapshotLookupByName": ("snapshots", "lookup"),
    "BlockSnapshot": ("snapshots", "BlockSnapshot"),
    "VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT":
        ("snapshots", "VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT"),
    "VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS":
        ("snapshots", "VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS"),
    # checkpoints
    "blockCheckpointList": ("checkpoints", "list_all"),
    "blockCheckpointLookupByName": ("checkpoints", "lookup"),
    "BlockCheckpoint": ("checkpoints", "BlockCheckpoint"),
    # exports
    "blockExportStart": ("exports", "start"),
    "blockExportStop": ("exports", "stop"),
    "blockExportList": ("exports", "list_all"),
    "VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE": ("exports", "VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE"),
    # maintenance
    "repair": ("calls", "repair"),
    # errors
    "Error": ("errors", "Error"),
    "InvalidArgument": ("errors", "InvalidArgument"),
    "NotFound": ("errors", "NotFound"),
    "AlreadyExists": ("errors", "AlreadyExists"),
    "OperationInvalid": ("errors", "OperationInvalid"),
    "ConnectionError": ("errors", "ConnectionError"),
    "QMPError": ("errors", "QMPError"),
    "LibvirtError": ("errors", "LibvirtError"),
    "InternalError": ("errors", "InternalError"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use. Raises AttributeError."""
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:       # what type checkers and IDEs see
    from .checkpoints import BlockCheckpoint  # noqa: F401
    from .checkpoints import list_all as blockCheckpointList  # noqa: F401
    from .checkpoints import lookup as blockCheckpointLookupByName  # noqa: F401
    from .errors import (AlreadyExists, ConnectionError, Error, InternalError,  # noqa: F401
                         InvalidArgument, LibvirtError, NotFound, OperationInvalid, QMPError)
    from .exports import VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE  # noqa: F401
    from .exports import list_all as blockExportList  # noqa: F401
    from .exports import start as blockExportStart  # noqa: F401
    from .exports import stop as blockExportStop  # noqa: F401
    from .calls import repair  # noqa: F401
    from .snapshots import (VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT,  # noqa: F401
                            VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS, BlockSnapshot)
    from .snapshots import create as blockSnapshotCreateXML  # noqa: F401
    from .snapshots import list_all as blockSnapshotList  # noqa: F401
    from .snapshots import lookup as blockSnapshotLookupByName  # noqa: F401
