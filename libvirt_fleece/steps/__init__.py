# SPDX-License-Identifier: LGPL-2.1-or-later
"""The internal steps behind the public calls.

Every function here takes an open :class:`..session.Session` and never opens
one; the public modules (:mod:`..snapshots`, :mod:`..exports`,
:mod:`..checkpoints`, :mod:`..calls`) open the session, finish interrupted
work and call these. Layered bottom-up: :mod:`.livedisks`, :mod:`.tls`,
:mod:`.checkpoint`, :mod:`.export`, :mod:`.snapshot`, then :mod:`.health`,
:mod:`.orphans`, :mod:`.unplug`, and :mod:`.reconcile` on top.
"""
