"""A compact record of one task's transitions: about 16 bytes per transition.

Each transition is two doubles in an ``array('d')``: the wall time, and the state
and attempt packed as ``state + 16 * attempt``. The satellite of each attempt is
kept once per attempt, and a reason only for the transitions that have one.
This keeps the tracker's memory per in-flight task within a few hundred bytes
(``bench/tracker.py`` measures it).
"""

from __future__ import annotations

from array import array
from typing import Any

from .states import TaskState

#: The rows of a history with no transition yet (shared, never written to).
_NONE = array("d")


class History:
    """Transitions of one task, oldest first."""

    __slots__ = ("_rows", "_sats", "_reasons")

    def __init__(self) -> None:
        self._rows = _NONE  # (made with the first transition, at its size: a queued task has one)
        #: the satellite of each attempt: a str while there was one attempt, then a list
        self._sats: str | list[str | None] | None = None
        self._reasons: dict[int, str] | None = None

    def add(self, t: float, state: int, attempt: int, sat: str | None = None, reason: str | None = None) -> None:
        """Record that the task entered ``state`` at wall time ``t`` during ``attempt``."""
        if reason is not None:
            if self._reasons is None:
                self._reasons = {}
            self._reasons[len(self._rows) // 2] = reason
        if attempt and sat is not None:
            sats = self._sats
            if attempt == 1 and (sats is None or isinstance(sats, str)):
                self._sats = sat
            else:
                if not isinstance(sats, list):
                    sats = self._sats = [sats]
                while len(sats) < attempt:
                    sats.append(None)
                sats[attempt - 1] = sat
        if self._rows is _NONE:
            self._rows = array("d", (t, state + 16 * attempt))
            return
        self._rows.append(t)
        self._rows.append(state + 16 * attempt)

    @property
    def last(self) -> float | None:
        """When the newest row happened (``None``: no row yet)."""
        return self._rows[-2] if self._rows else None

    def __len__(self) -> int:
        return len(self._rows) // 2

    def rows(self, count: int | None = None) -> list[tuple[float, int, int, str | None, str | None]]:
        """The first ``count`` transitions (all by default) as ``(time, state number, attempt,
        satellite, reason)`` (cheap: no maps)."""
        rows, reasons = self._rows, self._reasons or {}
        sats = [self._sats] if isinstance(self._sats, str) else (self._sats or [])
        nsats = len(sats)
        out = []
        n = len(rows) // 2
        for i in range(n if count is None else min(count, n)):
            attempt, state = divmod(int(rows[2 * i + 1]), 16)
            out.append((rows[2 * i], state, attempt, sats[attempt - 1] if 0 < attempt <= nsats else None,
                        reasons.get(i)))
        return out

    def entries(self) -> list[dict[str, Any]]:
        """Every transition as a map: time, state name, attempt, satellite, reason."""
        return [{"t": t, "state": TaskState(state).name.lower(), "attempt": attempt, "sat": sat, "reason": reason}
                for t, state, attempt, sat, reason in self.rows()]
