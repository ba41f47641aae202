"""Task kinds used by the integration tests (imported by satellites with --tasks)."""

from __future__ import annotations

import os
import signal
import time

from satellites import current, progress, task
from topology_tests.tasks import mark


@task("t.pid")
def pid(_: object = None) -> int:
    """The worker process id."""
    return os.getpid()


@task("t.exit")
def hard_exit(code: int = 3) -> None:
    """Leave the worker process at once, as a crash would."""
    os._exit(code)


@task("t.segv")
def segfault() -> None:
    """Die by SIGSEGV."""
    os.kill(os.getpid(), signal.SIGSEGV)


@task("t.progress", reports_progress=True)
def with_progress(steps: int = 5, pause: float = 0.06) -> str:
    """Report progress ``steps`` times; return the task id seen by the handler."""
    for i in range(steps):
        time.sleep(pause)
        progress(step=i + 1, of=steps)
    ctx = current()
    return ctx.task_id if ctx else ""


@task("t.identity")
def identity(x: object) -> dict[str, object]:
    """Return the input with the worker's satellite id."""
    ctx = current()
    return {"x": x, "sat": ctx.satellite if ctx else None, "attempt": ctx.attempt if ctx else None}


@task("t.blob")
def blob(size: int) -> str:
    """A result of ``size`` characters from a tiny input."""
    return "x" * size


@task("t.hang", reports_progress=True, stall_timeout=0.5)
def hang(seconds: float = 60.0) -> None:
    """Report progress once, then stop making progress (an endless loop, seen from outside)."""
    progress(step=1)
    time.sleep(seconds)


task("t.mark")(mark)  # the harness's marking kind, under the name the tests use


@task("t.inc")
def inc(x: int = 0, by: int = 1) -> int:
    """``x + by`` (a chain's link)."""
    return x + by


@task("t.sum")
def total(values: list[int]) -> int:
    """The sum of ``values`` (a fan-in)."""
    return sum(values)


@task("t.describe")
def describe(value: object) -> dict[str, object]:
    """What the handler received: its type's name, and a failed dependency's error type."""
    return {"type": type(value).__name__, "error": getattr(value, "type", None),
            "task": getattr(value, "task_id", None)}


@task("t.threads")
def threads() -> dict[str, object]:
    """The cores the task was given, and what its worker's thread pools were set to."""
    from threadpoolctl import threadpool_info

    from satellites import context

    return {"cores": context.cores(), "omp": os.environ.get("OMP_NUM_THREADS"),
            "blas": sorted({int(p["num_threads"]) for p in threadpool_info()})}


@task("t.hold")
def hold(seconds: float = 0.2) -> dict[str, object]:
    """Hold the worker ``seconds``; when it ran (monotonic, machine-wide), where, and with how many cores."""
    from satellites import context

    ctx = current()
    start = time.monotonic()
    time.sleep(seconds)
    return {"start": start, "end": time.monotonic(), "sat": ctx.satellite if ctx else "", "cores": context.cores()}


@task("t.link")
def link(previous: dict[str, float] | None = None, seconds: float = 0.1) -> dict[str, float]:
    """A chain's link: one more than ``previous``, and when it ran (monotonic, machine-wide) and when
    ``previous`` ended (a link can only start after it)."""
    start = time.monotonic()
    time.sleep(seconds)
    n = previous["n"] + 1 if previous else 1
    return {"n": n, "start": start, "end": time.monotonic(), "previous_end": previous["end"] if previous else 0.0}


@task("t.inline_pid", inline=True)
def inline_pid(_: object = None) -> int:
    """The process a light task runs in (the satellite's own)."""
    return os.getpid()


@task("t.inline_wait", inline=True, reports_progress=True, stall_timeout=60.0)
def inline_wait(seconds: float = 1.0) -> int:
    """A light kind that is not light: waits ``seconds`` (reporting progress once), returns the process id."""
    progress(waited=0)
    time.sleep(seconds)
    return os.getpid()
