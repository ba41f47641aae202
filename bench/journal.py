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

from closedloop import echo_rate  # bench/ is this script's folder, first on the path

from orchester import LocalCluster


def run(n: int, window: int, payload: bytes, serve_args: list[str]) -> float:
    """Tasks per second through a fresh cluster started with ``serve_args``."""
    with LocalCluster(satellites=2, workers=1, prefetch=8, log_level="ERROR", serve_args=serve_args) as cluster:
        return echo_rate(cluster.client(), n, window, payload)


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of a process (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def spill_peak(tasks: int, size: int, serve_args: list[str]) -> float:
    """Peak RSS (MB) of an orchestrator holding ``tasks`` queued tasks of ``size`` bytes (no satellite)."""
    with LocalCluster(satellites=0, log_level="ERROR", serve_args=serve_args) as cluster:
        client = cluster.client()
        payload = b"x" * size
        futures = []
        for i in range(tasks):
            futures.append(client.submit("echo", payload))
            if i % 1000 == 999:  # keep the client's own queue small
                futures[-1].accepted.wait(60)
        for f in futures:
            f.accepted.wait(60)
        time.sleep(0.5)
        assert cluster.orchestrator is not None
        return peak_rss_mb(cluster.orchestrator.pid)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--payload", type=int, default=100, help="bytes of payload per task")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the best of each is kept)")
    ap.add_argument("--spill-tasks", type=int, default=50_000, help="queued tasks for the spill figure (0: skip)")
    ap.add_argument("--spill-size", type=int, default=10_000, help="payload bytes of each queued task")
    args = ap.parse_args(argv)
    payload = b"x" * args.payload
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="orchester-bench-journal-") as tmp:
        for _ in range(args.rounds):  # interleaved rounds, best of each: the machine is noisy
            for name in ("no journal", "off", "batch", "full"):
                extra = [] if name == "no journal" else ["--journal", f"{tmp}/{name}-{_}", "--durability", name]
                results[name] = max(results.get(name, 0.0), run(args.n, args.window, payload, extra))
        peaks = {}
        if args.spill_tasks:
            for name, extra in (("journal, no spill", []), ("journal, spill 64 MB", ["--spill-bytes", str(64 << 20)])):
                peaks[name] = spill_peak(args.spill_tasks, args.spill_size,
                                         ["--journal", f"{tmp}/spill-{len(peaks)}", "--durability", "batch", *extra])
    base = results["no journal"]
    print(f"{args.n} echo tasks of {args.payload} B, window {args.window}:")
    for name, rate in results.items():
        target = "   (target >= 0.70)" if name == "batch" else ""
        print(f"  {name:12s} {rate:8.0f} tasks/s   {rate / base:5.2f}x{target}")
    if peaks:
        print(f"peak orchestrator RSS with {args.spill_tasks:,} queued tasks of {args.spill_size:,} B "
              f"({args.spill_tasks * args.spill_size / 2**20:,.0f} MB of payloads):")
        for name, mb in peaks.items():
            print(f"  {name:22s} {mb:8.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
