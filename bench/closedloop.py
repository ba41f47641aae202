"""The closed loop the throughput benchmarks share: echo tasks with a window in flight.

Imported by the scripts beside it (``journal.py``, ``metrics.py``, ``pair.py``, ``security.py``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any


def echo_rate(client: Any, n: int, window: int, payload: Any) -> float:
    """Echo tasks per second through ``client``, ``window`` in flight, after 200 to warm up."""
    for f in [client.submit("echo", payload) for _ in range(200)]:
        f.result(60)
    pending: deque[Any] = deque()
    t0 = time.perf_counter()
    for _ in range(n):
        pending.append(client.submit("echo", payload))
        if len(pending) >= window:
            pending.popleft().result(60)
    for f in pending:
        f.result(60)
    return n / (time.perf_counter() - t0)
