# SPDX-License-Identifier: LGPL-2.1-or-later
"""Install, remove and inspect the libvirt qemu hook shim.

The shim (``hooks/libvirt-fleece.in``, with the interpreter filled in) goes
to ``/etc/libvirt/hooks/qemu.d/libvirt-fleece``, root-owned, mode 0755: its
own file, beside whatever else is there. A ``qemu`` hook someone else owns is
never touched.

libvirtd looks for hooks when it starts (and on SIGHUP): when it found none
then, it ignores a file added to ``qemu.d/`` later, until it is reloaded.
:func:`install` says so, or sends the SIGHUP itself when asked to.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import stat
import sys
from typing import Optional

from . import errors, fsutil

HOOKS_DIR = "/etc/libvirt/hooks"
HOOK_NAME = "libvirt-fleece"
TEMPLATE = "libvirt-fleece.in"
PIDFILE = "/run/libvirtd.pid"
MARKER = "libvirt-fleece qemu hook shim"
RELOAD_HINT = "libvirtd must reload: run with --reload or `kill -HUP $(cat /run/libvirtd.pid)`"


def template_path() -> str:
    """The shim template (source tree, or installed data files). Raises InternalError."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(os.path.dirname(here), "hooks", TEMPLATE),
                      os.path.join(sys.prefix, "share", "libvirt-fleece", "hooks", TEMPLATE)):
        if os.path.isfile(candidate):
            return candidate
    raise errors.InternalError(f"the hook template ({TEMPLATE}) is not installed")


def render(python: Optional[str] = None) -> str:
    """The shim's text for ``python`` (default: the running interpreter)."""
    python = python or sys.executable
    with open(template_path(), encoding="utf-8") as f:
        return f.read().replace("@PYTHON@", shlex.quote(python))


def hook_path(hooks_dir: str = HOOKS_DIR) -> str:
    return os.path.join(hooks_dir, "qemu.d", HOOK_NAME)


def other_hooks(hooks_dir: str = HOOKS_DIR) -> list[str]:
    """Executable qemu hooks other than ours: ``qemu`` and entries of ``qemu.d/``."""
    found = []
    main = os.path.join(hooks_dir, "qemu")
    if os.path.isfile(main) and os.access(main, os.X_OK):
        found.append(main)
    qemu_d = os.path.join(hooks_dir, "qemu.d")
    try:
        names = sorted(os.listdir(qemu_d))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(qemu_d, name)
        if name != HOOK_NAME and os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
    return found


def libvirtd_pid(pidfile: str = PIDFILE) -> Optional[int]:
    """The pid of the running libvirtd named by ``pidfile`` (None when not running)."""
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            comm = f.read().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == "libvirtd" else None


def libvirtd_start_time(pid: int) -> Optional[float]:
    """When process ``pid`` started (epoch seconds), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def seen_by_libvirtd(hooks_dir: str = HOOKS_DIR, pidfile: str = PIDFILE) -> Optional[bool]:
    """Whether some qemu hook existed when libvirtd started (then it calls qemu.d/ hooks).

    None when unknown (libvirtd not running). False does not exclude a SIGHUP since."""
    pid = libvirtd_pid(pidfile)
    started = libvirtd_start_time(pid) if pid is not None else None
    if started is None:
        return None
    paths = other_hooks(hooks_dir) + ([hook_path(hooks_dir)] if _ours(hook_path(hooks_dir)) else [])
    for path in paths:
        try:
            if os.stat(path).st_ctime < started:
                return True
        except OSError:
            continue
    return False


def reload_libvirtd(pidfile: str = PIDFILE) -> str:
    """SIGHUP libvirtd so that it looks for hooks again; returns a message."""
    pid = libvirtd_pid(pidfile)
    if pid is None:
        return f"libvirtd is not running ({pidfile}); it will find the hook when it starts"
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        raise errors.InternalError(f"cannot signal libvirtd (pid {pid}): {e.strerror}") from e
    return f"libvirtd (pid {pid}) reloaded with SIGHUP"


def _ours(path: str) -> bool:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARKER in f.read(4096)
    except OSError:
        return False


def _write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically, root-owned, mode 0755."""
    fsutil.write_atomic(path, text.encode("utf-8"), 0o755)


def install(reload: bool = False, hooks_dir: str = HOOKS_DIR, pidfile: str = PIDFILE,
            python: Optional[str] = None) -> str:
    """Install (or update) the shim for ``python`` (default: this interpreter); idempotent.

    Returns what was done, including whether libvirtd must reload. Raises
    InvalidArgument when the hook path is taken by something that is not our
    shim, InternalError when the template is missing or a file cannot be written.
    """
    python = python or sys.executable
    if not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise errors.InvalidArgument(f"interpreter {python!r} is not an executable absolute path")
    text = render(python)
    path = hook_path(hooks_dir)
    existed_before = bool(other_hooks(hooks_dir)) or os.path.lexists(path)
    if os.path.lexists(path) and not _ours(path):
        raise errors.InvalidArgument(
            f"{path} exists and is not the libvirt-fleece hook shim; not overwriting it")
    try:
        with open(path, encoding="utf-8") as f:
            current: Optional[str] = f.read()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        current, mode = None, 0
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if current == text and mode == 0o755:
            msg = f"{path} is already installed and up to date (interpreter {python})"
        else:
            _write(path, text)
            verb = "updated" if current is not None else "installed"
            msg = f"{verb} {path} (interpreter {python})"
    except OSError as e:
        raise errors.InternalError(f"cannot install {path}: {e.strerror}") from e
    if reload:
        msg += "; " + reload_libvirtd(pidfile)
    elif not existed_before:
        msg += f"; no qemu hook existed before, so {RELOAD_HINT}"
    elif seen_by_libvirtd(hooks_dir, pidfile) is False:
        msg += (f"; libvirtd started before any qemu hook existed: unless it was reloaded "
                f"since, {RELOAD_HINT}")
    return msg


def uninstall(hooks_dir: str = HOOKS_DIR) -> str:
    """Remove our shim (only it; ``qemu.d/`` and other hooks stay). Idempotent.

    Raises InvalidArgument when the file there is not our shim."""
    path = hook_path(hooks_dir)
    if not os.path.lexists(path):
        return f"{path} is not installed"
    if not _ours(path):
        raise errors.InvalidArgument(
            f"{path} is not the libvirt-fleece hook shim; not removing it")
    try:
        os.unlink(path)
    except OSError as e:
        raise errors.InternalError(f"cannot remove {path}: {e.strerror}") from e
    return f"removed {path}"


@dataclasses.dataclass
class Status:
    installed: bool
    path: str
    interpreter: Optional[str]      # named by the installed shim
    interpreter_ok: bool            # it exists and is executable
    up_to_date: bool                # identical to the template rendered for this interpreter
    libvirtd_pid: Optional[int]
    other_hooks: list[str]
    seen_by_libvirtd: Optional[bool]    # a hook existed when libvirtd started (None: unknown)

    @property
    def libvirtd_running(self) -> bool:
        return self.libvirtd_pid is not None


def _installed_interpreter(text: str) -> Optional[str]:
    for line in text.splitlines():
        if line.startswith("PYTHON="):
            try:
                parts = shlex.split(line[len("PYTHON="):])
            except ValueError:
                return None
            return parts[0] if len(parts) == 1 else None
    return None


def status(hooks_dir: str = HOOKS_DIR, pidfile: str = PIDFILE,
           python: Optional[str] = None) -> Status:
    """Whether the shim is installed, for which interpreter, and whether it is current."""
    python = python or sys.executable
    path = hook_path(hooks_dir)
    text = None
    if _ours(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            text = None
    interpreter = _installed_interpreter(text) if text is not None else None
    up_to_date = False
    if text is not None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            up_to_date = text == render(python) and mode == 0o755
        except (OSError, errors.Error):
            up_to_date = False
    return Status(installed=text is not None, path=path, interpreter=interpreter,
                  interpreter_ok=bool(interpreter and os.access(interpreter, os.X_OK)),
                  up_to_date=up_to_date, libvirtd_pid=libvirtd_pid(pidfile),
                  other_hooks=other_hooks(hooks_dir),
                  seen_by_libvirtd=seen_by_libvirtd(hooks_dir, pidfile))
