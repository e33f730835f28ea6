# SPDX-License-Identifier: LGPL-2.1-or-later
"""The common part of BlockSnapshot and BlockCheckpoint: a handle by name."""

from __future__ import annotations

import libvirt


class NamedHandle:
    """A named object of a domain; it holds no state, every call reads the domain's."""

    def __init__(self, dom: libvirt.virDomain, name: str) -> None:
        self._dom = dom
        self._name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} of {self._dom.name()!r}>"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other._name == self._name
                and other._dom.UUIDString() == self._dom.UUIDString())

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._name))

    def getName(self) -> str:
        return self._name

    def getDomain(self) -> libvirt.virDomain:
        return self._dom
