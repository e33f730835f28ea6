# SPDX-License-Identifier: LGPL-2.1-or-later
"""Attacks on a backup directory that an unprivileged user controls (issue 12).

Root runs ``restore``, ``verify``, ``info`` and the journal's recovery against a
directory owned by ``nobody``, who planted the attack (files created as nobody
in a forked child). Every case asserts that no host file was read into a
restore or checked by verify, that nothing outside the directory was created,
written or deleted, that nothing hangs (each CLI run has a timeout), and that
the error names the offending file. Races stop the process at a stop point
(libvirt_fleece/faults.py) while the attacker moves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from libvirt_fleece import backup as bk
from libvirt_fleece.backup import files as backup_files, readback
from libvirt_fleece.backup import digest as bd
from libvirt_fleece.backup import manifest as mf
from libvirt_fleece.backup import state as backup_state
from libvirt_fleece import errors, faults
from libvirt_fleece.backup.dir import BackupDir, UnsafeFile

pytestmark = pytest.mark.hostile_backup

NOBODY = 65534
MiB = 1 << 20
SIZE = 4 * MiB
SECRET = b"ROOT-ONLY-SECRET" * 4096          # 64 KiB a restore must never contain
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [os.path.join(TOP, ".venv", "bin", "python"), "-m", "libvirt_fleece.cli"]


def as_nobody(func) -> None:
    """Run ``func()`` as nobody in a forked child; raise if it failed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            func()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            print(f"attacker step failed: {e!r}", file=sys.stderr)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker's step failed"


class Host:
    """A root-only area with a secret and a victim file, a restore directory of
    root's, and a backup directory owned by nobody holding one full point and one
    incremental of disk vda, written as root's backup would."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="fleece-hostile-")
        os.chmod(self.base, 0o711)
        self.private = os.path.join(self.base, "root")
        os.mkdir(self.private, 0o700)
        self.secret = os.path.join(self.private, "secret")
        self.victim = os.path.join(self.private, "victim")
        for path, data in ((self.secret, SECRET), (self.victim, b"victim\n")):
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
        self.out = os.path.join(self.base, "out")
        os.mkdir(self.out, 0o700)
        self.dir = os.path.join(self.base, "backup")
        self.dirs = {self.dir}          # backup directories: what is in them may change
        os.mkdir(self.dir, 0o755)
        self._write_points()
        for entry in os.listdir(self.dir) + ["."]:
            os.chown(os.path.join(self.dir, entry), NOBODY, NOBODY)
        self.before = self.snapshot()

    def _write_points(self) -> None:
        p0, p1 = (os.path.join(self.dir, mf.file_name("vda", i)) for i in (0, 1))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p0, str(SIZE)], check=True)
        qemu_io(p0, "write -P 0x11 0 1M")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", mf.file_name("vda", 0),
                        "-F", "qcow2", p1, str(SIZE)], check=True, cwd=self.dir)
        qemu_io(p1, "write -P 0x22 1M 1M")
        points = []
        for i, path in enumerate((p0, p1)):
            os.chmod(path, 0o600)
            points.append(point(i, bd.digest_file(path), backing=0 if i else None))
        self.manifest = {"format": mf.FORMAT, "domain": {"name": "web1", "uuid": "u-1"},
                         "points": points}
        self.write_manifest()

    def write_manifest(self, data=None) -> None:
        path = os.path.join(self.dir, mf.MANIFEST)
        text = json.dumps(self.manifest if data is None else data)
        if os.path.exists(path) and os.stat(path).st_uid == NOBODY:
            as_nobody(lambda: _replace(path, text.encode()))
        else:
            with open(path, "w") as f:
                f.write(text)

    def snapshot(self) -> dict:
        """Every host file outside the backup directory: name -> (mode, digest)."""
        out = {}
        for root, dirs, files in os.walk(self.base):
            if any(root == d or root.startswith(d + "/") for d in self.dirs):
                continue
            for name in files + dirs:
                path = os.path.join(root, name)
                if path in self.dirs:
                    continue
                st = os.lstat(path)
                digest = None
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                out[path] = (st.st_mode, digest)
        return out

    def assert_host_untouched(self, created=()) -> None:
        now = self.snapshot()
        for path in created:
            now.pop(path, None)
        assert now == self.before

    def restored_holds_no_secret(self) -> None:
        for name in os.listdir(self.out):
            with open(os.path.join(self.out, name), "rb") as f:
                assert SECRET[:64] not in f.read(), f"{name} holds the host's secret"

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def _replace(path: str, data: bytes) -> None:
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def qemu_io(path: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path], check=True,
                   capture_output=True)


def point(index: int, digest: str, backing=None, disk="vda") -> dict:
    return {"index": index, "time": f"2026-11-0{index + 1}T12:00:00Z",
            "mode": "incremental" if backing is not None else "full",
            "checkpoint": f"backup-2026110{index + 1}T120000Z",
            "disks": [{"name": disk, "file": mf.file_name(disk, index), "size": SIZE,
                       "copied": MiB, "layer_sha256": digest,
                       "backing": mf.file_name(disk, backing) if backing is not None else None}]}


@pytest.fixture
def host():
    h = Host()
    yield h
    h.cleanup()


def cli(*args, timeout=60):
    """virsh-fleece as root, with a timeout: nothing may hang."""
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout)


def empty_layer_digest() -> str:
    return bd.LayerDigest().hexdigest()


# --- 1. a header's backing file, json: names, nbd addresses ------------------------------

def plant_image(host: Host, name: str, backing: str, fmt: str = "raw", size: int = SIZE,
                options=()) -> None:
    """As nobody: replace ``name`` by a qcow2 whose header names ``backing``."""
    path = os.path.join(host.dir, name)

    def step():
        if os.path.exists(path):
            os.unlink(path)
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", *options]
        if backing:
            cmd += ["-b", backing, "-F", fmt]
        subprocess.run(cmd + [path, str(size)], check=True, capture_output=True)
    as_nobody(step)


@pytest.mark.parametrize("backing, fmt", [
    ("SECRET", "raw"),                                            # a host file by path
    ('json:{"driver":"raw","file":{"driver":"file","filename":"SECRET"}}', "raw"),
    ("nbd+unix:///x?socket=/run/other.sock", "raw"),              # another export
    ("nbd://127.0.0.1:10809/x", "raw"),                           # an attacker's listener
    ("vda.0000.qcow2", "raw"),                                    # the right name, raw format
])
def test_a_header_naming_a_backing_file_is_refused(host, backing, fmt):
    backing = backing.replace("SECRET", host.secret)
    plant_image(host, mf.file_name("vda", 0), backing, fmt)
    host.manifest["points"][0]["disks"][0]["layer_sha256"] = empty_layer_digest()
    host.write_manifest()
    to = os.path.join(host.out, "vda.raw")
    r = cli("restore", host.dir, "--disk", "vda", "--to", to, "--point", "0")
    assert r.returncode != 0 and "vda.0000.qcow2 names backing file" in r.stderr, r.stderr
    r = cli("restore", host.dir, "--disk", "vda", "--to", to, "--point", "0", "--no-check")
    assert r.returncode != 0 and "vda.0000.qcow2" in r.stderr
    r = cli("verify", host.dir)
    assert r.returncode == 1 and "vda.0000.qcow2 names backing file" in r.stdout, r.stdout
    assert "match the manifest" not in r.stdout
    host.restored_holds_no_secret()
    host.assert_host_untouched()


def test_an_external_data_file_is_refused(host):
    """A header naming a root-only data file (the bytes crafted elsewhere: an
    attacker can write any header)."""
    data, crafted = os.path.join(host.private, "data"), os.path.join(host.private, "c.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={data},data_file_raw=on", crafted, str(SIZE)], check=True)
    with open(data, "r+b") as f:
        f.write(SECRET)
    with open(crafted, "rb") as f:
        image = f.read()
    path = os.path.join(host.dir, mf.file_name("vda", 0))
    as_nobody(lambda: _replace(path, image))
    host.before = host.snapshot()
    host.manifest["points"][0]["disks"][0]["layer_sha256"] = empty_layer_digest()
    host.write_manifest()
    to = os.path.join(host.out, "vda.raw")
    r = cli("restore", host.dir, "--disk", "vda", "--to", to, "--point", "0", "--no-check")
    assert r.returncode != 0 and "vda.0000.qcow2 names an external data file" in r.stderr
    r = cli("verify", host.dir)
    assert r.returncode == 1 and "external data file" in r.stdout
    host.restored_holds_no_secret()
    host.assert_host_untouched()


@pytest.mark.parametrize("name", [
    'json:{"driver":"raw","file":{"driver":"file","filename":"\\u002fetc\\u002fshadow"}}',
    "/etc/shadow", "../root/secret", "nbd://127.0.0.1:10809/x", "vda.0000.qcow2/../x",
    "vda.0000.qcow2.part", "vdb.0000.qcow2", ".libvirt-fleece-backup.lock",
])
def test_a_manifest_naming_a_file_not_of_the_directory_is_refused(host, name):
    if name.startswith("json:"):        # the file literally exists in the directory
        as_nobody(lambda: open(os.path.join(host.dir, name), "wb").close())
    for field in ("file", "backing"):
        data = json.loads(json.dumps(host.manifest))
        data["points"][1]["disks"][0][field] = name
        host.write_manifest(data)
        for args in (("verify", host.dir), ("info", host.dir),
                     ("restore", host.dir, "--disk", "vda", "--to",
                      os.path.join(host.out, "x.raw"))):
            r = cli(*args)
            assert r.returncode != 0, (args, r.stdout)
            assert "manifest.json is not a valid backup manifest" in r.stderr, r.stderr
    host.restored_holds_no_secret()
    host.assert_host_untouched()


# --- 7 and 10. malformed manifests: loops, sizes, numbers, depth, FIFOs, links --------------

@pytest.mark.parametrize("change, message", [
    (lambda m: m["points"][0]["disks"][0].update(backing="vda.0000.qcow2"), "earlier point"),
    (lambda m: m["points"][1]["disks"][0].update(backing="vda.0001.qcow2"), "earlier point"),
    (lambda m: m["points"][1].update(index=0), "does not follow"),
    (lambda m: m["points"][0].update(index=-1), "not an integer"),
    (lambda m: m["points"][0].update(index=True), "not an integer"),
    (lambda m: m["points"][0].update(index="0"), "not an integer"),
    (lambda m: m["points"][0]["disks"][0].update(size=1 << 50), "not an integer in"),
    (lambda m: m["points"][0]["disks"][0].update(size=-1), "not an integer in"),
    (lambda m: m["points"][0]["disks"][0].update(name="vd/a"), "not a disk target name"),
    (lambda m: m["points"][0]["disks"].append(m["points"][0]["disks"][0]), "disk twice"),
    (lambda m: m["points"][0].update(mode="x"), "not full or incremental"),
    (lambda m: m.update(points={"a": 1}), "not a list"),
])
def test_malformed_manifest_fields_are_refused_clearly(host, change, message):
    data = json.loads(json.dumps(host.manifest))
    change(data)
    host.write_manifest(data)
    r = cli("info", host.dir)
    assert r.returncode != 0 and "manifest.json is not a valid backup manifest" in r.stderr
    assert message in r.stderr and "unexpected" not in r.stderr, r.stderr
    r = cli("restore", host.dir, "--disk", "vda", "--to", os.path.join(host.out, "v.raw"))
    assert r.returncode != 0 and "unexpected" not in r.stderr
    host.assert_host_untouched()


def test_numbers_that_do_not_fit_and_deep_json_give_clear_errors(host):
    text = json.dumps(host.manifest).replace('"index": 0', '"index": 1e400', 1)
    as_nobody(lambda: _replace(os.path.join(host.dir, mf.MANIFEST), text.encode()))
    r = cli("info", host.dir)
    assert r.returncode != 0 and "not an integer" in r.stderr and "Overflow" not in r.stderr
    deep = b"[" * 100000 + b"]" * 100000
    as_nobody(lambda: _replace(os.path.join(host.dir, mf.MANIFEST), deep))
    r = cli("info", host.dir)
    assert r.returncode != 0 and "nests deeper than" in r.stderr and "Recursion" not in r.stderr
    assert "manifest.json" in r.stderr


def test_info_prints_no_terminal_escapes(host):
    host.manifest["domain"]["name"] = "web1\x1b]0;owned\x07\x1b[2J"
    host.manifest["points"][0]["time"] = "\x1b[31mred"
    host.write_manifest()
    r = cli("info", host.dir)
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\x07" not in r.stdout


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "symlink-secret", "hardlink", "huge"])
def test_a_manifest_that_is_not_a_small_regular_file_is_refused_without_hanging(host, kind):
    path = os.path.join(host.dir, mf.MANIFEST)

    def plant():
        os.unlink(path)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "dev-zero":
            os.symlink("/dev/zero", path)
        elif kind == "symlink-secret":
            os.symlink(host.secret, path)
        elif kind == "hardlink":
            os.link(os.path.join(host.dir, mf.file_name("vda", 0)), path)
        else:
            with open(path, "wb") as f:
                f.truncate(64 * MiB)
    as_nobody(plant)
    started = time.monotonic()
    for args in (("info", host.dir), ("verify", host.dir)):
        r = cli(*args, timeout=30)
        assert r.returncode != 0 and "manifest.json" in r.stderr, r.stderr
        assert "unexpected" not in r.stderr
    assert time.monotonic() - started < 30
    host.assert_host_untouched()


def test_a_point_claiming_exabytes_is_refused_before_any_read(host):
    plant_image(host, mf.file_name("vda", 1), mf.file_name("vda", 0), "qcow2", size=1 << 50)
    r = cli("verify", host.dir, timeout=60)
    assert r.returncode == 1 and "vda.0001.qcow2 is a disk of" in r.stdout, r.stdout
    host.manifest["points"][1]["disks"][0]["size"] = 2 << 60
    host.write_manifest()
    r = cli("verify", host.dir, timeout=60)
    assert r.returncode != 0 and "size of vda.0001.qcow2" in r.stderr, r.stderr


# --- images that are links, FIFOs or hard links ---------------------------------------------

@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_an_image_that_is_a_link_or_fifo_is_refused(host, kind):
    path = os.path.join(host.dir, mf.file_name("vda", 0))
    link_to = os.path.join(host.base, "nobody-file")
    as_nobody(lambda: os.unlink(path))
    if kind == "symlink":
        as_nobody(lambda: os.symlink(host.secret, path))
    elif kind == "fifo":
        as_nobody(lambda: os.mkfifo(path))
    else:       # a hard link to a file nobody owns elsewhere (nobody cannot link root's)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", link_to, str(SIZE)],
                       check=True)
        os.chown(link_to, NOBODY, NOBODY)
        as_nobody(lambda: os.link(link_to, path))
    r = cli("verify", host.dir, timeout=30)
    assert r.returncode == 1 and "vda.0000.qcow2" in r.stdout and "refused" in r.stdout
    r = cli("restore", host.dir, "--disk", "vda", "--to", os.path.join(host.out, "v.raw"),
            timeout=30)
    assert r.returncode != 0 and "vda.0000.qcow2" in r.stderr and "refused" in r.stderr
    host.restored_holds_no_secret()
    host.assert_host_untouched(created=[link_to])


# --- 2, 3. a forged journal ------------------------------------------------------------------

class NoLibvirt:
    """A connection that fails the test if a forged journal makes recovery use it."""

    def lookupByUUIDString(self, uuid):
        raise AssertionError(f"recovery looked up domain {uuid} named by a forged journal")


@pytest.mark.parametrize("parts", [
    ["../root/victim"], ["ROOT/victim"], ["vda.0000.qcow2"], ["manifest.json"],
    ["vda.0009.qcow2.part", "../root/victim"],
])
def test_a_forged_journal_deletes_nothing_outside_and_touches_no_domain(host, parts, caplog):
    parts = [p.replace("ROOT", host.private) for p in parts]
    journal = {"uri": "qemu:///system", "domain_uuid": "0b4a3a1c-0000-0000-0000-00000000b0b0",
               "snapshot": "backup-20261101T120000Z", "checkpoint": "backup-20261101T120000Z",
               "parts": parts, "started": 0.0}
    text = json.dumps(journal).encode()
    as_nobody(lambda: _replace(os.path.join(host.dir, mf.JOURNAL), text))
    with BackupDir(host.dir) as bdir:
        backup_state.remove(bdir)           # no run of this host wrote it
    bk.recover(host.dir, NoLibvirt())
    assert os.path.exists(host.victim)
    assert all(os.path.exists(os.path.join(host.dir, n))
               for n in (mf.MANIFEST, mf.file_name("vda", 0), mf.file_name("vda", 1)))
    assert "ignoring" in caplog.text
    host.assert_host_untouched()


def test_a_journal_naming_only_part_files_removes_those_in_the_directory(host, caplog):
    part = mf.file_name("vda", 2, part=True)
    as_nobody(lambda: open(os.path.join(host.dir, part), "wb").close())
    journal = {"uri": "", "domain_uuid": "0b4a3a1c-0000-0000-0000-00000000b0b0",
               "snapshot": "backup-20261101T120000Z", "checkpoint": None,
               "parts": [part], "started": 0.0}
    as_nobody(lambda: _replace(os.path.join(host.dir, mf.JOURNAL), json.dumps(journal).encode()))
    bk.recover(host.dir, NoLibvirt())
    assert not os.path.exists(os.path.join(host.dir, part))
    assert not os.path.exists(os.path.join(host.dir, mf.JOURNAL))
    assert "no backup run of this host recorded them" in caplog.text


def test_the_state_record_is_authoritative_over_the_directory_journal(host, caplog):
    """The record says what the run made; a journal edited meanwhile is ignored."""
    record = mf.Journal(uri="", domain_uuid="", parts=[mf.file_name("vda", 2, part=True)])
    with BackupDir(host.dir) as bdir:
        backup_state.save(bdir, record)
    forged = dict(record.__dict__, parts=["vda.0000.qcow2"])
    as_nobody(lambda: _replace(os.path.join(host.dir, mf.JOURNAL), json.dumps(forged).encode()))
    bk.recover(host.dir, NoLibvirt())
    assert os.path.exists(os.path.join(host.dir, "vda.0000.qcow2"))
    assert "does not match the record" in caplog.text
    with BackupDir(host.dir) as bdir:
        assert backup_state.load(bdir) is None


# --- 4, 6. planted links where the backup creates files --------------------------------------

def test_a_lock_link_to_a_missing_path_creates_nothing(host):
    target = os.path.join(host.private, "created-by-root")
    as_nobody(lambda: os.symlink(target, os.path.join(host.dir, mf.LOCK)))
    with pytest.raises(mf.BackupCorrupt, match="libvirt-fleece-backup.lock: is a symbolic link"):
        mf.DirLock(host.dir)
    assert not os.path.lexists(target)
    host.assert_host_untouched()


def test_a_part_link_is_never_written_through(host):
    part = mf.file_name("vdb", 1, part=True)
    as_nobody(lambda: os.symlink(host.victim, os.path.join(host.dir, part)))
    with BackupDir(host.dir) as bdir:
        with pytest.raises(UnsafeFile, match="vdb.0001.qcow2.part: exists already"):
            bdir.create(part)
        bdir.write_atomic(mf.MANIFEST, b"{}")       # a planted manifest link is replaced
    host.assert_host_untouched()


def test_journal_and_manifest_links_are_replaced_not_followed(host):
    for name in (mf.MANIFEST, mf.JOURNAL):
        path = os.path.join(host.dir, name)
        as_nobody(lambda: (os.path.exists(path) and os.unlink(path),
                           os.symlink(host.victim, path)))
    with BackupDir(host.dir) as bdir:
        assert mf.Journal.load(bdir) == mf.Journal(uri="", domain_uuid="")
        mf.Journal(uri="", domain_uuid="").save(bdir)
        mf.save(bdir, mf.Manifest("web1", "u-1"))
        mf.Journal.remove(bdir)
    host.assert_host_untouched()


# --- 5. races, made deterministic with stop points -------------------------------------------

def test_a_link_renamed_over_the_restore_target_redirects_nothing(host, tmp_path):
    """The attacker owns the directory restored into and, while restore runs, plants
    links over every new name there: the image reaches only the new file."""
    os.chown(host.out, NOBODY, NOBODY)
    os.chmod(host.out, 0o755)
    host.before = host.snapshot()
    stops = tempfile.mkdtemp(dir=host.base)
    env = dict(os.environ, **{faults.STOP_ENV: "restore:target-created",
                              faults.STOP_DIR_ENV: stops})
    to = os.path.join(host.out, "vda.raw")
    proc = subprocess.Popen(CLI + ["restore", host.dir, "--disk", "vda", "--to", to], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = os.path.join(stops, "restore:target-created.reached")
        deadline = time.monotonic() + 60
        while not os.path.exists(reached):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)

        def attack():
            for name in os.listdir(host.out):       # a named temporary file, if any
                os.unlink(os.path.join(host.out, name))
                os.symlink(host.victim, os.path.join(host.out, name))
        as_nobody(attack)
        open(os.path.join(stops, "restore:target-created.go"), "w").close()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not os.path.islink(to) and os.stat(to).st_mode & 0o777 == 0o600
    with open(to, "rb") as f:
        data = f.read(2 * MiB)
    assert data[:MiB] == b"\x11" * MiB and data[MiB:] == b"\x22" * MiB
    host.assert_host_untouched(created=[to, stops] + [os.path.join(stops, n)
                                                      for n in os.listdir(stops)])


def test_a_link_renamed_over_a_named_restore_temporary_redirects_nothing(host, monkeypatch):
    """Without O_TMPFILE (NFS) restore writes under a temporary name: the attacker,
    owning the directory, renames a link to a root file over it at the stop point."""
    import threading
    os.chown(host.out, NOBODY, NOBODY)
    os.chmod(host.out, 0o755)
    host.before = host.snapshot()
    stops = tempfile.mkdtemp(dir=host.private)
    monkeypatch.setattr(readback, "_new_file", readback._new_named_file)
    monkeypatch.setenv(faults.STOP_ENV, "restore:target-created")
    monkeypatch.setenv(faults.STOP_DIR_ENV, stops)
    to = os.path.join(host.out, "vda.raw")
    failure = []

    def run():
        try:
            bk.restore(host.dir, "vda", to)
        except BaseException as e:  # noqa: BLE001 - reported below
            failure.append(e)
    worker = threading.Thread(target=run)
    worker.start()
    reached = os.path.join(stops, "restore:target-created.reached")
    deadline = time.monotonic() + 60
    while not os.path.exists(reached) and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.path.exists(reached), failure

    def attack():
        names = [n for n in os.listdir(host.out) if n.endswith(".restoring")]
        assert len(names) == 1, names
        link = os.path.join(host.out, "planted")
        os.symlink(host.victim, link)
        os.rename(link, os.path.join(host.out, names[0]))
    as_nobody(attack)
    open(os.path.join(stops, "restore:target-created.go"), "w").close()
    worker.join(120)
    assert not worker.is_alive()
    # the image went only into root's own file, now without a name: a clear error
    assert len(failure) == 1 and isinstance(failure[0], UnsafeFile), failure
    assert ".restoring: was removed or replaced while the restore wrote it" in str(failure[0])
    assert os.listdir(host.out) == []       # no --to, and the planted link is gone too
    shutil.rmtree(stops)
    host.assert_host_untouched()


# --- 8. private by default ------------------------------------------------------------------

def test_restored_files_are_private_and_verify_reports_readable_images(host):
    to = os.path.join(host.out, "vda.qcow2")
    bk.restore(host.dir, "vda", to)
    assert os.stat(to).st_mode & 0o777 == 0o600
    os.chmod(os.path.join(host.dir, mf.file_name("vda", 0)), 0o644)
    report = bk.verify(host.dir)
    assert report.ok and any("vda.0000.qcow2 is mode 644" in w for w in report.warnings)
    host.assert_host_untouched(created=[to])


def test_images_readable_by_others_are_tightened_and_backup_group_grants_read(
        host, tmp_path, monkeypatch):
    image = os.path.join(host.dir, mf.file_name("vda", 0))
    os.chmod(image, 0o644)
    with BackupDir(host.dir) as bdir:
        backup_files.tighten(bdir, mf.load(bdir))
    assert os.stat(image).st_mode & 0o777 == 0o600
    cfg = tmp_path / "config.yaml"
    cfg.write_text("backup_group: nogroup\n")
    monkeypatch.setenv("LIBVIRT_FLEECE_CONFIG", str(cfg))
    to = os.path.join(host.out, "vda.raw")
    bk.restore(host.dir, "vda", to)
    st = os.stat(to)
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == NOBODY
    report = bk.verify(host.dir)
    assert report.ok and not any("readable by others" in w for w in report.warnings)
    host.assert_host_untouched(created=[to])


def test_an_intact_directory_still_verifies_and_restores(host):
    report = bk.verify(host.dir)
    assert report.ok and report.checked == ["vda.0000.qcow2", "vda.0001.qcow2"], report
    to = os.path.join(host.out, "vda.raw")
    bk.restore(host.dir, "vda", to)
    with open(to, "rb") as f:
        assert f.read(2 * MiB) == b"\x11" * MiB + b"\x22" * MiB
    with pytest.raises(errors.AlreadyExists):
        bk.restore(host.dir, "vda", to)


# --- with real domains: 3 (another domain's state), 4 (.part link), 5 (swapped directory) -----

def backup_dir_of_nobody(host: Host, name: str) -> str:
    path = os.path.join(host.base, name)
    os.mkdir(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    host.dirs.add(path)
    host.before = host.snapshot()
    return path


def give_to_nobody(path: str) -> None:
    for entry in os.listdir(path) + ["."]:
        os.chown(os.path.join(path, entry), NOBODY, NOBODY)


def cli_backup_stopped(dom_name: str, target: str, stop: str, attack, host: Host):
    """``virsh-fleece backup`` stopped at ``stop`` while ``attack()`` runs as nobody."""
    stops = tempfile.mkdtemp(dir=host.private)
    env = dict(os.environ, **{faults.STOP_ENV: stop, faults.STOP_DIR_ENV: stops})
    proc = subprocess.Popen(CLI + ["backup", dom_name, "--target", target], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(stops, f"{stop}.reached")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        as_nobody(attack)
        open(os.path.join(stops, f"{stop}.go"), "w").close()
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shutil.rmtree(stops)
    return proc.returncode, out, err


@pytest.mark.integration
def test_a_forged_journal_leaves_another_domains_snapshot_and_checkpoint(make_vm, host):
    import libvirt_fleece as lf
    a, b = make_vm(disks=1, size_mib=64), make_vm(disks=1, size_mib=64)
    dir_a, dir_b = (backup_dir_of_nobody(host, n) for n in ("a", "b"))
    bk.backup(a.dom, dir_a, mode="full")
    bk.backup(b.dom, dir_b, mode="full")
    give_to_nobody(dir_a)
    cp_b = [c.getName() for c in lf.blockCheckpointList(b.dom)]
    name = "backup-20261101T120000Z"
    lf.blockSnapshotCreateXML(b.dom, f"<domainblocksnapshot><name>{name}</name>"
                                     f"</domainblocksnapshot>",
                              lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT)
    forged = {"uri": "qemu:///system", "domain_uuid": b.dom.UUIDString(), "snapshot": name,
              "checkpoint": cp_b[0], "parts": [], "started": 0.0}
    as_nobody(lambda: _replace(os.path.join(dir_a, mf.JOURNAL), json.dumps(forged).encode()))
    r = bk.backup(a.dom, dir_a)
    assert r.mode == "incremental"
    assert [s.getName() for s in lf.blockSnapshotList(b.dom)] == [name]
    assert cp_b[0] in [c.getName() for c in lf.blockCheckpointList(b.dom)]
    assert bk.backup(b.dom, dir_b, mode="incremental").mode == "incremental"
    lf.blockSnapshotLookupByName(b.dom, name).delete(0)


@pytest.mark.integration
def test_backup_refuses_a_manifest_naming_a_file_outside(make_vm, host):
    """``backup --incremental`` with an absolute ``file`` (attack 10): refused before
    anything is made; no point is backed by a host file."""
    import libvirt_fleece as lf
    a = make_vm(disks=1, size_mib=64)
    target = backup_dir_of_nobody(host, "a")
    bk.backup(a.dom, target, mode="full")
    give_to_nobody(target)
    with open(os.path.join(target, mf.MANIFEST)) as f:
        data = json.load(f)
    data["points"][0]["disks"][0]["file"] = host.secret
    as_nobody(lambda: _replace(os.path.join(target, mf.MANIFEST), json.dumps(data).encode()))
    r = cli("backup", a.name, "--target", target, "--incremental", timeout=120)
    assert r.returncode != 0 and "manifest.json is not a valid backup manifest" in r.stderr
    assert "is not a backup file name" in r.stderr, r.stderr
    assert lf.blockSnapshotList(a.dom) == []
    assert sorted(os.listdir(target)) == [mf.LOCK, mf.MANIFEST, "vda.0000.qcow2"]
    host.assert_host_untouched()


@pytest.mark.integration
def test_a_part_link_planted_during_a_backup_is_refused(make_vm, host):
    a = make_vm(disks=1, size_mib=64)
    target = backup_dir_of_nobody(host, "a")
    part = os.path.join(target, mf.file_name("vda", 0, part=True))
    rc, out, err = cli_backup_stopped(a.name, target, "backup:journal-saved",
                                      lambda: os.symlink(host.victim, part), host)
    assert rc != 0 and "vda.0000.qcow2.part: exists already" in err, err
    assert "unexpected" not in err
    host.assert_host_untouched()
    import libvirt_fleece as lf
    assert lf.blockSnapshotList(a.dom) == []


@pytest.mark.integration
def test_a_directory_swapped_during_a_backup_redirects_nothing(make_vm, host):
    a, b = make_vm(disks=1, size_mib=64), make_vm(disks=1, size_mib=64)
    parent = backup_dir_of_nobody(host, "shared")          # nobody may rename in here
    dir_a, dir_b = os.path.join(parent, "a"), os.path.join(host.base, "b")
    os.mkdir(dir_a, 0o755)
    os.chown(dir_a, NOBODY, NOBODY)
    bk.backup(b.dom, dir_b, mode="full")                   # root's own, elsewhere
    before_b = {n: os.stat(os.path.join(dir_b, n)).st_mtime_ns for n in os.listdir(dir_b)}
    with open(os.path.join(dir_b, mf.MANIFEST), "rb") as f:
        manifest_b = f.read()

    def swap():
        os.rename(dir_a, dir_a + ".moved")
        os.symlink(dir_b, dir_a)
    rc, out, err = cli_backup_stopped(a.name, dir_a, "backup:journal-saved", swap, host)
    assert rc == 0, err
    with open(os.path.join(dir_b, mf.MANIFEST), "rb") as f:
        assert f.read() == manifest_b
    assert {n: os.stat(os.path.join(dir_b, n)).st_mtime_ns for n in os.listdir(dir_b)} == \
        before_b
    moved = dir_a + ".moved"        # the backup went on in the directory it opened
    assert sorted(os.listdir(moved)) == sorted([mf.MANIFEST, mf.LOCK, "vda.0000.qcow2"])
    assert os.stat(os.path.join(moved, "vda.0000.qcow2")).st_mode & 0o777 == 0o600


# --- 9. metadata naming someone else's socket ----------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("state", ["ready", "creating"])
def test_forged_metadata_never_unlinks_a_socket_the_plugin_did_not_bind(make_vm, host, state):
    """A LIVE record naming another program's socket (listening, or dead) in the
    plugin's own socket directory or elsewhere: the next call repairs the record
    and leaves the sockets."""
    import socket as socketlib

    import libvirt
    import libvirt_fleece as lf
    from libvirt_fleece import config, metadata
    t = make_vm(disks=1, size_mib=64)
    sock_dir = config.load().socket_dir
    os.makedirs(sock_dir, exist_ok=True)
    paths = [os.path.join(host.base, "someone-else.sock"),
             os.path.join(sock_dir, f"{t.name}-foreign.sock")]
    listeners = []
    try:
        for i, path in enumerate(paths):
            s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
            s.bind(path)
            if i == 0:
                s.listen(1)
                listeners.append(s)
            else:
                s.close()       # dead: only the file is left
            doc = (f"<state version='1'><server state='{state}' type='unix' socket='{path}' "
                   f"fdname='fleece-nbd'/></state>")
            t.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, doc, metadata.NS_PREFIX,
                              metadata.NS_URI, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            lf.blockSnapshotList(t.dom)
            lf.repair(t.dom)
            assert os.path.exists(path), f"{path} was unlinked because metadata named it"
    finally:
        for s in listeners:
            s.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
