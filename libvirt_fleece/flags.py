# SPDX-License-Identifier: LGPL-2.1-or-later
"""Validation of the ``flags`` argument every public call takes, as libvirt does."""

from __future__ import annotations

from . import errors


def check_flags(flags: object, allowed: int, what: str) -> int:
    """Raises InvalidArgument for a non-integer or an unknown flag bit."""
    if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0:
        raise errors.InvalidArgument(f"{what}: flags must be a non-negative integer")
    if flags & ~allowed:
        raise errors.InvalidArgument(f"{what}: unsupported flags 0x{flags & ~allowed:x}")
    return flags
