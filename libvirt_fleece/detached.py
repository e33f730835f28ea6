# SPDX-License-Identifier: LGPL-2.1-or-later
"""Starting the plugin's detached helper processes, one way for all of them.

Four processes outlive (or must survive) the call that starts them: the
backup guard (:mod:`.backup_guard`), the pause guard (:mod:`.pauseguard`),
the per-domain watcher (:mod:`.watcher`) and the hook's reconcile worker
(:mod:`.hook`). Each caller builds its own command line (those are what a
process started by an older version is run with, so they stay as they are);
:func:`start` gives every one the same detachment: a new session (no
controlling terminal, no signal from the caller's terminal or process
group), stdout and stderr on ``/dev/null``, and no descriptor but the ones
named in ``pass_fds``.
"""

from __future__ import annotations

import os
import subprocess
from typing import IO, Optional, Sequence, Union

# the directory holding the libvirt_fleece package (a checkout, site-packages)
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_Stdin = Union[int, IO[bytes], None]


def package_env() -> dict[str, str]:
    """This process's environment with :data:`PACKAGE_PARENT` first on ``PYTHONPATH``,
    so that a child ``python -m libvirt_fleece...`` imports this very copy of the
    package (a checkout or a worktree), not another one installed on the host."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env


def start(argv: Sequence[str], *, stdin: _Stdin = subprocess.DEVNULL,
          pass_fds: Sequence[int] = (), cwd: Optional[str] = None,
          package_path: bool = True) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached: own session, stdout/stderr on /dev/null, all
    descriptors closed but ``pass_fds``; ``stdin`` /dev/null unless given (a
    guard gets ``subprocess.PIPE``, its line to the caller).

    ``package_path``: run it with :func:`package_env` (for ``python -m`` or
    ``-c`` commands of this package); False keeps the caller's environment as it
    is (the hook's worker runs ``python -I``, which ignores ``PYTHONPATH``).
    ``cwd``: the child's working directory (default: the caller's).
    Not waited for: the caller keeps the Popen (or drops it; it is reaped by
    :mod:`subprocess`). Raises OSError when it cannot be started."""
    return subprocess.Popen(
        list(argv), stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True, pass_fds=tuple(pass_fds), cwd=cwd,
        env=package_env() if package_path else None)
