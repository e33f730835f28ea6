# SPDX-License-Identifier: LGPL-2.1-or-later
"""virsh-fleece: the --disk parser, the XML builders and formatting (pure), and the
real command run as a subprocess against real domains on the real libvirtd."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import libvirt
import pytest
from lxml import etree

import libvirt_fleece as lf
import vm as testvm
from conftest import plugin_leftovers
from libvirt_fleece.qemu import bitmaps, names
from libvirt_fleece import documents, errors, units, xmlutil
from libvirt_fleece.steps import checkpoint as checkpoints
from libvirt_fleece.cli import commands as cli, format as cliformat

MiB = 1 << 20


# --- the --disk parser -----------------------------------------------------------------

def test_disk_spec_name_only():
    spec = cliformat.parse_disk_spec("vda", cliformat.SNAPSHOT_DISK_KEYS)
    assert spec.name == "vda" and spec.options == {}


def test_disk_spec_key_values():
    spec = cliformat.parse_disk_spec("vdb,snapshot=s1,exportname=web-vdb",
                                     cliformat.EXPORT_START_DISK_KEYS, required=("snapshot",))
    assert spec.name == "vdb"
    assert spec.options == {"snapshot": "s1", "exportname": "web-vdb"}


def test_disk_spec_double_comma_is_a_literal_comma():
    spec = cliformat.parse_disk_spec("vda,fleece=/srv/a,,b.qcow2", cliformat.SNAPSHOT_DISK_KEYS)
    assert spec.get("fleece") == "/srv/a,b.qcow2"


def test_disk_spec_value_may_contain_equals():
    assert cliformat.parse_disk_spec("vda,fleece=/x=y", ("fleece",)).get("fleece") == "/x=y"


@pytest.mark.parametrize("text, keys, required, problem", [
    ("vda,foo=1", ("fleece",), (), "unknown key 'foo'"),
    ("vda,fleece=", ("fleece",), (), "empty value for 'fleece'"),
    ("vda,snapshot=a,snapshot=b", ("snapshot",), (), "key 'snapshot' is given twice"),
    ("vda,snapshot", ("snapshot",), (), "'snapshot' is not key=value"),
    ("vda", ("snapshot",), ("snapshot",), "missing snapshot="),
    ("", ("snapshot",), (), "the disk name"),
    (",snapshot=s", ("snapshot",), (), "the disk name"),
    ("snapshot=s", ("snapshot",), (), "must be the disk name"),
])
def test_disk_spec_errors_name_the_problem(text, keys, required, problem):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(problem)):
        cliformat.parse_disk_spec(text, keys, required)


def test_bad_disk_spec_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["blockexport-start-as", "dom", "--disk", "vda,snapshot=s,bogus=1"])
    assert e.value.code == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


# --- argument rules (exit 2) -----------------------------------------------------------------

@pytest.mark.parametrize("argv, problem", [
    (["blockexport-start-as", "d", "--disk", "vda,snapshot=s", "--port", "10809"],
     "--port needs --host"),
    (["blockexport-start-as", "d", "--disk", "vda,snapshot=s", "--socket", "/s",
      "--host", "::1"], "not allowed with"),
    (["blockexport-start-as", "d", "--disk", "vda,snapshot=s", "--host", "::1",
      "--port", "70000"], "not in 0-65535"),
    (["blockexport-start-as", "d"], "--disk"),
    (["blockexport-stop-as", "d", "--disk", "vda,snapshot=s,checkpoint=c"], "unknown key"),
    (["no-such-command"], "invalid choice"),
    ([], "COMMAND"),
])
def test_usage_errors_exit_2(argv, problem, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert problem in capsys.readouterr().err


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_all_documented_subcommands_exist():
    # (the hook and backup modules add theirs)
    assert set(_subcommands()) >= {
        "blocksnapshot-create", "blocksnapshot-create-as", "blocksnapshot-list",
        "blocksnapshot-dumpxml", "blocksnapshot-delete", "blockexport-start",
        "blockexport-start-as", "blockexport-stop", "blockexport-stop-as",
        "blockexport-list", "blockcheckpoint-list", "blockcheckpoint-dumpxml",
        "blockcheckpoint-delete", "demo"}


@pytest.mark.parametrize("command", ["blocksnapshot-create", "blocksnapshot-create-as"])
def test_checkpoint_option_is_documented_without_caveats(command, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "not supported" not in out


@pytest.mark.parametrize("argv", [[]] + [[c] for c in _subcommands()])
def test_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Examples:\n  virsh-fleece " in out      # line breaks kept (RawDescription)


# --- XML builders -----------------------------------------------------------------------------

def test_snapshot_xml_escapes_and_is_accepted_by_the_library():
    xml = cliformat.snapshot_xml("a&b<c", [
        cliformat.DiskSpec("vda", {"fleece": "/srv/x'y\".qcow2"}), cliformat.DiskSpec("vdb", {})])
    root = etree.fromstring(xml)
    assert root.findtext("name") == "a&b<c"
    assert root.find("disk/fleece").get("file") == "/srv/x'y\".qcow2"
    # the schema refuses '&' in names; a plain name passes the library's parser
    spec = documents.parse_snapshot(cliformat.snapshot_xml("nightly", [
        cliformat.DiskSpec("vda", {"fleece": "/srv/x'y\".qcow2"}), cliformat.DiskSpec("vdb", {})]))
    assert spec.name == "nightly"
    assert [(d.name, d.fleece) for d in spec.disks] == [("vda", "/srv/x'y\".qcow2"),
                                                        ("vdb", None)]


def test_snapshot_xml_without_name_or_disks():
    spec = documents.parse_snapshot(cliformat.snapshot_xml(None, []))
    assert spec.name is None and spec.disks == []


def test_export_xml_unix_socket():
    spec = documents.parse_export(cliformat.export_xml(
        [cliformat.DiskSpec("vda", {"snapshot": "s1", "exportname": "web-vda"})],
        socket="/run/backup/web.sock"))
    assert spec.address == documents.Address(type="unix", socket="/run/backup/web.sock")
    assert spec.disks == [documents.ExportDiskSpec("vda", "s1", "web-vda", None)]


def test_export_xml_ip_with_and_without_port():
    disks = [cliformat.DiskSpec("vda", {"snapshot": "s1", "checkpoint": "c1"})]
    spec = documents.parse_export(cliformat.export_xml(disks, host="127.0.0.1", port=10810))
    assert spec.address == documents.Address(type="ip", host="127.0.0.1", port=10810)
    assert spec.disks[0].checkpoint == "c1"
    spec = documents.parse_export(cliformat.export_xml(disks, host="::1"))
    assert spec.address == documents.Address(type="ip", host="::1")


def test_export_xml_default_address():
    spec = documents.parse_export(
        cliformat.export_xml([cliformat.DiskSpec("vda", {"snapshot": "s"})]))
    assert spec.address is None


def test_export_xml_escapes_attributes():
    xml = cliformat.export_xml([cliformat.DiskSpec("vda", {"snapshot": "s'\"<&"})])
    assert etree.fromstring(xml).find("disk").get("snapshot") == "s'\"<&"


def test_print_xml_needs_no_connection(capsys, monkeypatch):
    monkeypatch.setattr(cli.virt, "open_connection", _must_not_connect)
    assert cli.main(["blockexport-start-as", "dom", "--disk", "vda,snapshot=s",
                     "--host", "127.0.0.1", "--port", "0", "--print-xml"]) == 0
    root = etree.fromstring(capsys.readouterr().out)
    assert root.find("address").attrib == {"type": "ip", "host": "127.0.0.1", "port": "0"}


def _must_not_connect(uri=None):
    raise AssertionError("connected")


# --- formatting -------------------------------------------------------------------------------

def test_nbd_uris():
    assert cliformat.nbd_uri("vda-s1", socket="/run/libvirt-fleece/web.sock") == \
        "nbd+unix:///vda-s1?socket=/run/libvirt-fleece/web.sock"
    assert cliformat.nbd_uri("vda-s1", host="127.0.0.1", port=10809) == \
        "nbd://127.0.0.1:10809/vda-s1"
    assert cliformat.nbd_uri("e", host="::1", port=1) == "nbd://[::1]:1/e"
    assert cliformat.nbd_uri("e", socket="/tmp/a b.sock") == "nbd+unix:///e?socket=/tmp/a%20b.sock"


def test_parse_export_list_of_library_documents():
    doc = documents.export_list_document(
        documents.Address(type="unix", socket="/run/s.sock"),
        [{"name": "vda", "snapshot": "s1", "exportname": "vda-s1"},
         {"name": "vdb", "snapshot": "s1", "exportname": "second"}])
    rows = cliformat.parse_export_list([doc])
    assert rows[0] == cliformat.ExportRow("vda-s1", "vda", "s1", "unix:/run/s.sock",
                                          "nbd+unix:///vda-s1?socket=/run/s.sock")
    assert rows[1].exportname == "second" and rows[1].disk == "vdb"
    doc = documents.export_list_document(
        documents.Address(type="ip", host="127.0.0.1", port=4444),
        [{"name": "vda", "snapshot": "s1", "exportname": "x"}])
    assert cliformat.parse_export_list([doc])[0].uri == "nbd://127.0.0.1:4444/x"
    assert cliformat.parse_export_list([]) == []


def test_parse_export_list_with_a_checkpoint_gives_the_meta_context():
    doc = documents.export_list_document(
        documents.Address(type="unix", socket="/run/s.sock"),
        [{"name": "vda", "snapshot": "tue", "checkpoint": "mon", "exportname": "vda-tue",
          "bitmap": "fleece-0a0b0c0d-0-bm0"},
         {"name": "vdb", "snapshot": "tue", "checkpoint": None, "exportname": "vdb-tue",
          "bitmap": None}])
    inc, full = cliformat.parse_export_list([doc])
    assert (inc.checkpoint, inc.bitmap) == ("mon", "fleece-0a0b0c0d-0-bm0")
    assert inc.meta_context == "qemu:dirty-bitmap:fleece-0a0b0c0d-0-bm0"
    assert (full.checkpoint, full.meta_context) == (None, None)


def test_export_table_shows_checkpoint_and_context_column_only_when_needed():
    plain = cliformat.ExportRow("vda-s", "vda", "s", "unix:/r.sock", "nbd+unix:///vda-s?socket=/r")
    text = cliformat.export_table([plain])
    assert text.splitlines()[0].split() == ["Export", "name", "Disk", "Snapshot", "Checkpoint",
                                            "Address", "URI"]
    assert re.match(r" vda-s\s+vda\s+s\s+-\s+unix:/r.sock\s+nbd", text.splitlines()[2])
    inc = dataclasses.replace(plain, exportname="inc", checkpoint="c1", bitmap="fleece-x")
    lines = cliformat.export_table([plain, inc]).splitlines()
    assert lines[0].endswith("Dirty bitmap context")
    assert lines[2].endswith(" -")
    assert re.match(r" inc\s+vda\s+s\s+c1\s+.*\sqemu:dirty-bitmap:fleece-x$", lines[3])
    assert cliformat.export_table([], header=False) == ""


def _checkpoint_doc(valid_vdb: bool = True) -> str:
    seq = 1_700_000_000 * 10**9
    vda = checkpoints.CheckpointDisk("vda", f"fleece-cp.{seq:016x}.4000000.c1", seq, 64 * MiB,
                                     "libvirt-2-format")
    vdb = checkpoints.CheckpointDisk("vdb", f"fleece-cp.{seq:016x}.4000000.c1", seq, 64 * MiB,
                                     "libvirt-1-format", valid=valid_vdb,
                                     reason="" if valid_vdb else "its bitmap is missing")
    changed = {"vda": 3 * 65536} | ({"vdb": 0} if valid_vdb else {})
    return checkpoints.checkpoint_document(checkpoints.Checkpoint("c1", seq, [vda, vdb]),
                                           changed)


def test_parse_checkpoint_desc_of_library_document():
    row = cliformat.parse_checkpoint_desc(_checkpoint_doc())
    assert row == cliformat.CheckpointRow("c1", 1_700_000_000, True, ["vda", "vdb"], [],
                                          {"vda": 3 * 65536, "vdb": 0})
    row = cliformat.parse_checkpoint_desc(_checkpoint_doc(valid_vdb=False))
    assert not row.valid
    assert row.reasons == [("vdb", "its bitmap is missing")]
    assert row.changed == {"vda": 3 * 65536}


def test_checkpoint_table_puts_the_reason_under_an_invalid_checkpoint(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        rows = [cliformat.parse_checkpoint_desc(_checkpoint_doc(valid_vdb=False)),
                cliformat.CheckpointRow("c2-longer", 1_700_000_100, True, ["vda"], [], {})]
        assert cliformat.checkpoint_table(rows).splitlines() == [
            " Name        Creation Time               Valid   Disks",
            "--------------------------------------------------------",
            " c1          2023-11-14 22:13:20 +0000   no      vda,vdb",
            "     vdb: its bitmap is missing",
            " c2-longer   2023-11-14 22:15:00 +0000   yes     vda",
        ]
        assert cliformat.checkpoint_table(rows[1:], header=False) == \
            " c2-longer   2023-11-14 22:15:00 +0000   yes     vda"
        assert cliformat.checkpoint_table([], header=False) == ""
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_parse_snapshot_desc_of_library_document():
    doc = documents.snapshot_document("s1", 1_700_000_000, [
        {"name": "vda", "file": "/f/a", "capacity": 64 * MiB, "allocation": MiB},
        {"name": "vdb", "file": "/f/b", "capacity": 64 * MiB, "allocation": MiB // 2}])
    row = cliformat.parse_snapshot_desc(doc)
    assert row == cliformat.SnapshotRow("s1", 1_700_000_000, ["vda", "vdb"], MiB + MiB // 2)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536 * 1024, "1.5 MiB"),
    (64 * MiB, "64 MiB"), (3 << 30, "3 GiB"), (5 << 40, "5 TiB")])
def test_human_size(n, text):
    assert units.human_size(n) == text


def test_format_time_like_virsh(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert cliformat.format_time(0) == "1970-01-01 00:00:00 +0000"
        assert cliformat.format_time(None) == "-"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_format_table_like_virsh_list():
    text = cliformat.format_table(("Name", "Disks"), [("s1", "vda,vdb"), ("longer-name", "vda")])
    assert text.splitlines() == [
        " Name          Disks",
        "----------------------",
        " s1            vda,vdb",
        " longer-name   vda",
    ]
    assert cliformat.format_table(("Name",), [("s1",)], header=False) == " s1"


# --- error handling in main() ------------------------------------------------------------------

def _raising(exc):
    def fail(uri=None):
        raise exc
    return fail


def test_expected_error_is_one_line_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(cli.virt, "open_connection",
                        _raising(errors.ConnectionError("cannot connect to libvirt")))
    assert cli.main(["blocksnapshot-list", "dom"]) == 1
    err = capsys.readouterr().err
    assert err == "virsh-fleece: error: cannot connect to libvirt\n"


def test_unexpected_error_hints_at_debug(monkeypatch, capsys):
    monkeypatch.setattr(cli.virt, "open_connection", _raising(RuntimeError("boom")))
    assert cli.main(["blocksnapshot-list", "dom"]) == 1
    err = capsys.readouterr().err
    assert err == ("virsh-fleece: error: unexpected RuntimeError: boom "
                   "(run with --debug for the traceback)\n")


def test_unexpected_error_traceback_with_debug(monkeypatch, capsys):
    monkeypatch.setattr(cli.virt, "open_connection", _raising(RuntimeError("boom")))
    assert cli.main(["--debug", "blocksnapshot-list", "dom"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.endswith("virsh-fleece: error: unexpected RuntimeError: boom\n")


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr(cli.virt, "open_connection", _raising(KeyboardInterrupt()))
    assert cli.main(["blocksnapshot-list", "dom"]) == 130


def test_library_warnings_are_prefixed(monkeypatch, capsys):
    import logging

    def warn(uri=None):
        logging.getLogger("libvirt_fleece.exports").warning("listens on %s", "0.0.0.0:1")
        raise errors.NotFound("x")
    monkeypatch.setattr(cli.virt, "open_connection", warn)
    try:
        assert cli.main(["blocksnapshot-list", "dom"]) == 1
    finally:
        logging.getLogger().handlers[:] = []
    assert capsys.readouterr().err.splitlines() == [
        "virsh-fleece: warning: listens on 0.0.0.0:1", "virsh-fleece: error: x"]


def test_unreadable_xml_file_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli.virt, "open_connection", _must_not_connect)
    assert cli.main(["blocksnapshot-create", "dom", str(tmp_path / "missing.xml")]) == 1
    assert capsys.readouterr().err == \
        f"virsh-fleece: error: cannot read {tmp_path / 'missing.xml'}: No such file or directory\n"


# --- integration: the real command on real domains -----------------------------------------------

def _cli_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "virsh-fleece")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "libvirt_fleece.cli"]


def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cli_command() + list(args), input=input, capture_output=True,
                          text=True, timeout=120)


def ok(*args: str, input: str | None = None) -> str:
    proc = run_cli(*args, input=input)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("virsh-fleece: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def make_cli_vm(make_vm):
    """conftest's domains, named so a leftover shows it came from here; a test that
    fails half-way leaves no snapshot (whose fleece file would outlive the domain)."""
    made = []

    def factory(**kwargs):
        t = make_vm(tag="cli-", **kwargs)
        made.append(t)
        return t

    yield factory
    for t in made:
        try:
            for snap in reversed(lf.blockSnapshotList(t.dom)):
                snap.delete(lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
        except lf.Error:
            pass        # best effort: conftest destroys the domain anyway


@pytest.fixture
def vm(make_cli_vm):
    return make_cli_vm(disks=2)


def fleece_bitmaps(dom) -> list[str]:
    """The plugin's dirty bitmaps still in qemu."""
    return sorted(b.name for bs in bitmaps.by_node(dom).values() for b in bs
                  if b.name.startswith(names.TEMP_BITMAP_PREFIX))


def dirty_extents(uri: str, context: str) -> list[tuple[int, int]]:
    """(offset, length) of the dirty extents nbdinfo --map shows for a bitmap context."""
    proc = subprocess.run(["nbdinfo", "--json", f"--map={context}", uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [(e["offset"], e["length"]) for e in json.loads(proc.stdout) if e["type"] & 1]


def nbdinfo_size(uri: str) -> int:
    proc = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


@pytest.mark.integration
def test_snapshot_and_export_lifecycle(vm):
    name = vm.name
    vm.write("vda", 0x5A, 0, MiB)
    assert ok("blocksnapshot-create-as", name, "--name", "s1", "--disk", "vda",
              "--disk", "vdb") == "Block snapshot s1 created\n"
    vm.write("vda", 0xA5, 0, MiB)       # the disk moves on; the snapshot does not

    table = ok("blocksnapshot-list", name).splitlines()
    assert table[0].split() == ["Name", "Creation", "Time", "Disks", "Fleece", "allocation"]
    row = next(line for line in table[2:] if line.split()[0] == "s1")
    assert re.match(r" s1\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\s+vda,vdb\s+\S+ \S*B$", row)
    assert ok("blocksnapshot-list", name, "--name") == "s1\n"

    root = etree.fromstring(ok("blocksnapshot-dumpxml", name, "s1").encode())
    assert root.findtext("name") == "s1"
    assert [d.get("name") for d in root.findall("disk")] == ["vda", "vdb"]

    out = ok("blockexport-start-as", name, "--disk", "vda,snapshot=s1",
             "--disk", "vdb,snapshot=s1,exportname=second")
    sock = f"/run/libvirt-fleece/{name}.sock"
    uri_a = f"nbd+unix:///vda-s1?socket={sock}"
    uri_b = f"nbd+unix:///second?socket={sock}"
    assert out.splitlines() == [f"Block export vda-s1 started: {uri_a}",
                                f"Block export second started: {uri_b}"]

    listing = ok("blockexport-list", name)
    assert uri_a in listing and uri_b in listing
    assert re.search(r"^ second\s+vdb\s+s1\s+-\s+unix:" + re.escape(sock), listing, re.M)
    docs = ok("blockexport-list", name, "--xml")
    assert etree.fromstring(docs.encode()).tag == "blockexport"

    # the export serves the disk as it was at snapshot time
    assert nbdinfo_size(uri_a) == 64 * MiB
    assert nbdinfo_size(uri_b) == 64 * MiB
    data = testvm.read_export(sock, "vda-s1")
    assert data == testvm.expected_image(64 * MiB, [(0x5A, 0, MiB)])

    assert ok("blockexport-stop-as", name, "--disk", "vda,snapshot=s1") == \
        "Block export vda-s1 stopped\n"
    listing = ok("blockexport-list", name)
    assert "vda-s1" not in listing and uri_b in listing

    # still exported (vdb): refused unless --stop-exports
    line = one_line_error(run_cli("blocksnapshot-delete", name, "s1"))
    assert "exported" in line
    assert ok("blocksnapshot-delete", name, "s1", "--stop-exports") == \
        "Block snapshot s1 deleted\n"
    assert ok("blocksnapshot-list", name, "--name") == ""
    assert ok("-q", "blockexport-list", name) == "\n"
    assert not os.path.exists(sock)
    assert plugin_leftovers(vm.dom) == {}


@pytest.mark.integration
def test_xml_files_stdin_tcp_and_domain_by_uuid_and_id(vm, tmp_path):
    uuid = vm.dom.UUIDString()
    dom_id = str(vm.dom.ID())
    assert ok("-q", "blocksnapshot-create", uuid, "-", input=(
        "<domainblocksnapshot><name>fromstdin</name><disk name='vdb'/>"
        "</domainblocksnapshot>")) == ""
    assert ok("blocksnapshot-list", dom_id, "--name") == "fromstdin\n"

    export = tmp_path / "export.xml"
    export.write_text("<domainblockexport type='nbd'><address type='ip' host='127.0.0.1' "
                      "port='0'/><disk name='vdb' snapshot='fromstdin' exportname='tcp'/>"
                      "</domainblockexport>")
    out = ok("blockexport-start", vm.name, str(export))
    m = re.fullmatch(r"Block export tcp started: (nbd://127\.0\.0\.1:(\d+)/tcp)\n", out)
    assert m and int(m.group(2)) > 0, out
    assert nbdinfo_size(m.group(1)) == 64 * MiB
    assert f"127.0.0.1:{m.group(2)}" in ok("blockexport-list", vm.name)

    # (port='0' asks for a free port; stopping names the exports without the address)
    stop = tmp_path / "stop.xml"
    stop.write_text("<domainblockexport type='nbd'><disk name='vdb' snapshot='fromstdin' "
                    "exportname='tcp'/></domainblockexport>")
    assert ok("blockexport-stop", vm.name, str(stop), "--force") == \
        "Block export tcp stopped\n"
    assert ok("blocksnapshot-delete", vm.name, "fromstdin") == \
        "Block snapshot fromstdin deleted\n"


@pytest.mark.integration
def test_export_on_a_chosen_socket(vm, tmp_path):
    sock = str(tmp_path / "x.sock")
    ok("blocksnapshot-create-as", vm.name, "--name", "s", "--disk", "vda")
    out = ok("blockexport-start-as", vm.name, "--disk", "vda,snapshot=s,exportname=e",
             "--socket", sock)
    assert out == f"Block export e started: nbd+unix:///e?socket={sock}\n"
    assert nbdinfo_size(f"nbd+unix:///e?socket={sock}") == 64 * MiB
    ok("blockexport-stop-as", vm.name, "--disk", "vda,snapshot=s,exportname=e")
    ok("blocksnapshot-delete", vm.name, "s")
    assert not os.path.exists(sock)


@pytest.mark.integration
def test_unknown_domain_is_one_line_exit_1(conn):
    line = one_line_error(run_cli("blocksnapshot-list", "fleecetest-no-such-domain"))
    assert "fleecetest-no-such-domain" in line


@pytest.mark.integration
def test_unknown_disk_is_one_line_exit_1(vm):
    line = one_line_error(run_cli("blocksnapshot-create-as", vm.name, "--disk", "vdz"))
    assert "'vdz'" in line and "vda, vdb" in line
    assert ok("blocksnapshot-list", vm.name, "--name") == ""


@pytest.mark.integration
def test_unknown_snapshot_is_one_line_exit_1(vm):
    one_line_error(run_cli("blocksnapshot-dumpxml", vm.name, "nope"))
    one_line_error(run_cli("blockexport-start-as", vm.name, "--disk", "vda,snapshot=nope"))


def test_checkpoint_option_passes_the_flag(monkeypatch, capsys, tmp_path):
    from libvirt_fleece import VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT as CP
    calls = []

    class Snap:
        def getName(self):
            return "c"

    monkeypatch.setattr(cli.Context, "domain", lambda self, ident: ident)
    monkeypatch.setattr(cli.fleece, "blockSnapshotCreateXML",
                        lambda dom, xml, flags=0: calls.append((dom, xml, flags)) or Snap())
    request = tmp_path / "snap.xml"
    request.write_text("<domainblocksnapshot><name>c</name></domainblocksnapshot>")
    assert cli.main(["blocksnapshot-create-as", "d", "--name", "c", "--checkpoint"]) == 0
    assert cli.main(["blocksnapshot-create-as", "d", "--name", "c"]) == 0
    assert cli.main(["blocksnapshot-create", "d", str(request), "--checkpoint"]) == 0
    assert cli.main(["blocksnapshot-create", "d", str(request)]) == 0
    assert [flags for _, _, flags in calls] == [CP, 0, CP, 0]
    assert etree.fromstring(calls[0][1]).findtext("name") == "c"
    assert capsys.readouterr().out == ("Block snapshot c created with checkpoint c\n"
                                       "Block snapshot c created\n") * 2


@pytest.mark.integration
def test_checkpoint_commands_and_an_incremental_export(vm):
    name = vm.name
    vm.write("vda", 0x11, 0, MiB)                   # before c1: not a change since c1
    assert ok("blocksnapshot-create-as", name, "--name", "c1", "--disk", "vda",
              "--checkpoint") == "Block snapshot c1 created with checkpoint c1\n"
    ok("blocksnapshot-delete", name, "c1")          # the checkpoint outlives its snapshot
    vm.write("vda", 0x22, 8 * MiB, 128 * 1024)      # between c1 and s2: the change
    assert ok("blocksnapshot-create", name, "-", "--checkpoint", input=(
        "<domainblocksnapshot><name>s2</name><disk name='vda'/></domainblocksnapshot>")) == \
        "Block snapshot s2 created with checkpoint s2\n"
    vm.write("vda", 0x33, 32 * MiB, 64 * 1024)      # after s2: not in the export's bitmap

    assert ok("blockcheckpoint-list", name, "--name") == "c1\ns2\n"
    table = ok("blockcheckpoint-list", name).splitlines()
    assert table[0].split() == ["Name", "Creation", "Time", "Valid", "Disks"]
    assert [line.split()[0] for line in table[2:]] == ["c1", "s2"]
    for line in table[2:]:
        assert re.match(r" \S+\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\s+yes\s+vda$", line)
    assert ok("-q", "blockcheckpoint-list", name).splitlines() == table[2:]

    root = etree.fromstring(ok("blockcheckpoint-dumpxml", name, "c1").encode())
    xmlutil.validate(root, "checkpoints", "checkpoint XML")
    assert root.findtext("name") == "c1" and root.findtext("valid") == "yes"
    disk = root.find("disk")
    assert disk.get("name") == "vda"
    assert int(disk.get("changed")) == 128 * 1024 + 64 * 1024     # whole 64 KiB clusters

    out = ok("blockexport-start-as", name, "--disk", "vda,snapshot=s2,checkpoint=c1")
    m = re.fullmatch(r"Block export vda-s2 started: (\S+) \(changes since c1: "
                     r"(qemu:dirty-bitmap:\S+)\)\n", out)
    assert m, out
    uri, context = m.groups()
    doc = etree.fromstring(ok("blockexport-list", name, "--xml").encode())
    d = doc.find("disk")
    assert (d.get("checkpoint"), f"qemu:dirty-bitmap:{d.get('bitmap')}") == ("c1", context)
    listing = ok("blockexport-list", name).splitlines()
    assert listing[0].split()[-3:] == ["Dirty", "bitmap", "context"]
    assert re.match(r" vda-s2\s+vda\s+s2\s+c1\s+unix:\S+\s+" + re.escape(uri) + r"\s+" +
                    re.escape(context) + "$", listing[2])

    assert dirty_extents(uri, context) == [(8 * MiB, 128 * 1024)]
    data = testvm.read_export(doc.find("address").get("socket"), "vda-s2")
    assert data == testvm.expected_image(64 * MiB, [(0x11, 0, MiB), (0x22, 8 * MiB, 128 * 1024)])

    assert "used by export" in one_line_error(run_cli("blockcheckpoint-delete", name, "c1"))
    ok("blockexport-stop-as", name, "--disk", "vda,snapshot=s2")
    ok("blocksnapshot-delete", name, "s2")
    assert ok("blockcheckpoint-delete", name, "c1") == "Block checkpoint c1 deleted\n"
    assert ok("blockcheckpoint-list", name, "--name") == "s2\n"
    assert ok("-q", "blockcheckpoint-delete", name, "s2") == ""
    assert ok("-q", "blockcheckpoint-list", name) == "\n"
    assert fleece_bitmaps(vm.dom) == []
    assert plugin_leftovers(vm.dom) == {}


@pytest.mark.integration
def test_unknown_checkpoint_is_one_line_exit_1(vm):
    for command in ("blockcheckpoint-dumpxml", "blockcheckpoint-delete"):
        assert "'nope'" in one_line_error(run_cli(command, vm.name, "nope"))
    ok("blocksnapshot-create-as", vm.name, "--name", "s", "--disk", "vda")
    line = one_line_error(run_cli("blockexport-start-as", vm.name,
                                  "--disk", "vda,snapshot=s,checkpoint=nope"))
    assert "no checkpoint 'nope'" in line
    assert ok("blockexport-list", vm.name, "--xml") == ""
    ok("blocksnapshot-delete", vm.name, "s")


@pytest.mark.integration
def test_invalid_checkpoint_is_listed_with_its_reason(make_cli_vm):
    t = make_cli_vm(disks=1)
    ok("-q", "blocksnapshot-create-as", t.name, "--name", "c1", "--checkpoint")
    ok("-q", "blocksnapshot-delete", t.name, "c1")
    t.dom.blockResize("vda", 128 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    table = ok("blockcheckpoint-list", t.name).splitlines()
    assert re.match(r" c1\s+.*\s+no\s+vda$", table[2])
    assert re.match(r"     vda: the disk was resized from 67108864 to 134217728 bytes", table[3])
    root = etree.fromstring(ok("blockcheckpoint-dumpxml", t.name, "c1").encode())
    assert root.findtext("valid") == "no" and "resized" in root.find("disk").get("reason")
    ok("-q", "blocksnapshot-create-as", t.name, "--name", "s")
    line = one_line_error(run_cli("blockexport-start-as", t.name,
                                  "--disk", "vda,snapshot=s,checkpoint=c1"))
    assert "resized" in line and "full backup" in line
    ok("-q", "blocksnapshot-delete", t.name, "s")
    ok("-q", "blockcheckpoint-delete", t.name, "c1")
    assert fleece_bitmaps(t.dom) == []


@pytest.mark.integration
def test_checkpoint_on_a_raw_disk_is_refused_in_one_line(make_cli_vm):
    t = make_cli_vm(disks=1, fmt="raw")
    line = one_line_error(run_cli("blocksnapshot-create-as", t.name, "--name", "c",
                                  "--checkpoint"))
    assert "raw" in line and "qcow2" in line
    assert ok("blocksnapshot-list", t.name, "--name") == ""
    assert ok("blocksnapshot-create-as", t.name, "--name", "s") == "Block snapshot s created\n"
    ok("blocksnapshot-delete", t.name, "s")
    assert plugin_leftovers(t.dom) == {}


@pytest.mark.integration
def test_port_without_host_exits_2():
    proc = run_cli("blockexport-start-as", "dom", "--disk", "vda,snapshot=s", "--port", "1")
    assert proc.returncode == 2
    assert "--port needs --host" in proc.stderr


@pytest.mark.integration
def test_help_of_the_installed_command_has_examples():
    for args in (["--help"], ["blockexport-start-as", "--help"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "Examples:" in proc.stdout


def test_size_limit_and_tls_options_reach_the_xml():
    from libvirt_fleece import documents
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "blocksnapshot-create-as",
                          "x", "--name", "s", "--size-limit", "2097152", "--print-xml"],
                         capture_output=True, text=True)
    assert documents.parse_snapshot(out.stdout).size_limit == 2097152
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "blockexport-start-as",
                          "x", "--disk", "vda,snapshot=s", "--host", "127.0.0.1", "--tls",
                          "--print-xml"], capture_output=True, text=True)
    assert documents.parse_export(out.stdout).address.tls
    out = subprocess.run([sys.executable, "-m", "libvirt_fleece.cli", "blockexport-start-as",
                          "x", "--disk", "vda,snapshot=s", "--tls", "--print-xml"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--tls needs --host" in out.stderr
