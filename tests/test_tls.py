# SPDX-License-Identifier: LGPL-2.1-or-later
"""Network exposure: TCP exports bind only the asked address and can require x509 TLS."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import nbd
import pytest

import libvirt_fleece as lf
from conftest import plugin_leftovers
from vm import MiB

pytestmark = pytest.mark.integration


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    os.makedirs(d, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", cwd=d)


def make_cert(ca_dir, d, prefix, cn, san=None):
    os.makedirs(d, exist_ok=True)
    ext = os.path.join(d, f"{prefix}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\n")
        if san:
            f.write(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{prefix}-key.pem", "-out", f"{prefix}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{prefix}.csr", "-CA", os.path.join(ca_dir, "ca-cert.pem"),
            "-CAkey", os.path.join(ca_dir, "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", f"{prefix}-cert.pem", cwd=d)
    subprocess.run(["cp", os.path.join(ca_dir, "ca-cert.pem"), d], check=True)


@pytest.fixture
def pki(tmp_path, monkeypatch):
    ca, rogue = str(tmp_path / "ca"), str(tmp_path / "rogue")
    make_ca(ca, "fleece test CA")
    make_ca(rogue, "rogue CA")
    server = str(tmp_path / "server")
    make_cert(ca, server, "server", "127.0.0.1", "IP:127.0.0.1,DNS:localhost")
    good = str(tmp_path / "client")
    make_cert(ca, good, "client", "backup-client")
    bad = str(tmp_path / "badclient")
    make_cert(rogue, bad, "client", "intruder")
    subprocess.run(["cp", os.path.join(ca, "ca-cert.pem"), bad], check=True)   # trusts our CA
    nocert = str(tmp_path / "nocert")
    os.makedirs(nocert)
    subprocess.run(["cp", os.path.join(ca, "ca-cert.pem"), nocert], check=True)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"tls_dir: {server}\n")
    monkeypatch.setenv("LIBVIRT_FLEECE_CONFIG", str(cfg))
    return {"good": good, "bad": bad, "nocert": nocert}


def client(port, certs=None, name="vda-t"):
    h = nbd.NBD()
    h.set_export_name(name)
    if certs:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(certs)
    h.connect_tcp("127.0.0.1", str(port))
    return h


def test_tls_export_admits_only_clients_with_our_certificate(vm, pki):
    vm.write("vda", 0x3C, 0, MiB)
    lf.blockSnapshotCreateXML(vm.dom, "<domainblocksnapshot><name>t</name>"
                                      "<disk name='vda'/></domainblocksnapshot>")
    lf.blockExportStart(vm.dom, "<domainblockexport type='nbd'><address type='ip' "
                                "host='127.0.0.1' port='0' tls='yes'/><disk name='vda' "
                                "snapshot='t'/></domainblockexport>")
    doc = lf.blockExportList(vm.dom)[0]
    assert 'tls="yes"' in doc
    port = int(re.search(r'port="(\d+)"', doc).group(1))
    h = client(port, pki["good"])
    assert h.get_tls_negotiated() and h.is_read_only()
    assert h.pread(4096, 0) == b"\x3c" * 4096
    h.shutdown()
    for who in ("bad", "nocert"):
        with pytest.raises(nbd.Error):
            client(port, pki[who]).pread(512, 0)
    with pytest.raises(nbd.Error):
        client(port).pread(512, 0)                    # plain NBD is refused
    # the credentials qemu reads are a private copy, gone with the server
    copies = [d for d in os.listdir("/run/libvirt-fleece/state") if d.startswith("tls-")]
    assert copies
    lf.blockSnapshotLookupByName(vm.dom, "t").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    assert not os.path.exists(f"/run/libvirt-fleece/state/tls-{vm.dom.UUIDString()}")
    assert plugin_leftovers(vm.dom) == {}


def test_tls_without_credentials_is_refused_clearly(vm, tmp_path, monkeypatch):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"tls_dir: {tmp_path}/empty\n")
    monkeypatch.setenv("LIBVIRT_FLEECE_CONFIG", str(cfg))
    lf.blockSnapshotCreateXML(vm.dom, "<domainblocksnapshot><name>t</name>"
                                      "<disk name='vda'/></domainblocksnapshot>")
    with pytest.raises(lf.InvalidArgument, match="lacks ca-cert.pem"):
        lf.blockExportStart(vm.dom, "<domainblockexport type='nbd'><address type='ip' "
                                    "host='127.0.0.1' port='0' tls='yes'/><disk name='vda' "
                                    "snapshot='t'/></domainblockexport>")
    assert lf.blockExportList(vm.dom) == []
    lf.blockSnapshotLookupByName(vm.dom, "t").delete()
    assert plugin_leftovers(vm.dom) == {}


def test_tcp_export_binds_only_the_address_asked_for(vm, caplog):
    lf.blockSnapshotCreateXML(vm.dom, "<domainblocksnapshot><name>b</name>"
                                      "<disk name='vda'/></domainblocksnapshot>")
    lf.blockExportStart(vm.dom, "<domainblockexport type='nbd'><address type='ip' "
                                "host='127.0.0.2' port='0'/><disk name='vda' snapshot='b'/>"
                                "</domainblockexport>")
    port = int(re.search(r'port="(\d+)"', lf.blockExportList(vm.dom)[0]).group(1))
    with socket.socket() as s:                       # 127.0.0.1 is another address
        assert s.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.2", port)) == 0
    lf.blockSnapshotLookupByName(vm.dom, "b").delete(
        lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)


def test_tcp_without_tls_warns_loudly_loopback_included():
    # a pure check: tests bind only loopback addresses; 127.0.0.1 is open to every local user
    from libvirt_fleece.documents import Address
    from libvirt_fleece.steps.export import exposure_warning
    assert "WITHOUT encryption" in exposure_warning(Address("ip", host="0.0.0.0", port=1), 1)
    assert "WITHOUT encryption" in exposure_warning(Address("ip", host="192.0.2.7", port=1), 1)
    assert exposure_warning(Address("ip", host="192.0.2.7", port=1, tls=True), 1) is None
    for loopback in ("127.0.0.1", "::1"):       # every local user can connect (issue 12)
        assert "every local user can read" in exposure_warning(
            Address("ip", host=loopback, port=1), 1)
    assert exposure_warning(Address("unix", socket="/run/x.sock"), 0) is None
