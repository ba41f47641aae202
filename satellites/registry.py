"""Task kinds: named handlers that satellites run in their worker processes.

Register a handler with the :func:`task` decorator in a module, and start a
satellite with ``--tasks that.module`` (or ``Satellite(tasks=["that.module"])``)::

    from satellites import task, progress

    @task("mylab.square")
    def square(x):
        return x * x

    @task("mylab.scan", reports_progress=True, stall_timeout=60)
    def scan(points):
        for i, p in enumerate(points):
            ...
            progress(done=i + 1, total=len(points))

    @task("mylab.lookup", inline=True)     # light: runs in the satellite's own thread
    def lookup(key):
        return TABLE.get(key)

Handlers take the positional and keyword arguments given to ``Client.submit``
and return any value the chosen codec can encode (numpy arrays travel as
zero-copy frames).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class TaskKind:
    """A registered handler and what it declares about itself."""

    name: str
    fn: Callable[..., Any]
    #: Whether the handler calls :func:`satellites.progress` (the tracker watches it).
    reports_progress: bool = False
    #: Seconds without progress after which the task counts as stalled (progress-reporting kinds).
    stall_timeout: float | None = None
    #: The docstring of the handler.
    doc: str = ""
    #: Version of what the kind runs (e.g. the GenX version), told to the orchestrator and clients.
    version: str = ""
    #: A light task: run in the satellite's own thread, without the worker-process hop
    #: (:mod:`satellites.inline`; it cannot be killed: a cancelled one is answered and its result dropped).
    inline: bool = False


class UnknownKind(LookupError):
    """No handler is registered under the asked name."""


class TaskRegistry:
    """Handlers by kind name."""

    def __init__(self) -> None:
        self._kinds: dict[str, TaskKind] = {}

    def register(self, name: str, fn: Callable[..., Any], *, reports_progress: bool = False,
                 stall_timeout: float | None = None, version: str = "", inline: bool = False) -> TaskKind:
        """Register ``fn`` under ``name`` (re-registering the same function is a no-op)."""
        if not name or not isinstance(name, str):
            raise ValueError("a task kind needs a non-empty string name")
        old = self._kinds.get(name)
        if old is not None and old.fn is not fn and getattr(old.fn, "__qualname__", None) != fn.__qualname__:
            raise ValueError(f"task kind {name!r} is already registered to {old.fn!r}")
        kind = TaskKind(name, fn, reports_progress, stall_timeout, (fn.__doc__ or "").strip(), version, inline)
        self._kinds[name] = kind
        return kind

    def get(self, name: str) -> TaskKind:
        """The handler of ``name``; :class:`UnknownKind` if none."""
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownKind(f"no task kind {name!r} on this satellite; known: {sorted(self._kinds)}") from None

    def kinds(self) -> list[str]:
        """Registered kind names, sorted."""
        return sorted(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds


#: The process-wide registry used by the decorator and by satellites.
registry = TaskRegistry()


def task(name: str | None = None, *, reports_progress: bool = False,
         stall_timeout: float | None = None, version: str = "", inline: bool = False) -> Callable[[F], F]:
    """Decorator: register the function as task kind ``name`` (default: ``module.function``).

    ``inline=True``: a light task (microseconds to milliseconds, nothing a kill would have to free), run in the
    satellite's own thread without the worker-process hop; the default runs each task in a worker process."""

    def deco(fn: F) -> F:
        registry.register(name or f"{fn.__module__}.{fn.__name__}", fn, reports_progress=reports_progress,
                          stall_timeout=stall_timeout, version=version, inline=inline)
        return fn

    return deco


def load_task_modules(modules: list[str] | tuple[str, ...]) -> None:
    """Import each module so its ``@task`` handlers register; clear error if one cannot load."""
    importlib.import_module("satellites.builtins")
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:
            raise ImportError(f"cannot import task module {mod!r}: {type(exc).__name__}: {exc}") from exc
