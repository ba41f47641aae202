"""Throughput and round-trip benchmark: Orchester against raw pyzmq, in the same run.

Three systems, each with two worker processes on this machine:

* ``raw``: a DEALER client talking to two echo ROUTERs directly (no broker);
* ``proxy``: a minimal one-hop Python ROUTER↔DEALER proxy (draining in batches)
  between the client and two echo workers;
* ``orchester``: a :class:`~orchester.LocalCluster` with two satellites of one
  worker each, driven through :class:`~orchester.Client`.

Three figures for each: no-op messages (tasks) per second with a window of
outstanding requests, round-trip p50/p99 with one request at a time, and
1 MB numpy payload throughput. Orchester's figures are printed as ratios to
the proxy's and the raw echo's.

Run: ``python bench/throughput.py [--n 20000] [--rtt 2000] [--mb 300] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq


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
    """The same measurements through a LocalCluster and the Client API."""

    name = "orchester"

    def __init__(self, prefetch: int) -> None:
        from orchester import LocalCluster

        self.cluster = LocalCluster(satellites=2, workers=1, prefetch=prefetch).start()
        self.client = self.cluster.client()
        for f in [self.client.submit("echo", b"warm") for _ in range(200)]:
            f.result(30)

    def roundtrips(self, n: int, make: Callable[[int], Any], window: int = 1) -> list[float]:
        sent: deque[tuple[float, Any]] = deque()
        rtts = []
        i = 0
        submit = self.client.submit
        while len(rtts) < n:
            while i < n and len(sent) < window:
                sent.append((time.perf_counter(), submit("echo", make(i))))
                i += 1
            t0, fut = sent.popleft()
            fut.result(60)
            rtts.append(time.perf_counter() - t0)
        return rtts

    def close(self) -> None:
        self.cluster.close()


def measure(system: Any, n: int, n_rtt: int, n_mb: int, window: int) -> dict[str, float]:
    """The three figures for one system."""
    noop: Callable[[int], Any] = (lambda i: [b"x" * 16]) if system.name != "orchester" else (lambda i: i)
    t0 = time.perf_counter()
    system.roundtrips(n, noop, window)
    tput = n / (time.perf_counter() - t0)
    rtts = system.roundtrips(n_rtt, noop, 1)
    q = statistics.quantiles(rtts, n=100)
    arr = np.random.default_rng(0).random(131072)  # 1 MiB of float64
    big: Callable[[int], Any] = (lambda i: [arr]) if system.name != "orchester" else (lambda i: arr)
    t0 = time.perf_counter()
    system.roundtrips(n_mb, big, 8)
    mbs = n_mb * arr.nbytes / 2**20 / (time.perf_counter() - t0)
    return {"tasks_per_s": tput, "p50_us": q[49] * 1e6, "p99_us": q[98] * 1e6, "mb_per_s": mbs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="no-op requests per system")
    ap.add_argument("--rtt", type=int, default=2000, help="sequential round trips for p50/p99")
    ap.add_argument("--mb", type=int, default=300, help="1 MiB payloads per system")
    ap.add_argument("--window", type=int, default=500, help="outstanding requests for throughput")
    ap.add_argument("--prefetch", type=int, default=8, help="Orchester satellite prefetch")
    ap.add_argument("--json", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    results: dict[str, dict[str, float]] = {}
    for name, make in (("raw", lambda: RawSystem("raw", False)), ("proxy", lambda: RawSystem("proxy", True)),
                       ("orchester", lambda: OrchesterSystem(args.prefetch))):
        system = make()
        try:
            results[name] = measure(system, args.n, args.rtt, args.mb, args.window)
        finally:
            system.close()
        r = results[name]
        print(f"{name:10s} {r['tasks_per_s']:9.0f} tasks/s   p50 {r['p50_us']:7.0f} µs   "
              f"p99 {r['p99_us']:7.0f} µs   1 MB: {r['mb_per_s']:7.0f} MB/s", flush=True)
    o, p, w = results["orchester"], results["proxy"], results["raw"]
    print("\nOrchester as a ratio of       proxy     raw      target (vs proxy)")
    rows = [("no-op throughput", "tasks_per_s", ">= 0.50"), ("p50 round trip", "p50_us", "<= 1.50"),
            ("p99 round trip", "p99_us", ""), ("1 MB payload throughput", "mb_per_s", ">= 0.80")]
    for label, key, target in rows:
        print(f"  {label:26s}{o[key] / p[key]:6.2f}  {o[key] / w[key]:6.2f}      {target}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
