"""A simulated fleet against a real ``orchester serve``: what 10, 100, 1,000 (or more) satellites cost.

The fleet is one process of N DEALER sockets speaking the satellite side of ``docs/protocol.rst``:
``REGISTER`` (one slot, kind ``echo``), ``HEARTBEAT {sid}`` every interval when nothing else was sent,
and for each ``DISPATCH`` a ``DONE`` at once with the task's result (its first argument): no worker,
no work, so everything measured is the orchestrator's. ``RECONNECT`` is answered with a new
``REGISTER``. The orchestrator is a real ``orchester serve`` process; its CPU time is read from
``/proc``.

For each fleet size N (``--sizes``):

* **registration**: seconds from the fleet's start until the status lists N satellites, and the
  orchestrator's CPU in that time;
* **idle heartbeats**: the orchestrator's CPU over ``--idle`` seconds with N idle satellites, as a
  share of one core (``--heartbeat-interval``, 1 s by default);
* **status**: the wall time of one ``STATUS`` request and the size of its reply;
* **tasks**: ``--tasks`` echo tasks through a window of 2,000 (``Client.submit``), the
  orchestrator's CPU per task, its wake-ups per task (its ``wakeups`` counter: fewer, larger wake-ups
  cost less a task) and the throughput;
* **stability**: satellites lost and registrations repeated (the orchestrator's counters) during the
  run: both must stay 0.

Run: ``python bench/fleet.py [--sizes 10,100,1000] [--tasks 20000] [--idle 10] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import msgpack  # noqa: E402
import zmq  # noqa: E402

from orchester import Client  # noqa: E402
from serializers import pack, unpack  # noqa: E402
from serializers import protocol as P  # noqa: E402
from serializers.messages import done  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def fleet(endpoint: str, n: int, interval: float, stop: Any) -> None:
    """N satellites in this process, until ``stop`` is set (see the module docstring)."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, n + 64)  # (1,023 by default)
    socks: list[zmq.Socket[bytes]] = []
    sids = [f"sim{i:05d}" for i in range(n)]
    last = [0.0] * n
    poller = zmq.Poller()
    index: dict[zmq.Socket[bytes], int] = {}

    def register(i: int) -> None:
        socks[i].send_multipart([P.SIGNATURE, P.REGISTER, pack(
            {"sid": sids[i], "slots": 1, "workers": 1, "kinds": ["echo"], "tags": [], "host": "sim", "pid": i,
             "cores": 1})])
        last[i] = time.monotonic()

    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.identity = f"s:{sids[i]}:".encode()
        s.rcvhwm = s.sndhwm = 10_000
        s.connect(endpoint)
        socks.append(s)
        index[s] = i
        poller.register(s, zmq.POLLIN)
    for i in range(n):
        register(i)
    beat = [pack({"sid": sid}) for sid in sids]
    try:
        while not stop.is_set():
            now = time.monotonic()
            for s, _ in poller.poll(100):
                i = index[s]
                for _ in range(1000):
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    messages = [frames]
                    if frames[1] == P.BATCH:  # several messages: {n: [frames of each], z: [length of each frame]},
                        batch = msgpack.unpackb(frames[2])  # then a body with those frames back to back
                        body, lone, messages, at, k = frames[3], frames[4:], [], 0, 0  # (-1: the frame comes alone)
                        sizes = iter(batch["z"])
                        for count in batch["n"]:
                            msg = [frames[0]]
                            for _ in range(count):
                                z = next(sizes)
                                if z < 0:
                                    msg.append(lone[k])
                                    k += 1
                                else:
                                    msg.append(body[at:at + z])
                                    at += z
                            messages.append(msg)
                    for msg in messages:
                        cmd = msg[1]
                        if cmd == P.DISPATCH:
                            order = msgpack.unpackb(msg[2])
                            task = unpack(msg[3])
                            args = msgpack.unpackb(msg[4]) if task.get("c", "msgpack") == "msgpack" else [[None]]
                            result = msgpack.packb(args[0][0] if args and args[0] else None)
                            s.send_multipart([P.SIGNATURE, P.DONE, done(order["id"], order["a"], sids[i],
                                                                         task.get("c", "msgpack"), 0.0), result])
                            last[i] = now
                        elif cmd == P.RECONNECT:
                            register(i)
            for i in range(n):
                if now - last[i] >= interval:
                    socks[i].send_multipart([P.SIGNATURE, P.HEARTBEAT, beat[i]])
                    last[i] = now
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def serve(tmp: Path, interval: float) -> tuple[subprocess.Popen[bytes], str]:
    """``orchester serve`` on loopback, OS-chosen ports; its client endpoint."""
    endpoints = tmp / "endpoints.json"
    proc = subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "ERROR", "serve", "--bind",
                             "tcp://127.0.0.1:0", "--pub", "tcp://127.0.0.1:0", "--endpoint-file", str(endpoints),
                             "--heartbeat-interval", str(interval), "--max-client-tasks", "1000000",
                             "--request-rate", "1000"])
    deadline = time.monotonic() + 60
    while not endpoints.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("orchester serve did not start")
        time.sleep(0.05)
    time.sleep(0.1)
    return proc, json.loads(endpoints.read_text())["bind"][0]


def one_size(n: int, args: argparse.Namespace) -> dict[str, float]:
    """The figures of one fleet size."""
    with tempfile.TemporaryDirectory(prefix="orchester-bench-fleet-") as tmp:
        proc, endpoint = serve(Path(tmp), args.heartbeat_interval)
        stop = mp.Event()
        sim = mp.Process(target=fleet, args=(endpoint, n, args.heartbeat_interval, stop), daemon=True)
        try:
            with Client(endpoint) as client:
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                sim.start()
                while client.status(timeout=60, satellites=0)["fleet"]["satellites"] < n:
                    if time.monotonic() - t0 > 600 or not sim.is_alive():
                        raise RuntimeError(f"the fleet of {n} did not register in 600 s"
                                           if sim.is_alive() else "the simulated fleet died")
                    time.sleep(0.05)
                out: dict[str, float] = {"satellites": n, "register_s": time.monotonic() - t0,
                                         "register_cpu_s": cpu_seconds(proc.pid) - c0}
                time.sleep(1.0)
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                time.sleep(args.idle)
                out["idle_core_share"] = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
                t0 = time.perf_counter()
                st = client.status(timeout=60)
                out["status_ms"] = (time.perf_counter() - t0) * 1000
                out["status_kb"] = len(pack(st)) / 1024
                assert st["fleet"]["satellites"] == n, st["fleet"]
                t0 = time.perf_counter()
                listed = sum(1 for _ in client.satellites(timeout=60))  # the full list, a page at a time
                out["list_ms"] = (time.perf_counter() - t0) * 1000
                assert listed == n, (listed, n)
                wakeups = client.status(timeout=60)["counters"].get("wakeups", 0)
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                window: list[Any] = []
                for i in range(args.tasks):
                    window.append(client.submit("echo", i))
                    if len(window) >= 2000:
                        window.pop(0).result(timeout=600)
                for f in window:
                    f.result(timeout=600)
                wall = time.monotonic() - t0
                out["cpu_per_task_us"] = (cpu_seconds(proc.pid) - c0) / args.tasks * 1e6
                out["tasks_per_s"] = args.tasks / wall
                counters = client.status(timeout=60)["counters"]
                out["wakeups_per_task"] = (counters.get("wakeups", 0) - wakeups) / args.tasks
                out["lost"] = counters.get("satellites_lost", 0)
                out["registered_again"] = counters.get("registered_again", 0) + max(
                    0, counters.get("satellites_registered", 0) - n)
                return out
        finally:
            stop.set()
            sim.join(30)
            if sim.is_alive():
                sim.kill()
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="fleet sizes, comma-separated")
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle heartbeats measured")
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    rows = [one_size(int(n), args) for n in args.sizes.split(",") if n]
    print(f"a simulated fleet against orchester serve, {args.tasks:,} echo tasks each, heartbeats every "
          f"{args.heartbeat_interval:g} s")
    print(f"{'satellites':>10} {'register s':>10} {'reg. CPU s':>10} {'idle core':>9} {'status ms':>9} "
          f"{'status KB':>9} {'list ms':>8} {'CPU/task µs':>11} {'wakes/task':>10} {'tasks/s':>8} {'lost':>5} "
          f"{'re-reg':>6}")
    for r in rows:
        print(f"{r['satellites']:>10,.0f} {r['register_s']:>10.2f} {r['register_cpu_s']:>10.2f} "
              f"{r['idle_core_share']:>9.1%} {r['status_ms']:>9.1f} {r['status_kb']:>9.0f} "
              f"{r['list_ms']:>8.0f} {r['cpu_per_task_us']:>11.0f} {r['wakeups_per_task']:>10.2f} "
              f"{r['tasks_per_s']:>8.0f} {r['lost']:>5.0f} "
              f"{r['registered_again']:>6.0f}")
    base = rows[0]
    for r in rows:
        r["heartbeat_cpu_us"] = r["idle_core_share"] * args.heartbeat_interval / r["satellites"] * 1e6
    for r in rows[1:]:
        print(f"  {r['satellites']:,.0f} against {base['satellites']:,.0f}: CPU per task "
              f"×{r['cpu_per_task_us'] / base['cpu_per_task_us']:.2f}; CPU per satellite heartbeat "
              f"{r['heartbeat_cpu_us']:.0f} µs")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
