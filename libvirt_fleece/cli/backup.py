# SPDX-License-Identifier: LGPL-2.1-or-later
"""virsh-fleece subcommands for the backup feature (registered by cli.build_parser):
``backup``, ``restore``, ``info`` and ``verify``."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Protocol

import libvirt

from .. import backup as bk
from ..backup.progress import Bar, LogLines
from ..backup.writer import clean
from .format import format_table
from ..units import human_size


class _Context(Protocol):
    """What these commands use of cli.Context."""

    quiet: bool

    def domain(self, ident: str) -> libvirt.virDomain: ...

    def say(self, text: str) -> None: ...


def cmd_backup(ctx: _Context, args: argparse.Namespace) -> int:
    dom = ctx.domain(args.domain)
    progress = None
    if not ctx.quiet:
        progress = Bar() if sys.stderr.isatty() else LogLines()
    result = bk.backup(dom, args.target, mode=args.mode, disks=args.disk or None,
                       progress=progress)
    p = result.point
    ctx.say(f"Backup point {p.index} ({p.mode}) of {dom.name()} written to {result.directory}: "
            f"{human_size(result.copied, fixed=True)} copied in {p.duration:.1f} s, "
            f"checkpoint {p.checkpoint}")
    return 0


def cmd_restore(ctx: _Context, args: argparse.Namespace) -> int:
    path = bk.restore(args.dir, args.disk, args.to, point=args.point,
                      check=not args.no_check)
    ctx.say(f"Disk {args.disk} restored to {path}")
    return 0


def cmd_info(ctx: _Context, args: argparse.Namespace) -> int:
    """The points as a table, then one WARNING line per point an affected version
    wrote (also with --quiet). Manifest strings are printed without control characters."""
    m = bk.info(args.dir)
    print(f"Domain: {clean(m.domain_name)} ({clean(m.domain_uuid)})")
    rows = []
    for p in m.points:
        for d in p.disks:
            rows.append((str(p.index), clean(p.time), clean(p.mode), clean(p.checkpoint),
                         clean(d.name), clean(d.file), human_size(d.size, fixed=True),
                         human_size(d.copied, fixed=True)))
    print(format_table(("Point", "Time (UTC)", "Mode", "Checkpoint", "Disk", "File",
                        "Size", "Copied"), rows, header=not ctx.quiet))
    for warning in bk.point_warnings(m):
        print(warning)
    return 0


def cmd_verify(ctx: _Context, args: argparse.Namespace) -> int:
    """Exit 1 when a file does not match the manifest; warnings alone keep exit 0
    (the files are what was written; only the data read then is in doubt)."""
    report = bk.verify(args.dir)
    for problem in report.problems:
        print(f"FAILED: {clean(problem, 1000)}")
    for warning in report.warnings:
        print(warning)
    if report.ok:
        ctx.say(f"All {len(report.checked)} files match the manifest"
                + (f"; {len(report.warnings)} point(s) cannot be proven right, see the "
                   f"WARNING lines" if report.warnings else ""))
        return 0
    print(f"{len(report.problems)} problem(s) in {len(report.checked)} files", file=sys.stderr)
    return 1


def _point(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a point number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("point numbers start at 0")
    return n


def register(sub: argparse._SubParsersAction[Any],
             add: Callable[..., argparse.ArgumentParser],
             domain: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add this module's subcommands.

    add(sub, name, func, help, examples) -> ArgumentParser creates one
    subcommand whose func(ctx, args) -> int runs it (ctx is a
    cli.Context); domain(parser) adds the DOMAIN argument.
    """
    p = add(sub, "backup", cmd_backup,
            "back up a running domain's disks into a directory (full or incremental)", """\
  virsh-fleece backup web1 --target /srv/backup/web1           # full first, then incremental
  virsh-fleece backup web1 --target /srv/backup/web1 --full
  virsh-fleece backup web1 --target /srv/backup/web1 --incremental --disk vda --disk vdb

Each run adds a point to DIR: per disk a qcow2 file (an incremental one is an
overlay backed by the previous point) and manifest.json. qemu-img alone reads
any point: qemu-img convert -O raw DIR/vda.0003.qcow2 vda.raw
The checkpoint of each backup stays on the domain (the base of the next
incremental); delete old ones with blockcheckpoint-delete.
""")
    domain(p)
    p.add_argument("--target", required=True, metavar="DIR",
                   help="backup directory (one per domain; created if missing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="copy every allocated cluster")
    mode.add_argument("--incremental", dest="mode", action="store_const", const="incremental",
                      help="copy what changed since DIR's newest point (fails if impossible)")
    mode.add_argument("--auto", dest="mode", action="store_const", const="auto",
                      help="incremental when possible, else full, saying why (default)")
    p.set_defaults(mode="auto")
    p.add_argument("--disk", action="append", default=[], metavar="DISK",
                   help="a disk to back up (repeatable; default: every disk)")

    p = add(sub, "restore", cmd_restore,
            "write a disk image of a backup point", """\
  virsh-fleece restore /srv/backup/web1 --disk vda --to /var/lib/libvirt/images/vda.qcow2
  virsh-fleece restore /srv/backup/web1 --disk vda --to /tmp/vda.raw --point 0
""")
    p.add_argument("dir", metavar="DIR", help="backup directory")
    p.add_argument("--disk", required=True, help="disk to restore (such as vda)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="new image file: qcow2 if it ends in .qcow2, else raw (never "
                        "overwritten)")
    p.add_argument("--point", type=_point, help="point number (default: the newest)")
    p.add_argument("--no-check", action="store_true",
                   help="do not verify the chain's checksums first")

    p = add(sub, "info", cmd_info, "list the points and disks of a backup directory", """\
  virsh-fleece info /srv/backup/web1
""")
    p.add_argument("dir", metavar="DIR", help="backup directory")

    p = add(sub, "verify", cmd_verify,
            "check every file of a backup directory against its manifest", """\
  virsh-fleece verify /srv/backup/web1 && echo good

A WARNING line names a point that libvirt-fleece 0.1.x wrote, whose data may be
wrong on QEMU before 8.0 although its files match (exit status 0); see NEWS.md.
""")
    p.add_argument("dir", metavar="DIR", help="backup directory")
