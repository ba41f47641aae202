"""One timer heap for every deadline of a process, driven by a clock passed in.

Timers are cancelled lazily: :meth:`TimerHeap.cancel` marks the entry dead and
the heap drops it when it reaches the top. This keeps scheduling and
cancelling O(log n) / O(1) with no thread per timer. Time is never read here:
callers pass ``now`` (monotonic seconds), so tests drive it with a fake clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Timer(Generic[K]):
    """A handle on one scheduled deadline; pass it to :meth:`TimerHeap.cancel`.

    ``key`` says whose deadline it is and ``code`` what it guards (a small int), so
    one owner can have several kinds of timer without allocating a key per timer.
    """

    __slots__ = ("deadline", "key", "code", "alive")

    def __init__(self, deadline: float, key: K, code: int = 0) -> None:
        self.deadline = deadline
        self.key = key
        self.code = code
        self.alive = True

    def __repr__(self) -> str:
        return f"Timer({self.deadline:.3f}, {self.key!r}, {self.code}, alive={self.alive})"


class TimerHeap(Generic[K]):
    """A min-heap of deadlines keyed by arbitrary hashable keys."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer[K]]] = []
        self._seq = itertools.count()
        self._alive = 0

    def __len__(self) -> int:
        """Number of live (not cancelled, not fired) timers."""
        return self._alive

    def schedule(self, deadline: float, key: K, code: int = 0) -> Timer[K]:
        """Add a timer that fires for ``key`` (and ``code``) at ``deadline``."""
        t = Timer(deadline, key, code)
        heapq.heappush(self._heap, (deadline, next(self._seq), t))
        self._alive += 1
        return t

    def cancel(self, timer: Timer[K] | None) -> None:
        """Cancel ``timer`` (a no-op if it already fired or was cancelled)."""
        if timer is not None and timer.alive:
            timer.alive = False
            self._alive -= 1

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or ``None`` when no timer is pending."""
        heap = self._heap
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_expired(self, now: float, limit: int | None = None) -> list[Timer[K]]:
        """Remove and return the timers due at ``now`` (at most ``limit``), earliest first."""
        heap = self._heap
        out: list[Timer[K]] = []
        while heap and (limit is None or len(out) < limit):
            deadline, _, t = heap[0]
            if not t.alive:
                heapq.heappop(heap)
                continue
            if deadline > now:
                break
            heapq.heappop(heap)
            t.alive = False
            self._alive -= 1
            out.append(t)
        return out
