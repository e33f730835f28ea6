# SPDX-License-Identifier: LGPL-2.1-or-later
"""virsh-fleece: the --disk parser, the XML builders and formatting (pure), and the
real command run as a subprocess against real domains on the real libvirtd."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import libvirt
import libvirt_qemu
import pytest
from lxml import etree

import vm as testvm
from libvirt_fleece import cli, documents, errors

MiB = 1 << 20


# --- the --disk parser -----------------------------------------------------------------

def test_disk_spec_name_only():
    spec = cli.parse_disk_spec("vda", cli.SNAPSHOT_DISK_KEYS)
    assert spec.name == "vda" and spec.options == {}


def test_disk_spec_key_values():
    spec = cli.parse_disk_spec("vdb,snapshot=s1,exportname=web-vdb",
                               cli.EXPORT_START_DISK_KEYS, required=("snapshot",))
    assert spec.name == "vdb"
    assert spec.options == {"snapshot": "s1", "exportname": "web-vdb"}


def test_disk_spec_double_comma_is_a_literal_comma():
    spec = cli.parse_disk_spec("vda,fleece=/srv/a,,b.qcow2", cli.SNAPSHOT_DISK_KEYS)
    assert spec.get("fleece") == "/srv/a,b.qcow2"


def test_disk_spec_value_may_contain_equals():
    assert cli.parse_disk_spec("vda,fleece=/x=y", ("fleece",)).get("fleece") == "/x=y"


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
        cli.parse_disk_spec(text, keys, required)


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
    assert _subcommands() == sorted([
        "blocksnapshot-create", "blocksnapshot-create-as", "blocksnapshot-list",
        "blocksnapshot-dumpxml", "blocksnapshot-delete", "blockexport-start",
        "blockexport-start-as", "blockexport-stop", "blockexport-stop-as",
        "blockexport-list", "demo"])


@pytest.mark.parametrize("argv", [[]] + [[c] for c in _subcommands()])
def test_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Examples:\n  virsh-fleece " in out      # line breaks kept (RawDescription)


# --- XML builders -----------------------------------------------------------------------------

def test_snapshot_xml_escapes_and_is_accepted_by_the_library():
    xml = cli.snapshot_xml("a&b<c", [cli.DiskSpec("vda", {"fleece": "/srv/x'y\".qcow2"}),
                                     cli.DiskSpec("vdb", {})])
    root = etree.fromstring(xml)
    assert root.findtext("name") == "a&b<c"
    assert root.find("disk/fleece").get("file") == "/srv/x'y\".qcow2"
    # the schema refuses '&' in names; a plain name passes the library's parser
    spec = documents.parse_snapshot(cli.snapshot_xml("nightly", [
        cli.DiskSpec("vda", {"fleece": "/srv/x'y\".qcow2"}), cli.DiskSpec("vdb", {})]))
    assert spec.name == "nightly"
    assert [(d.name, d.fleece) for d in spec.disks] == [("vda", "/srv/x'y\".qcow2"),
                                                        ("vdb", None)]


def test_snapshot_xml_without_name_or_disks():
    spec = documents.parse_snapshot(cli.snapshot_xml(None, []))
    assert spec.name is None and spec.disks == []


def test_export_xml_unix_socket():
    spec = documents.parse_export(cli.export_xml(
        [cli.DiskSpec("vda", {"snapshot": "s1", "exportname": "web-vda"})],
        socket="/run/backup/web.sock"))
    assert spec.address == documents.Address(type="unix", socket="/run/backup/web.sock")
    assert spec.disks == [documents.ExportDiskSpec("vda", "s1", "web-vda", None)]


def test_export_xml_ip_with_and_without_port():
    disks = [cli.DiskSpec("vda", {"snapshot": "s1", "checkpoint": "c1"})]
    spec = documents.parse_export(cli.export_xml(disks, host="127.0.0.1", port=10810))
    assert spec.address == documents.Address(type="ip", host="127.0.0.1", port=10810)
    assert spec.disks[0].checkpoint == "c1"
    spec = documents.parse_export(cli.export_xml(disks, host="::1"))
    assert spec.address == documents.Address(type="ip", host="::1")


def test_export_xml_default_address():
    spec = documents.parse_export(cli.export_xml([cli.DiskSpec("vda", {"snapshot": "s"})]))
    assert spec.address is None


def test_export_xml_escapes_attributes():
    xml = cli.export_xml([cli.DiskSpec("vda", {"snapshot": "s'\"<&"})])
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
    assert cli.nbd_uri("vda-s1", socket="/run/libvirt-fleece/web.sock") == \
        "nbd+unix:///vda-s1?socket=/run/libvirt-fleece/web.sock"
    assert cli.nbd_uri("vda-s1", host="127.0.0.1", port=10809) == "nbd://127.0.0.1:10809/vda-s1"
    assert cli.nbd_uri("e", host="::1", port=1) == "nbd://[::1]:1/e"
    assert cli.nbd_uri("e", socket="/tmp/a b.sock") == "nbd+unix:///e?socket=/tmp/a%20b.sock"


def test_parse_export_list_of_library_documents():
    doc = documents.export_list_document(
        documents.Address(type="unix", socket="/run/s.sock"),
        [{"name": "vda", "snapshot": "s1", "exportname": "vda-s1"},
         {"name": "vdb", "snapshot": "s1", "exportname": "second"}])
    rows = cli.parse_export_list([doc])
    assert rows[0] == cli.ExportRow("vda-s1", "vda", "s1", "unix:/run/s.sock",
                                    "nbd+unix:///vda-s1?socket=/run/s.sock")
    assert rows[1].exportname == "second" and rows[1].disk == "vdb"
    doc = documents.export_list_document(
        documents.Address(type="ip", host="127.0.0.1", port=4444),
        [{"name": "vda", "snapshot": "s1", "exportname": "x"}])
    assert cli.parse_export_list([doc])[0].uri == "nbd://127.0.0.1:4444/x"
    assert cli.parse_export_list([]) == []


def test_parse_snapshot_desc_of_library_document():
    doc = documents.snapshot_document("s1", 1_700_000_000, [
        {"name": "vda", "file": "/f/a", "capacity": 64 * MiB, "allocation": MiB},
        {"name": "vdb", "file": "/f/b", "capacity": 64 * MiB, "allocation": MiB // 2}])
    row = cli.parse_snapshot_desc(doc)
    assert row == cli.SnapshotRow("s1", 1_700_000_000, ["vda", "vdb"], MiB + MiB // 2)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536 * 1024, "1.5 MiB"),
    (64 * MiB, "64 MiB"), (3 << 30, "3 GiB"), (5 << 40, "5 TiB")])
def test_human_size(n, text):
    assert cli.human_size(n) == text


def test_format_time_like_virsh(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert cli.format_time(0) == "1970-01-01 00:00:00 +0000"
        assert cli.format_time(None) == "-"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_format_table_like_virsh_list():
    text = cli.format_table(("Name", "Disks"), [("s1", "vda,vdb"), ("longer-name", "vda")])
    assert text.splitlines() == [
        " Name          Disks",
        "----------------------",
        " s1            vda,vdb",
        " longer-name   vda",
    ]
    assert cli.format_table(("Name",), [("s1",)], header=False) == " s1"


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
def conn():
    try:
        c = libvirt.open("qemu:///system")
    except libvirt.libvirtError as e:
        if os.environ.get("LIBVIRT_FLEECE_REQUIRE_LIBVIRT"):
            raise
        pytest.skip(f"no libvirtd: {e}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def vm(conn):
    v = testvm.TestVM(conn, disks=2, tag="cli-")
    try:
        v.start()
        yield v
    finally:
        v.cleanup()


def qemu_leftovers(dom) -> list[str]:
    """The plugin's nodes and the exports still in qemu (empty: clean)."""
    def q(cmd, args=None):
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0))["return"]
    return sorted([n["node-name"] for n in q("query-named-block-nodes", {"flat": True})
                   if n["node-name"].startswith("fleece-")] +
                  [e["id"] for e in q("query-block-exports")])


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
    assert re.search(r"^ second\s+vdb\s+s1\s+unix:" + re.escape(sock), listing, re.M)
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
    assert qemu_leftovers(vm.dom) == []


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


@pytest.mark.integration
def test_checkpoint_is_created_or_refused_in_one_line(vm):
    # the library refuses checkpoints until they are implemented; either outcome is clear
    proc = run_cli("blocksnapshot-create-as", vm.name, "--name", "c", "--checkpoint")
    if proc.returncode == 0:
        assert proc.stdout == "Block snapshot c created\n"
    else:
        assert "checkpoint" in one_line_error(proc)


def test_checkpoint_option_passes_the_flag(monkeypatch, capsys):
    from libvirt_fleece import VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT
    calls = []

    class Snap:
        def getName(self):
            return "c"

    monkeypatch.setattr(cli.Context, "domain", lambda self, ident: ident)
    monkeypatch.setattr(cli.fleece, "blockSnapshotCreateXML",
                        lambda dom, xml, flags=0: calls.append((dom, xml, flags)) or Snap())
    assert cli.main(["blocksnapshot-create-as", "d", "--name", "c", "--checkpoint"]) == 0
    assert cli.main(["blocksnapshot-create-as", "d", "--name", "c"]) == 0
    assert [flags for _, _, flags in calls] == [VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT, 0]
    assert etree.fromstring(calls[0][1]).findtext("name") == "c"
    assert capsys.readouterr().out == "Block snapshot c created\n" * 2


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
