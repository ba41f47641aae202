"""Rebuilding an orchestrator's task table from journal records, and describing it as records.

:class:`RestoreFold` takes records one at a time (from the journal at start, or from the
active's replication stream on a passive server) and :meth:`RestoreFold.finish` installs
what they say into a fresh :class:`~orchester.server.core.Orchestrator`. A ``Z`` record is a
snapshot barrier: what came before it is superseded by the snapshot that follows.
:func:`snapshot` is the other direction: the records that rebuild a running core's table.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from orchester.server.lifecycle import _len
from orchester.server.tasks import Task
from serializers.header import ProtocolError, unpack
from serializers.messages import Submit
from tracker import TaskState as TS
from tracker.history import History

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator
    from orchester.server.results import StoredResult

log = logging.getLogger("orchester.journal.writer")
#: A snapshot barrier: records before it are superseded by the snapshot after it.
BARRIER = "Z"
_IN_FLIGHT = (TS.DISPATCHED, TS.RUNNING)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a bulk of long-lived objects is built.

    A collection pass walks the whole heap; building a large table (a snapshot, a takeover) triggers
    dozens of them, which cost more than the building itself (measured: about two thirds).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class RestoreFold:
    """Journal records folded into task descriptions, ready to install.

    A finished task's payload is dropped as soon as its end is folded, and at most
    ``keep_finished`` finished tasks are kept (the oldest go first, as the active's result
    retention drops them): a passive server following a long run holds what the active holds,
    not the whole run.
    """

    def __init__(self, keep_finished: int | None = None) -> None:
        self.tasks: dict[str, list[Any]] = {}  #: id -> [S record, last T record or None, its header]
        self.results: dict[str, list[Any]] = {}
        #: each task's transitions, built as they are folded (a takeover installs them as they are)
        self.history: dict[str, History] = {}
        self.keep_finished = keep_finished
        self._finished: dict[str, None] = {}  #: finished task ids, oldest first
        #: satellite id -> the key it belongs to ("K" records, CurveZMQ on)
        self.sat_keys: dict[str, str] = {}
        self.bad = 0
        self.records = 0

    def reset(self) -> None:
        """Forget everything (a snapshot follows)."""
        self.tasks.clear()
        self.results.clear()
        self.history.clear()
        self._finished.clear()
        self.sat_keys.clear()

    def _ended(self, tid: str, entry: list[Any]) -> None:
        srec = entry[0]
        if len(srec) > 4 and srec[4]:
            entry[0] = [*srec[:4], [], *srec[5:]]  # a copy: the record itself may still be on its way to disk
        self._finished[tid] = None
        if self.keep_finished is not None:
            while len(self._finished) > self.keep_finished:
                old = next(iter(self._finished))
                del self._finished[old]
                self.tasks.pop(old, None)
                self.history.pop(old, None)
                self.results.pop(old, None)

    def add(self, rec: list[Any]) -> None:
        """Fold one record; a record that cannot be applied is counted and skipped."""
        self.records += 1
        try:
            code = rec[0]
            if code == BARRIER:
                self.reset()
                return
            tid = rec[1]
            if not isinstance(tid, str):
                raise TypeError(f"task id {tid!r} is not a string")
            if code == "S":
                if tid not in self.tasks:
                    # refuse, now, a record whose header is unreadable or that a live server would refuse
                    hdr = Submit.decode(unpack(bytes(rec[3])))
                    if hdr.id != tid:
                        raise ValueError(f"submission record of {tid!r} carries the header of {hdr.id!r}")
                    if not isinstance(rec[4], list) or not all(isinstance(f, (bytes, memoryview)) for f in rec[4]):
                        raise TypeError("a task's payload must be a list of byte strings")
                    history = History()
                    history.add(float(rec[5]), TS.PENDING, 0)
                    self.tasks[tid] = [rec, None, hdr]
                    self.history[tid] = history
            elif code == "T":
                entry = self.tasks.get(tid)
                if not isinstance(rec[3], int) or not 0 <= rec[3] <= 1_000_000 or \
                        not (rec[4] is None or isinstance(rec[4], str)):
                    raise ValueError(f"a transition needs an attempt from 0 to 10^6 and a satellite id, not "
                                     f"{rec[3]!r}, {rec[4]!r}")
                if entry is not None:
                    state = TS(rec[2])
                    entry[1] = rec
                    self.history[tid].add(float(rec[6]) if len(rec) > 6 else time.time(), state, rec[3], rec[4],
                                          rec[5] if isinstance(rec[5], str) else None)
                    if state.terminal:
                        self._ended(tid, entry)
            elif code == "K":  # a satellite id and the key it belongs to
                if not isinstance(rec[2], str):
                    raise TypeError(f"the key of satellite {tid!r} is not a string")
                self.sat_keys[tid] = rec[2]
            elif code == "R" and tid in self.tasks:
                frames = rec[2]
                if not isinstance(frames, list) or not frames or \
                        not all(isinstance(f, (bytes, memoryview)) for f in frames):
                    raise TypeError("a result must be a non-empty list of byte strings")
                unpack(bytes(frames[0]))
                self.results[tid] = list(frames)
        except (IndexError, TypeError, ValueError, ProtocolError, KeyError) as exc:
            self.bad += 1
            log.warning("skipped a journal record that cannot be applied: %s", exc)

    def finish(self, core: Orchestrator, now: float, sock: Any, reclaim: float = 0.0) -> dict[str, int]:
        """Install the folded tasks into ``core`` (before it serves); returns counts.

        Finished tasks keep their results for fetch; unfinished ones are queued again (their
        next dispatch raises the attempt). With ``reclaim`` > 0, tasks that were in flight wait
        that many seconds for their satellite to re-announce them (see
        :meth:`~orchester.server.core.Orchestrator.adopt`) before they are queued.
        """
        with gc_paused():
            counts = self._install(core, now, sock, reclaim)
        for sid, user in self.sat_keys.items():
            core.state.sat_keys.setdefault(sid, user)
        core.revoke_unknown(now)  # a key revoked while this server was down has no work here
        # a later, smaller fold never shortens it
        core.state.reclaim_until = max(core.state.reclaim_until, now + reclaim)
        core.state.counters["journal_restored"] += len(self.tasks)
        core.state.counters["journal_bad_records"] += self.bad
        return dict(counts)

    def _install(self, core: Orchestrator, now: float, sock: Any, reclaim: float) -> Counter[str]:
        counts: Counter[str] = Counter()
        for tid, (srec, trec, hdr) in self.tasks.items():
            try:
                payload = list(srec[4])
                t = Task(tid, hdr.kind, hdr.priority, hdr.tags, bytes(srec[2]), sock, bytes(srec[3]), payload, now,
                         core.state.next_seq(), _len(payload))
                t.ttl, t.max_run, t.duration = hdr.ttl, hdr.max_run, hdr.duration
                if len(srec) > 7 and isinstance(srec[7], str):
                    t.owner = srec[7]
                t.history = self.history[tid]
                if trec is not None:
                    t.state, t.attempt, t.satellite = TS(trec[2]), int(trec[3]), trec[4]
            except (IndexError, TypeError, ValueError, ProtocolError) as exc:
                core.state.counters["journal_bad_records"] += 1
                log.warning("skipped a task that cannot be restored: %s", exc)
                continue
            outcome = core.life.install(t, self.results.get(tid), now, reclaim > 0)
            counts[outcome] += 1
            if outcome == "reclaimable":  # (queued too: it runs again unless its satellite claims it)
                counts["requeued"] += 1
        return counts


def restore(core: Orchestrator, records: list[list[Any]], now: float, sock: Any,
            reclaim: float = 0.0) -> dict[str, int]:
    """Rebuild the task table from journal records (before serving)."""
    fold = RestoreFold()
    for rec in records:
        fold.add(rec)
    return fold.finish(core, now, sock, reclaim)


#: What a snapshot needs of one task, taken at one instant (see :func:`capture`).
Captured = tuple[Task, list[Any], int, "StoredResult | None"]


def capture(core: Orchestrator) -> list[Captured]:
    """The table as of now, cheaply: per task, the task, its payload frames, how many
    transitions it had and its stored result.

    What :func:`task_records` reads later does not change in a way that matters: a task's
    header and owner are fixed (its client may be rebound by a FETCH: the snapshot then
    carries the newer one), its history only grows (the count cuts it back to now), a payload
    or a result is replaced, never altered. A payload waiting on disk is read now (its journal
    record may be compacted away once the task ends): with much spilled, the capture costs
    that much reading.
    """
    load, results = core.ports.load_spilled, core.state.results
    out: list[Captured] = []
    for tid, t in core.state.tasks.items():
        payload = load(t) if t.spilled is not None and load is not None else t.payload
        out.append((t, payload, len(t.history), results.get(tid)))
    return out


def task_records(core: Orchestrator, item: Captured) -> list[list[Any]]:
    """The records of one captured task: its submission, its transitions, its stored result.

    Frames are memoryviews of the table's own frames, not copies: packing them copies once."""
    t, payload, count, stored = item
    rows = t.history.rows(count)
    submitted = rows[0][0] if rows else core.state.wall()
    out: list[list[Any]] = [["S", t.id, t.client, t.header, [memoryview(f) for f in payload], submitted, None,
                             t.owner if isinstance(t.owner, str) else None]]
    out.extend(["T", t.id, state, attempt, sat, reason, when] for when, state, attempt, sat, reason in rows[1:])
    if stored is not None:
        out.append(["R", t.id, [memoryview(f) for f in stored.frames[2:]], core.state.wall()])
    return out


def snapshot(core: Orchestrator) -> Iterator[list[Any]]:
    """Records that rebuild ``core``'s task table: a barrier, then per task its submission,
    its transitions and its stored result (what a passive server needs to take over)."""
    yield [BARRIER, "", core.state.wall()]
    wall = core.state.wall()
    for sid, user in list(core.state.sat_keys.items()):
        yield ["K", sid, user, wall]
    for item in capture(core):
        yield from task_records(core, item)


def unknown_to(previous: RestoreFold, current: RestoreFold, own: bool) -> list[list[Any]]:
    """Records of the tasks ``previous`` knows and ``current`` does not.

    Unfinished ones always (accepted by a server while it was active alone: they must run);
    finished ones too when ``own`` (``previous`` came from that server's own journal: their
    results were never replicated).
    """
    out: list[list[Any]] = []
    for tid, (srec, trec, _) in previous.tasks.items():
        if tid in current.tasks:
            continue
        if trec is not None and TS(trec[2]).terminal and not own:
            continue
        out.append(srec)
        history = previous.history.get(tid)
        for wall, state, attempt, sat, reason in history.rows()[1:] if history is not None else []:
            out.append(["T", tid, state, attempt, sat, reason, wall])
        if tid in previous.results:
            out.append(["R", tid, previous.results[tid], 0.0])
    return out


def take_over(core: Orchestrator, records: list[Any], now: float, sock: Any) -> tuple[set[str], dict[str, int]]:
    """Install the tasks ``records`` describe that ``core`` does not know, as its own from now on
    (they are journaled, and streamed to a passive peer); returns their ids and the counts."""
    fold = RestoreFold()
    for rec in records:
        fold.add(rec)
    for tid in [t for t in fold.tasks if t in core.state.tasks]:
        del fold.tasks[tid]
    if not fold.tasks:
        return set(), {}
    wanted = set(fold.tasks)
    counts = fold.finish(core, now, sock)
    if core.outbox.records is not None:
        core.outbox.records.extend(r for r in records if isinstance(r, list) and len(r) > 1 and r[1] in wanted)
    return wanted, counts
