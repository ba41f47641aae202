"""A map over a million no-op tasks on a real bus: memory per queued task in the orchestrator, per pending
future in the client, and submission cost by depth.

A :class:`~orchester.LocalCluster` with no satellite at first (``--max-client-tasks`` and ``--max-queue``
raised so that the whole map may wait at once), a :class:`~orchester.Client` whose ``map`` (``window=None``:
every item at once) runs in a thread of this process. When the orchestrator's queue holds all N tasks:

* **orchestrator bytes per queued task**: its resident memory's growth over the submissions, divided by N;
* **client bytes per pending future**: this process's growth over the same time, divided by N (the futures,
  their entries kept to resend after a failover, the map's own list);
* **submission µs per task**: from the map's start until the orchestrator had acknowledged every task,
  divided by N (the client's encoding and the orchestrator's handling, one after the other's output);

then two satellites (``echo.inline``) join and the map drains: **drain tasks/s**. Run at 10,000 as well,
in the same run: the ratio says whether a task costs more when a million wait.

Run: ``python bench/map_million.py [--sizes 10000,1000000] [--json F]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

from orchester import LocalCluster  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int | None = None) -> int:
    """Resident bytes of a process (this one by default)."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def one(n: int) -> dict[str, float]:
    """The figures for a map of ``n`` no-op tasks."""
    serve = ["--max-client-tasks", str(2 * n + 10), "--max-queue", str(2 * n + 10), "--max-client-bytes", str(1 << 40),
             "--result-retention", "1000"]
    with LocalCluster(satellites=0, workers=1, prefetch=64, serve_args=serve, log_level="ERROR") as cluster:
        assert cluster.orchestrator is not None
        opid = cluster.orchestrator.pid
        client = cluster.client()
        client.status()
        gc.collect()
        o0, c0 = rss(opid), rss()
        out: dict[str, Any] = {}

        def consume() -> None:
            total = 0
            for value in client.map("echo.inline", range(n), window=None, timeout=3600):
                total += 1 if value is not None else 0
            out["results"] = total

        t0 = time.perf_counter()
        runner = threading.Thread(target=consume, daemon=True)
        runner.start()
        while True:  # until every task is acknowledged and queued
            time.sleep(0.2)
            queue = client.status(timeout=120).get("queue", {})
            if int(queue.get("tasks", 0)) >= n:
                break
        submitted = time.perf_counter() - t0
        o1, c1 = rss(opid), rss()
        t1 = time.perf_counter()
        for _ in range(2):
            cluster.add_satellite(workers=1)
        runner.join(3600)
        drain = n / (time.perf_counter() - t1)
        assert out.get("results") == n, f"{out.get('results')} of {n} results"
    return {"tasks": n, "orchestrator_bytes_per_task": (o1 - o0) / n, "client_bytes_per_future": (c1 - c0) / n,
            "submit_us_per_task": submitted / n * 1e6, "drain_per_s": drain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    rows = [one(int(n)) for n in args.sizes.split(",") if n]
    print("a map of no-op tasks (echo.inline), all queued before two satellites join")
    print(f"{'tasks':>10} {'orchestrator B/task':>20} {'client B/future':>16} {'submit µs/task':>15} {'drain/s':>9}")
    for r in rows:
        print(f"{r['tasks']:>10,} {r['orchestrator_bytes_per_task']:>20,.0f} {r['client_bytes_per_future']:>16,.0f} "
              f"{r['submit_us_per_task']:>15.1f} {r['drain_per_s']:>9,.0f}")
    if len(rows) > 1:
        print(f"submission per task at {rows[-1]['tasks']:,} / at {rows[0]['tasks']:,}: "
              f"{rows[-1]['submit_us_per_task'] / rows[0]['submit_us_per_task']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
