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

Then **the floor of this shape**: the processes and threads a round trip of ``echo.inline`` through the
:class:`~orchester.Client` crosses, with nothing in them. Each stage adds one hand-over to the one before:

a. **one-hop proxy**: a DEALER in the caller's thread, a Python ROUTER–DEALER proxy process (the baseline of
   ``bench/throughput.py``), an echo process behind it;
b. **+ a satellite's inline thread**: the echo process hands each message to a thread of its own and takes
   the answer back through an ``inproc://`` PAIR, as a satellite's I/O loop and its inline thread do;
c. **+ a client's I/O thread**: the caller hands each request to an I/O thread through an ``inproc://``
   PAIR and waits for a :class:`concurrent.futures.Future` the I/O thread resolves, as
   :class:`~orchester.Client` does.

d. **Orchester**: ``echo.inline`` through :class:`~orchester.Client`, a real ``orchester serve`` and
   ``satellite run``: the same processes and threads, with the bus in them.

Stages (a) to (c) speak ``tcp://`` loopback, as ``bench/throughput.py``'s baselines do; (d), a
:class:`~orchester.LocalCluster`, speaks ``ipc://``. On the 2-core VM of ``docs/performance.rst`` the two
transports gave the one-hop proxy the same round trip within the noise.

Stage (c) is what the bus costs before it does anything: its ratio to (a) is what is left of a goal stated
as a multiple of the proxy's round trip for all the bus's own work (decoding, checking, tracking, routing),
and (d) minus (c) is what that work takes now.

Run: ``python bench/latency.py [--n 2000] [--floor-only]``
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages
sys.path.append(HERE)  # (last: for throughput.py's one-hop proxy, here and in the processes spawned)

import msgpack  # noqa: E402
import zmq  # noqa: E402
from throughput import proxy  # noqa: E402

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


# ----------------------------------------------------------------- the floor: the shape with nothing in it
def echo_behind(endpoint: str, threaded: bool) -> None:
    """The echo behind the proxy: answers in its loop, or (``threaded``) hands each message to a thread of its
    own and sends the answer when that thread wakes it through an ``inproc://`` PAIR (a satellite's inline
    thread). It runs until killed (the proxy keeps a ``STOP`` to itself)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    wake = ctx.socket(zmq.PAIR)
    wake.bind("inproc://floor-inline")
    todo: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
    done: collections.deque[list[Any]] = collections.deque()

    def inline() -> None:
        tx = ctx.socket(zmq.PAIR)
        tx.connect("inproc://floor-inline")
        while True:
            done.append(todo.get())
            tx.send(b"")

    threading.Thread(target=inline, daemon=True).start()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(wake, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if sock in ready:
            msg = sock.recv_multipart(copy=False)
            if threaded:
                todo.put(msg)
            else:
                sock.send_multipart(msg, copy=False)
        if wake in ready:
            wake.recv()
            while done:
                sock.send_multipart(done.popleft(), copy=False)


class HandOver:
    """A caller's thread and an I/O thread that owns the DEALER: each request handed over through an
    ``inproc://`` PAIR, each answer through a :class:`concurrent.futures.Future` (as :class:`~orchester.Client`)."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.ctx, self.endpoint = ctx, endpoint
        self._out: collections.deque[tuple[bytes, cf.Future[Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._tx = ctx.socket(zmq.PAIR)
        self._tx.bind("inproc://floor-client")
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def once(self) -> float:
        t0 = time.perf_counter()
        fut: cf.Future[Any] = cf.Future()
        with self._lock:
            self._out.append((b"x" * 16, fut))
            self._tx.send(b"")
        fut.result(10)
        return time.perf_counter() - t0

    def close(self) -> None:
        with self._lock:
            self._tx.send(b"STOP")
        self._thread.join(5)
        self._tx.close(0)

    def _loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        rx = self.ctx.socket(zmq.PAIR)
        rx.linger = 0
        rx.connect("inproc://floor-client")
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(rx, zmq.POLLIN)
        waiting: collections.deque[cf.Future[Any]] = collections.deque()
        try:
            while True:
                ready = dict(poller.poll())
                if rx in ready:
                    with self._lock:
                        if rx.recv() == b"STOP":
                            break
                    while self._out:
                        body, fut = self._out.popleft()
                        waiting.append(fut)
                        sock.send(body)
                if sock in ready:
                    waiting.popleft().set_result(sock.recv())
        finally:
            sock.close(0)
            rx.close(0)


def floor(n: int) -> list[tuple[str, list[float]]]:
    """The stages of the floor (see the module's docstring), each ``n`` round trips after 100 to warm up."""
    out: list[tuple[str, list[float]]] = []
    spawn = mp.get_context("spawn")
    for label, threaded, handed in (("(a) one-hop proxy", False, False), ("(b) + a satellite's inline thread",
                                    True, False), ("(c) + a client's I/O thread", True, True)):
        ctx = zmq.Context()
        probe = ctx.socket(zmq.ROUTER)
        front, back = (f"tcp://127.0.0.1:{probe.bind_to_random_port('tcp://127.0.0.1')}" for _ in range(2))
        probe.close(0)
        procs = [spawn.Process(target=proxy, args=(front, back), daemon=True),
                 spawn.Process(target=echo_behind, args=(back, threaded), daemon=True)]
        for p in procs:
            p.start()
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(front)
        try:
            if handed:
                client = HandOver(ctx, front)
                try:
                    for _ in range(100):
                        client.once()
                    out.append((label, [client.once() for _ in range(n)]))
                finally:
                    client.close()
            else:
                rtts = []
                for _ in range(n + 100):
                    t0 = time.perf_counter()
                    dealer.send(b"x" * 16)
                    if not dealer.poll(10_000):
                        raise RuntimeError("the floor's echo did not answer in 10 s")
                    dealer.recv()
                    rtts.append(time.perf_counter() - t0)
                out.append((label, rtts[100:]))
            dealer.send(b"STOP")
            procs[0].join(5)  # (the proxy ends at the STOP; the echo behind it runs until killed)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
            dealer.close(0)
            ctx.destroy(linger=0)  # (whatever a stage left open: a failed stage never hangs the run)
    with LocalCluster(satellites=1, workers=1, log_level="ERROR") as cluster, cluster.client() as client:
        out.append(("(d) Orchester, echo.inline, Client", client_roundtrips(client, "echo.inline", n)))
    return out


def client_roundtrips(client: Any, kind: str, n: int) -> list[float]:
    """``n`` tasks of ``kind`` one at a time through :class:`~orchester.Client`, after 100 to warm up: each
    round trip from the caller's submit to its result, in seconds."""
    for _ in range(100):
        client.submit(kind, 1).result(30)
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.submit(kind, 1).result(30)
        rtts.append(time.perf_counter() - t0)
    return rtts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips per stage")
    ap.add_argument("--floor-only", action="store_true", help="only the floor: the shape with nothing in it")
    args = ap.parse_args(argv)
    n = args.n
    if n < 100:
        ap.error("--n must be at least 100")
    if not args.floor_only:
        print_stages(f"one task at a time, {n} round trips per stage (µs)", path(n))
    bottom = floor(n)
    print_stages(f"\nthe floor: the same processes and threads with nothing in them (a-c), then the bus in them (d), "
                 f"{n} round trips per stage (µs)",
                 bottom)
    base, shape, bus = (quantiles(bottom[i][1])[0] for i in (0, 2, 3))
    print(f"the shape alone costs {shape / base:.2f}x the one-hop proxy's p50: a goal of 2x leaves "
          f"{max(2 * base - shape, 0):.0f} µs ({max(2 - shape / base, 0):.2f}x) for all the bus's own work, "
          f"which takes {bus - shape:.0f} µs now ({bus / base:.2f}x in all)")
    return 0


def print_stages(title: str, stages: list[tuple[str, list[float]]]) -> None:
    """Each stage's p50 and p99, and what its p50 adds to the one before."""
    print(title)
    print(f"{'stage':36s} {'p50':>8s} {'p99':>8s} {'p50 added':>10s}")
    before = 0.0
    for label, rtts in stages:
        p50, p99 = quantiles(rtts)
        print(f"{label:36s} {p50:8.0f} {p99:8.0f} {p50 - before:+10.0f}")
        before = p50


def path(n: int) -> list[tuple[str, list[float]]]:
    """The stages of the bus's path (see the module's docstring), one piece added at a time."""
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
            stages.append(("+ Client API", client_roundtrips(client, "echo", n)))
    return stages


if __name__ == "__main__":
    sys.exit(main())
