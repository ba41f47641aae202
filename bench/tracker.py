"""Tracker benchmark: memory per tracked task, transitions per second, mass expiry.

Figures, each beside a baseline measured in the same run:

1. memory per in-flight task: the tracker's own state (state, lease, crash count, history of
   three transitions, one armed timer) for 1,000,000 tasks, and the orchestrator's whole
   record per task (task, queue and lease entries, header reference) for ``--full`` tasks
   driven through the real core; baseline: a ``transitions.Machine`` per task;
2. transitions per second through the compiled table (with history and timers) and through
   the whole orchestrator core; baseline: ``transitions.Machine`` triggers;
3. the cost of expiring 100,000 timeouts at once: the bare timer heap holding 1,000,000
   timers, and 100,000 queued tasks reaching their time-to-live in one housekeeping pass.

Run: ``python bench/tracker.py [--n 1000000] [--full 200000] [--baseline 20000]``
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
from typing import Any

# this file is named like the package it measures: keep its own folder off the import path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from transitions import Machine  # noqa: E402

from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.server.core import Orchestrator  # noqa: E402
from serializers import encode, pack  # noqa: E402
from serializers import protocol as P  # noqa: E402
from tracker import TASK_MACHINE, TaskEvent, TaskState, TimerWheel  # noqa: E402
from tracker.history import History  # noqa: E402


class TrackedTask:
    """Exactly the tracker's per-task state, as the orchestrator's Task record holds it."""

    __slots__ = ("state", "attempt", "crashes", "timer", "history")

    def __init__(self) -> None:
        self.state = TaskState.PENDING
        self.attempt = 0
        self.crashes = 0
        self.timer: Any = None
        self.history = History()


def measure(fn: Any) -> tuple[Any, int, float]:
    """Run ``fn``; return its value, the bytes it left allocated and its seconds."""
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    value = fn()
    dt = time.perf_counter() - t0
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, size, dt


def tracker_state(n: int) -> tuple[int, float, float, float]:
    """Track ``n`` tasks to RUNNING with an armed timer; return (bytes/task, transitions/s, pop s)."""
    heap: TimerWheel[str] = TimerWheel()  # one armed timer per task, as in the orchestrator
    nxt = TASK_MACHINE.next
    dispatch, start = TaskEvent.dispatch, TaskEvent.start
    ids = [f"c-{i}" for i in range(n)]  # task ids exist anyway: not counted

    def build() -> list[TrackedTask]:
        tasks = []
        for i in range(n):
            t = TrackedTask()
            t.history.add(1.0, t.state, 0)
            t.attempt = 1
            t.state = nxt(t.state, dispatch)
            t.history.add(2.0, t.state, 1, "sat-a")
            t.state = nxt(t.state, start)
            t.history.add(3.0, t.state, 1, "sat-a")
            t.timer = heap.schedule(100.0 + (i % 1000), ids[i], 2)
            tasks.append(t)
        return tasks

    tasks, size, dt = measure(build)
    per_task = (size - sys.getsizeof(tasks)) / n
    transitions = 3 * n / dt  # three transitions per task (with history and a timer)
    del tasks
    pop, full_gc = expiry(n, ids)
    return int(per_task), transitions, pop, full_gc


def expiry(n: int, ids: list[str]) -> tuple[float, float]:
    """Seconds to expire n/10 of n timers at once (structures built without tracemalloc, whose
    allocation headers would slow every access), and seconds of one full cyclic-GC pass over them."""
    wheel: TimerWheel[str] = TimerWheel()
    tasks = []
    for i in range(n):
        t = TrackedTask()
        t.timer = wheel.schedule(100.0 + (i % 1000), ids[i], 2)
        tasks.append(t)
    gc.collect()
    gc.disable()  # the wheel's own cost; Python's cyclic GC is measured apart below
    t0 = time.perf_counter()
    expired = wheel.pop_expired(100.0 + 99)  # 10% of the timers are due
    pop = time.perf_counter() - t0
    gc.enable()
    assert len(expired) == n // 10, len(expired)
    t0 = time.perf_counter()
    gc.collect()
    return pop, time.perf_counter() - t0


def baseline_machines(n: int) -> tuple[int, float, float]:
    """A transitions.Machine per task: bytes/task, create seconds/task, transitions/s."""
    states = [s.name for s in TaskState]
    spec = [{"trigger": e.name, "source": [s.name for s in src], "dest": d.name}
            for e, src, d in TASK_MACHINE.transitions]

    class Model:
        pass

    def build() -> list[Any]:
        out = []
        for _ in range(n):
            m = Model()
            Machine(model=m, states=states, transitions=spec, initial="PENDING", auto_transitions=False)
            out.append(m)
        return out

    models, size, create = measure(build)
    t0 = time.perf_counter()
    for m in models:
        m.dispatch()
        m.start()
        m.finish()
    trans = 3 * n / (time.perf_counter() - t0)
    return int(size / n), create / n, trans


def full_core(n: int) -> dict[str, float]:
    """Drive ``n`` tasks through the real orchestrator core (no sockets): memory and rates."""
    cfg = OrchestratorConfig(max_queue=n + 1, queue_ttl=0, stall_timeout=0)
    core = Orchestrator(cfg, 0.0)
    sat = b"sat"
    core.handle("s", [sat, P.SIGNATURE, P.REGISTER, pack({"sid": "s", "slots": n, "kinds": ["k"],
                                                          "progress": {"k": 600.0}})], 0.0)
    _, body = encode([[1], {}])
    frames = [[b"c", P.SIGNATURE, P.SUBMIT, pack({"id": f"t{i}", "k": "k"}), *body] for i in range(n)]

    def run() -> None:
        for f in frames:
            core.handle("c", f, 1.0)
        core.housekeeping(1.0)  # n dispatches
        core.outbox.messages.clear()
        ids = list(core.state.tasks)
        for i in range(0, n, 1000):
            core.handle("s", [sat, P.SIGNATURE, P.STARTED,
                              pack({"t": [[tid, 1] for tid in ids[i:i + 1000]]})], 2.0)

    _, size, dt = measure(run)
    frames_size = sum(sys.getsizeof(f[3]) for f in frames)  # headers are the client's, kept by reference
    per_task = (size - frames_size) / n
    # expiry of 100,000 queued tasks at once, in a fresh core with no satellite
    m = min(n, 100_000)
    core2 = Orchestrator(OrchestratorConfig(max_queue=m + 1), 0.0)
    for i in range(m):
        core2.handle("c", [b"c", P.SIGNATURE, P.SUBMIT, pack({"id": f"e{i}", "k": "k", "ttl": 5.0}), *body], 0.0)
    core2.housekeeping(0.0)
    core2.outbox.take_messages()
    t0 = time.perf_counter()
    core2.housekeeping(6.0)
    expiry = time.perf_counter() - t0
    assert core2.state.counters["expired"] == m
    return {"bytes_per_task": per_task, "transitions_per_s": 3 * n / dt, "expire_s": expiry, "expired": m}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="tasks for the tracker-state figures")
    ap.add_argument("--full", type=int, default=200_000, help="tasks driven through the whole core")
    ap.add_argument("--baseline", type=int, default=20_000, help="tasks with a transitions.Machine each")
    args = ap.parse_args(argv)
    per_task, trans, pop, full_gc = tracker_state(args.n)
    b_size, b_create, b_trans = baseline_machines(args.baseline)
    full = full_core(args.full)
    print(f"tracker state, {args.n:,} in-flight tasks (3 transitions each, one armed timer):")
    print(f"  memory per task          {per_task:8d} B        (target <= 500; Machine per task: {b_size:,} B, "
          f"{b_size / per_task:.0f}x more)")
    print(f"  transitions per second   {trans:10,.0f}   (target >= 200,000; Machine: {b_trans:,.0f}/s, "
          f"{trans / b_trans:.0f}x; creating a Machine: {b_create * 1e6:.0f} us)")
    print(f"  expire {args.n // 10:,} of {args.n:,} timers at once: {pop * 1e3:.1f} ms "
          f"(a full pass of Python's cyclic GC over this heap: {full_gc * 1e3:.0f} ms)")
    print(f"whole orchestrator core, {args.full:,} tasks submitted, dispatched, started (no sockets):")
    print(f"  memory per in-flight task {full['bytes_per_task']:7.0f} B (task, queue and lease entries, timers)")
    print(f"  transitions per second   {full['transitions_per_s']:10,.0f}   (message handling included)")
    print(f"  expire {full['expired']:,} queued tasks at their TTL in one pass: {full['expire_s']:.2f} s "
          f"({full['expired'] / full['expire_s']:,.0f} tasks/s, error results built and queued)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
