"""What the historian costs the bus, and how long the first history query waits after a busy spell.

One :class:`~orchester.LocalCluster` with a journal (two satellites of one worker each, like
``bench/throughput.py``), driven through :class:`~orchester.Client` with a window of no-op
tasks. Rounds alternate between two modes, in the same run:

* ``stopped``: the historian (the orchestrator's history process) is frozen with ``SIGSTOP``
  for the round: the bus as it would be without any history reading;
* ``running``: the historian runs as it does, reading what the journal gains every second.

For each mode, the bus's throughput (tasks/s, median of the rounds) and the ratio running /
stopped; and after each round, the time of the first ``history(limit=100)`` (after a
``stopped`` round the historian is woken first: that query waits for the whole round's
records, which is what a history query would cost if the index were read only when asked).

Run: ``python bench/historian.py [--n 20000] [--rounds 3] [--window 500] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # this folder is not a package of ours


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def historian_of(orchestrator: int, timeout: float = 30.0) -> int:
    """The pid of the orchestrator's historian (the child running ``orchester.journal.historian``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children(orchestrator):
            try:
                if b"orchester.journal.historian" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.1)
    raise RuntimeError("the orchestrator has no historian")


def windowed(client: Any, n: int, window: int) -> float:
    """Run ``n`` no-op tasks with at most ``window`` outstanding; tasks per second."""
    sent: deque[Any] = deque()
    i = done = 0
    t0 = time.perf_counter()
    while done < n:
        while i < n and len(sent) < window:
            sent.append(client.submit("echo", b""))
            i += 1
        sent.popleft().result(60)
        done += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="tasks per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    ap.add_argument("--window", type=int, default=500, help="outstanding tasks")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()

    from orchester import LocalCluster

    results: dict[str, list[float]] = {"running": [], "stopped": []}
    first: dict[str, list[float]] = {"running": [], "stopped": []}
    with tempfile.TemporaryDirectory(prefix="orchester-bench-historian-") as tmp:
        cluster = LocalCluster(satellites=2, workers=1, serve_args=["--journal", str(Path(tmp) / "j"),
                                                                    "--durability", "batch"]).start()
        try:
            assert cluster.orchestrator is not None
            historian = historian_of(cluster.orchestrator.pid)
            with cluster.client() as client:
                windowed(client, 2000, args.window)  # warm up
                client.history(limit=1, timeout=120)
                for r in range(args.rounds):
                    for mode in ("stopped", "running") if r % 2 == 0 else ("running", "stopped"):
                        if mode == "stopped":
                            os.kill(historian, signal.SIGSTOP)
                        try:
                            rate = windowed(client, args.n, args.window)
                        finally:
                            os.kill(historian, signal.SIGCONT)
                        t0 = time.perf_counter()
                        rows = client.history(limit=100, timeout=300)
                        waited = time.perf_counter() - t0
                        assert len(rows) == 100
                        results[mode].append(rate)
                        first[mode].append(waited * 1000)
                        print(f"round {r + 1} {mode:8s} {rate:8,.0f} tasks/s   first history query after it "
                              f"{waited * 1000:7.0f} ms", flush=True)
        finally:
            cluster.close()
    med = {m: statistics.median(v) for m, v in results.items()}
    ratio = med["running"] / med["stopped"]
    print(f"\nbus throughput, historian running / frozen: {med['running']:,.0f} / {med['stopped']:,.0f} tasks/s "
          f"= {ratio:.3f}x")
    print(f"first history query after {args.n:,} tasks: {statistics.median(first['running']):.0f} ms with the "
          f"historian keeping up, {statistics.median(first['stopped']):.0f} ms reading them all at the query")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "tasks_per_s": results, "first_query_ms": first,
                                         "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
