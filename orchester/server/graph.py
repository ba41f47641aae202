"""Dependencies between tasks: who waits for whom, and whose results are kept for whom (pure data).

A task submitted with ``after`` names tasks the orchestrator already holds. Each edge is kept
twice: on the dependent (:attr:`Task.after <orchester.server.tasks.Task.after>`, from its header,
journaled with it) and here, from the dependency's side (:attr:`TaskGraph.dependents`), so that a
task that ends finds the tasks waiting for it at once. :attr:`TaskGraph.needed` counts, per
dependency, the dependents that have not ended: while it is above zero the dependency's result is
pinned in the result store (kept whatever the retention says) and its task stays in the table.

The decisions (release a waiting task, fail it for its dependency) are the lifecycle's
(:meth:`orchester.server.lifecycle.Lifecycle.settle`); this module only keeps the tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from orchester.server.results import ResultStore


class TaskGraph:
    """The dependency edges of the tasks in the table, seen from the dependencies."""

    __slots__ = ("dependents", "needed", "_results", "_tasks")

    def __init__(self, results: ResultStore, tasks: Mapping[str, Any]) -> None:
        #: dependency id -> its dependent's id, or its dependents' ids in submission order (ended ones too,
        #: while in the table, for ``show``); one id alone is kept as it is (a chain, a fan-in: no map per edge)
        self.dependents: dict[str, str | dict[str, None]] = {}
        #: dependency id -> how many of its dependents have not ended (its result is pinned meanwhile, and
        #: counts against its owner's byte limit)
        self.needed: dict[str, int] = {}
        self._results = results
        self._tasks = tasks  #: the table (whose result a pin holds: its owner's)

    def __len__(self) -> int:
        """Dependencies that some unended task still needs."""
        return len(self.needed)

    def link(self, task_id: str, after: Iterable[str], ended: bool = False) -> None:
        """Record that ``task_id`` depends on each of ``after``; unless it ``ended`` already, their
        results are pinned until it ends (:meth:`unlink`)."""
        dependents, needed = self.dependents, self.needed
        for dep in after:
            known = dependents.get(dep)
            if known is None:
                dependents[dep] = task_id
            elif isinstance(known, str):
                if known != task_id:
                    dependents[dep] = {known: None, task_id: None}
            else:
                known[task_id] = None
            if not ended:
                n = needed.get(dep, 0)
                needed[dep] = n + 1
                if n == 0:
                    task = self._tasks.get(dep)
                    self._results.pin(dep, task.owner if task is not None else None)

    def unlink(self, after: Iterable[str]) -> list[str]:
        """A dependent of each of ``after`` ended: it needs their results no longer (the last one
        to end gives them back to the normal retention); returns those no task needs any more."""
        needed, free = self.needed, []
        for dep in after:
            n = needed.get(dep, 0) - 1
            if n > 0:
                needed[dep] = n
            elif n == 0:
                del needed[dep]
                self._results.unpin(dep)
                free.append(dep)
        return free

    def of(self, task_id: str) -> list[str]:
        """The ids of ``task_id``'s dependents, in submission order."""
        known = self.dependents.get(task_id)
        if known is None:
            return []
        return [known] if type(known) is str else list(known)

    def forget(self, task_id: str, after: Iterable[str] = ()) -> None:
        """``task_id`` (which waited for ``after``) left the table (its result was dropped by the retention):
        its edges go, both ways."""
        dependents = self.dependents
        dependents.pop(task_id, None)
        for dep in after:
            known = dependents.get(dep)
            if known == task_id:
                del dependents[dep]
            elif type(known) is dict:
                known.pop(task_id, None)
