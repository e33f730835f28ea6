# SPDX-License-Identifier: LGPL-2.1-or-later
"""virsh-fleece subcommands for the hook feature (registered by cli.build_parser).

``hook-install [--reload]``, ``hook-uninstall`` and ``hook-status`` manage
``/etc/libvirt/hooks/qemu.d/libvirt-fleece`` (see :mod:`..hookinstall`).
None of them connects to libvirt.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional, Protocol

from .. import errors, hookinstall


class _Context(Protocol):
    """What these commands use of cli.Context."""

    def say(self, text: str) -> None: ...


def _require_root() -> None:
    if os.geteuid() != 0:
        raise errors.OperationInvalid(
            f"installing hooks in {hookinstall.HOOKS_DIR} needs root; run it with sudo")


def cmd_hook_install(ctx: _Context, args: argparse.Namespace) -> int:
    _require_root()
    ctx.say(hookinstall.install(reload=args.reload))
    return 0


def cmd_hook_uninstall(ctx: _Context, args: argparse.Namespace) -> int:
    _require_root()
    ctx.say(hookinstall.uninstall())
    return 0


def format_status(st: hookinstall.Status) -> str:
    """``hook-status`` output: one ``key: value`` line each, like ``virsh dominfo``."""
    def yes(flag: Optional[bool]) -> str:
        return "unknown" if flag is None else ("yes" if flag else "no")

    rows = [
        ("Installed", yes(st.installed)),
        ("Path", st.path),
        ("Interpreter", (st.interpreter or "-") +
         ("" if not st.installed or st.interpreter_ok else " (missing: reinstall)")),
        ("Up to date", yes(st.up_to_date) if st.installed else "-"),
        ("libvirtd", f"running (pid {st.libvirtd_pid})" if st.libvirtd_running
         else "not running"),
        ("Hook present at libvirtd start", yes(st.seen_by_libvirtd)),
        ("Other qemu hooks", ", ".join(st.other_hooks) or "none"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    lines = [f"{(k + ':').ljust(width)} {v}" for k, v in rows]
    if st.installed and not st.up_to_date:
        lines.append("Run 'virsh-fleece hook-install' to update it.")
    if st.installed and st.libvirtd_running and st.seen_by_libvirtd is False:
        lines.append("If libvirtd was not reloaded since the hook was installed, it ignores "
                     "it: run 'virsh-fleece hook-install --reload'.")
    return "\n".join(lines)


def cmd_hook_status(ctx: _Context, args: argparse.Namespace) -> int:
    print(format_status(hookinstall.status()))
    return 0


def register(sub: argparse._SubParsersAction[Any],
             add: Callable[..., argparse.ArgumentParser],
             domain: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add this module's subcommands.

    add(sub, name, func, help, examples) -> ArgumentParser creates one
    subcommand whose func(ctx, args) -> int runs it (ctx is a
    cli.Context); domain(parser) adds the DOMAIN argument.
    """
    p = add(sub, "hook-install", cmd_hook_install,
            "install the libvirt qemu hook that cleans up after stopped domains", """\
  virsh-fleece hook-install
  virsh-fleece hook-install --reload      # also make a running libvirtd see it (SIGHUP)
  kill -HUP $(cat /run/libvirtd.pid)      # what --reload does
""")
    p.add_argument("--reload", action="store_true",
                   help="send libvirtd SIGHUP so that it picks the hook up (needed when no "
                        "qemu hook existed when libvirtd started)")

    add(sub, "hook-uninstall", cmd_hook_uninstall,
        "remove the libvirt qemu hook (other hooks stay)", """\
  virsh-fleece hook-uninstall
""")

    add(sub, "hook-status", cmd_hook_status,
        "show whether the libvirt qemu hook is installed and current", """\
  virsh-fleece hook-status
""")
