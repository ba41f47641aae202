"""Where one round trip's microseconds go, hop by hop: a timeline across the client, the orchestrator, the
satellite and its inline thread.

``bench/latency.py`` says what each piece of the path adds to a round trip; this says when each step of
one round trip happens. Every process on the path records the monotonic clock (one clock for every process
of a machine) at the points that mark a step: each wake-up of its loop, each message it handled, each send,
the start and the end of the task. The hooks are installed from outside, by this script, before the
command runs: the code measured is the code shipped. It starts ``orchester serve`` and one ``satellite run``
under them, sends one task at a time (a raw DEALER speaking ``docs/protocol.rst``, or with ``--client`` the
:class:`~orchester.Client` API, whose I/O thread is traced too), then prints, for the most common order of
steps, the median time of each from the client's send and what it took after the step before.

A step that follows one in another process is a hop: what ZeroMQ and the operating system take to wake a
process (a raw pyzmq round trip is two of them); a step that follows one in the same process is its own
Python.

Run: ``python bench/timeline.py [--n 2000] [--kind echo.inline|echo] [--client] [--durability batch]``
"""

from __future__ import annotations

import argparse
import atexit
import collections
import glob
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]  # bench/*.py must not shadow packages

import zmq  # noqa: E402

from serializers import encode, pack  # noqa: E402
from serializers import messages as M  # noqa: E402
from serializers import protocol as P  # noqa: E402

#: Where a hooked process writes its steps at exit (``<dir>/<role>.<pid>``).
OUT_ENV = "ORCHESTER_TIMELINE_DIR"
_events: list[tuple[float, str, str]] = []
_clock = time.monotonic
_role = "client"  #: this process's part (set by :func:`install`)


def mark(step: str) -> None:
    """Record ``step`` now, by this process's role and the thread that took it."""
    _events.append((_clock(), f"{_role}/{threading.current_thread().name}", step))


def _name(command: Any) -> str:
    return P.command_name(bytes(command))


def _wrap(owner: Any, attr: str, before: Callable[..., str | None] | None = None,
          after: Callable[..., str | None] | None = None) -> None:
    """Replace ``owner.attr`` by a function that marks ``before(*args)`` and ``after(*args)`` around it (no mark
    when they return None)."""
    inner = getattr(owner, attr)

    def traced(*args: Any, **kw: Any) -> Any:
        if before is not None and (step := before(*args, **kw)) is not None:
            mark(step)
        out = inner(*args, **kw)
        if after is not None and (step := after(*args, **kw)) is not None:
            mark(step)
        return out

    setattr(owner, attr, traced)


def _poll(role: str) -> None:
    """Every loop's poll: a wake-up with something to read is a step."""
    inner = zmq.Poller.poll
    who = "client I/O thread" if role == "client" else role

    def poll(self: zmq.Poller, timeout: int | None = None) -> Any:
        ready = inner(self, timeout)
        if ready:
            mark(f"{who} wakes")
        return ready

    zmq.Poller.poll = poll  # type: ignore[method-assign]


def install(role: str) -> None:
    """Hook the steps of ``role`` (``orchestrator``, ``satellite``, ``client``) into this process; the steps are
    written at exit when :data:`OUT_ENV` names a folder."""
    global _role
    _role = role
    _poll(role)
    if role == "orchestrator":
        from orchester.server import broker, core

        _wrap(core.Orchestrator, "handle", after=lambda self, sock, frames, *a, **k:
              f"orchestrator handled {_name(frames[2])}" if len(frames) > 2 else None)
        _wrap(broker, "send_frames", before=lambda sock, frames, *a: f"orchestrator sends {_name(frames[2])}")
    elif role == "satellite":
        from satellites import inline, satellite
        from satellites.worker import RUN

        _wrap(satellite.Satellite, "_handle", after=lambda self, frames, now: f"satellite handled {_name(frames[1])}")
        _wrap(satellite.Satellite, "_run_inline", before=lambda *a: "satellite hands it to its inline thread")
        _wrap(satellite, "send_frames", before=lambda sock, frames, *a: "satellite hands it to a worker"
              if frames[1] == RUN else f"satellite sends {_name(frames[1])}")
        _wrap(inline, "run_task", before=lambda *a, **k: "inline thread starts the task",
              after=lambda *a, **k: "inline thread ends the task")
    elif role == "client":
        from orchester.client import core as client_core
        from orchester.client import sync

        _wrap(sync, "send_frames", before=lambda sock, frames, *a: f"client I/O thread sends {_name(frames[1])}")
        _wrap(client_core.ClientCore, "_handle", after=lambda self, frames:
              f"client I/O thread handled {_name(frames[1])}")
    out = os.environ.get(OUT_ENV)
    if out:
        atexit.register(_write, os.path.join(out, f"{role}.{os.getpid()}"))


def _write(path: str) -> None:
    with open(path, "w") as f:
        f.writelines(f"{t:.7f}\t{actor}\t{step}\n" for t, actor, step in _events)


def hooked(argv: list[str]) -> None:
    """``timeline.py --hooked orchester|satellites ARGS``: that command line, with the steps of its role hooked."""
    program, args = argv[0], argv[1:]
    install("orchestrator" if program == "orchester" else "satellite")
    if program == "orchester":
        from orchester.cli.main import main as cli
    else:
        from satellites.cli import main as cli
    cli.main(args=args, prog_name=program)


# ---------------------------------------------------------------- the run
def start(program: str, args: list[str], out: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hooked", program, *args],
                            env={**os.environ, OUT_ENV: out})


def raw_round_trips(endpoint: str, kind: str, n: int) -> None:
    """``n`` tasks, one at a time, from a DEALER speaking the protocol (warmed up first, unmarked)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    body = encode([[1], {}])[1]
    try:
        for i in range(-200, n):
            tid = f"tl{i}"
            if i >= 0:
                mark("client sends SUBMIT")
            sock.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": kind, "c": "msgpack"}), *body])
            while True:
                if not sock.poll(30_000):
                    raise RuntimeError(f"no result for {tid} in 30 s")
                frames = sock.recv_multipart()
                messages = [m[1:] for m in M.unbatch(frames, 1)] if frames[1] == P.BATCH else [frames[1:]]
                if i >= 0:
                    for m in messages:
                        mark(f"client receives {_name(m[0])}")
                if any(m[0] == P.RESULT for m in messages):
                    break
    finally:
        sock.close(0)
        ctx.term()


def client_round_trips(endpoint: str, kind: str, n: int) -> None:
    """``n`` tasks, one at a time, through :class:`~orchester.Client` (its I/O thread hooked)."""
    from orchester import Client

    with Client(endpoint) as client:
        for _ in range(200):
            client.submit(kind, 1).result(30)
        install("client")
        for _ in range(n):
            mark("caller submits")
            future = client.submit(kind, 1)
            future.result(30)
            mark("caller has the result")


def timeline(folder: str, first: str) -> tuple[int, int, list[tuple[str, str, float]]]:
    """The steps every process wrote, cut into round trips at ``first``: (round trips, of them in the most
    common order, [(actor, step, median µs from the first)])."""
    events: list[tuple[float, str, str]] = []
    for path in glob.glob(os.path.join(folder, "*.*")):
        with open(path) as f:
            for line in f:
                t, actor, step = line.rstrip("\n").split("\t")
                events.append((float(t), actor, step))
    events.extend(_events)
    events.sort()
    trips: list[list[tuple[float, str, str]]] = []
    for event in events:
        if event[2] == first:
            trips.append([event])
        elif trips:
            trips[-1].append(event)
    orders = collections.Counter(tuple(e[1:] for e in trip) for trip in trips)
    order, count = orders.most_common(1)[0]
    chosen = [trip for trip in trips if tuple(e[1:] for e in trip) == order]
    return len(trips), count, [(actor, step, statistics.median((trip[i][0] - trip[0][0]) * 1e6 for trip in chosen))
                               for i, (actor, step) in enumerate(order)]


#: Steps that make another process or thread go on, and what the step they cause names.
_CAUSES = ("sends", "hands it to", "ends the task", "submits")


def cause(steps: list[tuple[str, str, float]], i: int) -> int | None:
    """The step before step ``i`` that made it happen: for a message handled or received, the wake-up that read it
    (or its send, when nothing polled: a raw client); for a wake-up,
    the send of what it then handles (else the last step that hands work on); for the inline thread's start, the
    hand-over; for the caller's result, the I/O thread's handling of it; otherwise the same thread's step before."""
    actor, step, _ = steps[i]

    def last(match: Callable[[str, str], bool]) -> int | None:
        return next((j for j in range(i - 1, -1, -1) if match(*steps[j][:2])), None)

    words = step.split()

    def sender(command: str) -> int | None:
        return last(lambda a, s: a.split("/")[0] != actor.split("/")[0] and s.endswith(f"sends {command}"))

    if words[-2] in ("handled", "receives"):
        sent = sender(words[-1])
        woke = last(lambda a, s: a == actor)  # (its wake-up, when the loop polled: the hop ends there)
        return woke if woke is not None and (sent is None or woke > sent) else sent
    if step.endswith("wakes"):
        after = next((s for a, s, _ in steps[i + 1:] if a == actor), "").split()
        if after[-2:-1] == ["handled"]:
            return sender(after[-1])
        return last(lambda a, s: any(c in s for c in _CAUSES) and (a != actor or s.endswith("to a worker")))
    if step.endswith("starts the task"):
        return last(lambda a, s: s.endswith("to its inline thread"))
    if step.endswith("has the result"):
        return last(lambda a, s: s.endswith("handled RESULT"))
    return last(lambda a, s: a == actor)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--hooked"]:
        hooked(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips")
    ap.add_argument("--kind", default="echo.inline", choices=("echo.inline", "echo"),
                    help="echo.inline (the satellite's thread) or echo (a worker)")
    ap.add_argument("--client", action="store_true", help="through the Client API instead of a raw DEALER")
    ap.add_argument("--durability", choices=("full", "batch", "off"), default=None,
                    help="the orchestrator journals to a temporary folder with this durability (default: no journal)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")
    with tempfile.TemporaryDirectory(prefix="orchester-timeline-") as tmp:
        out = os.path.join(tmp, "steps")
        os.mkdir(out)
        endpoint = f"ipc://{tmp}/bus.sock"
        journal = ["--journal", f"{tmp}/journal", "--durability", args.durability] if args.durability else []
        procs = [start("orchester", ["--log-level", "ERROR", "serve", "--bind", endpoint, "--pub",
                                     f"ipc://{tmp}/events.sock", *journal], out)]
        try:
            procs.append(start("satellites", ["--log-level", "ERROR", "run", "--connect", endpoint, "--workers", "1",
                                              "--id", "timeline"], out))
            if args.client:
                client_round_trips(endpoint, args.kind, args.n)
            else:
                raw_round_trips(endpoint, args.kind, args.n)
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
            for proc in reversed(procs):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        trips, count, steps = timeline(out, "caller submits" if args.client else "client sends SUBMIT")
    print(f"one {args.kind} task at a time{' through the Client API' if args.client else ''}: {trips} round trips, "
          f"{count} of them in this order; the median time of each step from the first (µs)")
    at = {i: t for i, (_, _, t) in enumerate(steps)}
    for i, (actor, step, t) in enumerate(steps):
        j = cause(steps, i)
        how = ""
        if j is not None and steps[j][0].split("/")[0] != actor.split("/")[0]:
            how = "a hop from another process"
        elif j is not None and steps[j][0] != actor:
            how = "from another thread"
        elif j is not None and steps[j][1].endswith("to a worker"):
            how = "there and back to the worker process"
        print(f"  {step:44s} {t:8.0f}  {t - at[j] if j is not None else 0:+6.0f}  {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
