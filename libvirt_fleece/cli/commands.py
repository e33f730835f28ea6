# SPDX-License-Identifier: LGPL-2.1-or-later
"""``virsh-fleece``: temporary block snapshots, checkpoints and NBD exports from the
shell, virsh-style.

Each subcommand is a small ``cmd_*`` function taking the :class:`Context`
and the parsed arguments; the pure helpers (``--disk`` parsing, XML
builders, table and size formatting) live in :mod:`.format`.

Exit status: 0 success, 1 an error (one line on stderr), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import libvirt

import libvirt_fleece as fleece

from . import backup as cli_backup, hook as cli_hook
from .. import errors, virt
from .format import (EXPORT_START_DISK_KEYS, EXPORT_STOP_DISK_KEYS, SNAPSHOT_DISK_KEYS,
                     CheckpointRow, ExportRow, checkpoint_table, disk_spec_type, export_table,
                     export_xml, format_table, format_time, parse_checkpoint_desc,
                     parse_export_list, parse_snapshot_desc, snapshot_xml)
from ..units import human_size

PROG = "virsh-fleece"


# --- the commands -------------------------------------------------------------------

class Context:
    """What commands share: the connection (opened on first use) and the output."""

    def __init__(self, uri: Optional[str], quiet: bool) -> None:
        self.uri = uri
        self.quiet = quiet
        self._conn: Optional[libvirt.virConnect] = None

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            self._conn = virt.open_connection(self.uri)
        return self._conn

    def domain(self, ident: str) -> libvirt.virDomain:
        return virt.lookup_domain(self.conn, ident)

    def say(self, text: str) -> None:
        """A confirmation message, suppressed by --quiet."""
        if not self.quiet:
            print(text)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:   # noqa: BLE001 - closing must not hide the real outcome
                pass
            self._conn = None


def read_xml_file(path: str) -> str:
    """The contents of FILE, or of stdin for ``-``. Raises InvalidArgument."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise errors.InvalidArgument(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise errors.InvalidArgument(f"cannot read {path}: not UTF-8 text") from e


def _export_rows(dom: libvirt.virDomain) -> list[ExportRow]:
    return parse_export_list(fleece.blockExportList(dom))


def _start_exports(ctx: Context, dom: libvirt.virDomain, xml: str) -> int:
    before = {r.exportname for r in _export_rows(dom)}
    fleece.blockExportStart(dom, xml)
    for r in _export_rows(dom):
        if r.exportname not in before:
            changes = f" (changes since {r.checkpoint}: {r.meta_context})" \
                if r.meta_context else ""
            ctx.say(f"Block export {r.exportname} started: {r.uri}{changes}")
    return 0


def _stop_exports(ctx: Context, dom: libvirt.virDomain, xml: str, force: bool) -> int:
    before = _export_rows(dom)
    flags = fleece.VIR_DOMAIN_BLOCK_EXPORT_STOP_FORCE if force else 0
    fleece.blockExportStop(dom, xml, flags)
    after = {r.exportname for r in _export_rows(dom)}
    for r in before:
        if r.exportname not in after:
            ctx.say(f"Block export {r.exportname} stopped")
    return 0


def _create_snapshot(ctx: Context, args: argparse.Namespace, xml: str) -> int:
    flags = fleece.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT if args.checkpoint else 0
    snap = fleece.blockSnapshotCreateXML(ctx.domain(args.domain), xml, flags)
    ctx.say(f"Block snapshot {snap.getName()} created" +
            (f" with checkpoint {snap.getName()}" if args.checkpoint else ""))
    return 0


def cmd_blocksnapshot_create(ctx: Context, args: argparse.Namespace) -> int:
    return _create_snapshot(ctx, args, read_xml_file(args.file))


def cmd_blocksnapshot_create_as(ctx: Context, args: argparse.Namespace) -> int:
    xml = snapshot_xml(args.name, args.disk, args.size_limit)
    if args.print_xml:
        print(xml, end="")
        return 0
    return _create_snapshot(ctx, args, xml)


def cmd_blocksnapshot_list(ctx: Context, args: argparse.Namespace) -> int:
    dom = ctx.domain(args.domain)
    rows = []
    for snap in fleece.blockSnapshotList(dom):
        try:
            rows.append(parse_snapshot_desc(snap.getXMLDesc()))
        except fleece.NotFound:
            continue        # deleted meanwhile
    if args.name:
        for r in rows:
            print(r.name)
        return 0
    print(format_table(
        ("Name", "Creation Time", "Disks", "Fleece allocation"),
        [(r.name, format_time(r.created), ",".join(r.disks), human_size(r.allocation))
         for r in rows], header=not ctx.quiet))
    return 0


def cmd_blocksnapshot_dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    snap = fleece.blockSnapshotLookupByName(ctx.domain(args.domain), args.name)
    print(snap.getXMLDesc(), end="")
    return 0


def cmd_blocksnapshot_delete(ctx: Context, args: argparse.Namespace) -> int:
    snap = fleece.blockSnapshotLookupByName(ctx.domain(args.domain), args.name)
    flags = fleece.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS if args.stop_exports else 0
    snap.delete(flags)
    ctx.say(f"Block snapshot {snap.getName()} deleted")
    return 0


def cmd_blockexport_start(ctx: Context, args: argparse.Namespace) -> int:
    xml = read_xml_file(args.file)
    return _start_exports(ctx, ctx.domain(args.domain), xml)


def cmd_blockexport_start_as(ctx: Context, args: argparse.Namespace) -> int:
    xml = export_xml(args.disk, socket=args.socket, host=args.host, port=args.port,
                     tls=args.tls)
    if args.print_xml:
        print(xml, end="")
        return 0
    return _start_exports(ctx, ctx.domain(args.domain), xml)


def cmd_blockexport_stop(ctx: Context, args: argparse.Namespace) -> int:
    xml = read_xml_file(args.file)
    return _stop_exports(ctx, ctx.domain(args.domain), xml, args.force)


def cmd_blockexport_stop_as(ctx: Context, args: argparse.Namespace) -> int:
    xml = export_xml(args.disk)
    if args.print_xml:
        print(xml, end="")
        return 0
    return _stop_exports(ctx, ctx.domain(args.domain), xml, args.force)


def cmd_blockexport_list(ctx: Context, args: argparse.Namespace) -> int:
    dom = ctx.domain(args.domain)
    if args.xml:
        for doc in fleece.blockExportList(dom):
            print(doc, end="" if doc.endswith("\n") else "\n")
        return 0
    print(export_table(_export_rows(dom), header=not ctx.quiet))
    return 0


def cmd_blockcheckpoint_list(ctx: Context, args: argparse.Namespace) -> int:
    dom = ctx.domain(args.domain)
    names: list[str] = []
    rows: list[CheckpointRow] = []
    for cp in fleece.blockCheckpointList(dom):
        if args.name:
            names.append(cp.getName())
            continue
        try:
            rows.append(parse_checkpoint_desc(cp.getXMLDesc()))
        except fleece.NotFound:
            continue        # deleted meanwhile
    if args.name:
        for name in names:
            print(name)
        return 0
    print(checkpoint_table(rows, header=not ctx.quiet))
    return 0


def cmd_blockcheckpoint_dumpxml(ctx: Context, args: argparse.Namespace) -> int:
    cp = fleece.blockCheckpointLookupByName(ctx.domain(args.domain), args.name)
    print(cp.getXMLDesc(), end="")
    return 0


def cmd_blockcheckpoint_delete(ctx: Context, args: argparse.Namespace) -> int:
    cp = fleece.blockCheckpointLookupByName(ctx.domain(args.domain), args.name)
    cp.delete()
    ctx.say(f"Block checkpoint {cp.getName()} deleted")
    return 0


def cmd_repair(ctx: Context, args: argparse.Namespace) -> int:
    report = fleece.repair(ctx.domain(args.domain))
    for line in report:
        ctx.say(line)
    ctx.say("Nothing to repair" if not report else f"Repaired: {len(report)} item(s)")
    return 0


def cmd_demo(ctx: Context, args: argparse.Namespace) -> int:
    from . import demo
    return demo.run(ctx.conn, keep=args.keep)


# --- the parser ---------------------------------------------------------------------

TOP_EPILOG = """\
Examples:
  virsh-fleece blocksnapshot-create-as web1 --name nightly --disk vda --disk vdb
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=nightly
  virsh-fleece blockexport-list web1
  nbdcopy 'nbd+unix:///vda-nightly?socket=/run/libvirt-fleece/web1.sock' vda.raw
  virsh-fleece blocksnapshot-delete web1 nightly --stop-exports
  virsh-fleece blocksnapshot-create-as web1 --name mon --checkpoint
  virsh-fleece blocksnapshot-create-as web1 --name tue --checkpoint
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=tue,checkpoint=mon
  virsh-fleece blockcheckpoint-list web1
  virsh-fleece demo                 # the whole cycle on a throwaway domain

Run 'virsh-fleece COMMAND --help' for a command's options and examples.
"""


class _Parser(argparse.ArgumentParser):
    """Subparsers inherit the formatter that keeps the examples' line breaks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


# A subcommand: func(ctx, args) -> exit status.
Command = Callable[[Context, argparse.Namespace], int]
if TYPE_CHECKING:
    # What add_subparsers returns (generic only in the stubs).
    SubParsers = argparse._SubParsersAction[_Parser]


def _add(sub: SubParsers, name: str, func: Command, help: str,
         examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                       epilog="Examples:\n" + examples)
    p.set_defaults(func=func, subparser=p)
    return p


def _domain(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN", help="domain name, UUID or id")


def _checkpoint_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="store_true",
                   help="also make the snapshot's instant a checkpoint of the same name "
                        "(qcow2 disks only), for later exports with checkpoint=NAME")


def _add_snapshot_commands(sub: SubParsers) -> None:
    p = _add(sub, "blocksnapshot-create", cmd_blocksnapshot_create,
             "create a temporary block snapshot from an XML file", """\
  virsh-fleece blocksnapshot-create web1 snap.xml
  virsh-fleece blocksnapshot-create web1 snap.xml --checkpoint
  echo "<domainblocksnapshot><name>s1</name><disk name='vda'/></domainblocksnapshot>" |
      virsh-fleece blocksnapshot-create web1 -
""")
    _domain(p)
    p.add_argument("file", metavar="FILE", help="<domainblocksnapshot> XML file, - for stdin")
    _checkpoint_option(p)

    p = _add(sub, "blocksnapshot-create-as", cmd_blocksnapshot_create_as,
             "create a temporary block snapshot from options", """\
  virsh-fleece blocksnapshot-create-as web1 --name nightly
  virsh-fleece blocksnapshot-create-as web1 --name s1 --disk vda --disk vdb
  virsh-fleece blocksnapshot-create-as web1 --name mon --disk vda --checkpoint
  virsh-fleece blocksnapshot-create-as web1 --disk vda,fleece=/srv/fleece/web1-vda.qcow2
  virsh-fleece blocksnapshot-create-as web1 --name s1 --disk vda --print-xml
  virsh-fleece blocksnapshot-create-as web1 --name big --size-limit 10737418240
""")
    _domain(p)
    p.add_argument("--name", help="snapshot name (default: a generated UUID)")
    p.add_argument("--disk", action="append", default=[], metavar="DISK[,fleece=PATH]",
                   type=disk_spec_type(SNAPSHOT_DISK_KEYS),
                   help="a disk to snapshot, optionally with its fleece image path "
                        "(repeatable; default: every disk that can be snapshotted)")
    _checkpoint_option(p)
    p.add_argument("--print-xml", action="store_true",
                   help="print the XML instead of creating the snapshot")
    p.add_argument("--size-limit", type=int, metavar="BYTES",
                   help="stop the snapshot cleanly when a fleece image grows past BYTES")

    p = _add(sub, "blocksnapshot-list", cmd_blocksnapshot_list,
             "list a domain's temporary block snapshots", """\
  virsh-fleece blocksnapshot-list web1
  virsh-fleece blocksnapshot-list web1 --name
""")
    _domain(p)
    p.add_argument("--name", action="store_true", help="print only the snapshot names")

    p = _add(sub, "blocksnapshot-dumpxml", cmd_blocksnapshot_dumpxml,
             "print a block snapshot's XML", """\
  virsh-fleece blocksnapshot-dumpxml web1 nightly
""")
    _domain(p)
    p.add_argument("name", metavar="NAME", help="snapshot name")

    p = _add(sub, "blocksnapshot-delete", cmd_blocksnapshot_delete,
             "delete a temporary block snapshot and its fleece images", """\
  virsh-fleece blocksnapshot-delete web1 nightly
  virsh-fleece blocksnapshot-delete web1 nightly --stop-exports
""")
    _domain(p)
    p.add_argument("name", metavar="NAME", help="snapshot name")
    p.add_argument("--stop-exports", action="store_true",
                   help="stop the snapshot's exports first (instead of refusing)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0-65535")
    return port


def _add_export_commands(sub: SubParsers) -> None:
    p = _add(sub, "blockexport-start", cmd_blockexport_start,
             "export snapshots over NBD from an XML file", """\
  virsh-fleece blockexport-start web1 export.xml
  echo "<domainblockexport type='nbd'><disk name='vda' snapshot='s1'/></domainblockexport>" |
      virsh-fleece blockexport-start web1 -
""")
    _domain(p)
    p.add_argument("file", metavar="FILE", help="<domainblockexport> XML file, - for stdin")

    p = _add(sub, "blockexport-start-as", cmd_blockexport_start_as,
             "export snapshots over NBD from options", """\
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=s1
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=s1,exportname=web1-vda \\
      --socket /run/backup/web1.sock
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=s1 --host 127.0.0.1 --port 10809
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=s1 --host 192.0.2.10 --tls
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=tue,checkpoint=mon
  virsh-fleece blockexport-start-as web1 --disk vda,snapshot=s1 --print-xml
""")
    _domain(p)
    p.add_argument("--disk", action="append", required=True,
                   metavar="DISK,snapshot=S[,exportname=N][,checkpoint=C]",
                   type=disk_spec_type(EXPORT_START_DISK_KEYS, required=("snapshot",)),
                   help="a disk of a snapshot to export (repeatable); with checkpoint=C "
                        "also the blocks changed between checkpoint C and the snapshot")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="listen on this unix socket (default: "
                            "/run/libvirt-fleece/DOMAIN.sock)")
    where.add_argument("--host", help="listen on this IP address (no TLS: prefer a socket)")
    p.add_argument("--port", type=_port, help="TCP port with --host (default 10809)")
    p.add_argument("--tls", action="store_true",
                   help="with --host: require x509 TLS with client certificates (tls_dir)")
    p.add_argument("--print-xml", action="store_true",
                   help="print the XML instead of starting the export")

    p = _add(sub, "blockexport-stop", cmd_blockexport_stop,
             "stop NBD exports given in an XML file", """\
  virsh-fleece blockexport-stop web1 export.xml
  virsh-fleece blockexport-stop web1 export.xml --force
""")
    _domain(p)
    p.add_argument("file", metavar="FILE", help="<domainblockexport> XML file, - for stdin")
    p.add_argument("--force", action="store_true", help="disconnect connected clients")

    p = _add(sub, "blockexport-stop-as", cmd_blockexport_stop_as,
             "stop NBD exports given by options", """\
  virsh-fleece blockexport-stop-as web1 --disk vda,snapshot=s1
  virsh-fleece blockexport-stop-as web1 --disk vda,snapshot=s1,exportname=web1-vda --force
""")
    _domain(p)
    p.add_argument("--disk", action="append", required=True,
                   metavar="DISK,snapshot=S[,exportname=N]",
                   type=disk_spec_type(EXPORT_STOP_DISK_KEYS, required=("snapshot",)),
                   help="an exported disk of a snapshot (repeatable)")
    p.add_argument("--force", action="store_true", help="disconnect connected clients")
    p.add_argument("--print-xml", action="store_true",
                   help="print the XML instead of stopping the export")

    p = _add(sub, "blockexport-list", cmd_blockexport_list,
             "list a domain's NBD exports with their URIs", """\
  virsh-fleece blockexport-list web1
  virsh-fleece blockexport-list web1 --xml
""")
    _domain(p)
    p.add_argument("--xml", action="store_true", help="print the raw <blockexport> documents")


def _add_checkpoint_commands(sub: SubParsers) -> None:
    p = _add(sub, "blockcheckpoint-list", cmd_blockcheckpoint_list,
             "list a domain's checkpoints, oldest first, and whether they are usable", """\
  virsh-fleece blockcheckpoint-list web1
  virsh-fleece blockcheckpoint-list web1 --name
""")
    _domain(p)
    p.add_argument("--name", action="store_true", help="print only the checkpoint names")

    p = _add(sub, "blockcheckpoint-dumpxml", cmd_blockcheckpoint_dumpxml,
             "print a checkpoint's XML (validity and bytes changed since, per disk)", """\
  virsh-fleece blockcheckpoint-dumpxml web1 mon
""")
    _domain(p)
    p.add_argument("name", metavar="NAME", help="checkpoint name")

    p = _add(sub, "blockcheckpoint-delete", cmd_blockcheckpoint_delete,
             "delete a checkpoint (its changes merge into the one before)", """\
  virsh-fleece blockcheckpoint-delete web1 mon
""")
    _domain(p)
    p.add_argument("name", metavar="NAME", help="checkpoint name")


def _add_repair_command(sub: SubParsers) -> None:
    p = _add(sub, "repair", cmd_repair,
             "make the plugin's record and qemu agree: finish interrupted calls, remove "
             "orphans, rebuild checkpoints", """\
  virsh-fleece repair web1
""")
    _domain(p)


def _add_demo_command(sub: SubParsers) -> None:
    p = _add(sub, "demo", cmd_demo,
             "snapshot, export and copy a throwaway domain's disk, and verify the copy", """\
  virsh-fleece demo
  virsh-fleece --debug demo
  virsh-fleece demo --keep    # leave the domain, snapshot and export for a look
""")
    p.add_argument("--keep", action="store_true",
                   help="do not clean up; print what was left and how to remove it")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, epilog=TOP_EPILOG,
        description="Temporary block snapshots (image fleecing), checkpoints and NBD "
                    "exports of running libvirt domains.")
    parser.add_argument("-c", "--connect", metavar="URI",
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, else qemu:///system)")
    parser.add_argument("--debug", action="store_true",
                        help="log debug messages (QMP included) and show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no confirmation messages and no table headers")
    parser.add_argument("--version", action="version", version=f"%(prog)s {fleece.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    _add_snapshot_commands(sub)
    _add_export_commands(sub)
    _add_checkpoint_commands(sub)
    _add_repair_command(sub)
    _add_demo_command(sub)
    cli_hook.register(sub, _add, _domain)
    cli_backup.register(sub, _add, _domain)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; exits 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "port", None) is not None and args.host is None:
        args.subparser.error("--port needs --host")
    if getattr(args, "tls", False) and args.host is None:
        args.subparser.error("--tls needs --host (a unix socket is protected by its permissions)")
    return args


# --- main ---------------------------------------------------------------------------

class _Formatter(logging.Formatter):
    """``virsh-fleece: warning: ...``; with --debug also the logger and tracebacks."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        if not self.debug:
            return f"{PROG}: {level}: {record.getMessage()}"
        text = f"{PROG}: {level}: {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(debug))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def _error(text: str) -> None:
    print(f"{PROG}: error: {text}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``virsh-fleece`` entry point; returns the exit status."""
    args = parse_args(argv)
    setup_logging(args.debug)
    ctx = Context(args.connect, args.quiet)
    try:
        return args.func(ctx, args)
    except errors.Error as e:
        if args.debug:
            traceback.print_exc()
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (| head): not an error; keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if args.debug:
            traceback.print_exc()
            _error(f"unexpected {type(e).__name__}: {e}")
        else:
            _error(f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)")
        return 1
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
