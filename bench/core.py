"""The orchestrator's policy core alone, in-process: tasks per second against msgpack's own cost.

No sockets and no other process: one satellite with 64 slots registers, then tasks are submitted
in windows of 64, dispatched by housekeeping and finished by DONE messages, all through
:meth:`~orchester.server.core.Orchestrator.handle`. The baseline, run in the same process, is
what the bytes of those messages cost msgpack alone (packing every header the core reads and
unpacking it once): the ratio says how much the core adds to the serialisation it cannot avoid.

Run: ``python bench/core.py [--n 20000] [--repeat 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import msgpack  # noqa: E402

from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.server.core import Orchestrator  # noqa: E402
from serializers import encode, pack  # noqa: E402
from serializers import protocol as P  # noqa: E402

WINDOW = 64


def core_run(n: int) -> float:
    """Tasks per second through a fresh core (submit, dispatch, done, result)."""
    core = Orchestrator(OrchestratorConfig(max_client_tasks=10**7, max_client_bytes=2**40, max_queue=10**7), 0.0)
    _, body = encode([[1], {}])
    core.handle("s", [b"sat", P.SIGNATURE, P.REGISTER, pack({"sid": "s1", "slots": WINDOW, "kinds": ["echo"]})],
                0.0)
    core.outbox.take_messages()
    now = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        tid = f"t{i:08d}"
        core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": "echo", "c": "msgpack"}), *body],
                    now)
        if i % WINDOW == WINDOW - 1 or i == n - 1:
            core.housekeeping(now)
            for _, frames, _ in core.outbox.take_messages():
                if frames[2] == P.DISPATCH:
                    order = msgpack.unpackb(frames[3])
                    done = pack({"id": order["id"], "a": order["a"], "ok": True, "sat": "s1", "c": "msgpack",
                                 "dt": 0.001})
                    core.handle("s", [b"sat", P.SIGNATURE, P.DONE, done, b"\xc0"], now)
            now += 0.001
    core.housekeeping(now)
    core.outbox.take_messages()
    elapsed = time.perf_counter() - t0
    assert core.state.counters["done"] == n, core.state.counters
    return n / elapsed


def baseline_run(n: int) -> float:
    """Tasks per second msgpack alone manages on the same headers (SUBMIT, DISPATCH, DONE, ACK)."""
    t0 = time.perf_counter()
    for i in range(n):
        tid = f"t{i:08d}"
        for hdr in ({"id": tid, "k": "echo", "c": "msgpack"}, {"id": tid, "a": 1},
                    {"id": tid, "a": 1, "ok": True, "sat": "s1", "c": "msgpack", "dt": 0.001},
                    {"ids": [tid], "e": "x"}):
            msgpack.unpackb(pack(hdr))
    return n / (time.perf_counter() - t0)


def main() -> None:
    """Run both, ``--repeat`` times each, alternating; print the best of each and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="tasks per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating (the best counts)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    core_best = base_best = 0.0
    for _ in range(args.repeat):
        base_best = max(base_best, baseline_run(args.n))
        core_best = max(core_best, core_run(args.n))
    out: dict[str, Any] = {"tasks": args.n, "core_tasks_per_s": round(core_best), "msgpack_tasks_per_s":
                           round(base_best), "ratio": round(core_best / base_best, 4)}
    print(f"core       {core_best:10,.0f} tasks/s")
    print(f"msgpack    {base_best:10,.0f} tasks/s  (the same headers packed and unpacked once)")
    print(f"core / msgpack: {core_best / base_best:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
