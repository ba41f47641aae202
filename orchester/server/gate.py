"""The release gate: what the orchestrator sends only once the records it depends on are safe.

An acknowledgement promises that a task survives a crash, a result that its outcome does; in
a binary-star pair with synchronous replication, and with keys and a journal, a dispatch
promises that the journal names the satellite running it. So those messages wait until the
journal has written (``--durability full``: fsync'ed) the last record before them, and the
passive server has it too. :class:`ReleaseGate` keeps them in order and says which may go;
it touches no socket and reads no clock (the broker asks the journal and the pair how far
they are and hands the answer in).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

#: A message for the broker to send: (socket key, frames, task id whose result it carries or None).
Out = tuple[Any, list[Any], "str | None"]


def gate_bound(durable: int | None, replicated: int | None) -> int | None:
    """The highest record number both the journal (``durable``) and the passive server
    (``replicated``) have; ``None`` for one that does not hold anything back."""
    if durable is None:
        return replicated
    if replicated is None:
        return durable
    return min(durable, replicated)


class ReleaseGate:
    """Holds the messages whose commands are in ``gated`` until their records are safe.

    A held message waits for the record number that was last when it was produced; a later
    gated message never overtakes an earlier one. Messages of other commands pass at once.
    """

    def __init__(self, gated: Iterable[bytes]) -> None:
        self.gated = frozenset(gated)
        self._held: deque[tuple[int, Out]] = deque()

    def __len__(self) -> int:
        """Messages held."""
        return len(self._held)

    def route(self, out: list[Out], last: int, bound: int | None) -> list[Out]:
        """The messages of ``out`` that may go now; the others are held.

        ``last``: the number of the last record produced with them; ``bound``: the highest record
        that is safe (:func:`gate_bound`; ``None``: everything is)."""
        hold = bound is not None and bound < last
        if not hold and not self._held:
            return out
        send: list[Out] = []
        for item in out:
            if item[1][2] in self.gated:
                self._held.append((last, item))
            else:
                send.append(item)
        return send

    def release(self, bound: int | None) -> list[Out]:
        """The held messages whose records are now safe (``bound``; ``None``: all), oldest first."""
        held = self._held
        out: list[Out] = []
        while held and (bound is None or held[0][0] <= bound):
            out.append(held.popleft()[1])
        return out
