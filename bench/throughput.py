"""Throughput and round-trip benchmark: Orchester against raw pyzmq, in the same run.

The peers' workloads (a windowed submit loop of no-ops, ``map``, one request at a time, 1 MiB numpy
arrays) on each system, each with two workers on this machine:

* ``raw``: a DEALER client talking to two echo ROUTERs directly (no broker);
* ``proxy``: a minimal one-hop Python ROUTER↔DEALER proxy (draining in batches)
  between the client and two echo workers;
* ``orchester``: a :class:`~orchester.LocalCluster` with two satellites of one
  worker each, driven through :class:`~orchester.Client`, with full tracking: ``echo`` in a worker
  process, ``echo.inline`` in the satellite's own thread (a light kind), each without a journal and
  with a ``batch`` journal.

Orchester's figures are printed as ratios to the proxy's and the raw echo's, all from this one run.

A ``batch`` journal writes each 1 MiB task's payload and its result: 2 MiB to disk per task. The run
also measures what this machine's disk takes (sequential 1 MiB writes to the journal's folder, synced,
as the journal writes them) and prints the journal's 1 MiB figure against that sustained ceiling too
(a run shorter than the page cache passes it).

The 1 MiB arrays go twice, in two passes of ``--mb`` each, on every system alike. Orchester keeps finished
results for fetch by task id, up to 256 MiB of them: in the first pass from a fresh start that store is
filling, and every result it keeps lands in memory the orchestrator touches for the first time (a page
fault per 4 KiB). In the second the store is full: each result takes the memory an older one leaves, as a
proxy that keeps nothing does from the start. The first pass is what a fresh orchestrator's first few
hundred MiB of results cost; the second, what it sustains.

On a shared VM the figures move from minute to minute: ``--repeat N`` measures every system N times,
in turns (raw, proxy, the Orchester configurations, then again), and prints the median of each figure.

Run: ``python bench/throughput.py [--n 20000] [--rtt 2000] [--mb 300] [--repeat 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from orchester.config import OrchestratorConfig


# ---------------------------------------------------------------- raw pyzmq
def echo_worker(endpoint: str, bind: bool) -> None:
    """An echo server: a ROUTER that sends every message back as it came."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    s.rcvhwm = s.sndhwm = 100_000
    (s.bind if bind else s.connect)(endpoint)
    try:
        while True:
            msg = s.recv_multipart(copy=False)
            if len(msg) == 2 and msg[1].bytes == b"STOP":
                break
            s.send_multipart(msg, copy=False)
    finally:
        s.close(0)
        ctx.term()


def proxy(front: str, back: str) -> None:
    """A one-hop ROUTER↔DEALER proxy in Python, draining each socket in batches."""
    ctx = zmq.Context()
    f = ctx.socket(zmq.ROUTER)
    b = ctx.socket(zmq.DEALER)
    for s in (f, b):
        s.linger = 0
        s.rcvhwm = s.sndhwm = 100_000
    f.bind(front)
    b.bind(back)
    poller = zmq.Poller()
    poller.register(f, zmq.POLLIN)
    poller.register(b, zmq.POLLIN)
    try:
        while True:
            for sock, _ in poller.poll():
                other = b if sock is f else f
                for _ in range(256):
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if sock is f and msg[-1].bytes == b"STOP":
                        return
                    other.send_multipart(msg, copy=False)
    finally:
        f.close(0)
        b.close(0)
        ctx.term()


class RawSystem:
    """Client side of the raw and proxy baselines: a DEALER and a window of requests."""

    def __init__(self, name: str, via_proxy: bool) -> None:
        self.name = name
        self.ctx = zmq.Context()
        self.procs: list[mp.Process] = []
        mpc = mp.get_context("spawn")
        probe = self.ctx.socket(zmq.ROUTER)
        ports = []
        for _ in range(3 if via_proxy else 2):
            ports.append(probe.bind_to_random_port("tcp://127.0.0.1"))
        probe.close(0)  # free the ports for the children (a tiny race, acceptable in a benchmark)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = self.sock.sndhwm = 100_000
        if via_proxy:
            front, back = f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}"
            self.procs.append(mpc.Process(target=proxy, args=(front, back), daemon=True))
            for _ in range(2):
                self.procs.append(mpc.Process(target=echo_worker, args=(back, False), daemon=True))
            self.sock.connect(front)
        else:
            for p in ports[:2]:
                ep = f"tcp://127.0.0.1:{p}"
                self.procs.append(mpc.Process(target=echo_worker, args=(ep, True), daemon=True))
                self.sock.connect(ep)
        for p in self.procs:
            p.start()
        time.sleep(1.0)
        self.roundtrips(50, lambda i: [b"warm"])

    def roundtrips(self, n: int, make: Callable[[int], list[Any]], window: int = 1) -> list[float]:
        """Send ``n`` requests with at most ``window`` outstanding; return each round-trip time."""
        sent = deque()
        rtts = []
        i = 0
        while len(rtts) < n:
            while i < n and len(sent) < window:
                sent.append(time.perf_counter())
                self.sock.send_multipart(make(i), copy=False)
                i += 1
            self.sock.recv_multipart(copy=False)
            rtts.append(time.perf_counter() - sent.popleft())
        return rtts

    def close(self) -> None:
        for _ in range(4):
            self.sock.send_multipart([b"STOP"])
        for p in self.procs:
            p.join(2)
            if p.is_alive():
                p.kill()
        self.sock.close(0)
        self.ctx.term()


class OrchesterSystem:
    """The same measurements through a LocalCluster and the Client API (``kind``: ``echo`` runs in a worker
    process, ``echo.inline`` in the satellite's own thread; ``journal``: none, or a journal with that
    durability)."""

    def __init__(self, name: str, prefetch: int, kind: str = "echo", journal: str | None = None,
                 tmp: str | None = None) -> None:
        from orchester import LocalCluster

        self.name = name
        self.kind = kind
        serve = ["--journal", f"{tmp}/{name}", "--durability", journal] if journal else []
        self.cluster = LocalCluster(satellites=2, workers=1, prefetch=prefetch, serve_args=serve,
                                    log_level="ERROR").start()
        self.client = self.cluster.client()
        for f in [self.client.submit(kind, b"warm") for _ in range(200)]:
            f.result(30)

    def roundtrips(self, n: int, make: Callable[[int], Any], window: int = 1) -> list[float]:
        sent: deque[tuple[float, Any]] = deque()
        rtts = []
        i = 0
        submit, kind = self.client.submit, self.kind
        while len(rtts) < n:
            while i < n and len(sent) < window:
                sent.append((time.perf_counter(), submit(kind, make(i))))
                i += 1
            t0, fut = sent.popleft()
            fut.result(60)
            rtts.append(time.perf_counter() - t0)
        return rtts

    def mapped(self, n: int) -> float:
        """``Client.map`` over ``n`` no-op items: tasks per second."""
        t0 = time.perf_counter()
        got = sum(1 for _ in self.client.map(self.kind, range(n), timeout=300))
        assert got == n, f"{got} results of {n}"
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        self.cluster.close()


def measure(system: Any, n: int, n_rtt: int, n_mb: int, window: int) -> dict[str, float]:
    """The peers' workloads for one system: a windowed submit loop of no-ops, ``map`` (Orchester only), one
    at a time (p50/p99 round trip), 1 MiB arrays with 8 outstanding (two passes of ``n_mb``: a fresh
    orchestrator's result store fills during the first)."""
    raw = isinstance(system, RawSystem)
    noop: Callable[[int], Any] = (lambda i: [b"x" * 16]) if raw else (lambda i: i)
    t0 = time.perf_counter()
    system.roundtrips(n, noop, window)
    out = {"tasks_per_s": n / (time.perf_counter() - t0)}
    if not raw:
        out["map_per_s"] = system.mapped(n)
    rtts = system.roundtrips(n_rtt, noop, 1)
    q = statistics.quantiles(rtts, n=100)
    out.update(p50_us=q[49] * 1e6, p99_us=q[98] * 1e6)
    if n_mb:
        arr = np.random.default_rng(0).random(131072)  # 1 MiB of float64
        big: Callable[[int], Any] = (lambda i: [arr]) if raw else (lambda i: arr)
        for key in ("mb_per_s", "mb_full_per_s"):
            t0 = time.perf_counter()
            system.roundtrips(n_mb, big, 8)
            out[key] = n_mb * arr.nbytes / 2**20 / (time.perf_counter() - t0)
    return out


def disk_ceiling(directory: str, mib: int = 512) -> float:
    """MiB per second this disk takes in sequential 1 MiB writes to a file in ``directory``, synced at the end
    (as a ``batch`` journal writes its log); the file is removed."""
    block = os.urandom(1 << 20)
    path = os.path.join(directory, "disk-ceiling")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(mib):
            os.write(fd, block)
        os.fdatasync(fd)
        return mib / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)


#: MiB of results an orchestrator keeps by default: a first pass of at least that many 1 MiB arrays fills its
#: result store.
FULL_STORE_MIB = OrchestratorConfig.result_retention_bytes >> 20

#: The Orchester configurations measured: name, kind, journal durability (None: no journal).
CONFIGS = (("orchester", "echo", None), ("orchester inline", "echo.inline", None),
           ("orchester batch journal", "echo", "batch"), ("inline, batch journal", "echo.inline", "batch"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="no-op requests per system")
    ap.add_argument("--rtt", type=int, default=2000, help="sequential round trips for p50/p99")
    ap.add_argument("--mb", type=int, default=300, help="1 MiB payloads per system and pass (two passes)")
    ap.add_argument("--window", type=int, default=500, help="outstanding requests for throughput")
    ap.add_argument("--prefetch", type=int, default=8, help="Orchester satellite prefetch")
    ap.add_argument("--repeat", type=int, default=1, help="measure every system this many times, in turns; "
                    "print the medians")
    ap.add_argument("--json", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    runs: dict[str, list[dict[str, float]]] = {}
    makers: list[tuple[str, Callable[[str], Any]]] = [
        ("raw", lambda tmp: RawSystem("raw", False)), ("proxy", lambda tmp: RawSystem("proxy", True))]
    for name, kind, journal in CONFIGS:
        makers.append((name, lambda tmp, name=name, kind=kind, journal=journal: OrchesterSystem(
            name, args.prefetch, kind, journal, tmp)))
    disk: list[float] = []
    with tempfile.TemporaryDirectory(prefix="orchester-bench-throughput-") as tmp:
        for turn in range(args.repeat):
            for name, make in makers:
                system = make(os.path.join(tmp, str(turn)))
                try:
                    r = measure(system, args.n, args.rtt, args.mb, args.window)
                finally:
                    system.close()
                runs.setdefault(name, []).append(r)
                extra = f"   map {r['map_per_s']:7.0f}/s" if "map_per_s" in r else ""
                mb = f"   1 MB: {r['mb_per_s']:6.0f} then {r['mb_full_per_s']:6.0f} MB/s" if "mb_per_s" in r else ""
                print(f"{name:24s} {r['tasks_per_s']:8.0f} tasks/s{extra}   p50 {r['p50_us']:6.0f} µs   "
                      f"p99 {r['p99_us']:6.0f} µs{mb}", flush=True)
            if args.mb:
                disk.append(disk_ceiling(tmp))
                print(f"{'disk (1 MiB writes)':24s} {disk[-1]:8.0f} MiB/s written, synced", flush=True)
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    if args.repeat > 1:
        print(f"\nthe median of {args.repeat} turns of each figure:")
    p, w = results["proxy"], results["raw"]
    print("\nas a ratio of the one-hop proxy's figure (raw pyzmq's in brackets), with the issue's goal")
    rows = [("no-op submit loop", "tasks_per_s", lambda o: o["tasks_per_s"], ">= 0.50 (journal off), >= 0.40 (batch)"),
            ("map / submit loop", "map_per_s", lambda o: o["map_per_s"] / o["tasks_per_s"], ">= 1.00 (of itself)"),
            ("p50 round trip", "p50_us", lambda o: o["p50_us"], "<= 2.00"),
            ("p99 round trip", "p99_us", lambda o: o["p99_us"], ""),
            ("1 MiB arrays", "mb_per_s", lambda o: o["mb_per_s"], ">= 0.80 (off), >= 0.56 (batch)"),
            ("1 MiB, 2nd pass", "mb_full_per_s", lambda o: o["mb_full_per_s"],
             "(the result store full)" if args.mb >= FULL_STORE_MIB
             else f"(--mb < {FULL_STORE_MIB}: the store not full yet)")]
    print(f"  {'':22s}" + "".join(f"{name[:22]:>24s}" for name, *_ in CONFIGS) + "   goal")
    for label, key, value, goal in rows:
        cells = []
        for name, *_ in CONFIGS:
            o = results[name]
            if key not in o:
                cells.append(f"{'-':>24s}")
            elif key == "map_per_s":
                cells.append(f"{value(o):24.2f}")
            else:
                cells.append(f"{value(o) / p[key]:10.2f} ({value(o) / w[key]:5.2f})".rjust(24))
        print(f"  {label:22s}" + "".join(cells) + f"   {goal}")
    if disk:
        ceiling = statistics.median(disk) / 2  # a task's payload and its result: 2 MiB written per 1 MiB task
        print(f"\nwith a batch journal, 1 MiB tasks write 2 MiB each: sustained, this disk "
              f"({statistics.median(disk):.0f} MiB/s) allows at most {ceiling:.0f} MB/s of them, "
              f"{ceiling / p['mb_per_s']:.2f} of the proxy's figure (a short run may pass it: the page cache takes "
              "what the journal's syncer has not flushed yet)")
        for name, _, journal in CONFIGS:
            if journal:
                first, second = results[name]["mb_per_s"], results[name]["mb_full_per_s"]
                print(f"  {name:22s} {first:6.0f} then {second:6.0f} MB/s: {first / ceiling:.2f} and "
                      f"{second / ceiling:.2f} of the disk's ceiling")
        results["disk"] = {"mib_per_s": statistics.median(disk)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": results, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
