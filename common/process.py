"""Process helpers shared by the launcher and the peer fork server."""

from __future__ import annotations

import ctypes
import os
import signal

# A role is one single-threaded process among many on the same cores: BLAS threads only compete
# with the other roles. Measured on the 2-core test machine with a run going on: one Anderson step
# of the coordinator (20 x 62 400 doubles) 15 ms with OpenBLAS's default threads, 0.3 ms with one.
SINGLE_THREADED_BLAS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def role_environment(base: dict | None = None) -> dict:
    """The environment of a role process: ``base`` (default: this process's) with one BLAS thread
    unless the user set the thread counts."""
    env = dict(os.environ if base is None else base)
    for key, value in SINGLE_THREADED_BLAS.items():
        env.setdefault(key, value)
    return env


def use_single_threaded_blas() -> None:
    """For a role started by hand (``python -m p2pm <role>``): must run before numpy is imported."""
    for key, value in SINGLE_THREADED_BLAS.items():
        os.environ.setdefault(key, value)


def die_with_parent() -> None:
    """Ask the kernel to end this process when its parent dies (run in a child before exec or
    right after fork), so that a launcher killed outright leaves no role behind."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
