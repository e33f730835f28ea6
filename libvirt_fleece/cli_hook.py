# SPDX-License-Identifier: LGPL-2.1-or-later
"""virsh-fleece subcommands for the hook feature (registered by cli.build_parser)."""

from __future__ import annotations


def register(sub, add, domain) -> None:
    """Add this module's subcommands.

    add(sub, name, func, help, examples) -> ArgumentParser creates one
    subcommand whose func(ctx, args) -> int runs it (ctx is a
    cli.Context); domain(parser) adds the DOMAIN argument.
    """
