"""Keeping a large task table out of the cyclic garbage collector's way.

Python's cyclic collector walks every object it tracks in its oldest generation whenever that
generation has grown by a quarter: with a million queued tasks that walk took 2.4 s, during which
the orchestrator read nothing, answered nothing and heard no heartbeat. The orchestrator's task
tables hold no reference cycles (a finished task is freed by its reference count alone: checked by
``tests/test_heap.py``), so the collector has nothing to find in them.

:class:`HeapKeeper` moves every object that has lived a moment (:data:`FREEZE_EVERY`) into the
collector's permanent generation (``gc.freeze()``, constant time), where no collection walks it; the
collections that still run see only what was made since. Reference counting frees frozen objects as
usual. What only the collector could free (a cycle made elsewhere, say by an exception kept with its
traceback) is found by a full pass (``gc.unfreeze()`` then ``gc.collect()``) every
:data:`FULL_EVERY` seconds, taken only while the frozen objects are few enough for the pass to be
short (:data:`FULL_LIMIT`); otherwise it waits for a smaller table.

The collector module is given to the constructor (a fake in unit tests); time is passed in.
"""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

#: Seconds between two freezes: objects older than this are out of the collector's way (a freeze costs the same
#: whatever it moves; between two, a fast submitter makes some 10,000 tasks, a 10 ms walk).
FREEZE_EVERY = 0.1
#: Seconds between two full passes over the frozen objects (cycles made outside the task tables).
FULL_EVERY = 600.0
#: Most frozen objects for a full pass (about 0.25 s at a quarter of a microsecond each): beyond, it waits.
FULL_LIMIT = 1_000_000


class HeapKeeper:
    """Freezes long-lived objects, and collects the frozen ones when that is cheap.

    ``collector``: the :mod:`gc` module (or a fake with ``freeze``, ``unfreeze``, ``collect`` and
    ``get_freeze_count``); ``counters``: where ``gc_freezes``, ``gc_full_passes``, ``gc_full_deferred``
    and ``gc_cycles_found`` are counted.
    """

    def __init__(self, now: float, counters: Counter[str] | None = None, collector: Any = gc,
                 freeze_every: float = FREEZE_EVERY, full_every: float = FULL_EVERY,
                 full_limit: int = FULL_LIMIT) -> None:
        self.gc = collector
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.freeze_every = freeze_every
        self.full_every = full_every
        self.full_limit = full_limit
        self._next_freeze = now + freeze_every
        self._next_full = now + full_every

    def settled(self, now: float) -> None:
        """A bulk of long-lived objects was just built (a restore, a takeover): freeze them now."""
        self.gc.freeze()
        self.counters["gc_freezes"] += 1
        self._next_freeze = now + self.freeze_every

    def tick(self, now: float) -> None:
        """After a wake-up: freeze when due; a full pass when due and small enough."""
        if now >= self._next_full:
            self._next_full = now + self.full_every
            if self.gc.get_freeze_count() <= self.full_limit:
                self.gc.unfreeze()
                self.counters["gc_cycles_found"] += self.gc.collect()
                self.counters["gc_full_passes"] += 1
                self.settled(now)
                return
            self.counters["gc_full_deferred"] += 1
        if now >= self._next_freeze:
            self.settled(now)

    def release(self) -> None:
        """Give every frozen object back to the collector (the orchestrator stops, in this process)."""
        self.gc.unfreeze()
