"""Rate-limited warnings, so a peer sending garbage cannot flood the log."""

from __future__ import annotations

import logging
import time
from typing import Any

_window: dict[str, list[float]] = {}

#: At most this many warnings per logger per second; the rest are counted and summarised.
MAX_PER_SECOND = 10


def warn_limited(log: logging.Logger, msg: str, *args: Any) -> None:
    """Log a warning unless ``log`` already logged ``MAX_PER_SECOND`` of them in the last second."""
    log_limited(log, logging.WARNING, msg, *args)


def log_limited(log: logging.Logger, level: int, msg: str, *args: Any) -> None:
    """Log at ``level`` unless ``log`` already logged ``MAX_PER_SECOND`` limited lines in the last
    second (for lines a peer can cause: a flood of them is summarised, not written)."""
    if not log.isEnabledFor(level):
        return
    now = time.monotonic()
    state = _window.setdefault(log.name, [now, 0.0, 0.0])  # window start, logged, suppressed
    if now - state[0] >= 1.0:
        if state[2]:
            log.warning("... %d similar lines suppressed in the last second", int(state[2]))
        state[:] = [now, 0.0, 0.0]
    if state[1] < MAX_PER_SECOND:
        state[1] += 1
        log.log(level, msg, *args)
    else:
        state[2] += 1
