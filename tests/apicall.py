# SPDX-License-Identifier: LGPL-2.1-or-later
"""Run one API call in a separate process (for kill-point and concurrency tests).

usage: python apicall.py DOMAIN OP [ARG]
  OP: create XML | create-cp XML | delete NAME | checkpoint-delete NAME |
      export-start XML | export-stop XML | loop SECONDS PREFIX
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import libvirt  # noqa: E402

import libvirt_fleece as lf  # noqa: E402


def main(argv):
    conn = libvirt.open("qemu:///system")
    dom = conn.lookupByName(argv[0])
    op = argv[1]
    if op == "create":
        lf.blockSnapshotCreateXML(dom, argv[2])
    elif op == "create-cp":
        lf.blockSnapshotCreateXML(dom, argv[2], lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT)
    elif op == "checkpoint-delete":
        lf.blockCheckpointLookupByName(dom, argv[2]).delete()
    elif op == "delete":
        lf.blockSnapshotLookupByName(dom, argv[2]).delete(
            lf.VIR_DOMAIN_BLOCK_SNAPSHOT_DELETE_STOP_EXPORTS)
    elif op == "export-start":
        lf.blockExportStart(dom, argv[2])
    elif op == "export-stop":
        lf.blockExportStop(dom, argv[2])
    elif op in ("loop", "loop-cp"):
        # create, export, stop, delete snapshots (loop-cp: each with a checkpoint, exported
        # with the previous one, which is then deleted) until the time is up; count outcomes
        deadline = time.monotonic() + float(argv[2])
        prefix = argv[3]
        with_cp = op == "loop-cp"
        ok, failed, i, prev = 0, {}, 0, None
        while time.monotonic() < deadline:
            name = f"{prefix}-{i}"
            i += 1
            try:
                snap = lf.blockSnapshotCreateXML(
                    dom, f"<domainblocksnapshot><name>{name}</name></domainblocksnapshot>",
                    lf.VIR_DOMAIN_BLOCK_SNAPSHOT_CREATE_CHECKPOINT if with_cp else 0)
                cp = f" checkpoint='{prev}'" if with_cp and prev else ""
                lf.blockExportStart(dom, f"<domainblockexport type='nbd'><disk name='vda' "
                                         f"snapshot='{name}'{cp}/></domainblockexport>")
                lf.blockExportStop(dom, f"<domainblockexport type='nbd'><disk name='vda' "
                                        f"snapshot='{name}'/></domainblockexport>")
                while True:
                    try:
                        snap.delete()
                        break
                    except lf.OperationInvalid as e:
                        # a newer snapshot of another process sits on top of ours
                        if "first" not in str(e):
                            raise
                        key = "delete-order (retried)"
                        failed[key] = failed.get(key, 0) + 1
                        time.sleep(0.05)
                if with_cp:
                    if prev:
                        lf.blockCheckpointLookupByName(dom, prev).delete()
                    prev = name
                ok += 1
            except lf.Error as e:
                failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
                print(f"{name}: {e}", file=sys.stderr)
        if prev:
            lf.blockCheckpointLookupByName(dom, prev).delete()
        print(f"{ok} {sum(failed.values())} {failed}")
    else:
        raise SystemExit(f"unknown op {op}")


if __name__ == "__main__":
    main(sys.argv[1:])
