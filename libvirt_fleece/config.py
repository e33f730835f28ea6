# SPDX-License-Identifier: LGPL-2.1-or-later
"""The YAML configuration shared by the library, the CLI and the hook.

Path: ``/etc/libvirt-fleece/config.yaml`` (``$LIBVIRT_FLEECE_CONFIG``
overrides it). A missing file means all defaults; unknown keys and values
of the wrong type are errors, so a typo never goes unnoticed.

Keys and defaults::

    fleece_dir: /var/lib/libvirt/fleece   # default directory of fleece images
    socket_dir: /run/libvirt-fleece        # default directory of export sockets
    state_dir: /run/libvirt-fleece/state   # lock files and pause guards (root only)
    socket_group: null                     # group allowed to connect (mode 0660)
    pause_guard_timeout: 2.0               # seconds a guest may stay paused by us
    hook_syslog: true                      # hook logs to syslog (/dev/log) when it exists
    hook_log_file: /var/log/libvirt-fleece/hook.log   # hook log when there is no syslog
    hook_log_level: info                   # debug, info, warning or error
    hook_reconcile_timeout: 60.0           # seconds the hook's worker waits for libvirt
    fleece_size_limit: null                # default size limit of every fleece image (bytes)
    fleece_min_free: 262144                # below this many free bytes a snapshot breaks
    read_path: auto                        # auto (self-test per qemu) or overlay (always)
    overlay_size_limit: null               # limit of overlay snapshots without one (bytes);
                                           # null: half the free space, shared by the images
    backup_manifest_max_bytes: 16777216    # largest manifest.json / journal a backup reads
    backup_max_virtual_size: 281474976710656   # largest disk (bytes) a backup may name (256 TiB)
    backup_group: null                     # group granted read access to backup images
                                           # (mode 0640); null: owner only (0600)

A backup directory is untrusted input (see backup/manifest.py): the two size keys
bound what ``backup``, ``restore``, ``verify`` and ``info`` accept from it.

On a QEMU whose snapshot-access reads are wrong (7.2; see readpath.py),
snapshots use the overlay read path, where a copy that cannot be written
fails the guest's write: every such snapshot gets a size limit
(``<sizeLimit>``, else ``fleece_size_limit``, else ``overlay_size_limit``),
its free space is checked at creation, and the watcher breaks it at the limit.
"""

from __future__ import annotations

import dataclasses
import grp
import os
from typing import Any, Optional

import yaml

from . import errors

DEFAULT_PATH = "/etc/libvirt-fleece/config.yaml"
ENV_PATH = "LIBVIRT_FLEECE_CONFIG"


@dataclasses.dataclass(frozen=True)
class Config:
    fleece_dir: str = "/var/lib/libvirt/fleece"
    socket_dir: str = "/run/libvirt-fleece"
    state_dir: str = "/run/libvirt-fleece/state"
    socket_group: Optional[str] = None
    pause_guard_timeout: float = 2.0
    fleece_size_limit: Optional[int] = None
    fleece_min_free: int = 256 * 1024
    tls_dir: str = "/etc/pki/libvirt-fleece"
    hook_syslog: bool = True
    hook_log_file: str = "/var/log/libvirt-fleece/hook.log"
    hook_log_level: str = "info"
    hook_reconcile_timeout: float = 60.0
    read_path: str = "auto"
    overlay_size_limit: Optional[int] = None
    backup_manifest_max_bytes: int = 16 << 20
    backup_max_virtual_size: int = 256 << 40
    backup_group: Optional[str] = None

    def validate(self) -> None:
        """Raises InvalidArgument for an unusable value."""
        for key in ("fleece_dir", "socket_dir", "state_dir", "hook_log_file"):
            value = getattr(self, key)
            if not isinstance(value, str) or not os.path.isabs(value):
                raise errors.InvalidArgument(
                    f"configuration key {key!r} must be an absolute path, not {value!r}")
        for key, low in (("backup_manifest_max_bytes", 4096), ("backup_max_virtual_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not \
                    low <= value <= 1 << 62:
                raise errors.InvalidArgument(
                    f"configuration key {key!r} must be a number of bytes >= {low}")
        for key in ("socket_group", "backup_group"):
            if getattr(self, key) is not None:
                try:
                    grp.getgrnam(str(getattr(self, key)))
                except KeyError as e:
                    raise errors.InvalidArgument(
                        f"configuration key {key!r}: no group {getattr(self, key)!r}") from e
        if self.fleece_size_limit is not None and (
                not isinstance(self.fleece_size_limit, int) or self.fleece_size_limit < 1 << 20):
            raise errors.InvalidArgument(
                "configuration key 'fleece_size_limit' must be a number of bytes >= 1048576")
        if self.overlay_size_limit is not None and (
                not isinstance(self.overlay_size_limit, int) or isinstance(
                    self.overlay_size_limit, bool) or self.overlay_size_limit < 1 << 20):
            raise errors.InvalidArgument(
                "configuration key 'overlay_size_limit' must be a number of bytes >= 1048576")
        if self.read_path not in ("auto", "overlay"):
            raise errors.InvalidArgument(
                "configuration key 'read_path' must be auto or overlay")
        if not isinstance(self.fleece_min_free, int) or self.fleece_min_free < 0:
            raise errors.InvalidArgument(
                "configuration key 'fleece_min_free' must be a number of bytes >= 0")
        if not isinstance(self.pause_guard_timeout, (int, float)) or \
                not 0.1 <= self.pause_guard_timeout <= 30:
            raise errors.InvalidArgument(
                "configuration key 'pause_guard_timeout' must be a number of seconds in [0.1, 30]")
        if not isinstance(self.hook_syslog, bool):
            raise errors.InvalidArgument("configuration key 'hook_syslog' must be true or false")
        if self.hook_log_level not in ("debug", "info", "warning", "error"):
            raise errors.InvalidArgument(
                "configuration key 'hook_log_level' must be debug, info, warning or error")
        if not isinstance(self.hook_reconcile_timeout, (int, float)) or \
                isinstance(self.hook_reconcile_timeout, bool) or \
                not 1 <= self.hook_reconcile_timeout <= 3600:
            raise errors.InvalidArgument(
                "configuration key 'hook_reconcile_timeout' must be a number of seconds "
                "in [1, 3600]")


def config_path() -> str:
    return os.environ.get(ENV_PATH) or DEFAULT_PATH


def parse(text: str, origin: str = "<string>") -> Config:
    """Parse a YAML configuration document. Raises InvalidArgument."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise errors.InvalidArgument(f"{origin}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise errors.InvalidArgument(f"{origin}: expected a mapping of keys to values")
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise errors.InvalidArgument(
            f"{origin}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = Config(**data)
    cfg.validate()
    return cfg


def load(path: Optional[str] = None) -> Config:
    """Load the configuration; a missing file gives the defaults.

    Raises InvalidArgument when the file exists but is not usable.
    """
    path = path or config_path()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read configuration {path}: {e.strerror}") from e
    return parse(text, path)
