# SPDX-License-Identifier: LGPL-2.1-or-later
"""One API call's hold on a domain: validation, the lock, the state, the cleanup.

Every public call runs inside :func:`open_session`, which checks the domain,
takes the domain's lock, loads the state from the metadata and first
finishes or undoes whatever an earlier, interrupted call left recorded as
in progress (:mod:`.reconcile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

import libvirt

from . import config, errors, lock, metadata, qmp, virt

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Session:
    dom: libvirt.virDomain
    cfg: config.Config
    state: metadata.State
    uuid: str
    repaired: bool = False      # the stored state was unusable and is being rebuilt
    report: list = dataclasses.field(default_factory=list)   # what reconciling changed

    def save(self) -> None:
        metadata.save(self.dom, self.state)


@contextlib.contextmanager
def open_session(dom: libvirt.virDomain) -> Iterator[Session]:
    """Validate ``dom``, lock it and yield its state.

    Raises InvalidArgument, ConnectionError, OperationInvalid (see
    :func:`.virt.check_domain`) and the errors of reading the metadata.
    """
    virt.check_domain(dom)
    cfg = config.load()
    uuid = virt.domain_uuid(dom)
    with lock.domain_lock(cfg, uuid, dom.name()), qmp.cached_queries(dom):
        try:
            sess = Session(dom=dom, cfg=cfg, state=metadata.load(dom), uuid=uuid)
        except errors.InvalidArgument as e:
            log.error("domain %s: the plugin's metadata is unusable (%s); rebuilding it from "
                      "qemu and the images", dom.name(), e)
            sess = Session(dom=dom, cfg=cfg, state=metadata.State(), uuid=uuid, repaired=True)
        from . import reconcile as _reconcile
        sess.report = _reconcile.finish_interrupted(sess)
        if sess.repaired:
            sess.report.insert(0, "the stored metadata was unusable and was rebuilt")
        yield sess
