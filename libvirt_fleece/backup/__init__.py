# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backup client: full and incremental backups of running domains into a directory.

::

    from libvirt_fleece import backup
    result = backup.backup(dom, "/srv/backup/web1")            # full, then incremental
    backup.restore("/srv/backup/web1", "vda", "/tmp/vda.qcow2", point=0)
    backup.info("/srv/backup/web1").points
    backup.verify("/srv/backup/web1").ok

The modules: :mod:`.run` (the mode decision and the run: snapshot, export,
copy, teardown; recover, info, verify, restore), :mod:`.copy` (the NBD
readers and the thread fan-out), :mod:`.digest`, :mod:`.manifest` (the
directory's record), :mod:`.dir` (safe file access in a directory others
may control), :mod:`.chain` (opening a point's qcow2 chain), :mod:`.progress`,
:mod:`.state`, :mod:`.writer` and :mod:`.guard` (the detached clean-up process).
"""

from .copy import Cancelled, CopyError
from .manifest import BackupBusy, BackupCorrupt, BackupTargetError
from .progress import ProgressEvent
from .run import (BackupResult, NoValidChain, VerifyReport, backup, info, point_warnings,
                  recover, restore, verify)

__all__ = ["backup", "restore", "info", "verify", "recover", "point_warnings", "BackupResult",
           "VerifyReport", "BackupTargetError", "BackupBusy", "BackupCorrupt", "NoValidChain",
           "CopyError", "Cancelled", "ProgressEvent"]
