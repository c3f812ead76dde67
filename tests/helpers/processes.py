"""Starting the package's own processes from a test: the repository root to run them in, and their ``preexec_fn``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

#: The repository's root: the working directory of the processes the tests start.
ROOT = Path(__file__).resolve().parent.parent.parent


def die_with_parent() -> None:
    """``preexec_fn`` for the processes a test starts: the kernel sends them SIGTERM when the test process dies,
    so a killed test run (a timeout, Ctrl-C twice) leaves no daemon, recorder or viewer behind (Linux; elsewhere a
    no-op). Popen must then be called from the main thread, whose exit is the parent's death."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
