"""A passive catching up with a large table: how long the active's poll loop stops, and takeover.

Two halves of a pair (:class:`orchester.ha.pair.Pair`, real cores, ``ipc://`` peer link) are driven
the way the broker drives them (with its :class:`~orchester.server.heap.HeapKeeper` after each
wake-up). The active holds ``--tasks`` queued tasks of ``--payload`` bytes; the passive joins and
asks for a snapshot. Measured in the same run:

* **raw pyzmq**: the same snapshot messages, packed beforehand, through a bare PUB/SUB pair:
  the floor for moving those bytes.
* **one slice**: the whole snapshot sent in the wake-up that answers ``SYNC`` (as Orchester
  did before snapshots were sliced): the longest wake-up of the active is the whole snapshot.
* **sliced**: the default, :data:`orchester.ha.resync.SLICE` seconds of sending per wake-up.

For each: the longest single wake-up of the active (what delays its heartbeats and every client
and satellite), the passive's (it must still send its state within two heartbeats, or the
active gives up on it) and the time until the passive is in sync. Then the passive takes over
(:class:`~orchester.server.restore.Installation`, a slice per wake-up), timed per task, with its longest wake-up.

Run: ``python bench/resync.py [--tasks 100000] [--payload 1000] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import zmq  # noqa: E402

from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.ha import resync  # noqa: E402
from orchester.ha.pair import Pair  # noqa: E402
from orchester.server.core import Orchestrator  # noqa: E402
from orchester.server.heap import HeapKeeper  # noqa: E402
from orchester.server.ports import Ports  # noqa: E402
from serializers import pack  # noqa: E402
from serializers import protocol as P  # noqa: E402

#: Seconds after which a passive that has not caught up never will (``--give-up``).
GIVE_UP = 600.0


class Half:
    """One server of the pair without its client sockets, woken as the broker wakes it."""

    def __init__(self, ctx: zmq.Context[Any], primary: bool, mine: str, peer: str) -> None:
        cfg = OrchestratorConfig(ha="primary" if primary else "backup", state_bind=mine, peer=peer,
                                 ha_heartbeat=1.0, max_client_tasks=10**7, max_client_bytes=2**40)
        self.core = Orchestrator(cfg, time.monotonic(), ports=Ports(journal=True))
        self.seq = 0
        self.pair = Pair(cfg, ctx, self.core, "router", time.monotonic(), None, lambda: self.seq)
        self.longest = 0.0
        self.heap = HeapKeeper(time.monotonic())  #: as the broker keeps its tables out of the collector's way

    def wake(self) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        self.pair.apply(self.pair.drain(now), now)
        self.pair.tick(now)
        if self.pair.installing is not None:  # a takeover: a slice of the table per wake-up, as the broker does
            self.pair.install_step(now)
        elif self.pair.retiring is not None:
            self.pair.retire_step()
        self.seq += len(self.core.outbox.records)  # queued tasks: their records are in the snapshot
        self.core.outbox.records.clear()
        self.pair.flush()
        self.heap.tick(now)
        self.longest = max(self.longest, time.perf_counter() - t0)


def in_sync(a: Half, b: Half) -> bool:
    """The active's passive acknowledged its snapshot and applied every record since."""
    leader, follower = a.pair.leader, b.pair.follower
    return leader is not None and leader.synced and follower is not None and follower.applied == a.seq


def fill(core: Orchestrator, n: int, payload: bytes) -> None:
    for i in range(n):
        core.handle("c", [b"client", P.SIGNATURE, P.SUBMIT, pack({"id": f"t{i}", "k": "echo"}), payload], 0.0)


def pair_run(n: int, payload: bytes, slice_s: float, tmp: str) -> dict[str, float]:
    """Longest wake-up of the active while the passive catches up, time to sync, takeover time."""
    resync.SLICE = slice_s
    ctx: zmq.Context[Any] = zmq.Context()
    a_ep, b_ep = f"ipc://{tmp}/a-{slice_s}", f"ipc://{tmp}/b-{slice_s}"
    a = Half(ctx, True, a_ep, b_ep)
    b = Half(ctx, False, b_ep, a_ep)
    try:
        fill(a.core, n, payload)
        a.wake()  # the active counts the records of the table
        a.longest = 0.0
        start = time.perf_counter()
        deadline = time.monotonic() + GIVE_UP
        while not in_sync(a, b):
            a.wake()
            b.wake()
            if time.monotonic() > deadline:  # (the active gives up on a passive it cannot hear, in a loop)
                return {"longest": a.longest, "passive": b.longest, "synced": float("inf"), "takeover": float("nan"),
                        "takeover_longest": float("nan")}
            time.sleep(0.0005)
        synced = time.perf_counter() - start
        passive = b.longest
        # the active is gone: the passive is promoted and installs the table, woken as the broker wakes it
        t0 = time.perf_counter()
        b.pair.promote(True, time.monotonic())
        first = time.perf_counter() - t0
        b.longest = 0.0
        while b.pair.installing is not None or b.pair.retiring is not None:
            b.wake()
        takeover = time.perf_counter() - t0
        assert len(b.core.state.tasks) == n and b.pair.leader is not None
        return {"longest": a.longest, "passive": passive, "synced": synced, "takeover": takeover,
                "takeover_longest": max(first, b.longest)}
    finally:
        a.pair.close()
        b.pair.close()
        ctx.term()


def raw_run(n: int, payload: bytes, tmp: str) -> dict[str, float]:
    """The same snapshot messages, packed beforehand, through a bare PUB/SUB pair."""
    ctx: zmq.Context[Any] = zmq.Context()
    core = Orchestrator(OrchestratorConfig(max_client_tasks=10**7, max_client_bytes=2**40), 0.0)
    fill(core, n, payload)
    messages = list(resync.OutgoingSnapshot(core, 0).messages("e", time.perf_counter, budget=float("inf")))
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        pub.sndhwm = sub.rcvhwm = 100_000
        pub.bind(f"ipc://{tmp}/raw")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{tmp}/raw")
        for _ in range(200):  # the subscription reaches the publisher
            pub.send(b"hello")
            if sub.poll(10):
                sub.recv()
                break
        while sub.poll(50):
            sub.recv()
        start = time.perf_counter()
        for m in messages:
            pub.send_multipart(m)
        for _ in messages:
            sub.recv_multipart()
        return {"synced": time.perf_counter() - start}
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--payload", type=int, default=1000, help="bytes per task")
    ap.add_argument("--rounds", type=int, default=2, help="rounds (the best of each figure is kept)")
    ap.add_argument("--give-up", type=float, default=600.0, help="seconds after which a resync counts as never")
    ap.add_argument("--skip-one-slice", action="store_true", help="only the raw floor and the sliced resync")
    args = ap.parse_args(argv)
    global GIVE_UP
    GIVE_UP = args.give_up
    logging.getLogger("orchester").setLevel(logging.ERROR)
    payload = b"x" * args.payload
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="orchester-bench-resync-") as tmp:
        for _ in range(args.rounds):
            for name, run in (("raw pyzmq", lambda: raw_run(args.tasks, payload, tmp)),
                              ("one slice", None if args.skip_one_slice else
                               lambda: pair_run(args.tasks, payload, float("inf"), tmp)),
                              ("sliced", lambda: pair_run(args.tasks, payload, 0.02, tmp))):
                if run is None:
                    continue
                got = run()
                best[name] = {k: min(v, best.get(name, {}).get(k, v)) for k, v in got.items()}
    raw = best["raw pyzmq"]["synced"]
    one = best["one slice"]["longest"] if "one slice" in best else float("nan")
    print(f"{args.tasks} queued tasks of {args.payload} B; best of {args.rounds} rounds")
    print(f"{'':12} {'active longest':>15} {'vs one slice':>13} {'passive longest':>16} {'time to sync':>13} "
          f"{'vs raw pyzmq':>13}")
    for name, figures in best.items():
        longest, passive = figures.get("longest"), figures.get("passive")
        cells = (f"{longest * 1000:12.0f} ms" if longest is not None else f"{'-':>15}",
                 f"{longest / one:12.3f}×" if longest is not None else f"{'-':>13}",
                 f"{passive * 1000:13.0f} ms" if passive is not None else f"{'-':>16}")
        print(f"{name:12} {cells[0]:>15} {cells[1]:>13} {cells[2]:>16} {figures['synced']:12.2f}s "
              f"{figures['synced'] / raw:12.2f}×")
    takeover = best["sliced"]["takeover"]
    print(f"takeover of {args.tasks} tasks by the passive: {takeover:.2f} s "
          f"({takeover / args.tasks * 1e6:.1f} µs a task), its longest wake-up "
          f"{best['sliced']['takeover_longest'] * 1000:.0f} ms (the table goes in a slice per wake-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
