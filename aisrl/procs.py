"""Child processes that die with their parent, even when the parent is SIGKILLed.

`die_with_parent(sig)` is a Popen `preexec_fn`: in the forked child, before exec, it asks Linux
(prctl PR_SET_PDEATHSIG) to send `sig` to the child when the thread that forked it ends, and
sends it at once if that parent is already gone. Elsewhere than Linux it does nothing (the
supervisor's orderly stop still applies). Fork from a thread that lives as long as the parent
(the main thread): the signal follows the forking thread, not the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A preexec_fn that ties the child's life to this process's (None where prctl does not exist)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:  # pragma: no cover - prctl cannot fail here
            os._exit(127)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), sig)

    return preexec
