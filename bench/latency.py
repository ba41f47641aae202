"""Where a round trip's microseconds go: one task at a time, with one piece of the path added at a time.

Every stage runs in the same process and the same run, one request outstanding, and prints its p50 and
p99 round trip; the difference between two stages is what the piece added between them costs:

1. **raw pyzmq**: a DEALER and an echo ROUTER in another process (``tcp://`` loopback): one process
   wake-up each way;
2. **orchestrator, simulated satellite**: a raw DEALER speaking ``docs/protocol.rst`` submits to a real
   ``orchester serve`` (``ipc://``); the satellite is a minimal one in a process of its own, answering
   each ``DISPATCH`` with its ``DONE`` at once: the orchestrator's handling and one more process each way;
3. **+ satellite, inline**: a real ``satellite run`` process instead, the task ``echo.inline``: what the
   satellite's I/O loop and its inline thread add to a minimal satellite;
4. **+ worker process**: ``echo`` instead: the hop to a worker process and back;
5. **+ Client API**: :class:`~orchester.Client` instead of the raw DEALER, ``echo``: the hand-over
   between the caller's thread and the client's I/O thread, both ways.

Run: ``python bench/latency.py [--n 2000]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import msgpack  # noqa: E402
import zmq  # noqa: E402

from orchester import LocalCluster  # noqa: E402
from serializers import encode, pack  # noqa: E402
from serializers import messages as M  # noqa: E402
from serializers import protocol as P  # noqa: E402


def echo_server(endpoint: str) -> None:
    """A ROUTER that sends back what it gets, until ``STOP``."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(endpoint)
    while True:
        msg = s.recv_multipart()
        if msg[-1] == b"STOP":
            break
        s.send_multipart(msg)
    s.close(0)
    ctx.term()


def quantiles(rtts: list[float]) -> tuple[float, float]:
    """p50 and p99, in µs."""
    q = statistics.quantiles(rtts, n=100)
    return q[49] * 1e6, q[98] * 1e6


def raw(n: int) -> list[float]:
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(0)
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(target=echo_server, args=(endpoint,), daemon=True)
    proc.start()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    try:
        for _ in range(100):
            s.send(b"warm")
            s.recv()
        rtts = []
        for _ in range(n):
            t0 = time.perf_counter()
            s.send(b"x" * 16)
            s.recv()
            rtts.append(time.perf_counter() - t0)
        s.send(b"STOP")
        proc.join(5)
        return rtts
    finally:
        s.close(0)
        ctx.term()


def messages(frames: list[Any]) -> list[list[Any]]:
    """The messages a DEALER received (a BATCH, message by message), each from its command on."""
    if len(frames) > 2 and frames[1] == P.BATCH:
        return [m[1:] for m in M.unbatch(frames, 1)]
    return [frames[1:]]


def simulated_satellite(endpoint: str, stop: Any) -> None:
    """A satellite written from ``docs/protocol.rst`` in a process of its own: each ``DISPATCH`` is answered
    with its ``DONE`` at once (the echo of its body), each heartbeat with one, until ``stop`` is set."""
    ctx = zmq.Context()
    sat = ctx.socket(zmq.DEALER)
    sat.linger = 0
    sat.routing_id = b"s:simulated:0123456789abcdef0123456789abcdef"
    sat.connect(endpoint)
    sat.send_multipart(M.Register(sid="simulated", slots=4, workers=1, kinds=("echo",), host="bench",
                                  pid=os.getpid()).frames())
    try:
        while not stop.is_set():
            if not sat.poll(100):
                continue
            for msg in messages(sat.recv_multipart()):
                if msg[0] == P.DISPATCH:
                    order = msgpack.unpackb(msg[1])
                    sat.send_multipart([P.SIGNATURE, P.DONE, M.done(order["id"], order["a"], "simulated", "msgpack",
                                                                    0.0), msg[3]])
                elif msg[0] in (P.HEARTBEAT, P.WELCOME):
                    sat.send_multipart(M.Heartbeat(sid="simulated").frames())
        sat.send_multipart(M.Leave("simulated").frames())
    finally:
        sat.close(100)
        ctx.term()


class Protocol:
    """A raw client DEALER speaking ``docs/protocol.rst``: one task at a time."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.client = self.ctx.socket(zmq.DEALER)
        self.client.linger = 0
        self.client.connect(endpoint)
        self._body = encode([[1], {}])[1]
        self._n = 0

    def once(self, kind: str) -> float:
        """One task, submitted and waited for; the round trip in seconds."""
        self._n += 1
        tid = f"lat{self._n}"
        t0 = time.perf_counter()
        self.client.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": kind, "c": "msgpack"}),
                                    *self._body])
        while True:
            if not self.client.poll(10_000):
                raise RuntimeError(f"no result for {tid} in 10 s")
            for msg in messages(self.client.recv_multipart()):
                if msg[0] == P.RESULT:
                    return time.perf_counter() - t0

    def close(self) -> None:
        self.client.close(0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips per stage")
    args = ap.parse_args(argv)
    n = args.n
    stages: list[tuple[str, list[float]]] = [("raw pyzmq (one hop)", raw(n))]
    with LocalCluster(satellites=0, workers=1, log_level="ERROR") as cluster:
        spawn = mp.get_context("spawn")
        stop = spawn.Event()
        simulated = spawn.Process(target=simulated_satellite, args=(cluster.endpoint, stop), daemon=True)
        simulated.start()
        cluster.wait_for_satellites(1)
        proto = Protocol(cluster.endpoint)
        try:
            for _ in range(100):
                proto.once("echo")
            stages.append(("orchestrator, simulated satellite", [proto.once("echo") for _ in range(n)]))
            stop.set()
            simulated.join(10)
            cluster.add_satellite(workers=1)
            deadline = time.monotonic() + 60
            with cluster.client() as c:  # until the simulated one is gone and the real one is here
                while [s.get("id") for s in c.status()["satellites"]] in ([], ["simulated"]) or \
                        len(c.status()["satellites"]) != 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the satellite did not take over from the simulated one")
                    time.sleep(0.1)
            for kind, label in (("echo.inline", "+ satellite, inline"), ("echo", "+ worker process")):
                for _ in range(100):
                    proto.once(kind)
                stages.append((label, [proto.once(kind) for _ in range(n)]))
        finally:
            proto.close()
        with cluster.client() as client:
            for _ in range(100):
                client.submit("echo", 1).result(30)
            rtts = []
            for _ in range(n):
                t0 = time.perf_counter()
                client.submit("echo", 1).result(30)
                rtts.append(time.perf_counter() - t0)
            stages.append(("+ Client API", rtts))
    print(f"one task at a time, {n} round trips per stage (µs)")
    print(f"{'stage':36s} {'p50':>8s} {'p99':>8s} {'p50 added':>10s}")
    before = 0.0
    for label, rtts in stages:
        p50, p99 = quantiles(rtts)
        print(f"{label:36s} {p50:8.0f} {p99:8.0f} {p50 - before:+10.0f}")
        before = p50
    return 0


if __name__ == "__main__":
    sys.exit(main())
