"""Workflows against the same work submitted flat: what dependencies cost the orchestrator, and save.

Two measurements, in one run:

1. **The policy core alone, in-process** (as ``bench/core.py``): the orchestrator's CPU time per task
   for N independent tasks (the baseline, flat), for a chain of N where each task waits for the one
   before and takes its result by reference, and for a fan-out of N tasks into one fan-in that takes
   every result by reference. The ratio to flat is what the dependency bookkeeping costs per task
   (the issue's bound: at most 1.10).
2. **The whole bus** (a :class:`~orchester.LocalCluster`: an orchestrator and two satellites as
   processes): a chain of ``--chain`` echo tasks, each taking the previous result by reference,
   against the same chain submitted flat (the client waits for each result and submits the next
   with it); a fan-out of ``--fan`` echo tasks into one fan-in, against the same tasks submitted flat
   and the fan-in submitted by the client with every result. Wall time, and the orchestrator
   process's CPU time per task (``/proc``), each against its flat baseline, alternating runs.

The dependency bookkeeping's share of the orchestrator's work per task is the first measurement's
difference (a task with its dependencies, less the same task flat, in the core alone) over the second's
orchestrator CPU per task of the flat work.

Run: ``python bench/workflows.py [--core-n 20000] [--chain 1000] [--fan 10000] [--repeat 5] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import msgpack  # noqa: E402

from orchester import Client, LocalCluster  # noqa: E402
from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.server.core import Orchestrator  # noqa: E402
from serializers import encode, pack  # noqa: E402
from serializers import protocol as P  # noqa: E402

WINDOW = 64
_TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ 1. the core alone
def _core() -> Orchestrator:
    core = Orchestrator(OrchestratorConfig(max_client_tasks=10**7, max_client_bytes=2**40, max_queue=10**7,
                                           result_retention=10**7), 0.0)
    core.handle("s", [b"sat", P.SIGNATURE, P.REGISTER, pack({"sid": "s1", "slots": WINDOW, "kinds": ["echo"]})],
                0.0)
    core.outbox.take_messages()
    return core


def _finish_dispatched(core: Orchestrator, now: float) -> int:
    """Housekeeping, then a DONE for every DISPATCH it produced; how many."""
    core.housekeeping(now)
    n = 0
    for _, frames, _ in core.outbox.take_messages():
        if frames[2] == P.DISPATCH:
            order = msgpack.unpackb(frames[3])
            done = pack({"id": order["id"], "a": order["a"], "ok": True, "sat": "s1", "c": "msgpack", "dt": 0.001})
            core.handle("s", [b"sat", P.SIGNATURE, P.DONE, done, b"\x01"], now)
            n += 1
    return n


def core_serial(n: int, dependent: bool) -> float:
    """Seconds of CPU per task of a chain of ``n``: one task in flight at a time, so every task costs one
    wake-up of its own. ``dependent``: all of them submitted at once, each waiting for the one before and
    taking its result by reference; else (the same work flat) each submitted when the one before is done."""
    core = _core()
    _, body = encode([[1], {}])
    now = 0.0
    t0 = time.process_time()
    if dependent:
        for i in range(n):
            hdr: dict[str, Any] = {"id": f"t{i:08d}", "k": "echo", "c": "msgpack"}
            if i:
                hdr["af"], hdr["rf"] = [f"t{i - 1:08d}"], [0]
            # one client, as a user's: each result goes to the task that takes it, not to the client (the flat
            # chain sends each to the client instead: as many results leave the orchestrator either way)
            core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack(hdr), *body], now)
        while _finish_dispatched(core, now):
            now += 0.001
    else:
        for i in range(n):
            core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack({"id": f"t{i:08d}", "k": "echo",
                                                                   "c": "msgpack"}), *body], now)
            _finish_dispatched(core, now)
            now += 0.001
        _finish_dispatched(core, now)
    spent = time.process_time() - t0
    assert core.state.counters["done"] == n, core.state.counters
    return spent / n


def core_fan(n: int, dependent: bool) -> float:
    """Seconds of CPU per task of ``n`` tasks and one more, all submitted at once, then run. ``dependent``:
    the last waits for all the others and takes every result by reference; else it is one more flat task."""
    core = _core()
    _, body = encode([[1], {}])
    now = 0.0
    ids = [f"t{i:08d}" for i in range(n)]
    t0 = time.process_time()
    for tid in ids:
        core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": "echo", "c": "msgpack"}), *body],
                    now)
    last: dict[str, Any] = {"id": "fan-in", "k": "echo", "c": "msgpack"}
    if dependent:
        last["af"], last["rf"] = ids, list(range(n))
    core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack(last), *body], now)
    while _finish_dispatched(core, now):
        now += 0.001
    spent = time.process_time() - t0
    assert core.state.counters["done"] == n + 1, core.state.counters
    return spent / (n + 1)


# ------------------------------------------------------------------ 2. the whole bus
def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def measured(cluster: LocalCluster, tasks: int, run: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, orchestrator CPU seconds per task) of ``run``."""
    assert cluster.orchestrator is not None
    pid = cluster.orchestrator.pid
    c0, t0 = _cpu(pid), time.perf_counter()
    run()
    return time.perf_counter() - t0, (_cpu(pid) - c0) / tasks


def chain_by_reference(client: Client, n: int) -> None:
    fut = client.submit("echo", 1)
    for _ in range(n - 1):
        fut = client.submit("echo", fut)
    assert fut.result(timeout=600) == 1


def chain_flat(client: Client, n: int) -> None:
    value = client.submit("echo", 1).result(timeout=60)
    for _ in range(n - 1):
        value = client.submit("echo", value).result(timeout=60)
    assert value == 1


def fan_by_reference(client: Client, n: int) -> None:
    parts = [client.submit("echo", i) for i in range(n)]
    assert len(client.submit("echo", parts).result(timeout=600)) == n


def fan_flat(client: Client, n: int) -> None:
    parts = [client.submit("echo", i) for i in range(n)]
    values = [f.result(timeout=600) for f in parts]
    assert len(client.submit("echo", values).result(timeout=600)) == n


def main() -> None:
    """Both measurements; medians over ``--repeat`` alternating runs; ratios against flat."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--core-n", type=int, default=20_000, help="tasks per run of the core alone")
    ap.add_argument("--chain", type=int, default=1000, help="tasks of the chain through the bus")
    ap.add_argument("--fan", type=int, default=10_000, help="tasks of the fan-out through the bus")
    ap.add_argument("--repeat", type=int, default=5, help="alternating runs of each (medians count)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    out: dict[str, Any] = {"core_tasks": args.core_n, "chain": args.chain, "fan": args.fan, "repeat": args.repeat}

    runs: dict[str, list[float]] = {"chain_flat": [], "chain": [], "fan_flat": [], "fan": []}
    for _ in range(args.repeat):  # alternating
        runs["chain_flat"].append(core_serial(args.core_n, dependent=False))
        runs["chain"].append(core_serial(args.core_n, dependent=True))
        runs["fan_flat"].append(core_fan(args.core_n, dependent=False))
        runs["fan"].append(core_fan(args.core_n, dependent=True))
    us = {k: statistics.median(v) * 1e6 for k, v in runs.items()}
    out["core_us_per_task"] = {k: round(v, 2) for k, v in us.items()}
    out["core_ratio"] = {"chain": round(us["chain"] / us["chain_flat"], 3), "fan_in": round(us["fan"] / us["fan_flat"],
                                                                                             3)}
    print(f"the policy core alone, {args.core_n:,} tasks a run (CPU per task, median of {args.repeat} alternating)")
    print(f"  chain, flat (each submitted when the last is done)  {us['chain_flat']:8.2f} µs")
    print(f"  chain by reference (all submitted at once)          {us['chain']:8.2f} µs   "
          f"{us['chain'] / us['chain_flat']:.3f} × flat")
    print(f"  fan-out, flat (one more task)                       {us['fan_flat']:8.2f} µs")
    print(f"  fan-out into a fan-in by reference                  {us['fan']:8.2f} µs   "
          f"{us['fan'] / us['fan_flat']:.3f} × flat")

    figures: dict[str, list[tuple[float, float]]] = {k: [] for k in ("chain_ref", "chain_flat", "fan_ref",
                                                                     "fan_flat")}
    # the orchestrator keeps --result-retention finished tasks: a fan-in must find its parts there (they may
    # have finished before it is submitted), and the flat runs' results must not push them out
    retention = str(4 * args.repeat * (args.fan + args.chain + 1) + 10_000)
    with LocalCluster(satellites=2, workers=1, serve_args=["--result-retention", retention]) as cluster, \
            cluster.client() as client:
        for w in [client.submit("echo", i) for i in range(200)]:  # warm up
            w.result(60)
        for _ in range(args.repeat):
            figures["chain_flat"].append(measured(cluster, args.chain, lambda: chain_flat(client, args.chain)))
            figures["chain_ref"].append(measured(cluster, args.chain, lambda: chain_by_reference(client, args.chain)))
            figures["fan_flat"].append(measured(cluster, args.fan + 1, lambda: fan_flat(client, args.fan)))
            figures["fan_ref"].append(measured(cluster, args.fan + 1, lambda: fan_by_reference(client, args.fan)))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in figures.items()}
    out["bus"] = {k: {"seconds": round(w, 3), "orchestrator_cpu_us_per_task": round(c * 1e6, 1)}
                  for k, (w, c) in med.items()}
    print(f"the whole bus (an orchestrator and two satellites), median of {args.repeat}")
    for name, ref_key, flat_key, tasks in (("chain", "chain_ref", "chain_flat", args.chain),
                                           ("fan-out/fan-in", "fan_ref", "fan_flat", args.fan + 1)):
        (wr, cr), (wf, cf) = med[ref_key], med[flat_key]
        out["bus"][f"{ref_key}_over_flat"] = {"seconds": round(wr / wf, 3), "cpu": round(cr / cf, 3)}
        print(f"  {name} of {tasks:,}: by reference {wr:.2f} s, flat {wf:.2f} s ({wr / wf:.2f} × the time); "
              f"orchestrator CPU {cr * 1e6:.0f} against {cf * 1e6:.0f} µs per task ({cr / cf:.2f} ×)")
    # the bookkeeping alone: what a task costs the core with its dependencies over what it costs without them,
    # against what the orchestrator spends on a task on the bus (sockets, journal-free, flat)
    share = {"chain": (us["chain"] - us["chain_flat"]) / (med["chain_flat"][1] * 1e6),
             "fan_in": (us["fan"] - us["fan_flat"]) / (med["fan_flat"][1] * 1e6)}
    out["bookkeeping_share"] = {k: round(v, 4) for k, v in share.items()}
    print("the dependency bookkeeping (the core with dependencies minus without), per task, as a share of the")
    print("orchestrator's CPU per task on the bus:")
    print(f"  chain   {us['chain'] - us['chain_flat']:6.2f} µs of {med['chain_flat'][1] * 1e6:5.0f} µs  "
          f"{100 * share['chain']:5.1f} %")
    print(f"  fan-in  {us['fan'] - us['fan_flat']:6.2f} µs of {med['fan_flat'][1] * 1e6:5.0f} µs  "
          f"{100 * share['fan_in']:5.1f} %")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
