# SPDX-License-Identifier: LGPL-2.1-or-later
"""Finishing or undoing an interrupted backup, as its journal says.

A run writes a journal (the root-only record in the state directory first, a
copy in the backup directory as a hint) before it creates anything; the run
itself on errors, its detached guard when it was killed, and the next run
into the directory all clean up through :func:`recover`.
"""

from __future__ import annotations

import logging
from typing import Optional

import libvirt
from lxml import etree

from .. import checkpoints, errors, snapshots, virt
from . import manifest as mf, state as backup_state
from .dir import BackupDir
from .manifest import Journal

log = logging.getLogger(__name__)


def teardown(dom: libvirt.virDomain, name: str) -> None:
    """Stop the snapshot's exports and delete it; tolerate it being gone."""
    try:
        snapshots.BlockSnapshot(dom, name).delete(        # one call, not lookup + delete
            snapshots.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    except errors.NotFound:
        pass


def cleanup(dom: Optional[libvirt.virDomain], bdir: BackupDir, journal: Journal,
            delete_checkpoint: bool) -> None:
    """Undo what the journal names: snapshot (with exports), checkpoint, .part files."""
    if dom is not None and dom.isActive():
        if journal.snapshot:
            teardown(dom, journal.snapshot)
        if delete_checkpoint and journal.checkpoint:
            try:
                cp = checkpoints.lookup(dom, journal.checkpoint)
                created = etree.fromstring(cp.getXMLDesc().encode()).findtext("creationTime")
                if int(created or 0) >= int(journal.started):   # made by that run, not before
                    cp.delete()
                    log.info("deleted checkpoint %s of the unfinished backup",
                             journal.checkpoint)
            except errors.NotFound:
                pass
    elif journal.checkpoint and delete_checkpoint:
        log.warning("domain is not running: checkpoint %s of the unfinished backup was not "
                    "deleted (harmless; delete it with blockcheckpoint-delete)",
                    journal.checkpoint)
    for part in journal.parts:      # .part names (Journal.from_json), in this directory
        bdir.unlink(part)
    bdir.fsync()
    remove_journal(bdir)


def recover(directory: "str | BackupDir",
            conn: Optional[libvirt.virConnect] = None) -> list[str]:
    """Finish or undo what an interrupted backup into ``directory`` left; the caller
    holds the directory's lock (or is its guard). Returns what was done.

    Snapshots, checkpoints and domains are acted on only as the root-only record
    in the state directory says (:mod:`.state`); the directory's journal is
    a hint, ignored with a warning where the record does not agree."""
    with mf._opened(directory) as bdir:
        return _recover(bdir, conn)


def _trusted_journal(bdir: BackupDir) -> Optional[Journal]:
    """The journal to act on: the state directory's record; without one, only the
    ``.part`` files the directory's journal names (files of this directory, by
    their checked names), nothing of any domain."""
    hint = Journal.load(bdir)
    record = backup_state.load(bdir)
    if record is None:
        if hint is not None and (hint.domain_uuid or hint.snapshot or hint.checkpoint):
            log.warning("%s names snapshot %s and checkpoint %s of domain %s, but no backup "
                        "run of this host recorded them; ignoring them (removing only the "
                        ".part files it names)", bdir.show(mf.JOURNAL), hint.snapshot,
                        hint.checkpoint, hint.domain_uuid or "?")
        return Journal(uri="", domain_uuid="", parts=hint.parts) if hint is not None else None
    if hint != record:
        log.warning("%s does not match the record of the run that wrote it; ignoring it",
                    bdir.show(mf.JOURNAL))
    return record


def _recover(bdir: BackupDir, conn: Optional[libvirt.virConnect]) -> list[str]:
    done: list[str] = []
    for entry in bdir.listdir():
        if mf.TMP_RE.match(entry):
            bdir.unlink(entry)
            done.append(f"removed temporary file {entry}")
    journal = _trusted_journal(bdir)
    if journal is None:
        return done
    manifest = mf.load(bdir)
    point = next((p for p in manifest.points if p.checkpoint == journal.checkpoint), None) \
        if manifest is not None and journal.checkpoint else None
    dom = None
    if journal.domain_uuid:
        try:
            if conn is None:
                conn = virt.open_connection(journal.uri or None)
            dom = conn.lookupByUUIDString(journal.domain_uuid)
        except libvirt.libvirtError:
            dom = None
        except errors.Error as e:
            log.warning("cannot reach libvirt to clean up domain %s: %s", journal.domain_uuid, e)
    if point is not None:       # the manifest lists it: roll forward
        for disk in point.disks:
            if bdir.exists(disk.file + ".part") and not bdir.exists(disk.file):
                bdir.rename(disk.file + ".part", disk.file)
        bdir.fsync()
        if dom is not None and dom.isActive() and journal.snapshot:
            teardown(dom, journal.snapshot)
        remove_journal(bdir)
        done.append(f"completed point {point.index}")
        return done
    cleanup(dom, bdir, journal, delete_checkpoint=True)
    done.append(f"removed the unfinished backup {journal.snapshot}")
    log.warning("cleaned up the unfinished backup %s in %s", journal.snapshot, bdir.path)
    return done


def save_journal(bdir: BackupDir, journal: Journal) -> None:
    """The record in the state directory first (authoritative), then the
    directory's copy (a hint for people and older versions). Raises OSError."""
    backup_state.save(bdir, journal)
    journal.save(bdir)


def remove_journal(bdir: BackupDir) -> None:
    Journal.remove(bdir)
    backup_state.remove(bdir)
