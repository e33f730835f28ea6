# SPDX-License-Identifier: LGPL-2.1-or-later
"""``python -m libvirt_fleece.cli``."""

import sys

from .commands import main

sys.exit(main())
