"""The task kinds of the topology harness and the benchmarks: work that takes a set time (slower on
slow satellites), and work that leaves a mark per execution (so repeats show up)."""

from __future__ import annotations

import os
import time

from satellites import task

#: A satellite's relative speed (1.0 normal, 0.25 four times slower), set by the harness.
SPEED_VARIABLE = "ORCHESTER_TOPOLOGY_SPEED"


@task("topo.work")
def work(duration: float, payload: bytes = b"") -> int:
    """Sleep ``duration / speed`` seconds (a stand-in for computing); return the payload size."""
    speed = float(os.environ.get(SPEED_VARIABLE, "1") or 1)
    time.sleep(max(0.0, float(duration)) / speed)
    return len(payload)


@task("topo.mark")
def mark(path: str, key: str, seconds: float = 0.0) -> str:
    """Sleep ``seconds``, append ``key`` to the file at ``path`` (one line per execution), return ``key``."""
    if seconds:
        time.sleep(seconds)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    return key
