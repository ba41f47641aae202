"""The task kind the topology harness runs: work that takes a set time, slower on slow satellites."""

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
