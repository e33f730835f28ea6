# SPDX-License-Identifier: LGPL-2.1-or-later
"""Byte counts for people: the one formatting of sizes the CLI and the backup progress use."""

from __future__ import annotations


def human_size(n: float, fixed: bool = False) -> str:
    """Bytes in binary units (B, KiB ... TiB), one decimal at most.

    Two styles, both kept as they were printed before they were merged:

    - default (``virsh-fleece`` tables): a trailing ``.0`` is dropped and bytes
      are truncated: ``0 B``, ``512 KiB``, ``1.5 MiB``, ``64 MiB``;
    - ``fixed=True`` (backup progress and summary lines, where a rate or a
      changing count should not jump in width): always one decimal above bytes,
      bytes rounded: ``512 B``, ``64.0 MiB``, ``1.5 GiB``.
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if fixed:
        return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
    if unit == "B":
        return f"{int(value)} B"
    text = f"{value:.1f}"
    return f"{text[:-2] if text.endswith('.0') else text} {unit}"
