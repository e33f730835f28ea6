# SPDX-License-Identifier: LGPL-2.1-or-later
"""Kept for backup guards started by 0.3.0 and before: such a guard, still running
while the package is upgraded, imports ``libvirt_fleece.backup_dir.BackupDir`` only
after its backup died, to clean up. The module is :mod:`.backup.dir`."""

from .backup.dir import BackupDir

__all__ = ["BackupDir"]
