"""Where a task's CPU goes: CPU time per task of every process on the path, measured from /proc.

Runs a LocalCluster (2 satellites × 1 worker) and a windowed stream of ``echo``
tasks, then prints the user+system CPU each process spent per task: the
client (this process), the orchestrator, each satellite's I/O loop and its
worker processes. On a 2-core machine the sum bounds throughput at about
``2 / sum`` tasks per second, which is what this benchmark is for: naming
exactly what holds throughput back.

The baseline, run in the same process after it: the one-hop Python proxy of ``bench/throughput.py`` (a
ROUTER↔DEALER proxy and two echo servers) on the same stream, measured the same way. Beside the CPU of
each, the share of the machine's cores busy during the run (``/proc/stat``): a pipeline whose processes
wait on each other leaves cores idle, and runs slower than its CPU per task allows.

Beside the CPU, each process's minor page faults per task: memory touched for the first time. With
large payloads, a process that keeps what it received for a while (results kept for a resend or a
fetch) takes each new message into fresh pages, a fault per 4 KiB (``--resend-memory`` sets what a
satellite keeps).

With ``--durability batch`` (or ``full``, ``off``) the orchestrator journals to a temporary folder: the
journal's threads are counted in the orchestrator's CPU.

Run: ``python bench/cpu_per_task.py [--n 20000] [--payload 0|1048576] [--window 500] [--kind echo|echo.inline]
[--durability batch] [--resend-memory 16M] [--no-baseline]``
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from orchester import LocalCluster

TICK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> tuple[int, int]:
    """Jiffies of all cores since boot: (all, idle or waiting for I/O)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


def busy_since(mark: tuple[int, int]) -> float:
    """The share of the machine's cores busy since ``mark`` (:func:`machine`)."""
    total, idle = machine()
    return 1.0 - (idle - mark[1]) / max(1, total - mark[0])


Rows = list[tuple[str, float, int]]


def measured(procs: dict[str, int], stream: Callable[[], object]) -> tuple[Rows, float, float]:
    """Run ``stream``; the CPU seconds and page faults of this process and of ``procs`` (name: pid) it took,
    its seconds, and the share of the machine's cores busy meanwhile."""
    before = {name: usage(pid) for name, pid in procs.items()}
    me0, faults0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mark, t0 = machine(), time.perf_counter()
    stream()
    elapsed, busy = time.perf_counter() - t0, busy_since(mark)
    rows = [("client (this process)", time.process_time() - me0,
             resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)]
    for name, pid in procs.items():
        sec, faults = usage(pid)
        rows.append((name, sec - before[name][0], faults - before[name][1]))
    return rows, elapsed, busy


def proxy_baseline(n: int, window: int, payload: int) -> tuple[Rows, float, float]:
    """The same stream through the one-hop proxy of ``bench/throughput.py``: (rows, seconds, busy share)."""
    if HERE not in sys.path:
        sys.path.append(HERE)  # (last: bench/*.py never shadows a package)
    from throughput import RawSystem

    system = RawSystem("proxy", True)
    try:
        make: Callable[[int], list[Any]] = (lambda i: [np.zeros(payload // 8)]) if payload else (lambda i: [b"x" * 16])
        procs = dict(zip(("proxy", "echo server 1", "echo server 2"), (p.pid for p in system.procs), strict=True))
        return measured(procs, lambda: system.roundtrips(n, make, window))
    finally:
        system.close()


def report(title: str, n: int, rows: Rows, elapsed: float, busy: float) -> float:
    """Print one system's figures; returns its CPU seconds per task."""
    print(f"{title}: {n / elapsed:.0f} tasks/s, {busy * 100:.0f} % of the machine's {os.cpu_count()} cores busy")
    total = 0.0
    for name, sec, faults in rows:
        if sec > 0:
            total += sec
            print(f"  {name:28s} {sec / n * 1e6:8.1f} µs CPU per task  {faults / n:7.1f} page faults")
    print(f"  {'total':28s} {total / n * 1e6:8.1f} µs CPU per task "
          f"({os.cpu_count()} cores: at most {(os.cpu_count() or 1) * n / total:.0f} tasks/s)")
    return total / n


def usage(pid: int) -> tuple[float, int]:
    """User + system CPU seconds and minor page faults of ``pid`` (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[7])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--payload", type=int, default=0, help="bytes of float64 array per task (0: an int)")
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--kind", default="echo", choices=("echo", "echo.inline"),
                    help="echo (a worker process) or echo.inline (the satellite's thread)")
    ap.add_argument("--resend-memory", default=None, help="the satellites' --resend-memory (default: their own)")
    ap.add_argument("--durability", choices=("full", "batch", "off"), default=None,
                    help="journal to a temporary folder with this durability (default: no journal)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-hop proxy run")
    args = ap.parse_args(argv)
    if args.n < 1 or args.window < 1 or args.payload < 0 or args.prefetch < 0:
        ap.error("--n and --window must be at least 1, --payload and --prefetch at least 0")
    arg = np.zeros(args.payload // 8) if args.payload else 1
    extra = ["--resend-memory", args.resend_memory] if args.resend_memory else []
    with tempfile.TemporaryDirectory(prefix="orchester-cpu-") as tmp, LocalCluster(
            satellites=0, workers=1, prefetch=args.prefetch, log_level="ERROR",
            serve_args=["--journal", f"{tmp}/journal", "--durability", args.durability] if args.durability else ()
    ) as cluster:
        for _ in range(2):
            cluster.add_satellite(extra=extra)
        cluster.wait_for_satellites(2)
        client = cluster.client()
        for f in [client.submit(args.kind, arg) for _ in range(200)]:
            f.result(60)
        assert cluster.orchestrator is not None
        procs = {"orchestrator": cluster.orchestrator.pid}
        for i, sat in enumerate(cluster.satellites):
            procs[f"satellite {i} I/O"] = sat.pid
            for j, pid in enumerate(descendants(sat.pid)):
                procs[f"satellite {i} child {j}"] = pid

        def stream() -> None:
            window: deque[Any] = deque()
            for _ in range(args.n):
                window.append(client.submit(args.kind, arg))
                if len(window) >= args.window:
                    window.popleft().result(60)
            for f in window:
                f.result(60)

        rows, elapsed, busy = measured(procs, stream)
    journal = f", {args.durability} journal" if args.durability else ""
    ours = report(f"{args.n} {args.kind} tasks, payload {args.payload} B{journal}", args.n, rows, elapsed, busy)
    if args.no_baseline:
        return 0
    base_rows, base_elapsed, base_busy = proxy_baseline(args.n, args.window, args.payload)
    base = report("the one-hop proxy, the same stream", args.n, base_rows, base_elapsed, base_busy)
    print(f"against the proxy: {base_elapsed / elapsed:.2f}× its tasks/s; {ours / base:.2f}× its CPU per task; "
          f"{busy * 100:.0f} % of the cores busy against its {base_busy * 100:.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
