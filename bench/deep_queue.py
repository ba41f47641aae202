"""A deep queue in the orchestrator's policy core: memory per queued task, submission cost and the longest
pause, at 10⁴, 10⁵ and 10⁶ queued tasks.

In-process, no socket: N no-op ``echo`` tasks (no payload beyond their one-argument body) are submitted
to a core with no satellite, so every one of them waits in the queue, then a satellite registers and
the queue drains through it. Measured for each N:

* **memory per queued task**: the growth of the process's resident memory (``/proc/self/statm``) over
  the submissions, divided by N;
* **submission cost**: CPU seconds per task over the first and the last tenth of the submissions (a
  cost that grows with the depth shows as a ratio above 1);
* **the longest pause**: the longest run of Python's cyclic garbage collector during the run
  (``gc.callbacks``), and the longest single housekeeping call (the loop's wake-up) with N queued;
* **drain**: tasks per second through one satellite of 1,000 slots, from N queued.

Run: ``python bench/deep_queue.py [--sizes 10000,100000,1000000] [--json F]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import msgpack  # noqa: E402

from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.server.core import Orchestrator  # noqa: E402
from orchester.server.heap import HeapKeeper  # noqa: E402
from serializers import encode, pack  # noqa: E402
from serializers import protocol as P  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class GcWatch:
    """The longest run of the cyclic garbage collector while installed."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.runs = 0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.runs += 1
            self.longest = max(self.longest, time.perf_counter() - self._t0)


def one(n: int, keep_heap: bool) -> dict[str, float]:
    """The figures for ``n`` queued tasks (``keep_heap``: with the broker's :class:`HeapKeeper`, on the
    process clock, as the broker runs it after each wake-up)."""
    gc.collect()
    core = Orchestrator(OrchestratorConfig(max_client_tasks=10**8, max_client_bytes=2**42, max_queue=10**8,
                                           result_retention=10**8), 0.0)
    heap = HeapKeeper(time.monotonic()) if keep_heap else None
    watch = GcWatch()
    gc.callbacks.append(watch)
    try:
        _, body = encode([[1], {}])
        tenth = max(1, n // 10)
        before = rss()
        cpu: list[float] = []
        t0 = time.process_time()
        for i in range(n):
            core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack({"id": f"t{i:09d}", "k": "echo", "c": "msgpack"}),
                              *body], 0.0)
            if i % 256 == 255:  # a wake-up of the broker: a batch of messages, then housekeeping (the acks)
                core.housekeeping(0.0)
                core.outbox.take_messages()
                if heap is not None:
                    heap.tick(time.monotonic())
            if (i + 1) % tenth == 0:
                cpu.append(time.process_time() - t0)
                t0 = time.process_time()
        core.housekeeping(0.0)
        core.outbox.take_messages()
        grown = rss() - before
        t = time.perf_counter()
        core.housekeeping(1.0)
        housekeeping = time.perf_counter() - t
        core.handle("s", [b"sat", P.SIGNATURE, P.REGISTER, pack({"sid": "s1", "slots": 1000, "kinds": ["echo"]})],
                    1.0)
        t = time.perf_counter()
        done = 0
        now = 1.0
        longest_wake = housekeeping
        while done < n:
            w = time.perf_counter()
            core.housekeeping(now)
            if heap is not None:
                heap.tick(time.monotonic())
            longest_wake = max(longest_wake, time.perf_counter() - w)
            for _, frames, _ in core.outbox.take_messages():
                if frames[2] == P.DISPATCH:
                    order = msgpack.unpackb(frames[3])
                    core.handle("s", [b"sat", P.SIGNATURE, P.DONE, pack(
                        {"id": order["id"], "a": order["a"], "ok": True, "sat": "s1", "c": "msgpack"}), b"\x01"], now)
                    done += 1
            now += 0.001
        drain = n / (time.perf_counter() - t)
    finally:
        gc.callbacks.remove(watch)
        if heap is not None:
            heap.release()
        del core
        gc.collect()
    return {"tasks": n, "heap_keeper": keep_heap, "bytes_per_queued_task": grown / n,
            "submit_us_first_tenth": cpu[0] / tenth * 1e6, "submit_us_last_tenth": cpu[-1] / tenth * 1e6,
            "longest_gc_ms": watch.longest * 1000, "gc_runs": watch.runs,
            "housekeeping_ms_at_depth": housekeeping * 1000, "longest_wake_ms": longest_wake * 1000,
            "drain_tasks_per_s": drain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--without-keeper", action="store_true",
                    help="also run each size without the heap keeper (Python's collector as it comes)")
    args = ap.parse_args()
    rows = []
    for n in (int(n) for n in args.sizes.split(",") if n):
        if args.without_keeper:
            rows.append(one(n, False))
        rows.append(one(n, True))
    print("a deep queue in the policy core (in-process, no socket), no-op tasks")
    print(f"{'queued':>10} {'keeper':>6} {'bytes/task':>10} {'submit µs (first/last tenth)':>28} {'longest GC ms':>13} "
          f"{'GC runs':>7} {'wake ms at depth':>16} {'longest wake ms':>15} {'drain/s':>8}")
    for r in rows:
        print(f"{r['tasks']:>10,} {'yes' if r['heap_keeper'] else 'no':>6} {r['bytes_per_queued_task']:>10,.0f} "
              f"{r['submit_us_first_tenth']:>13.1f} / {r['submit_us_last_tenth']:<12.1f} "
              f"{r['longest_gc_ms']:>13.1f} {r['gc_runs']:>7,} {r['housekeeping_ms_at_depth']:>16.2f} "
              f"{r['longest_wake_ms']:>15.1f} {r['drain_tasks_per_s']:>8,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
