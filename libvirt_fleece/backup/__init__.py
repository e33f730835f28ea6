# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backup client: full and incremental backups of running domains into a directory.

::

    from libvirt_fleece import backup
    result = backup.backup(dom, "/srv/backup/web1")            # full, then incremental
    backup.restore("/srv/backup/web1", "vda", "/tmp/vda.qcow2", point=0)
    backup.info("/srv/backup/web1").points
    backup.verify("/srv/backup/web1").ok

The modules: :mod:`.run` (the mode decision and the run: snapshot, export,
the copies in parallel, teardown), :mod:`.readback` (info, verify, restore),
:mod:`.recovery` (finishing or undoing an interrupted run), :mod:`.copy` (the
NBD readers and writers), :mod:`.digest`, :mod:`.manifest` (the directory's
record), :mod:`.dir` (safe file access in a directory others may control),
:mod:`.files` (modes and limits of what a backup writes), :mod:`.chain`
(opening a point's qcow2 chain), :mod:`.progress`, :mod:`.state`,
:mod:`.writer` and :mod:`.guard` (the detached clean-up process).
"""

from .copy import Cancelled, CopyError
from .manifest import BackupBusy, BackupCorrupt, BackupTargetError
from .progress import ProgressEvent
from .readback import VerifyReport, info, restore, verify
from .recovery import recover
from .run import BackupResult, NoValidChain, backup
from .writer import point_warnings

__all__ = ["backup", "restore", "info", "verify", "recover", "point_warnings", "BackupResult",
           "VerifyReport", "BackupTargetError", "BackupBusy", "BackupCorrupt", "NoValidChain",
           "CopyError", "Cancelled", "ProgressEvent"]
