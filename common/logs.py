"""The roles' logs: stdlib ``logging`` to stderr, one line per record with the time to the
millisecond, the level, the role and the process id, e.g.

    2026-11-30 07:41:02.115 INFO    coordinator pid 4211: listening on tcp://127.0.0.1:5555

The level comes from ``--log-level`` or, when that is not given, the environment variable
``P2PM_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR; default INFO). At DEBUG the socket shell traces
every message sent and received: type, iteration, peer and size. The JSON progress events that
the launcher reads go to stdout and are not log records.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_LEVEL = "P2PM_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_ROOT = "p2pm"


class LogLevelError(ValueError):
    pass


def parse_level(value: str | None) -> int:
    """A level name (any case) -> logging level; None or "" -> the environment's, else INFO."""
    name = (value or os.environ.get(ENV_LEVEL) or "INFO").strip().upper()
    if name not in LEVELS:
        source = "--log-level" if value else ENV_LEVEL
        raise LogLevelError(f"{source}: {name!r} is not a log level ({', '.join(LEVELS)})")
    return getattr(logging, name)


def setup_logging(role: str, level: str | None = None) -> logging.Logger:
    """Configure this process's log for ``role`` (once; a second call changes the role and level)
    and return the role's logger."""
    root = logging.getLogger(_ROOT)
    fmt = logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)-7s {role} pid %(process)d: %(message)s",
                            "%Y-%m-%d %H:%M:%S")
    handler = next((h for h in root.handlers if getattr(h, "_p2pm", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._p2pm = True
        root.addHandler(handler)
    handler.setFormatter(fmt)
    root.setLevel(parse_level(level))
    root.propagate = False
    return logging.getLogger(f"{_ROOT}.{role}")


def role_logger(role: str) -> logging.Logger:
    """The role's logger; sets up the process's log (level from P2PM_LOG_LEVEL) if nothing did."""
    if not any(getattr(h, "_p2pm", False) for h in logging.getLogger(_ROOT).handlers):
        try:
            setup_logging(role)
        except LogLevelError:
            setup_logging(role, "INFO")
    return logging.getLogger(f"{_ROOT}.{role}")
