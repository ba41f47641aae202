"""A snapshot on its way between the two servers of a pair, a few chunks per wake-up.

When a passive server asks to be brought up to date (``SYNC``), the active captures the
table as of its last record (:func:`~orchester.server.restore.capture`: a tuple per task, no copies)
and then describes and sends it :data:`SNAP_CHUNK` records per message, for at
most :data:`SLICE` seconds per wake-up of its poll loop. A large table therefore never stops
the active's heartbeats, clients and satellites for the whole resync; records journaled in
the meantime are held and streamed after the last chunk (:class:`OutgoingSnapshot`).

The passive folds the chunks in order as they come, apart from what it follows, and swaps
only once the last one has come (:class:`IncomingSnapshot`): a snapshot cut by the active's
death or by a lost message is dropped whole, and the passive keeps what it followed before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from orchester.ha.link import encode_snap, pack_record
from orchester.journal import records
from orchester.server.restore import RestoreFold, capture, gc_paused, task_records

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator

#: Records per snapshot message (``SNAP``, :mod:`orchester.ha.link`).
SNAP_CHUNK = 500
#: Seconds of snapshot sending per wake-up of the active's loop (at least one chunk is sent).
SLICE = 0.02


class OutgoingSnapshot:
    """The table as of record ``q``, sent a slice of time at a time (active side).

    Only :func:`~orchester.server.restore.capture` runs at once (a tuple per task); the records are
    made and packed chunk by chunk, and describe each task as it was at capture.
    """

    def __init__(self, core: Orchestrator, q: int) -> None:
        self.core = core
        with gc_paused():
            self.items = capture(core)
        self.q = q  #: the last record the snapshot covers; the stream resumes at ``q + 1``
        self.wall = core.state.wall()  #: when the snapshot was taken
        self.barrier: list[Any] = records.barrier(self.wall)
        self.next = 0  #: the next task to describe
        self.index = 0  #: the next chunk's number
        self.records = 0  #: records sent so far

    @property
    def done(self) -> bool:
        """Every chunk has been handed out."""
        return self.index > 0 and self.next >= len(self.items)

    def chunk(self) -> list[list[Any]]:
        """The records of the next chunk: about :data:`SNAP_CHUNK`, whole tasks (the barrier first)."""
        out: list[list[Any]] = [self.barrier] if self.index == 0 else []
        if self.index == 0:  # which key each satellite id belongs to
            out.extend(records.satellite_key(sid, user, self.wall) for sid, user in self.core.state.sat_keys.items())
        items, core = self.items, self.core
        while len(out) < SNAP_CHUNK and self.next < len(items):
            out.extend(task_records(core, items[self.next]))
            self.next += 1
        self.index += 1
        self.records += len(out)
        return out

    def messages(self, epoch: str, clock: Callable[[], float], budget: float | None = None) -> Iterator[list[bytes]]:
        """``SNAP`` messages (header and records) until ``budget`` seconds (:data:`SLICE`) of
        ``clock`` (the caller's: a work clock such as :func:`time.perf_counter`) are spent, or the end."""
        budget = SLICE if budget is None else budget
        start = clock()
        while not self.done:
            index = self.index
            records = [pack_record(r) for r in self.chunk()]
            yield encode_snap(epoch, self.q, index, self.done, records)
            if clock() - start >= budget:
                return


class IncomingSnapshot:
    """The chunks of one snapshot, folded in order as they come (passive side).

    Each chunk is folded on arrival into a fold of its own, so no wake-up of the passive
    folds the whole table; what it follows and its journal change only when the last chunk
    has come (:class:`~orchester.ha.follower.Follower`).
    """

    def __init__(self, now: float, keep_finished: int | None) -> None:
        self.fold = RestoreFold(keep_finished=keep_finished)
        self.records: list[list[Any]] = []  #: the records, for the journal once the snapshot is whole
        self.next = 0  #: the chunk expected next
        self.progress = now  #: when the last chunk came

    def add(self, index: int, records: Sequence[list[Any]], now: float) -> bool:
        """Fold chunk ``index`` (its records decoded by :func:`~orchester.ha.link.decode`); False when
        it is not the one expected (the snapshot is broken)."""
        if index != self.next:
            return False
        for record in records:
            self.fold.add(record)
        self.records.extend(records)
        self.next += 1
        self.progress = now
        return True

    def stalled(self, now: float, patience: float) -> bool:
        """No chunk for ``patience`` seconds: the active died or the rest was dropped."""
        return now - self.progress > patience
