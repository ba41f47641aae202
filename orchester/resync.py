"""A snapshot on its way between the two servers of a pair, a few chunks per wake-up.

When a passive server asks to be brought up to date (``SYNC``), the active takes the
table as of its last record once (:func:`~orchester.restore.snapshot`: references to the
table's frames, no copies) and then sends it :data:`SNAP_CHUNK` records per message, for at
most :data:`SLICE` seconds per wake-up of its poll loop. A large table therefore never stops
the active's heartbeats, clients and satellites for the whole resync; records journaled in
the meantime are held and streamed after the last chunk (:class:`OutgoingSnapshot`).

The passive gathers the chunks in order and hands the records over only once the last one
has come (:class:`IncomingSnapshot`): a snapshot cut by the active's death or by a lost
message is dropped whole, and the passive keeps what it followed before.
"""

from __future__ import annotations

from collections.abc import Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgpack

from .restore import gc_paused, snapshot

if TYPE_CHECKING:
    from .core import Orchestrator

#: Records per snapshot message.
SNAP_CHUNK = 500
#: Seconds of snapshot sending per wake-up of the active's loop (at least one chunk is sent).
SLICE = 0.02


class OutgoingSnapshot:
    """The table as of record ``q``, sent a slice of time at a time (active side)."""

    def __init__(self, core: Orchestrator, q: int) -> None:
        with gc_paused():
            self.records: list[list[Any]] = list(snapshot(core))  # never empty: it starts with a barrier
        self.q = q  #: the last record the snapshot covers; the stream resumes at ``q + 1``
        self.sent = 0  #: records sent so far
        self.index = 0  #: the next chunk's number

    @property
    def done(self) -> bool:
        """Every record has been handed out."""
        return self.sent >= len(self.records)

    def messages(self, epoch: str, budget: float | None = None) -> Iterator[list[bytes]]:
        """``SNAP`` messages (header and records) until ``budget`` seconds (:data:`SLICE`) are spent
        or the end."""
        budget = SLICE if budget is None else budget
        start = perf_counter()
        while not self.done:
            chunk = self.records[self.sent:self.sent + SNAP_CHUNK]
            self.sent += len(chunk)
            head = msgpack.packb({"e": epoch, "q": self.q, "i": self.index, "last": self.done})
            self.index += 1
            yield [b"SNAP", head, *(msgpack.packb(r, use_bin_type=True) for r in chunk)]
            if perf_counter() - start >= budget:
                return


class IncomingSnapshot:
    """The chunks of one snapshot, gathered in order (passive side)."""

    def __init__(self, now: float) -> None:
        self.records: list[bytes] = []
        self.next = 0  #: the chunk expected next
        self.progress = now  #: when the last chunk came

    def add(self, index: int, records: list[bytes], now: float) -> bool:
        """Take chunk ``index``; False when it is not the one expected (the snapshot is broken)."""
        if index != self.next:
            return False
        self.records.extend(bytes(r) for r in records)
        self.next += 1
        self.progress = now
        return True

    def stalled(self, now: float, patience: float) -> bool:
        """No chunk for ``patience`` seconds: the active died or the rest was dropped."""
        return now - self.progress > patience
