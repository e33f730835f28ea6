# SPDX-License-Identifier: LGPL-2.1-or-later
"""One call's hold on a domain: validation, the lock, the state and saving it.

:func:`open_session` checks the domain, takes the domain's lock and loads the
state from the metadata (an unusable document gives an empty state, marked
``repaired``). It does nothing else: public calls open theirs through
:func:`.calls.session`, which first finishes interrupted work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterator

import libvirt

from . import config, errors, lock, metadata, virt
from .qemu import qmp

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
        if sess.repaired:
            sess.report.append("the stored metadata was unusable and was rebuilt")
        yield sess
