# SPDX-License-Identifier: LGPL-2.1-or-later
"""Issue 13: an upgrade must not silently switch off the hook's cleanup.

The hook is installed from a git worktree of the last commit before the package
restructuring (OLD_COMMIT), the way a user installs it (docs/install.md: a venv made
from /usr/bin/python3, `pip install --no-build-isolation <checkout>`; hooks/README.md:
`virsh-fleece hook-install --reload` from that venv). Then the package in that venv is
upgraded to the tree under test (the checkout this file lives in) with the same pip
command, and a real domain shows the hook running after each step:

  1. old shim, old package (the baseline: the hook works here at all);
  2. old shim left in place, new package: the upgrade alone must keep cleanup on;
  3. `virsh-fleece hook-install` again from the upgraded venv (hooks/README.md: run it
     again, `hook-status` says when the shim is not the current template).

What the installer records: only the interpreter (`PYTHON=<sys.executable>` in the shim),
which runs `python -I` (PYTHONPATH and the working directory are ignored), so the package
the hook runs is whatever that interpreter's site-packages hold. Upgrading the package
in that venv is therefore the meaningful "swap the package under the old shim"; no
checkout path is recorded anywhere. (An installer run with a checkout on PYTHONPATH
under a bare /usr/bin/python3 records /usr/bin/python3, whose `-I` cannot import the
package: that hook silently does nothing, before or after any upgrade.)

What shows that the hook ran: at stop, the fleece image of a temporary snapshot is gone
when destroy() returns (`release`, synchronous); at start, a checkpoint whose mirror was
removed from the definition is back in the domain XML (`started` hands it to the detached
`python -I -m libvirt_fleece.hook --reconcile` worker). Nothing else calls the plugin
between the start and that check. The new code: after the upgrade the shim's interpreter
imports libvirt_fleece from the venv, file for file the tree under test's package.

Serial tier: it installs the hook into the running libvirtd (SIGHUP once, as the
hook-install --reload of the docs does). /etc/libvirt/hooks/qemu.d is restored afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time

import libvirt
import pytest
from lxml import etree

import libvirt_fleece as lf
from conftest import REQUIRE
from vm import wait_for

# 4d53dd6: the last commit before the package restructuring (flat libvirt_fleece/)
OLD_COMMIT = "4d53dd67b02324bd7e0e137a830ff1bd9587ab6b"
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS_DIR = "/etc/libvirt/hooks"
QEMU_D = os.path.join(HOOKS_DIR, "qemu.d")
HOOK = os.path.join(QEMU_D, "libvirt-fleece")         # hooks/README.md
STATE_NS = "http://libvirt-fleece.org/xmlns/state/1"          # documented formats:
CP_NS = "http://libvirt-fleece.org/xmlns/checkpoints/1"       # hooks/README.md
BASE_PYTHON = "/usr/bin/python3"                       # docs/install.md
# what a root shell under sudo passes on: nothing of this test's environment
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LC_ALL": "C", "HOME": "/root"}
# what is not part of a source tree (.gitignore); copying the tree under test without
# them keeps pip from building out of (and writing build/ into) the checkout under test
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".mypy_cache", ".reliability", "*.whl")


# --- helpers -----------------------------------------------------------------------


def sh(*args: str, timeout: float = 120) -> str:
    """Run a command as root with a clean environment; its stdout (fails on exit != 0)."""
    proc = subprocess.run(list(args), capture_output=True, text=True, env=ENV, cwd="/",
                          timeout=timeout)
    assert proc.returncode == 0, \
        f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def pip_install(venv: str, src: str) -> None:
    """docs/install.md's install (also an upgrade: pip replaces an installed version);
    --no-deps --no-index: the dependencies are Debian's, nothing is downloaded."""
    sh(os.path.join(venv, "bin", "pip"), "install", "-q", "--no-build-isolation", "--no-deps",
       "--no-index", src)


def shim_interpreter() -> str:
    with open(HOOK, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.startswith("PYTHON=")]
    assert len(lines) == 1, lines
    return lines[0][len("PYTHON="):].strip("'\"")


def package_files(pkg_dir: str) -> dict:
    """{path relative to the package: content} of its .py files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(pkg_dir):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, pkg_dir)] = f.read()
    return out


def assert_runs_package(python: str, venv: str, source: str) -> None:
    """``python -I`` (as the shim runs it) imports libvirt_fleece and its hook from
    ``venv``, and that package is ``source``'s libvirt_fleece file for file."""
    pkg = sh(python, "-I", "-c", "import os, libvirt_fleece, libvirt_fleece.hook; "
             "print(os.path.dirname(libvirt_fleece.__file__))").strip()
    assert os.path.realpath(pkg).startswith(os.path.realpath(venv) + os.sep), \
        f"the hook's interpreter {python} imports libvirt_fleece from {pkg}, not from {venv}"
    have = package_files(pkg)
    want = package_files(os.path.join(source, "libvirt_fleece"))
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    differ = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    assert not (missing or extra or differ), \
        (f"the package the hook runs ({pkg}) is not {source}'s: not installed {missing}, "
         f"left over {extra}, different {differ}")


def state_files(dom) -> list:
    """Fleece image paths the live state document records."""
    root = etree.fromstring(dom.XMLDesc(0).encode())
    return [el.get("file") for el in root.iter()
            if isinstance(el.tag, str) and etree.QName(el).namespace == STATE_NS
            and etree.QName(el).localname == "disk" and el.get("file")]


def mirror(dom, flags: int = 0) -> dict:
    """{checkpoint name: valid} from the checkpoint mirror in the domain XML."""
    root = etree.fromstring(dom.XMLDesc(flags).encode())
    result: dict = {}
    for el in root.iter(f"{{{CP_NS}}}checkpoint"):
        result[el.get("name")] = result.get(el.get("name"), True) and el.get("valid") == "yes"
    return result


def assert_hook_runs(t, step: str, n: int) -> None:
    """The running persistent domain ``t`` (checkpoint c1 in its image) shows the
    installed hook at work, at stop and at start. Leaves it running."""
    dom = t.dom
    lf.blockSnapshotCreateXML(dom, f"<domainblocksnapshot><name>tmp{n}</name>"
                                   f"<disk name='vda'/></domainblocksnapshot>", 0)
    files = state_files(dom)
    assert files and all(os.path.exists(f) for f in files), files
    dom.destroy()
    # release runs before destroy() returns
    left = [f for f in files if os.path.lexists(f)]
    assert not left, f"{step}: the hook did not clean up at stop (cleanup is off): {left}"
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, CP_NS,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert mirror(dom, libvirt.VIR_DOMAIN_XML_INACTIVE) == {}
    dom.create()
    wait_for(lambda: mirror(dom) == {"c1": True}, 30,
             f"{step}: the hook's worker did not bring checkpoint c1 back into the domain "
             f"XML after start: {mirror(dom)}")


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture
def hooks_dir_restored():
    """/etc/libvirt/hooks/qemu.d afterwards as it was before (our file: content and mode,
    or absent; the directories removed when this test made them)."""
    made = [d for d in (HOOKS_DIR, QEMU_D) if not os.path.isdir(d)]
    listing = sorted(os.listdir(QEMU_D)) if os.path.isdir(QEMU_D) else None
    before = None
    if os.path.lexists(HOOK):
        with open(HOOK, "rb") as f:
            before = (f.read(), stat.S_IMODE(os.lstat(HOOK).st_mode))
    yield
    if before is None:
        if os.path.lexists(HOOK):
            os.unlink(HOOK)
    else:
        tmp = HOOK + ".restore"
        with open(tmp, "wb") as f:
            f.write(before[0])
        os.chmod(tmp, before[1])
        os.rename(tmp, HOOK)
    for d in reversed(made):
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
    now = sorted(os.listdir(QEMU_D)) if os.path.isdir(QEMU_D) else None
    assert now == listing, f"{QEMU_D} not restored: {listing} before, {now} after"


@pytest.fixture
def workdir():
    """A scratch directory: the old worktree, the venv, the copy of the tree under test.
    The worktree is removed with `git worktree remove --force`."""
    d = tempfile.mkdtemp(prefix="fleece-hookup-")
    old = os.path.join(d, "old")
    proc = subprocess.run(["git", "-C", TOP, "worktree", "add", "--detach", old, OLD_COMMIT],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(d, ignore_errors=True)
        why = f"no worktree of {OLD_COMMIT[:7]} from {TOP}: {proc.stderr.strip()}"
        if REQUIRE:
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield d
    finally:
        subprocess.run(["git", "-C", TOP, "worktree", "remove", "--force", old],
                       capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["git", "-C", TOP, "worktree", "prune"], capture_output=True)


# --- the test ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.serial
@pytest.mark.slow
def test_upgrade_keeps_the_installed_hook_working(hooks_dir_restored, workdir, make_vm):
    t0 = time.monotonic()
    old = os.path.join(workdir, "old")
    new = os.path.join(workdir, "new")
    shutil.copytree(TOP, new, ignore=NOT_SOURCE, symlinks=True)
    venv = os.path.join(workdir, "venv")
    cli = os.path.join(venv, "bin", "virsh-fleece")

    # a persistent domain with checkpoint c1 (its bitmap in the image, its mirror in the XML)
    t = make_vm(disks=1, persistent=True, tag="hookup-")
    lf.blockSnapshotCreateXML(t.dom, "<domainblocksnapshot><name>c1</name><disk name='vda'/>"
                                     "</domainblocksnapshot>",
                              lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT).delete()
    assert mirror(t.dom) == {"c1": True}

    # 1. the old version installed and its hook installed, as a user does
    sh(BASE_PYTHON, "-m", "venv", "--system-site-packages", venv)
    pip_install(venv, old)
    print(sh(cli, "hook-install", "--reload").strip())
    # libvirtd re-reads the hook directory in its reload thread (test_hook_integration)
    wait_for(lambda: subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                                    capture_output=True).returncode == 0, 30,
             "libvirtd does not answer after SIGHUP")
    time.sleep(1.0)
    # the console script's interpreter (bin/python3) is what the installer records
    python = shim_interpreter()
    assert os.path.dirname(python) == os.path.join(venv, "bin"), python
    with open(HOOK, "rb") as f:
        old_shim = f.read()
    assert_runs_package(python, venv, old)
    assert_hook_runs(t, "old shim, old package (baseline)", 1)

    # 2. upgrade the package only: the old shim stays, its interpreter now runs the new code
    pip_install(venv, new)
    with open(HOOK, "rb") as f:
        assert f.read() == old_shim
    assert_runs_package(python, venv, new)
    assert_hook_runs(t, "old shim left in place, new package", 2)

    # 3. the documented follow-up: hook-status, then hook-install again from the new code
    print(sh(cli, "hook-status").strip())
    print(sh(cli, "hook-install").strip())
    status = dict(line.split(":", 1) for line in sh(cli, "hook-status").splitlines()
                  if ":" in line)
    status = {k.strip(): v.strip() for k, v in status.items()}
    assert status.get("Installed") == "yes" and status.get("Up to date") == "yes", status
    assert status.get("Interpreter") == python, status
    assert shim_interpreter() == python
    assert_runs_package(python, venv, new)
    assert_hook_runs(t, "shim re-installed from the new package", 3)
    took = time.monotonic() - t0
    print(f"hook upgrade test: {took:.1f} s")


def _old_source(path: str) -> str:
    return subprocess.run(["git", "-C", TOP, "show", f"{OLD_COMMIT}:{path}"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", ["libvirt_fleece/backup_guard.py"])
def test_a_guard_of_the_old_version_still_cleans_up_after_the_upgrade(
        path, tmp_path, monkeypatch):
    """A backup guard started before the upgrade runs its old code, which imports the
    package's modules by their old names only once its backup died: they must resolve
    in the new package and reach the new recover()."""
    import io
    import libvirt_fleece.backup as backup_pkg
    code = compile(_old_source(path), path, "exec")
    old = {"__name__": "libvirt_fleece._old_backup_guard", "__package__": "libvirt_fleece"}
    exec(code, old)
    seen = []
    monkeypatch.setattr(backup_pkg, "recover", lambda bdir, conn=None: seen.append(bdir))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))   # the backup died
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert old["main"]([str(tmp_path), "0", str(fd)]) == 0
    finally:
        os.close(fd)
    assert len(seen) == 1 and type(seen[0]).__name__ == "BackupDir"
