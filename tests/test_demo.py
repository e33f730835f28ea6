# SPDX-License-Identifier: LGPL-2.1-or-later
"""virsh-fleece demo: the whole cycle on a throwaway domain, end to end, and its cleanup."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys

import libvirt
import pytest
from lxml import etree

import vm as testvm
from libvirt_fleece.cli import demo

MiB = 1 << 20


def test_expected_sha256_matches_the_disk_image():
    writes = [(0x5A, 0, 4 * MiB)]
    assert demo.expected_sha256(64 * MiB, writes) == \
        hashlib.sha256(testvm.expected_image(64 * MiB, writes)).hexdigest()


def test_domain_xml_is_small_and_has_one_virtio_disk():
    root = etree.fromstring(demo.domain_xml("fleece-demo-0123abcd", "/d/vda.qcow2", "qemu"))
    assert root.get("type") == "qemu"
    assert root.find("memory").text == "64" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "1"
    disk = root.find("devices/disk")
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file") == "/d/vda.qcow2"
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert root.find("os/kernel") is None


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


def assert_nothing_left(conn: libvirt.virConnect, name: str) -> None:
    assert name not in [d.name() for d in conn.listAllDomains()]
    assert not os.path.exists(os.path.join(demo.IMAGE_ROOT, name))
    assert glob.glob(f"/var/lib/libvirt/fleece/{name}.*") == []
    assert not os.path.exists(f"/run/libvirt-fleece/{name}.sock")


@pytest.mark.integration
def test_demo_command_proves_the_copy_and_cleans_up(conn):
    script = os.path.join(os.path.dirname(sys.executable), "virsh-fleece")
    cmd = [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "libvirt_fleece.cli"]
    proc = subprocess.run(cmd + ["demo"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    lines = proc.stdout.splitlines()
    assert [line[:5] for line in lines[:7]] == [f"[{i}/7]" for i in range(1, 8)]
    want = demo.expected_sha256(64 * MiB, demo.BEFORE)
    assert lines[-1].startswith(f"OK: the copy equals the disk at snapshot time (sha256 {want})")
    assert proc.stderr == ""
    name = re.search(r"fleece-demo-[0-9a-f]{8}", proc.stdout).group(0)
    assert_nothing_left(conn, name)


@pytest.mark.integration
def test_demo_reports_a_wrong_copy_as_failed_and_still_cleans_up(conn, monkeypatch):
    monkeypatch.setattr(demo, "expected_sha256", lambda size, writes: "0" * 64)
    lines: list[str] = []
    assert demo.run(conn, out=lines.append) == 1
    assert any(line.startswith("FAILED at step 7/7") and "differs" in line for line in lines)
    assert not any(line.startswith("OK") for line in lines)
    name = re.search(r"fleece-demo-[0-9a-f]{8}", lines[0]).group(0)
    assert_nothing_left(conn, name)
