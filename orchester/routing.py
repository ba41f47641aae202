"""Routing strategies: which satellite with free credit gets the next task.

A strategy is any object with a ``name`` and a ``choose(task, candidates)``
method; ``candidates`` is never empty and holds only satellites that offer the
task's kind, have every tag it requires and have credit left. Strategies are
pure: they may keep counters but never touch a socket or a clock.

Name a built-in strategy (``least_loaded``, ``round_robin``, ``tags``) or a
class by import path (``package.module:ClassName``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Protocol

from .fleet import SatelliteRecord
from .tasks import Task


class RoutingStrategy(Protocol):
    """The routing interface."""

    name: str

    def choose(self, task: Task, candidates: Sequence[SatelliteRecord]) -> SatelliteRecord:
        """Return one of ``candidates`` for ``task``."""


class LeastLoaded:
    """The satellite with the lowest in-flight/slots ratio; ties go to the least recently used."""

    name = "least_loaded"

    def choose(self, task: Task, candidates: Sequence[SatelliteRecord]) -> SatelliteRecord:
        if len(candidates) == 1:
            return candidates[0]
        return min(candidates, key=lambda s: (len(s.inflight) / s.slots, s.last_dispatch))


class RoundRobin:
    """Each satellite in turn: the one that received a task least recently."""

    name = "round_robin"

    def choose(self, task: Task, candidates: Sequence[SatelliteRecord]) -> SatelliteRecord:
        if len(candidates) == 1:
            return candidates[0]
        return min(candidates, key=lambda s: s.last_dispatch)


class TagAffinity:
    """Prefer the satellite whose tags best match the task's: fewest tags the task did not ask for.

    Keeps specialised satellites free for the tasks that need them; ties are
    broken by load, then by least recent use.
    """

    name = "tags"

    def choose(self, task: Task, candidates: Sequence[SatelliteRecord]) -> SatelliteRecord:
        if len(candidates) == 1:
            return candidates[0]
        return min(candidates, key=lambda s: (len(s.tags - task.tags), len(s.inflight) / s.slots,
                                              s.last_dispatch))


BUILTIN: dict[str, type] = {c.name: c for c in (LeastLoaded, RoundRobin, TagAffinity)}


def make_strategy(name: str) -> RoutingStrategy:
    """Instantiate a strategy by built-in name or ``module:Class`` import path.

    Raises :class:`ValueError` with the reason when the name cannot be resolved.
    """
    cls = BUILTIN.get(name)
    if cls is None:
        if ":" not in name:
            raise ValueError(f"unknown routing strategy {name!r}; built-in: {sorted(BUILTIN)}, "
                             "or give module:Class")
        mod_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import routing strategy {name!r}: {exc}") from None
    strategy = cls()
    if not callable(getattr(strategy, "choose", None)):
        raise ValueError(f"{name!r} has no choose(task, candidates) method")
    if not isinstance(getattr(strategy, "name", None), str):
        strategy.name = name
    return strategy
