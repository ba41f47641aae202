"""One timer wheel for every deadline of a process, driven by a clock passed in.

Deadlines are rounded *up* to a tick (1 ms by default) and kept in one bucket
per tick, with a small heap of the ticks that have buckets. Scheduling is an
append, cancelling sets a flag (the bucket drops the timer when its tick comes),
and expiring *n* timers at once costs O(n) list work rather than *n* heap pops.
A timer never fires early, and at most one tick late. Time is never read here:
callers pass ``now`` (monotonic seconds), so tests drive it with a fake clock.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: The last tick a timer can be in: a deadline beyond it (``1e308``, ``inf``, ``nan``) waits there,
#: which is never in practice, instead of overflowing the rounding.
NEVER_TICK = 2**62


class Timer(Generic[K]):
    """A handle on one scheduled deadline; pass it to :meth:`TimerWheel.cancel`.

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


class TimerWheel(Generic[K]):
    """Timers in per-tick buckets; ``tick`` is the resolution in seconds."""

    def __init__(self, tick: float = 0.001) -> None:
        self.tick = tick
        self._buckets: dict[int, list[Timer[K]]] = {}
        self._ticks: list[int] = []  # heap of the ticks that have a bucket
        self._alive = 0

    def __len__(self) -> int:
        """Number of live (not cancelled, not fired) timers."""
        return self._alive

    def schedule(self, deadline: float, key: K, code: int = 0) -> Timer[K]:
        """Add a timer that fires for ``key`` (and ``code``) at ``deadline``."""
        t = Timer(deadline, key, code)
        scaled = deadline / self.tick
        if -NEVER_TICK < scaled < NEVER_TICK:
            slot = math.ceil(scaled)
        else:  # clamped: far past fires at once; far future, or not a number at all, waits in the last tick
            slot = -NEVER_TICK if scaled <= -NEVER_TICK else NEVER_TICK
        bucket = self._buckets.get(slot)
        if bucket is None:
            self._buckets[slot] = [t]
            heapq.heappush(self._ticks, slot)
        else:
            bucket.append(t)
        self._alive += 1
        return t

    def cancel(self, timer: Timer[K] | None) -> None:
        """Cancel ``timer`` (a no-op if it already fired or was cancelled)."""
        if timer is not None and timer.alive:
            timer.alive = False
            self._alive -= 1

    def next_deadline(self) -> float | None:
        """When the earliest bucket with a live timer is due, or ``None`` when none is pending."""
        ticks, buckets = self._ticks, self._buckets
        while ticks:
            slot = ticks[0]
            if any(t.alive for t in buckets[slot]):
                return slot * self.tick
            heapq.heappop(ticks)
            del buckets[slot]
        return None

    def pop_expired(self, now: float, limit: int | None = None) -> list[Timer[K]]:
        """Remove and return the live timers due at ``now`` (at most ``limit``), earliest tick first."""
        ticks, buckets = self._ticks, self._buckets
        out: list[Timer[K]] = []
        due = math.floor(now / self.tick)
        while ticks and ticks[0] <= due:
            slot = ticks[0]
            bucket = buckets[slot]
            for i, t in enumerate(bucket):
                if not t.alive:
                    continue
                if limit is not None and len(out) >= limit:
                    buckets[slot] = bucket[i:]
                    self._alive -= len(out)
                    return out
                t.alive = False
                out.append(t)
            heapq.heappop(ticks)
            del buckets[slot]
        self._alive -= len(out)
        return out
