"""The task kind of ``bench/failover.py``: count executions, so repeats show up."""

from __future__ import annotations

import os
import time

from satellites import task


@task("bench.mark")
def mark(path: str, key: str, seconds: float = 0.0) -> str:
    """Sleep ``seconds``, append ``key`` to ``path`` (one line per execution), return ``key``."""
    if seconds:
        time.sleep(seconds)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    return key
