# SPDX-License-Identifier: LGPL-2.1-or-later
"""The libvirt boundary: connection checks, domain state, error translation.

libvirt errors are translated here, by error code, into this package's
errors; nothing else in the package catches ``libvirt.libvirtError``
except where it calls libvirt itself and hands the error to
:func:`translate`.
"""

from __future__ import annotations

import os
import time
from typing import Callable
from urllib.parse import urlparse

import libvirt

from . import errors

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN,
}
_NOT_RUNNING = {
    libvirt.VIR_ERR_OPERATION_INVALID,
}
_DENIED = {
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_ACCESS_DENIED,
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_SYSTEM_ERROR,
}

# Remove libvirt's default handler, which prints every error to stderr
# even when the caller handles it.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def translate(e: libvirt.libvirtError, what: str) -> errors.Error:
    """Turn a libvirtError into this package's error (to be raised ``from e``)."""
    code = e.get_error_code()
    text = f"{what}: {e.get_error_message()}"
    if code in _NOT_FOUND:
        return errors.NotFound(text)
    if code in _NOT_RUNNING:
        return errors.OperationInvalid(text)
    if code == libvirt.VIR_ERR_ACCESS_DENIED:
        return errors.ConnectionError(
            text + " (libvirt-fleece needs full access to qemu:///system)")
    return errors.LibvirtError(text, code=code or 0)


def check_uri(uri: str) -> None:
    """Refuse a URI that is not a local QEMU connection. Raises ConnectionError."""
    parsed = urlparse(uri)
    if parsed.scheme != "qemu" or parsed.netloc:
        raise errors.ConnectionError(
            f"libvirt-fleece works on the host beside libvirtd over a local "
            f"QEMU connection such as qemu:///system, not {uri!r}")


def check_connection(conn: libvirt.virConnect) -> None:
    """Refuse connections the plugin cannot work through.

    The plugin runs beside libvirtd, as root, over a local QEMU connection:
    it creates files qemu uses and sockets clients connect to on this host.
    Raises ConnectionError otherwise.
    """
    try:
        uri = conn.getURI()
    except libvirt.libvirtError as e:
        raise translate(e, "cannot query the libvirt connection") from e
    check_uri(uri)
    if os.geteuid() != 0:
        raise errors.ConnectionError(
            "libvirt-fleece must run as root (it creates fleece images and "
            "sockets that qemu and root-only directories need); run it with sudo")


def check_domain(dom: object) -> libvirt.virDomain:
    """Validate that ``dom`` is a usable, running libvirt domain.

    Raises InvalidArgument for a wrong type, ConnectionError for an
    unusable connection, OperationInvalid when the domain is not running.
    """
    if not isinstance(dom, libvirt.virDomain):
        raise errors.InvalidArgument(
            f"expected a libvirt.virDomain, got {type(dom).__name__}")
    check_connection(dom.connect())
    state = domain_state(dom)
    if state not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
        raise errors.OperationInvalid(
            f"domain {dom.name()!r} is not running; start it first "
            f"(temporary block snapshots exist only while qemu runs)")
    return dom


def domain_state(dom: libvirt.virDomain) -> int:
    """The domain's state (``libvirt.VIR_DOMAIN_*``)."""
    try:
        return dom.state()[0]
    except libvirt.libvirtError as e:
        raise translate(e, "cannot query the domain state") from e


def domain_uuid(dom: libvirt.virDomain) -> str:
    return dom.UUIDString()


def domain_xml(dom: libvirt.virDomain, flags: int = 0) -> str:
    try:
        return dom.XMLDesc(flags)
    except libvirt.libvirtError as e:
        raise translate(e, f"cannot read the XML of domain {dom.name()!r}") from e


def suspend(dom: libvirt.virDomain) -> None:
    try:
        dom.suspend()
    except libvirt.libvirtError as e:
        raise translate(e, f"cannot pause domain {dom.name()!r}") from e


def resume(dom: libvirt.virDomain) -> None:
    try:
        dom.resume()
    except libvirt.libvirtError as e:
        raise translate(e, f"cannot resume domain {dom.name()!r}") from e


def lookup_domain(conn: libvirt.virConnect, ident: str) -> libvirt.virDomain:
    """Find a domain by name, UUID or numeric id (like virsh).

    Raises NotFound when no domain matches.
    """
    lookups = [conn.lookupByName]
    if ident.isdigit() and int(ident) < 2 ** 31:
        lookups.insert(0, lambda i: conn.lookupByID(int(i)))
    if len(ident) == 36 and ident.count("-") == 4:
        lookups.insert(0, conn.lookupByUUIDString)
    for lookup in lookups:
        try:
            return lookup(ident)
        except libvirt.libvirtError:
            continue
    raise errors.NotFound(f"domain {ident!r} not found (give its name, UUID or id)")


def open_connection(uri: str | None = None) -> libvirt.virConnect:
    """Open a libvirt connection (default: $LIBVIRT_DEFAULT_URI or qemu:///system).

    Raises ConnectionError when libvirt cannot be reached or the URI is unusable.
    """
    uri = uri or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    check_uri(uri)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise errors.ConnectionError(
            f"cannot connect to libvirt at {uri!r}: {e.get_error_message()}; "
            f"is libvirtd running?") from e
    check_connection(conn)
    return conn


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def block_job_active(dom: libvirt.virDomain, disk: str) -> bool:
    """Whether libvirt runs a block job (copy, commit, pull) on ``disk``."""
    try:
        return bool(dom.blockJobInfo(disk, 0))
    except libvirt.libvirtError as e:
        raise translate(e, f"cannot query block jobs of disk {disk!r}") from e
