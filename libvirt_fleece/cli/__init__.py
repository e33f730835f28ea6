# SPDX-License-Identifier: LGPL-2.1-or-later
"""``virsh-fleece``, the command line: :mod:`.commands` (the plugin's API commands),
:mod:`.backup` (backup, restore, info, verify), :mod:`.hook` (hook install,
remove, status), :mod:`.format` (argument parsing, XML builders, tables) and
:mod:`.demo` (the throwaway demo domain)."""

from .commands import main

__all__ = ["main"]
