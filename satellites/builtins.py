"""Built-in task kinds: ``echo`` (and ``echo.inline``, the same run in the satellite's own thread), ``sleep``,
``fail`` and ``spin``."""

from __future__ import annotations

import time
from typing import Any

from .context import progress
from .registry import task


@task("echo")
def echo(*args: Any, **kwargs: Any) -> Any:
    """Return the argument (or the arguments as a list, with keyword arguments as a map)."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if kwargs:
        return {"args": list(args), "kwargs": kwargs}
    return list(args)


@task("echo.inline", inline=True)
def echo_inline(*args: Any, **kwargs: Any) -> Any:
    """``echo``, run in the satellite's own thread (a light kind: no worker-process hop)."""
    return echo(*args, **kwargs)


@task("sleep", reports_progress=True, stall_timeout=30.0)
def sleep(seconds: float = 0.0, steps: int = 1) -> float:
    """Sleep ``seconds`` (in ``steps`` parts, reporting progress after each); return the seconds."""
    seconds = float(seconds)
    steps = max(1, int(steps))
    for i in range(steps):
        time.sleep(seconds / steps)
        if steps > 1:
            progress(done=i + 1, total=steps)
    return seconds


@task("fail")
def fail(message: str = "task failed on purpose", exc_type: str = "RuntimeError") -> None:
    """Raise ``exc_type(message)`` (a built-in exception name; RuntimeError otherwise)."""
    import builtins

    cls = getattr(builtins, exc_type, RuntimeError)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    raise cls(message)


@task("spin", reports_progress=True, stall_timeout=30.0)
def spin(seconds: float = 0.1) -> int:
    """Keep one CPU busy for ``seconds`` of wall time; return the loop count."""
    deadline = time.monotonic() + float(seconds)
    n = 0
    next_report = time.monotonic() + 0.5
    while (t := time.monotonic()) < deadline:
        for _ in range(1000):
            n += 1
        if t >= next_report:
            progress(loops=n)
            next_report = t + 0.5
    return n


def _register_genx() -> None:
    """Offer ``genx.fit`` wherever GenX is installed (GenX itself is imported only when a fit runs)."""
    from importlib.util import find_spec

    if find_spec("genx") is not None:
        from . import genx_task  # noqa: F401


_register_genx()
