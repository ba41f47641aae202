"""Rebuilding an orchestrator's task table from journal records, and describing it as records.

:class:`RestoreFold` takes records one at a time (from the journal at start, or from the
active's replication stream on a passive server) and :meth:`RestoreFold.finish` installs
what they say into a fresh :class:`~orchester.server.core.Orchestrator`. A ``Z`` record is a
snapshot barrier: what came before it is superseded by the snapshot that follows.
:func:`snapshot` is the other direction: the records that rebuild a running core's table.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from orchester.journal import records
from orchester.server.lifecycle import T_DEADLINE
from orchester.server.tasks import Task, new_task
from serializers.header import ProtocolError, unpack
from serializers.messages import MAX_TASK_HEADER, Submit
from serializers.zmqframes import frames_size
from tracker import TaskState as TS
from tracker.history import History

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator
    from orchester.server.results import StoredResult

log = logging.getLogger("orchester.journal")


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a bulk of long-lived objects is built.

    A collection pass walks the whole heap; building a large table (a snapshot, a takeover) triggers
    dozens of them, which cost more than the building itself (measured: about two thirds). What was
    built is long-lived: it is frozen (``gc.freeze()``, see :mod:`orchester.server.heap`), so that the
    first collection after it does not walk it all either.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class RestoreFold:
    """Journal records folded into task descriptions, ready to install.

    A finished task's payload is dropped as soon as its end is folded, and at most
    ``keep_finished`` finished tasks are kept (the oldest go first, as the active's result
    retention drops them): a passive server following a long run holds what the active holds,
    not the whole run. A finished task that an unfinished one waits for is kept (as the active
    pins its result) until that one ends.
    """

    def __init__(self, keep_finished: int | None = None) -> None:
        self.tasks: dict[str, list[Any]] = {}  #: id -> [S record, last T record or None, its header]
        self.results: dict[str, list[Any]] = {}
        #: each task's transitions, built as they are folded (a takeover installs them as they are)
        self.history: dict[str, History] = {}
        self.keep_finished = keep_finished
        self._finished: dict[str, None] = {}  #: finished task ids, oldest first
        #: task id -> unfinished tasks of the fold that wait for it; finished ones among them are held apart
        self._needed: Counter[str] = Counter()
        self._held: dict[str, None] = {}
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
        self._needed.clear()
        self._held.clear()
        self.sat_keys.clear()

    def _ended(self, tid: str, entry: list[Any]) -> None:
        submitted: records.Submitted = entry[0]
        if submitted.payload:  # a copy without it: the record itself may still be on its way to disk
            entry[0] = dataclasses.replace(submitted, payload=[])
        hdr: Submit = entry[2]
        for dep in hdr.after:  # it no longer holds what it waited for
            n = self._needed[dep] - 1
            if n > 0:
                self._needed[dep] = n
            else:
                del self._needed[dep]
                if self._held.pop(dep, "") is None:  # held apart while needed: the retention applies again
                    self._finished[dep] = None
        if tid in self._needed:
            self._held[tid] = None
        else:
            self._finished[tid] = None
        if self.keep_finished is not None:
            while len(self._finished) > self.keep_finished:
                old = next(iter(self._finished))
                del self._finished[old]
                self.tasks.pop(old, None)
                self.history.pop(old, None)
                self.results.pop(old, None)

    def _forget(self, tid: str) -> None:
        """Drop what the fold holds of ``tid`` (an ended task: what it waited for it no longer holds)."""
        self._finished.pop(tid, None)
        self._held.pop(tid, None)
        self.tasks.pop(tid, None)
        self.history.pop(tid, None)
        self.results.pop(tid, None)

    def add(self, rec: list[Any]) -> None:
        """Fold one record; a record that cannot be applied is counted and skipped."""
        self.records += 1
        try:
            v = records.view(rec)  # the shape and every field's type checked (RecordError, a ValueError)
            if isinstance(v, records.Barrier):
                self.reset()
            elif isinstance(v, records.Submitted):
                known = self.tasks.get(v.task_id)
                if known is not None and known[1] is not None and known[1].state.terminal:
                    # an id that ended and was submitted again (once the active forgot it), or a finished task's
                    # records again (the active repeats them for a task that waits for it): this one holds
                    self._forget(v.task_id)
                    known = None
                if known is None:
                    # refuse, now, a record whose header is unreadable or that a live server would refuse
                    hdr = Submit.decode(unpack(v.header, MAX_TASK_HEADER))
                    if hdr.id != v.task_id:
                        raise ValueError(f"submission record of {v.task_id!r} carries the header of {hdr.id!r}")
                    for dep in hdr.after:
                        self._needed[dep] += 1
                        if self._finished.pop(dep, "") is None:  # finished, and needed again: held apart
                            self._held[dep] = None
                    history = History()
                    history.add(v.time, TS.WAITING if hdr.after else TS.PENDING, 0)
                    self.tasks[v.task_id] = [v, None, hdr]
                    self.history[v.task_id] = history
            elif isinstance(v, records.Transition):
                entry = self.tasks.get(v.task_id)
                if entry is not None:
                    entry[1] = v
                    self.history[v.task_id].add(v.time if v.time is not None else time.time(), v.state, v.attempt,
                                                v.satellite, v.reason)
                    if v.state.terminal:
                        self._ended(v.task_id, entry)
            elif isinstance(v, records.SatelliteKey):  # a satellite id and the key it belongs to
                self.sat_keys[v.satellite] = v.key
            elif isinstance(v, records.Result) and v.task_id in self.tasks:
                unpack(v.header)
                self.results[v.task_id] = v.frames
        except (ValueError, ProtocolError, RecursionError) as exc:  # (a value nested a thousand deep: bad too)
            self.bad += 1
            log.warning("skipped a journal record that cannot be applied: %s", type(exc).__name__ if
                        isinstance(exc, RecursionError) else exc)

    def finish(self, core: Orchestrator, now: float, sock: Any, reclaim: float = 0.0) -> dict[str, int]:
        """Install the folded tasks into ``core`` (before it serves), in one piece; returns counts.

        Finished tasks keep their results for fetch; unfinished ones are queued again (their
        next dispatch raises the attempt). With ``reclaim`` > 0, tasks that were in flight wait
        that many seconds for their satellite to re-announce them (see
        :meth:`~orchester.server.core.Orchestrator.adopt`) before they are queued.
        """
        installing = self.installation(core, sock, reclaim)
        installing.step(now, None)
        return dict(installing.counts)

    def installation(self, core: Orchestrator, sock: Any, reclaim: float = 0.0) -> Installation:
        """What :meth:`finish` does, to be done a slice at a time (:class:`Installation`: a takeover of a
        large table, which must not hold the loop for seconds). The fold must not change meanwhile."""
        return Installation(self, core, sock, reclaim)


class Installation:
    """The tasks of a :class:`RestoreFold` installed into a core a slice at a time (:meth:`step`), in the order
    they were submitted (a task's dependencies before it); then its satellite keys, revocations and reclaim
    window (counted from the end). Each slice's tasks take that slice's time as their own (their timers count
    from when they entered the table)."""

    #: Tasks installed between two looks at the clock.
    CHUNK = 2048

    def __init__(self, fold: RestoreFold, core: Orchestrator, sock: Any, reclaim: float) -> None:
        self.fold, self.core, self.sock, self.reclaim = fold, core, sock, reclaim
        self.total = len(fold.tasks)  #: tasks to install
        self.installed = 0  #: tasks installed so far
        self.slices = 0  #: steps taken
        self.done = False  #: every task installed, and the rest done
        self.counts: Counter[str] = Counter()  #: per outcome (``finished``, ``requeued``, ``reclaimable``…)
        self._items = iter(fold.tasks.items())  # (no copy: the fold does not change while it is installed)

    def step(self, now: float, until: float | None) -> bool:
        """Install tasks until the monotonic clock (:func:`time.monotonic`) passes ``until`` (``None``: all of
        them); whether every task is installed (and the rest is done)."""
        if self.done:
            return True
        self.slices += 1
        monotonic = time.monotonic
        with gc_paused():
            while True:
                n = self._install(now, self.CHUNK)
                self.installed += n
                if n < self.CHUNK:
                    break
                if until is not None and monotonic() >= until:
                    return False
        fold, core = self.fold, self.core
        for sid, user in fold.sat_keys.items():
            if sid not in core.state.sat_keys:
                core.state.bind_sid(sid, user)
        core.revoke_unknown(now)  # a key revoked while this server was down has no work here
        # a later, smaller fold never shortens it
        core.state.reclaim_until = max(core.state.reclaim_until, now + self.reclaim)
        core.state.counters["journal_restored"] += self.total
        core.state.counters["journal_bad_records"] += fold.bad
        self.done = True
        return True

    def _install(self, now: float, limit: int) -> int:
        """Install up to ``limit`` more tasks; how many."""
        core, sock, history, results = self.core, self.sock, self.fold.history, self.fold.results
        counts, reclaim, state, install = self.counts, self.reclaim > 0, core.state, core.life.install
        n = 0
        for tid, (sub, last, hdr) in self._items:
            payload = list(sub.payload)
            t = new_task(tid, hdr.kind, hdr.priority, hdr.tags, sub.client, sock, sub.header, payload, now,
                         state.next_seq(), frames_size(payload), hdr.after, hdr.referenced, hdr.run_on_failure)
            t.ttl, t.max_run, t.duration = hdr.ttl, hdr.max_run, hdr.duration
            t.cores, t.memory, t.codec = hdr.cores, hdr.memory, hdr.codec
            if sub.owner is not None:
                t.owner = sub.owner
            t.history = history[tid]
            if last is not None:
                t.state, t.attempt, t.satellite = last.state, last.attempt, last.satellite
            outcome = install(t, results.get(tid), now, reclaim)
            counts[outcome] += 1
            if outcome != "finished" and hdr.timeout is not None and t.deadline is None:
                # its overall timeout counts from its submission, as before the restart (wall times: the
                # journal keeps no other; at most the whole timeout again, at least nothing)
                first = t.history.rows(1)
                elapsed = max(0.0, state.wall() - first[0][0]) if first else 0.0
                t.deadline = state.timers.schedule(now + max(0.0, hdr.timeout - elapsed), tid, T_DEADLINE)
            if outcome == "reclaimable":  # (queued too: it runs again unless its satellite claims it)
                counts["requeued"] += 1
            n += 1
            if n >= limit:
                break
        return n


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
    return core.life.records_of(t, payload, count, stored)


def snapshot(core: Orchestrator) -> Iterator[list[Any]]:
    """Records that rebuild ``core``'s task table: a barrier, then per task its submission,
    its transitions and its stored result (what a passive server needs to take over)."""
    yield records.barrier(core.state.wall())
    wall = core.state.wall()
    for sid, user in list(core.state.sat_keys.items()):
        yield records.satellite_key(sid, user, wall)
    for item in capture(core):
        yield from task_records(core, item)


def unknown_to(previous: RestoreFold, current: RestoreFold, own: bool) -> list[list[Any]]:
    """Records of the tasks ``previous`` knows and ``current`` does not.

    Unfinished ones always (accepted by a server while it was active alone: they must run);
    finished ones too when ``own`` (``previous`` came from that server's own journal: their
    results were never replicated).
    """
    out: list[list[Any]] = []
    for tid, (sub, last, _) in previous.tasks.items():
        if tid in current.tasks:
            continue
        if last is not None and last.state.terminal and not own:
            continue
        out.append(sub.record())
        history = previous.history.get(tid)
        for wall, state, attempt, sat, reason in history.rows()[1:] if history is not None else []:
            out.append(records.transition(tid, state, attempt, sat, reason, wall))
        if tid in previous.results:
            out.append(records.result(tid, previous.results[tid], 0.0))
    return out


def take_over(core: Orchestrator, given: list[Any], now: float, sock: Any) -> tuple[set[str], dict[str, int]]:
    """Install the tasks the records ``given`` describe that ``core`` does not know, as its own from now on
    (they are journaled, and streamed to a passive peer); returns their ids and the counts."""
    fold = RestoreFold()
    for rec in given:
        fold.add(rec)
    for tid in [t for t in fold.tasks if t in core.state.tasks]:
        del fold.tasks[tid]
    if not fold.tasks:
        return set(), {}
    wanted = set(fold.tasks)
    counts = fold.finish(core, now, sock)
    if core.outbox.records is not None:
        core.outbox.records.extend(r for r in given if isinstance(r, list) and records.head(r)[1] in wanted)
    return wanted, counts
