"""Journal benchmark: throughput with durability full, batch and off, against no journal.

Each configuration is a fresh local cluster (2 satellites × 1 worker) with a fresh journal
folder; a client keeps ``--window`` tasks in flight and each task is acknowledged only when
its configuration says so. Printed as ratios against "no journal" measured in the same run
(target: batch >= 0.7x).

Run: ``python bench/journal.py [--n 10000] [--window 500] [--payload 100]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import deque

from orchester import LocalCluster


def run(n: int, window: int, payload: bytes, serve_args: list[str]) -> float:
    """Tasks per second through a fresh cluster started with ``serve_args``."""
    with LocalCluster(satellites=2, workers=1, prefetch=8, log_level="ERROR", serve_args=serve_args) as cluster:
        client = cluster.client()
        for f in [client.submit("echo", payload) for _ in range(200)]:
            f.result(60)
        t0 = time.perf_counter()
        pending: deque = deque()
        for _ in range(n):
            pending.append(client.submit("echo", payload))
            if len(pending) >= window:
                pending.popleft().result(60)
        for f in pending:
            f.result(60)
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--payload", type=int, default=100, help="bytes of payload per task")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the best of each is kept)")
    args = ap.parse_args(argv)
    payload = b"x" * args.payload
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="orchester-bench-journal-") as tmp:
        for _ in range(args.rounds):  # interleaved rounds, best of each: the machine is noisy
            for name in ("no journal", "off", "batch", "full"):
                extra = [] if name == "no journal" else ["--journal", f"{tmp}/{name}-{_}", "--durability", name]
                results[name] = max(results.get(name, 0.0), run(args.n, args.window, payload, extra))
    base = results["no journal"]
    print(f"{args.n} echo tasks of {args.payload} B, window {args.window}:")
    for name, rate in results.items():
        target = "   (target >= 0.70)" if name == "batch" else ""
        print(f"  {name:12s} {rate:8.0f} tasks/s   {rate / base:5.2f}x{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
