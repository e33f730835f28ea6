# SPDX-License-Identifier: LGPL-2.1-or-later
"""The backing-chain logic of checkpoints on qemu's recorded answers (no qemu).

tests/chain-recorded.json: ``query-named-block-nodes {flat: true}`` (trimmed to the
fields used) and ``x-debug-query-block-graph`` on libvirt 9.0 / QEMU 7.2 after:
checkpoint c1, 1 MiB written, ``virsh snapshot-create-as --disk-only`` (ext1),
checkpoint c2, 1 MiB written, external snapshot ext2, 1 MiB written. libvirt copied
only the recording c2 into ext2; c1 lives in vda.qcow2 (1 MiB) and ext1 (empty,
disabled there when c2 was made)."""

from __future__ import annotations

import copy
import json
import os

import pytest

from libvirt_fleece.qemu import chains
from libvirt_fleece.steps import checkpoint as checkpoints

HERE = os.path.dirname(os.path.abspath(__file__))
C1 = "fleece-cp.18ece459bdb06fc8.4000000.c1"
C2 = "fleece-cp.18ece459f5cc25e4.4000000.c2"
TOP, MID, BASE = "libvirt-3-format", "libvirt-2-format", "libvirt-1-format"


@pytest.fixture
def recorded():
    with open(os.path.join(HERE, "chain-recorded.json")) as f:
        return json.load(f)["three-layers"]


def view_of(rec):
    return chains.view(rec["query-named-block-nodes"], rec["x-debug-query-block-graph"])


def drop(rec, node, bitmap):
    """The recording without one bitmap copy (as if that layer lost it)."""
    rec = copy.deepcopy(rec)
    for n in rec["query-named-block-nodes"]:
        if n["node-name"] == node:
            n["dirty-bitmaps"] = [b for b in n["dirty-bitmaps"] if b["name"] != bitmap]
    return rec


def entries(rec, top=TOP):
    return {e.bitmap: e for e in checkpoints.disk_entries(view_of(rec), "vda", top)}


def test_the_chain_follows_the_backing_links_from_the_top(recorded):
    chain = view_of(recorded).chain(TOP)
    assert [la.node for la in chain] == [TOP, MID, BASE]
    files = [os.path.basename(la.file) for la in chain]
    assert files == ["ext2.qcow2", "ext1.qcow2", "vda.qcow2"]
    assert [la.read_only for la in chain] == [False, True, True]
    assert [la.node for la in view_of(recorded).chain(MID)] == [MID, BASE]


def test_each_checkpoint_is_the_union_of_its_copies_down_the_chain(recorded):
    e = entries(recorded)
    assert set(e) == {C1, C2}
    c1, c2 = e[C1], e[C2]
    assert (c2.node, c2.recording, c2.chain_reason) == (TOP, True, "")
    assert c2.sources() == [{"node": TOP, "name": C2}, {"node": MID, "name": C2}]
    assert c2.spread.nonempty == 2
    # c1 only in the backing images: no top copy, still whole (it stopped recording in ext1)
    assert (c1.node, c1.recording, c1.present, c1.chain_reason) == (None, False, True, "")
    assert c1.sources() == [{"node": MID, "name": C1}, {"node": BASE, "name": C1}]
    assert c1.spread.nonempty == 1 and c1.top == TOP


def test_a_single_top_copy_merges_by_name(recorded):
    e = entries(recorded, top=BASE)            # the chain as it was before ext1
    assert e[C1].sources() == [C1] and e[C1].node == BASE
    assert C2 not in e


def test_the_newest_checkpoint_missing_from_the_top_image_is_lost(recorded):
    e = entries(drop(recorded, TOP, C2))
    assert "backing chain of vda changed" in e[C2].chain_reason
    assert "top image" in e[C2].chain_reason and "ext2.qcow2 is missing" in e[C2].chain_reason
    assert "full backup" in e[C2].chain_reason


def test_a_gap_in_the_middle_of_the_chain_is_lost_history(recorded):
    e = entries(drop(recorded, MID, C1))
    assert "backing image" in e[C1].chain_reason
    assert "ext1.qcow2 is missing" in e[C1].chain_reason
    assert e[C2].chain_reason == ""


def test_an_older_checkpoint_must_reach_where_the_newer_one_starts(recorded):
    """c1 stopped recording where c2 was made (ext1): a c1 with no copy there lost the
    writes between the two, whatever c1's deepest copy says."""
    rec = drop(drop(recorded, MID, C1), MID, C2)      # c2 now starts in the top image
    e = entries(rec)
    assert e[C2].chain_reason == ""
    assert "ext2.qcow2 is missing" in e[C1].chain_reason


def test_judging_a_lost_newer_checkpoint_breaks_every_older_one(recorded):
    e = entries(drop(recorded, TOP, C2))
    checkpoints._judge(list(e.values()), 64 << 20)
    assert not e[C2].valid and e[C2].reason.startswith("the backing chain of vda")
    assert not e[C1].valid and "newer checkpoint 'c2'" in e[C1].reason
    e = entries(recorded)
    checkpoints._judge(list(e.values()), 64 << 20)
    assert e[C1].valid and e[C2].valid


def stop(rec, node, bitmap):
    """The recording with one bitmap copy disabled."""
    rec = copy.deepcopy(rec)
    for n in rec["query-named-block-nodes"]:
        for b in n["dirty-bitmaps"] if n["node-name"] == node else []:
            if b["name"] == bitmap:
                b["recording"] = False
    return rec


def test_a_disabled_bitmap_that_lost_a_nonempty_copy_is_invalid(recorded):
    e = entries(stop(recorded, BASE, C1))                # every copy of c1 stopped (0.2)
    assert checkpoints._dropped_reason(e[C1], 1) == ""
    assert checkpoints._dropped_reason(e[C1], None) == ""          # no memory: no claim
    assert "was dropped" in checkpoints._dropped_reason(e[C1], 2)
    assert checkpoints._dropped_reason(e[C2], 5) == ""             # recording: libvirt merged


def test_fewer_nonempty_copies_are_no_loss_while_a_copy_records(recorded):
    """0.2's c1 still records in the base (read-only when c2 was made, never stopped):
    a commit into the base dirtied it with every cluster it copied."""
    e = entries(recorded)
    assert checkpoints._dropped_reason(e[C1], 2) == ""


def test_the_mirror_remembers_copies_and_chain_reasons(recorded):
    e = entries(drop(recorded, MID, C1))
    checkpoints._judge(list(e.values()), 64 << 20)
    cps = [checkpoints.Checkpoint(name=n, seq=x.seq, disks=[x])
           for n, x in (("c1", e[C1]), ("c2", e[C2]))]
    text = checkpoints.mirror_document(cps)
    back = {d.bitmap: d for d in checkpoints._parse_mirror(text)}
    assert back[C2].copies == 2 and back[C2].chain_reason == ""
    assert back[C1].chain_reason.startswith("the backing chain of vda")   # sticky


def test_nodes_without_backing_links_are_one_layer_chains():
    v = chains.view([{"node-name": "a", "file": "/a", "ro": False}], {"nodes": [], "edges": []})
    assert [la.node for la in v.chain("a")] == ["a"]
    assert v.chain("missing") == []


def test_without_the_debug_graph_backing_links_come_from_file_names(recorded):
    nodes = copy.deepcopy(recorded["query-named-block-nodes"])
    files = {n["node-name"]: n["file"] for n in nodes}
    for node, below in ((TOP, MID), (MID, BASE)):
        next(n for n in nodes if n["node-name"] == node)["backing_file"] = files[below]
    v = chains.view(nodes, None)
    assert [la.node for la in v.chain(TOP)] == [TOP, MID, BASE]
