"""Process helpers shared by the launcher and the peer fork server."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent() -> None:
    """Ask the kernel to end this process when its parent dies (run in a child before exec or
    right after fork), so that a launcher killed outright leaves no role behind."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
