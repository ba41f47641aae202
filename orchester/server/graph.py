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

from collections.abc import Iterable

from orchester.server.results import ResultStore


class TaskGraph:
    """The dependency edges of the tasks in the table, seen from the dependencies."""

    __slots__ = ("dependents", "needed", "_results")

    def __init__(self, results: ResultStore) -> None:
        #: dependency id -> its dependents' ids, in submission order (ended ones too, for ``show``)
        self.dependents: dict[str, dict[str, None]] = {}
        #: dependency id -> how many of its dependents have not ended (its result is pinned meanwhile)
        self.needed: dict[str, int] = {}
        self._results = results

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
                dependents[dep] = {task_id: None}
            else:
                known[task_id] = None
            if not ended:
                n = needed.get(dep, 0)
                needed[dep] = n + 1
                if n == 0:
                    self._results.pin(dep)

    def unlink(self, after: Iterable[str]) -> None:
        """A dependent of each of ``after`` ended: it needs their results no longer (the last one
        to end gives them back to the normal retention)."""
        needed = self.needed
        for dep in after:
            n = needed.get(dep, 0) - 1
            if n > 0:
                needed[dep] = n
            elif n == 0:
                del needed[dep]
                self._results.unpin(dep)

    def of(self, task_id: str) -> list[str]:
        """The ids of ``task_id``'s dependents, in submission order."""
        return list(self.dependents.get(task_id, ()))

    def forget(self, task_id: str) -> None:
        """``task_id`` left the table (its result was dropped by the retention)."""
        self.dependents.pop(task_id, None)
