# SPDX-License-Identifier: LGPL-2.1-or-later
"""TLS for TCP exports: x509 credentials qemu can read, and nothing more.

The administrator keeps the server credentials in ``tls_dir`` (config,
default ``/etc/pki/libvirt-fleece``): ``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem`` (qemu's tls-creds-x509 layout). qemu runs as its own
user and cannot read root's key, so for each server the plugin copies the
three files into ``<state_dir>/tls-<domain uuid>/``, a directory readable
only by root and the group of the domain's qemu process (from the domain's
DAC label), creates a ``tls-creds-x509`` object with ``verify-peer`` on
(clients must present a certificate signed by the same CA), and removes
both when the server stops.
"""

from __future__ import annotations

import os
import re
import shutil

from .. import errors, virt
from ..qemu import blockgraph, names
from ..session import Session

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def _qemu_gid(sess: Session) -> int:
    """The group qemu runs with, from the live domain's DAC label ("+UID:+GID")."""
    xml = virt.domain_xml(sess.dom)
    m = re.search(r"<seclabel[^>]*model='dac'[^>]*>\s*<label>\+?(\d+):\+?(\d+)</label>", xml)
    if not m:
        raise errors.OperationInvalid(
            "cannot find the user qemu runs as (no DAC seclabel in the live domain XML); "
            "TLS exports need it to hand qemu its certificates")
    return int(m.group(2))


def private_dir(sess: Session) -> str:
    return os.path.join(sess.cfg.state_dir, f"tls-{sess.uuid}")


def setup(sess: Session) -> str:
    """Copy the credentials for qemu and create the creds object; return its id.

    Raises InvalidArgument when tls_dir lacks a file, QMPError when qemu refuses them.
    """
    missing = [f for f in FILES if not os.path.isfile(os.path.join(sess.cfg.tls_dir, f))]
    if missing:
        raise errors.InvalidArgument(
            f"TLS export: {sess.cfg.tls_dir} lacks {', '.join(missing)} (set tls_dir in the "
            f"configuration to a directory with the CA, the server certificate and its key)")
    target = private_dir(sess)
    teardown(sess)
    os.makedirs(sess.cfg.state_dir, mode=0o700, exist_ok=True)
    os.chmod(sess.cfg.state_dir, 0o711)            # traversable, not listable, by qemu
    os.mkdir(target, 0o750)
    gid = _qemu_gid(sess)
    os.chown(target, 0, gid)
    for name in FILES:
        dst = os.path.join(target, name)
        shutil.copyfile(os.path.join(sess.cfg.tls_dir, name), dst)
        os.chown(dst, 0, gid)
        os.chmod(dst, 0o640)
    blockgraph.add_tls_creds(sess.dom, names.TLS_OBJECT_ID, target)
    return names.TLS_OBJECT_ID


def teardown(sess: Session) -> None:
    """Remove the creds object and the private copy; tolerate missing ones."""
    blockgraph.remove_object(sess.dom, names.TLS_OBJECT_ID)
    shutil.rmtree(private_dir(sess), ignore_errors=True)
