# SPDX-License-Identifier: LGPL-2.1-or-later
"""The read-path verdict cache and the overlay size limit, without qemu."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import pytest

from libvirt_fleece import config, errors, metadata
from libvirt_fleece.steps import snapshot as snapshots
from libvirt_fleece.qemu import readpath
from libvirt_fleece.metadata import DiskRecord, SnapshotRecord


def me() -> str:
    with open("/proc/self/stat") as f:
        return f"{os.getpid()}-{f.read().rsplit(')', 1)[1].split()[19]}"


def test_a_verdict_is_kept_per_qemu_process_and_stale_ones_are_dropped(tmp_path):
    v = readpath.Verdict(readpath.OVERLAY, "self-test", "7.2.22")
    stale = tmp_path / "qemu" / "999999999-1.json"
    stale.parent.mkdir()
    stale.write_text("{}")
    readpath._store(str(tmp_path), me(), v)
    assert readpath._load_cached(str(tmp_path), me()) == v
    assert not stale.exists(), "a verdict of a qemu that is gone is removed"
    assert oct((tmp_path / "qemu" / f"{me()}.json").stat().st_mode & 0o777) == "0o600"
    assert readpath._load_cached(str(tmp_path), f"{os.getpid()}-0") is None


@pytest.mark.parametrize("content", ["", "[]", '{"readpath": "snapshot-access"}',
                                     '{"readpath": "fast", "reason": "", "qemu": ""}',
                                     "x" * 5000])
def test_an_unusable_cached_verdict_is_ignored(tmp_path, content):
    (tmp_path / "qemu").mkdir()
    (tmp_path / "qemu" / f"{me()}.json").write_text(content)
    assert readpath._load_cached(str(tmp_path), me()) is None


def test_a_cached_verdict_behind_a_symlink_or_fifo_is_ignored(tmp_path):
    (tmp_path / "qemu").mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"readpath": "snapshot-access", "reason": "", "qemu": ""}))
    os.symlink(target, tmp_path / "qemu" / f"{me()}.json")
    assert readpath._load_cached(str(tmp_path), me()) is None
    os.unlink(tmp_path / "qemu" / f"{me()}.json")
    os.mkfifo(tmp_path / "qemu" / f"{me()}.json")
    assert readpath._load_cached(str(tmp_path), me()) is None     # and does not hang


def test_liveness_needs_the_same_start_time():
    assert readpath._alive(me())
    assert not readpath._alive(f"{os.getpid()}-1")
    assert not readpath._alive("999999999-1")


def _session(tmp_path, **cfg) -> types.SimpleNamespace:
    return types.SimpleNamespace(cfg=dataclasses.replace(config.Config(), **cfg))


def _record(paths: list[str], path: str = readpath.OVERLAY) -> SnapshotRecord:
    disks = [DiskRecord(name=f"vd{i}", file=p, qdev="q", base="b", below="b", fleece_node="f",
                        filter_node="c", access_node="a", fdset=1, capacity=1)
             for i, p in enumerate(paths)]
    return SnapshotRecord(name="s", id="0" * 8, state=metadata.CREATING, created=0,
                          readpath=path, disks=disks)


def _free(directory) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def test_the_snapshot_access_path_keeps_the_asked_limit(tmp_path):
    rec = _record([str(tmp_path / "a")], readpath.SNAPSHOT_ACCESS)
    assert snapshots._size_limit(_session(tmp_path), rec, None) is None
    assert snapshots._size_limit(_session(tmp_path), rec, 5 << 20) == 5 << 20


def test_an_overlay_snapshot_always_gets_a_limit_that_fits(tmp_path):
    sess = _session(tmp_path, fleece_min_free=0)
    one = snapshots._size_limit(sess, _record([str(tmp_path / "a")]), None)
    two = snapshots._size_limit(sess, _record([str(tmp_path / "a"), str(tmp_path / "b")]), None)
    free = _free(tmp_path)
    assert one is not None and two is not None
    assert abs(one - free // 2) < 64 << 20 and abs(two - free // 4) < 64 << 20
    configured = _session(tmp_path, fleece_min_free=0, overlay_size_limit=2 << 20)
    assert snapshots._size_limit(configured, _record([str(tmp_path / "a")]), None) == 2 << 20
    assert snapshots._size_limit(configured, _record([str(tmp_path / "a")]), 3 << 20) == 3 << 20


def test_an_overlay_limit_that_does_not_fit_is_refused(tmp_path):
    sess = _session(tmp_path, fleece_min_free=0)
    with pytest.raises(errors.OperationInvalid, match="does not fit"):
        snapshots._size_limit(sess, _record([str(tmp_path / "a")]), _free(tmp_path) * 2)
    with pytest.raises(errors.OperationInvalid, match="bytes are free"):
        snapshots._size_limit(_session(tmp_path, fleece_min_free=_free(tmp_path)),
                              _record([str(tmp_path / "a")]), None)


def test_needed_nodes_and_export_node_follow_the_read_path():
    access = _record(["/x"], readpath.SNAPSHOT_ACCESS)
    overlay = _record(["/x"])
    assert access.needed_nodes() == {"a", "c", "f"} and access.export_node(access.disks[0]) == "a"
    assert overlay.needed_nodes() == {"c", "f"} and overlay.export_node(overlay.disks[0]) == "f"


def test_records_without_a_read_path_are_snapshot_access_and_the_path_round_trips():
    text = metadata.dumps(metadata.State(snapshots=[_record(["/x"])]))
    assert "read-path=\"overlay\"" in text
    assert metadata.loads(text).snapshots[0].readpath == readpath.OVERLAY
    old = text.replace(' read-path="overlay"', "")
    assert metadata.loads(old).snapshots[0].readpath == readpath.SNAPSHOT_ACCESS
    with pytest.raises(errors.InvalidArgument):
        metadata.loads(text.replace('read-path="overlay"', 'read-path="fast"'))


@pytest.mark.parametrize("key,value", [("read_path", "fast"), ("overlay_size_limit", 5),
                                       ("overlay_size_limit", True)])
def test_bad_read_path_configuration_is_refused(key, value):
    with pytest.raises(errors.InvalidArgument, match=key):
        config.parse(json.dumps({key: value}))
