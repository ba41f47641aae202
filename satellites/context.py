"""What a running handler can know and say: its task id, attempt, cores, and progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class TaskContext:
    """The task a worker process is running now."""

    task_id: str
    attempt: int
    kind: str
    satellite: str
    _send: Callable[[dict[str, Any]], None] | None = None
    cores: int = 1  #: the cores the task asked for (its worker's thread pools are set to as many)

    def progress(self, **info: Any) -> None:
        """Send a progress report (any msgpack-encodable keyword values) to the orchestrator."""
        if self._send is not None:
            self._send(info)


_current: TaskContext | None = None


def current() -> TaskContext | None:
    """The context of the task running in this worker process, or ``None`` outside a task."""
    return _current


def set_current(ctx: TaskContext | None) -> None:
    """Install the context of the task about to run (used by the worker loop)."""
    global _current
    _current = ctx


def cores() -> int:
    """The cores the running task may use (``cores=`` at submit; 1 outside a satellite). Its worker's
    thread pools (OpenMP, BLAS, numba) are set to as many before it starts."""
    return _current.cores if _current is not None else 1


def progress(**info: Any) -> None:
    """Report progress of the current task (a no-op when called outside a satellite)."""
    if _current is not None:
        _current.progress(**info)
