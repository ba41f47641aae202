"""Routing strategies: which satellite with free credit gets the next task.

A strategy is any object with a ``name`` and a ``choose(task, candidates)``
method; ``candidates`` is never empty and holds only satellites that offer the
task's kind, have every tag it requires and have credit left. Strategies are
pure: they may keep counters but never touch a socket or a clock.

A strategy may also have a ``rank(sat, key)`` method, the value its ``choose`` minimises (the
built-in ones do): the fleet then keeps, per queue key, the ready satellites in a heap by rank, and
a dispatch costs the same with 10 satellites as with 5,000. Without it, ``choose`` gets the list of
ready candidates of the key.

Name a built-in strategy (``least_loaded``, ``round_robin``, ``tags``) or a
class by import path (``package.module:ClassName``). An import path runs code (the
module's import, the class's constructor), so only the paths the operator allowed at
start (``serve --strategy`` and ``--allow-strategy``) are resolved; each must name a class
with a ``choose`` method, checked before it is instantiated.
"""

from __future__ import annotations

import importlib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from orchester.server.fleet import SatelliteRecord
from orchester.server.tasks import QueueKey, Task


class RoutingStrategy(Protocol):
    """The routing interface."""

    name: str

    def choose(self, task: Task, candidates: Sequence[SatelliteRecord]) -> SatelliteRecord:
        """Return one of ``candidates`` for ``task``."""


class Ranked(ABC):
    """A strategy that picks the candidate of least :meth:`rank` (the built-in ones): ``choose`` scans the
    candidates, the fleet's index serves the same pick from a heap."""

    name = "ranked"
    #: whether :meth:`rank` may read a satellite's light tasks (``inflight`` holds them too): then the fleet ranks
    #: a satellite again whenever one comes or goes. The built-in ranks read ``load`` and ``last_dispatch``,
    #: which light tasks do not change; a strategy of one's own keeps the safe default.
    reads_light = True

    def choose(self, task: Task, candidates: Sequence[SatelliteRecord]) -> SatelliteRecord:
        """The candidate of least rank (the first of them, at a tie)."""
        if len(candidates) == 1:
            return candidates[0]
        key, rank = task.queue_key, self.rank
        return min(candidates, key=lambda s: rank(s, key))

    @staticmethod
    @abstractmethod
    def rank(sat: SatelliteRecord, key: QueueKey) -> tuple[Any, ...]:
        """What :meth:`choose` minimises for a task of queue ``key`` (each strategy says its own)."""


class LeastLoaded(Ranked):
    """The satellite with the lowest in-flight/slots ratio; ties go to the least recently used."""

    name = "least_loaded"
    reads_light = False

    @staticmethod
    def rank(sat: SatelliteRecord, key: QueueKey) -> tuple[Any, ...]:
        """What :meth:`choose` minimises, for the fleet's index of ready satellites (the least is chosen)."""
        return (sat.load, sat.last_dispatch)


class RoundRobin(Ranked):
    """Each satellite in turn: the one that received a task least recently."""

    name = "round_robin"
    reads_light = False

    @staticmethod
    def rank(sat: SatelliteRecord, key: QueueKey) -> tuple[Any, ...]:
        """What :meth:`choose` minimises."""
        return (sat.last_dispatch,)


class TagAffinity(Ranked):
    """Prefer the satellite whose tags best match the task's: fewest tags the task did not ask for.

    Keeps specialised satellites free for the tasks that need them; ties are
    broken by load, then by least recent use.
    """

    name = "tags"
    reads_light = False

    @staticmethod
    def rank(sat: SatelliteRecord, key: QueueKey) -> tuple[Any, ...]:
        """What :meth:`choose` minimises (a task's tags are its queue key's)."""
        return (len(sat.tags - key[1]), sat.load, sat.last_dispatch)


BUILTIN: dict[str, type] = {c.name: c for c in (LeastLoaded, RoundRobin, TagAffinity)}
#: The built-in classes by import path (``orchester.server.routing:TagAffinity``): always allowed, also under
#: the path they had before the server room existed (``orchester.routing:TagAffinity``), so saved configs still run.
BUILTIN_PATHS: dict[str, type] = {f"{module}:{c.__name__}": c for c in BUILTIN.values()
                                  for module in (__name__, "orchester.routing")}
#: ``package.module:ClassName``: dotted identifiers, a colon, one identifier.
SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_strategy_spec(name: str) -> bool:
    """Whether ``name`` is a built-in strategy name or a well-formed ``module:Class`` path."""
    return isinstance(name, str) and (name in BUILTIN or SPEC.fullmatch(name) is not None)


def strategy_class(name: str, allowed: Collection[str] = ()) -> type:
    """The class a strategy name stands for, checked but not instantiated.

    A built-in name or built-in import path is always accepted. Any other ``module:Class``
    must be in ``allowed`` (compared as written) before its module is even imported; the
    object it names must then be a class with a ``choose`` method (a subclass of
    :class:`RoutingStrategy` or any class of that shape). Nothing else is ever called.

    Raises :class:`ValueError` with the reason.
    """
    if not isinstance(name, str):
        raise ValueError(f"a routing strategy is named by a string, not {type(name).__name__}")
    cls = BUILTIN.get(name) or BUILTIN_PATHS.get(name)
    if cls is not None:
        return cls
    shown = name if len(name) <= 200 else name[:200] + "..."
    if SPEC.fullmatch(name) is None:
        raise ValueError(f"unknown routing strategy {shown!r}; built-in: {sorted(BUILTIN)}, "
                         "or an allowed module:Class")
    if name not in allowed:
        extra = sorted(a for a in allowed if a not in BUILTIN and a not in BUILTIN_PATHS)
        raise ValueError(f"routing strategy {shown!r} is not allowed on this orchestrator: only the built-in "
                         f"{sorted(BUILTIN)} and the classes it was started with ({extra or 'none'}); "
                         f"start it with --allow-strategy {shown} to allow this one")
    mod_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import routing strategy {name!r}: {exc}") from None
    if not isinstance(obj, type):
        raise ValueError(f"routing strategy {name!r} is a {type(obj).__name__}, not a class")
    choose = getattr(obj, "choose", None)
    if not (inspect.isfunction(choose) or inspect.ismethod(choose)):
        raise ValueError(f"routing strategy {name!r} is a class without a choose(task, candidates) method")
    return obj


def make_strategy(name: str, *, allowed: Collection[str] = ()) -> RoutingStrategy:
    """Instantiate a strategy by built-in name or ``module:Class`` import path.

    ``allowed``: the import paths this orchestrator may load (its start strategy and
    ``--allow-strategy``: :attr:`OrchestratorConfig.allowed_strategies
    <orchester.config.OrchestratorConfig.allowed_strategies>`); by default none but the built-ins.
    The class is checked (:func:`strategy_class`) before it is instantiated.

    Raises :class:`ValueError` with the reason when the name cannot be used.
    """
    cls = strategy_class(name, allowed)
    try:
        strategy = cls()
    except Exception as exc:
        raise ValueError(f"cannot instantiate routing strategy {name!r}: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(strategy, "choose", None)):
        raise ValueError(f"{name!r} has no choose(task, candidates) method")
    if not isinstance(getattr(strategy, "name", None), str):
        strategy.name = name
    return strategy
