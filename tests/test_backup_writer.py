# SPDX-License-Identifier: LGPL-2.1-or-later
"""The writer record of backup points (issue #10): version comparison, which points are
warned about, old manifests, and what the CLI prints (no libvirt needed)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

import libvirt_fleece
from libvirt_fleece import backup as bk
from libvirt_fleece.backup import readback, run
from libvirt_fleece.backup import manifest as mf
from libvirt_fleece.backup import writer as bw
from libvirt_fleece.cli import backup as cli_backup

SHA = "ab" * 32
W = mf.Writer


def test_version_tuple_reads_plugin_and_qemu_versions():
    assert bw.version_tuple("7.2.22") == (7, 2, 22)
    assert bw.version_tuple("10.0.2") == (10, 0, 2)
    assert bw.version_tuple("8.0") == (8, 0, 0)
    assert bw.version_tuple("0.2.0.dev1") == (0, 2, 0)
    assert bw.version_tuple(" 0.10.1 ") == (0, 10, 1)
    for bad in (None, "", "x7.2", "seven", "7", 7.2, ["7.2.0"]):
        assert bw.version_tuple(bad) is None, bad
    assert bw.version_tuple("0.10.0") > bw.version_tuple("0.2.0")   # not a string compare
    assert bw.version_tuple("10.0.0") >= bw.QEMU_FIXED > bw.version_tuple("7.2.22")


@pytest.mark.parametrize("writer, affected", [
    (None, True),                                       # 0.1.x: no record, QEMU unknown
    (W("0.1.0"), True),
    (W("0.1.0", "7.2.22"), True),
    (W("0.1.0", "7.2.22", "snapshot-access"), True),
    (W("0.1.9", "7.99.99"), True),
    (W("0.1.0", "8.0.0"), False),                       # the QEMU has the fix
    (W("0.1.0", "10.0.2"), False),
    (W("0.1.0", "garbage"), True),                      # unreadable QEMU: unknown
    (W("garbage", "7.2.22"), True),                     # unreadable plugin: old
    (W("garbage", "9.0.0"), False),
    (W("0.2.0"), False),                                # fixed read path, any QEMU
    (W("0.2.0", "7.2.22", "overlay"), False),
    (W("0.2.0", "7.2.22", None), False),
    (W("0.2.1", None), False),
    (W("1.0.0", "6.2.0"), False),
    (W(libvirt_fleece.__version__, "7.2.22"), False),
])
def test_which_writers_are_affected(writer, affected):
    assert bw.affected_writer(writer) is affected


def point_json(index, writer="absent", backing=None, disks=("vda",), mode=None):
    p = {"index": index, "time": f"2026-11-0{index + 1}T12:00:00Z",
         "mode": mode or ("incremental" if backing is not None else "full"),
         "checkpoint": f"backup-{index}",
         "disks": [{"name": d, "file": mf.file_name(d, index), "size": 1 << 20, "copied": 0,
                    "layer_sha256": SHA,
                    "backing": mf.file_name(d, backing) if backing is not None else None}
                   for d in disks]}
    if writer != "absent":
        p["writer"] = writer
    return p


def manifest(*points, fmt=mf.FORMAT):
    return mf._from_json({"format": fmt, "domain": {"name": "web1", "uuid": "u"},
                          "points": list(points)}, "manifest.json")


NEW = {"libvirt_fleece": "0.2.0", "qemu": "7.2.22", "read_path": "overlay"}


def test_old_manifests_read_without_a_writer_and_round_trip_unchanged():
    m = manifest(point_json(0), point_json(1, backing=0))         # /2 as 0.1.x wrote it
    assert [p.writer for p in m.points] == [None, None]
    assert "writer" not in m.points[0].to_json()                  # never invented
    old = {"format": "libvirt-fleece-backup/1", "domain": {"name": "d", "uuid": "u"},
           "points": [{"index": 0, "time": "t", "mode": "full", "checkpoint": "c",
                       "disks": [{"name": "vda", "file": "vda.0000.qcow2", "size": 1,
                                  "copied": 1, "sha256": SHA, "backing": None}]}]}
    m1 = mf._from_json(old, "manifest.json")
    assert m1.points[0].writer is None and bw.point_warnings(m1)
    # a new point keeps its record through save and load, the old ones stay without
    m.points.append(mf.Point(index=2, time="t", mode="full", checkpoint="c", disks=[],
                             writer=W("0.2.0", "7.2.22", "overlay")))
    data = json.loads(json.dumps(m.to_json()))
    assert data["format"] == "libvirt-fleece-backup/2"
    assert data["points"][2]["writer"] == NEW
    assert "writer" not in data["points"][0]
    again = mf._from_json(data, "manifest.json")
    assert again.points[2].writer == W("0.2.0", "7.2.22", "overlay")
    assert again.to_json() == data


def test_an_unusable_writer_record_counts_as_missing_and_never_blocks_reading():
    for bad in ("0.2.0", 5, [], {}, {"libvirt_fleece": 2}, {"qemu": "9.0.0"}):
        m = manifest(point_json(0, writer=bad))
        assert m.points[0].writer is None, bad
    m = manifest(point_json(0, writer={"libvirt_fleece": "0.2.0", "qemu": 7, "read_path": [],
                                       "future": "field"}))
    assert m.points[0].writer == W("0.2.0", None, None)


def test_warnings_name_each_suspect_point_and_the_incrementals_built_on_them():
    m = manifest(point_json(0),                                            # 0.1.x full
                 point_json(1, backing=0),                                 # 0.1.x incr
                 point_json(2, writer=NEW, backing=1),                     # 0.2.0 on top
                 point_json(3, writer=NEW),                                # 0.2.0 full
                 point_json(4, writer=NEW, backing=3),                     # 0.2.0 on it
                 point_json(5, writer={"libvirt_fleece": "0.1.0", "qemu": "10.0.2"}))
    warnings = bw.point_warnings(m)
    assert len(warnings) == 3, warnings
    w0, w1, w2 = warnings
    assert w0 == ("WARNING: point 0 (vda, 2026-11-01 12:00) was written by libvirt-fleece "
                  "0.1.x on an unknown QEMU: on QEMU before 8.0 its data may differ from the "
                  "disk at the snapshot's instant if the guest wrote during the backup, and "
                  "verify cannot prove it right; take a new full backup (see NEWS.md)")
    assert w1.startswith("WARNING: point 1 (vda, 2026-11-02 12:00) was written by")
    assert w2.startswith("WARNING: point 2 (vda, 2026-11-03 12:00) builds on points 0, 1, "
                         "written by libvirt-fleece 0.1.x on an unknown QEMU: restoring it "
                         "reads their data;")
    assert "take a new full backup (see NEWS.md)" in w2
    assert all("\n" not in w for w in warnings)
    assert bw.suspect_reason(m, m.points[2]).startswith("point 2 builds on point 0, written by")
    assert bw.suspect_reason(m, m.points[1]).startswith("point 1 was written by libvirt-fleece")
    assert bw.suspect_reason(m, m.points[4]) is None
    assert bw.suspect_reason(m, m.points[5]) is None


def test_a_warning_names_the_recorded_versions():
    m = manifest(point_json(0, writer={"libvirt_fleece": "0.1.0", "qemu": "7.2.22"},
                            disks=("vda", "vdb")))
    assert bw.point_warnings(m)[0].startswith(
        "WARNING: point 0 (vda,vdb, 2026-11-01 12:00) was written by libvirt-fleece 0.1.0 on "
        "QEMU 7.2.22: ")


def test_manifest_strings_are_printed_without_control_characters():
    evil = "0.1\x1b]0;owned\x07\n\r\x9b31m" + "x" * 500
    p = point_json(0, writer={"libvirt_fleece": evil, "qemu": evil})
    p["time"] = "2026\x1b[1m-11"
    w = bw.point_warnings(manifest(p))[0]
    assert w.isprintable() and "\x1b" not in w and "\x9b" not in w
    assert "2026?[1m-11" in w and len(w) < 600
    p["disks"][0]["name"] = "vd\x1b[2Ja"          # a disk name is refused, printably
    with pytest.raises(mf.BackupCorrupt, match="is not a disk target name") as e:
        manifest(p)
    assert "\x1b" not in str(e.value)
    assert bw.clean("a\tb\x00c\u202ed") == "a?b?c?d"
    assert bw.clean("y" * 200) == "y" * 77 + "..."


def run_cli(func, directory, capsys, quiet=False):
    ctx = argparse.Namespace(quiet=quiet, say=lambda text: None if quiet else print(text))
    rc = func(ctx, argparse.Namespace(dir=str(directory)))
    return rc, capsys.readouterr().out


def write_manifest(directory, *points):
    data = {"format": mf.FORMAT, "domain": {"name": "web1\x1b[31m", "uuid": "u"},
            "points": list(points)}
    (directory / mf.MANIFEST).write_text(json.dumps(data))


def test_info_prints_one_warning_line_per_suspect_point_even_when_quiet(tmp_path, capsys):
    write_manifest(tmp_path, point_json(0), point_json(1, writer=NEW))
    for quiet in (False, True):
        rc, out = run_cli(cli_backup.cmd_info, tmp_path, capsys, quiet)
        assert rc == 0 and "\x1b" not in out and "Domain: web1?[31m (u)" in out
        warned = [line for line in out.splitlines() if line.startswith("WARNING:")]
        assert len(warned) == 1 and warned[0].startswith("WARNING: point 0 (vda, ")
    write_manifest(tmp_path, point_json(0, writer=NEW))
    rc, out = run_cli(cli_backup.cmd_info, tmp_path, capsys)
    assert rc == 0 and "WARNING" not in out


def test_verify_report_carries_warnings_and_the_cli_exits_0(tmp_path, capsys, monkeypatch):
    write_manifest(tmp_path, point_json(0), point_json(1, writer=NEW))
    for i in (0, 1):        # headers as the manifest says (verify reads them itself)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                        str(tmp_path / mf.file_name("vda", i)), str(1 << 20)], check=True)
        os.chmod(tmp_path / mf.file_name("vda", i), 0o600)
    monkeypatch.setattr(readback, "_check_image", lambda where, d, opened: [])
    monkeypatch.setattr(readback, "_matches", lambda d, path: True)
    report = bk.verify(str(tmp_path))
    assert report.ok and len(report.warnings) == 1 and "point 0" in report.warnings[0]
    rc, out = run_cli(cli_backup.cmd_verify, tmp_path, capsys)
    assert rc == 0
    assert out.splitlines()[0].startswith("WARNING: point 0 (vda, ")
    assert "All 2 files match the manifest; 1 point(s) cannot be proven right" in out
    monkeypatch.setattr(readback, "_matches", lambda d, path: d.file != "vda.0001.qcow2")
    rc, out = run_cli(cli_backup.cmd_verify, tmp_path, capsys)
    assert rc == 1 and "FAILED: point 1 disk vda" in out and "WARNING: point 0" in out


def test_read_path_of_the_exports():
    assert run._read_path({"vda": {}, "vdb": {"bitmap": "b"}}) is None         # not recorded
    assert run._read_path({"vda": {"readPath": "overlay"},
                          "vdb": {"readPath": "overlay"}}) == "overlay"
    assert run._read_path({"vdb": {"readPath": "snapshot-access"},
                          "vda": {"readPath": "overlay"}}) == \
        "vda=overlay, vdb=snapshot-access"
    assert run._read_path({"vda": {"readPath": "overlay"}, "vdb": {}}) == \
        "vda=overlay, vdb=unknown"
    assert run._bitmaps({"vda": {"bitmap": "bm0"}, "vdb": {}}) == {"vda": "bm0"}


def test_version_is_0_3_0_and_newer_than_the_fixed_one():
    assert libvirt_fleece.__version__ == "0.3.0"
    assert bw.version_tuple(libvirt_fleece.__version__) >= bw.FIXED_IN
