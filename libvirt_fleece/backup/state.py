# SPDX-License-Identifier: LGPL-2.1-or-later
"""The authoritative record of what a running backup created, in the root-only state directory.

The journal in a backup directory can be forged by whoever writes there. The
backup writes the same journal first to ``<state_dir>/backups/DEV-INODE.json``
(the directory's device and inode, so a renamed or swapped directory does not
inherit another one's record) and :func:`libvirt_fleece.backup.recover` acts
on the snapshot, checkpoint and domain only as this record says.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Optional

from .. import config, fsutil
from .dir import BackupDir
from .manifest import Journal

log = logging.getLogger(__name__)


def _path(bdir: BackupDir) -> str:
    st = os.fstat(bdir.fd)
    return os.path.join(config.load().state_dir, "backups", f"{st.st_dev}-{st.st_ino}.json")


def save(bdir: BackupDir, journal: Journal) -> None:
    """Write the record of ``journal`` for ``bdir`` (0600 in a 0700 directory).
    Raises OSError."""
    path = _path(bdir)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fsutil.write_atomic(path, json.dumps(dataclasses.asdict(journal)).encode(), 0o600)


def load(bdir: BackupDir) -> Optional[Journal]:
    """The record for ``bdir``; None when there is none or it is unreadable."""
    try:
        with open(_path(bdir), encoding="utf-8") as f:
            return Journal.from_json(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring the unreadable backup record for %s: %s", bdir.path, e)
        return None


def remove(bdir: BackupDir) -> None:
    try:
        os.unlink(_path(bdir))
    except FileNotFoundError:
        pass
