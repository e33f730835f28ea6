# SPDX-License-Identifier: LGPL-2.1-or-later
"""The files a backup writes: who may read them and how large a record may be."""

from __future__ import annotations

import logging
import os
import stat

from .. import config
from .dir import BackupDir, UnsafeFile
from .manifest import Manifest

log = logging.getLogger(__name__)


def max_size() -> int:
    return config.load().backup_max_virtual_size


def image_mode() -> int:
    """0600, or 0640 when ``backup_group`` grants a group read access."""
    return 0o640 if config.load().backup_group else 0o600


def own_image(fd: int) -> None:
    """Give a new image (or restored file) the configured group, if any."""
    group = config.load().backup_group
    if group:
        import grp
        os.fchown(fd, -1, grp.getgrnam(group).gr_gid)


def tighten(bdir: BackupDir, manifest: Manifest) -> None:
    """Images earlier versions wrote readable by others (0644) become private."""
    mode = image_mode()
    for p in manifest.points:
        for d in p.disks:
            st = bdir.lstat(d.file)
            if st is None or not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o777 & ~mode:
                continue
            try:
                fd = bdir.open(d.file)
            except (OSError, UnsafeFile):
                continue        # verify and restore refuse it and say why
            try:
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & mode)
                log.warning("%s was readable by others; now mode %o", bdir.show(d.file),
                            stat.S_IMODE(os.fstat(fd).st_mode))
            finally:
                os.close(fd)
