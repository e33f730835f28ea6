# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backup client's pure logic (copy plans, the layer digest, the manifest), and the
layer digest of real qcow2 files read through qemu-nbd (no libvirt needed)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess

import pytest

from libvirt_fleece.backup import copy as bc
from libvirt_fleece.backup import digest as bd
from libvirt_fleece.backup import manifest as mf
from libvirt_fleece import errors

K = 1024
MiB = 1 << 20
C = bc.CLUSTER
E = bc.Extent


def test_align_widens_data_to_whole_clusters_and_shrinks_zeroes():
    size = 10 * C + 512                                 # ends in a partial cluster
    assert bc.align([E(4 * K, 8 * K)], size) == [E(0, C)]
    assert bc.align([E(C - 1, 2)], size) == [E(0, 2 * C)]
    # a zero extent keeps the clusters it covers whole; its ragged ends are copied
    assert bc.align([E(C + 4 * K, 3 * C, zero=True)], size) == [
        E(C, C), E(2 * C, 2 * C, zero=True), E(4 * C, C)]
    # zeroes covering no whole cluster become data; data wins where both touch a cluster
    assert bc.align([E(4 * K, 8 * K, zero=True)], size) == [E(0, C)]
    assert bc.align([E(0, 4 * K), E(4 * K, 3 * C, zero=True)], size) == [
        E(0, C), E(C, 2 * C, zero=True), E(3 * C, C)]
    # the disk's last, partial cluster: data up to the end, never a partial zero write
    assert bc.align([E(9 * C, C + 512, zero=True)], size) == [
        E(9 * C, C, zero=True), E(10 * C, 512)]
    assert bc.align([E(10 * C + 100, 10)], size) == [E(10 * C, 512)]


def test_merge_joins_touching_extents_of_one_kind_and_refuses_mixed_overlap():
    assert bc.merge([E(C, C), E(0, C), E(2 * C, C, zero=True), E(3 * C, C, zero=True)]) == [
        E(0, 2 * C), E(2 * C, 2 * C, zero=True)]
    with pytest.raises(errors.InternalError):
        bc.merge([E(0, 2 * C), E(C, C, zero=True)])


def test_intersect_keeps_what_both_cover_with_the_status_zero_flag():
    dirty = [(0, 2 * C), (4 * C, C), (8 * C, 4 * C)]
    status = [(0, C, False), (C, 5 * C, True), (6 * C, 3 * C, False), (9 * C, 10 * C, True)]
    assert bc.intersect(dirty, status) == [E(0, C), E(C, C, zero=True), E(4 * C, C, zero=True),
                                           E(8 * C, C), E(9 * C, 3 * C, zero=True)]
    assert bc.intersect(dirty, []) == [] and bc.intersect([], status) == []
    # per-range status (the other way of asking) gives the same
    per_range = [(0, C, False), (C, C, True), (4 * C, C, True), (8 * C, C, False),
                 (9 * C, 3 * C, True)]
    assert bc.intersect(dirty, per_range) == bc.intersect(dirty, status)


def test_pieces_are_cut_at_every_multiple():
    assert list(bc.pieces(3 * MiB, 6 * MiB, 4 * MiB)) == [(3 * MiB, MiB), (4 * MiB, 4 * MiB),
                                                          (8 * MiB, MiB)]
    assert list(bc.pieces(0, 4 * MiB, 4 * MiB)) == [(0, 4 * MiB)]
    assert list(bc.pieces(5, 0, 4 * MiB)) == []


def test_copy_requests_follow_the_piece_grid_and_split_long_zeroes():
    got = list(bc._chunks([E(3 * MiB, 2 * MiB), E(8 * MiB, 3 * bc.ZERO_SPAN, zero=True)],
                          4 * MiB))
    assert got[:2] == [E(3 * MiB, MiB), E(4 * MiB, MiB)]
    assert all(e.zero and e.length <= bc.ZERO_SPAN for e in got[2:])
    assert sum(e.length for e in got[2:]) == 3 * bc.ZERO_SPAN


def by_hand(records):
    """The digest as backup_digest's docstring defines it."""
    h = hashlib.sha256()
    for kind, offset, length, data in records:
        h.update(kind + struct.pack(">QQ", offset, length) +
                 (hashlib.sha256(data).digest() if kind == b"D" else b""))
    return h.hexdigest()


def test_layer_digest_is_order_free_merges_zeroes_and_matches_its_definition():
    a, b = os.urandom(MiB), os.urandom(4 * MiB)
    d1, d2 = bd.LayerDigest(), bd.LayerDigest()
    d1.add_data(3 * MiB, MiB, d1.hash_piece(a))
    d1.add_data(4 * MiB, 4 * MiB, d1.hash_piece(b))
    d1.add_zero(16 * MiB, MiB)
    d1.add_zero(17 * MiB, MiB)
    d2.add_zero(16 * MiB, 2 * MiB)
    d2.add_data(4 * MiB, 4 * MiB, d2.hash_piece(b))
    d2.add_data(3 * MiB, MiB, d2.hash_piece(a))
    want = by_hand([(b"D", 3 * MiB, MiB, a), (b"D", 4 * MiB, 4 * MiB, b),
                    (b"Z", 16 * MiB, 2 * MiB, b"")])
    assert d1.hexdigest() == d2.hexdigest() == want
    d2.add_data(0, MiB, d2.hash_piece(a))
    assert d2.hexdigest() != want
    with pytest.raises(errors.InternalError, match="crosses"):
        d1.add_data(3 * MiB, 2 * MiB, b"")
    d1.add_zero(7 * MiB, MiB)                       # overlaps the data at 4 MiB
    with pytest.raises(errors.InternalError, match="overlap"):
        d1.hexdigest()


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [path], capture_output=True, text=True, check=True)
    assert "error" not in r.stdout.lower() and "failed" not in r.stdout.lower(), r.stdout


def test_digest_file_reads_only_the_layer_through_qemu(tmp_path):
    """A real qcow2 chain: the overlay's digest covers its own data and zero clusters,
    never what shows through from its backing file."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
    qemu_io(base, "write -P 0x11 0 8M", "write -P 0x12 20M 1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                    "-F", "qcow2", top], check=True)
    qemu_io(top, "write -P 0x21 2M 3M", "write -z 20M 1M", "write -P 0x22 63M 1M")
    assert bd.digest_file(base) == by_hand([
        (b"D", 0, 4 * MiB, b"\x11" * 4 * MiB), (b"D", 4 * MiB, 4 * MiB, b"\x11" * 4 * MiB),
        (b"D", 20 * MiB, MiB, b"\x12" * MiB)])
    assert bd.digest_file(top) == by_hand([
        (b"D", 2 * MiB, 2 * MiB, b"\x21" * 2 * MiB), (b"D", 4 * MiB, MiB, b"\x21" * MiB),
        (b"Z", 20 * MiB, MiB, b""), (b"D", 63 * MiB, MiB, b"\x22" * MiB)])
    # the same content laid out differently in another file has the same digest
    copy = str(tmp_path / "copy.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                    copy, "64M"], check=True)
    qemu_io(copy, "write -P 0x12 20M 1M", "write -P 0x11 4M 4M", "write -P 0x11 0 4M")
    assert bd.digest_file(copy) == bd.digest_file(base)
    # one byte changed inside a data cluster changes it
    host = next(m["offset"] for m in json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", base], capture_output=True, check=True).stdout)
        if m["data"] and m["start"] == 0)
    with open(base, "r+b") as f:
        f.seek(host + 12345)
        f.write(b"\x99")
    assert bd.digest_file(base) != by_hand([
        (b"D", 0, 4 * MiB, b"\x11" * 4 * MiB), (b"D", 4 * MiB, 4 * MiB, b"\x11" * 4 * MiB),
        (b"D", 20 * MiB, MiB, b"\x12" * MiB)])


def test_digest_file_of_garbage_is_a_copy_error(tmp_path):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + os.urandom(4096))
    with pytest.raises(bc.CopyError):
        bd.digest_file(str(junk))


def manifest_json(disk):
    return {"format": mf.FORMAT, "domain": {"name": "d", "uuid": "u"},
            "points": [{"index": 0, "time": "t", "mode": "full", "checkpoint": "c",
                        "disks": [disk]}]}


def test_manifest_reads_both_checksum_formats_and_refuses_bad_ones(tmp_path):
    base = {"name": "vda", "file": "vda.0000.qcow2", "size": 1, "copied": 1, "backing": None}
    ok = "ab" * 32
    path = str(tmp_path / "m.json")
    m = mf._from_json(manifest_json(dict(base, layer_sha256=ok)), path)
    assert m.points[0].disks[0].layer_sha256 == ok and m.points[0].disks[0].sha256 is None
    assert "sha256" not in m.points[0].disks[0].to_json()
    old = manifest_json(dict(base, sha256=ok))
    old["format"] = "libvirt-fleece-backup/1"
    d = mf._from_json(old, path).points[0].disks[0]
    assert (d.sha256, d.layer_sha256) == (ok, "")
    for bad in (dict(base), dict(base, layer_sha256="xyz"), dict(base, layer_sha256=5)):
        with pytest.raises(mf.BackupCorrupt):
            mf._from_json(manifest_json(bad), path)
    future = manifest_json(dict(base, layer_sha256=ok))
    future["format"] = "libvirt-fleece-backup/9"
    with pytest.raises(mf.BackupCorrupt, match="not one of"):
        mf._from_json(future, path)
