# SPDX-License-Identifier: LGPL-2.1-or-later
"""The qemu block layer, as the plugin drives it through libvirt's monitor.

:mod:`.qmp` is the transport (``virDomainQemuMonitorCommand``, job settling,
per-session query caching); :mod:`.names` builds every node, bitmap, export,
job and fdset name the plugin gives qemu; :mod:`.blockgraph` and
:mod:`.bitmaps` are the graph and bitmap steps; :mod:`.chains` reads a disk's
backing chain and its bitmaps; :mod:`.readpath` picks how exports read a
snapshot on this qemu; :mod:`.tools` runs ``qemu-img`` and ``qemu-nbd``.
Nothing here knows the plugin's records or sessions.
"""
