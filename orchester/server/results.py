"""Bounded retention of finished results, kept for fetch by task id.

Results are retained up to ``max_results`` entries and ``max_bytes`` bytes.
When over either bound the oldest *delivered* result is evicted first; an
undelivered one (its client had gone or was not reading) is evicted only when
nothing delivered is left, and that eviction is counted as a drop. A *pinned* result (one that
tasks waiting for it will take by reference) is kept apart and never evicted; once unpinned it
is the newest delivered one, and the normal retention applies again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set as AbstractSet
from typing import Any


class StoredResult:
    """The frames of one finished task's RESULT message, header first."""

    __slots__ = ("frames", "size", "delivered")

    def __init__(self, frames: list[Any], size: int, delivered: bool) -> None:
        self.frames = frames
        self.size = size
        self.delivered = delivered


class ResultStore:
    """An insertion-ordered, size-bounded map of task id → :class:`StoredResult`."""

    def __init__(self, max_results: int = 10_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_results = max_results
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped_undelivered = 0
        self._delivered: OrderedDict[str, StoredResult] = OrderedDict()
        self._undelivered: OrderedDict[str, StoredResult] = OrderedDict()
        #: task ids pinned (dependents will take their results), and the results of those that ended
        self._pins: dict[str, Any] = {}  #: pinned task id -> whose result it is (its owner)
        self._pinned: dict[str, StoredResult] = {}
        self.pinned_bytes = 0  #: bytes of the pinned results (outside the bounds)
        self._owner_bytes: dict[Any, int] = {}  #: per owner, bytes of its pinned results (its limits count them)

    def __len__(self) -> int:
        return len(self._delivered) + len(self._undelivered) + len(self._pinned)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._delivered or task_id in self._undelivered or task_id in self._pinned

    def get(self, task_id: str) -> StoredResult | None:
        """The stored result of ``task_id``, if retained."""
        return self._delivered.get(task_id) or self._undelivered.get(task_id) or self._pinned.get(task_id)

    def put(self, task_id: str, frames: list[Any], size: int, delivered: bool = False) -> None:
        """Retain a result (call :meth:`trim` later to get back within bounds)."""
        r = StoredResult(frames, size, delivered)
        if task_id in self._pins:
            self._pinned[task_id] = r
            self._count_pinned(task_id, size)
        else:
            (self._delivered if delivered else self._undelivered)[task_id] = r
        self.bytes += size

    def over(self) -> bool:
        """Whether the results that are not pinned exceed a bound (:meth:`trim` is due)."""
        return (len(self._delivered) + len(self._undelivered) > self.max_results
                or self.bytes - self.pinned_bytes > self.max_bytes)

    def pin(self, task_id: str, owner: Any = None) -> None:
        """Keep ``task_id``'s result (now, or when it comes) whatever the bounds, until :meth:`unpin`; its
        bytes count against ``owner`` (:meth:`held_by`)."""
        if task_id in self._pins:
            return
        self._pins[task_id] = owner
        r = self._delivered.pop(task_id, None) or self._undelivered.pop(task_id, None)
        if r is not None:
            self._pinned[task_id] = r
            self._count_pinned(task_id, r.size)

    def unpin(self, task_id: str) -> None:
        """Give ``task_id``'s result back to the retention (as its newest result)."""
        owner = self._pins.pop(task_id, None)
        r = self._pinned.pop(task_id, None)
        if r is not None:
            self.pinned_bytes -= r.size
            n = self._owner_bytes.get(owner, 0) - r.size
            if n > 0:
                self._owner_bytes[owner] = n
            else:
                self._owner_bytes.pop(owner, None)
            (self._delivered if r.delivered else self._undelivered)[task_id] = r

    def _count_pinned(self, task_id: str, size: int) -> None:
        self.pinned_bytes += size
        owner = self._pins[task_id]
        self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size

    def held_by(self, owner: Any) -> int:
        """Bytes of ``owner``'s results pinned for its waiting tasks (they count against its byte limit)."""
        return self._owner_bytes.get(owner, 0)

    def mark(self, task_id: str, delivered: bool) -> None:
        """Move a result between the delivered and undelivered lists."""
        pinned = self._pinned.get(task_id)
        if pinned is not None:
            pinned.delivered = delivered
            return
        src, dst = (self._undelivered, self._delivered) if delivered else (self._delivered, self._undelivered)
        r = src.pop(task_id, None)
        if r is not None:
            r.delivered = delivered
            dst[task_id] = r

    def pop(self, task_id: str) -> StoredResult | None:
        """Forget a result (e.g. replaced after a retry)."""
        r = self._delivered.pop(task_id, None) or self._undelivered.pop(task_id, None)
        if r is None:
            r = self._pinned.pop(task_id, None)
            if r is not None:  # (still pinned: a result put again is kept apart, as this one was)
                self.pinned_bytes -= r.size
                owner = self._pins.get(task_id)
                self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) - r.size
                if self._owner_bytes[owner] <= 0:
                    del self._owner_bytes[owner]
        if r is not None:
            self.bytes -= r.size
        return r

    def undelivered(self) -> list[str]:
        """Ids of results whose client has not received them."""
        return list(self._undelivered)

    def trim(self, pinned: AbstractSet[str] = frozenset()) -> list[str]:
        """Evict until within bounds (delivered results first, oldest first); return the evicted ids.

        ``pinned`` results (waiting for their client to have room) are never evicted: the
        store may stay above its bounds by them (their owners' byte limits bound them)."""
        evicted: list[str] = []
        kept: list[tuple[str, StoredResult]] = []
        held = -self.pinned_bytes  #: bytes of the pinned results set aside (and of those kept apart)
        while (len(self._delivered) + len(self._undelivered) + len(kept) > self.max_results
               or (self.bytes + held > self.max_bytes and len(self._delivered) + len(self._undelivered) > 1)):
            if self._delivered:
                tid, r = self._delivered.popitem(last=False)
            elif self._undelivered:
                tid, r = self._undelivered.popitem(last=False)
                if tid in pinned:
                    kept.append((tid, r))
                    self.bytes -= r.size
                    held += r.size
                    continue
                self.dropped_undelivered += 1
            else:
                break
            self.bytes -= r.size
            evicted.append(tid)
        for tid, r in kept:  # oldest first, still
            self._undelivered[tid] = r
            self.bytes += r.size
        return evicted
