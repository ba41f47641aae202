"""The history index: every task's row and per-minute roll-ups, kept current from the journal's files.

The historian process (:mod:`orchester.journal.historian`) keeps one :class:`HistoryIndex`.
Each :meth:`~HistoryIndex.refresh` reads what the journal gained: segments read before are not
read again (a compacted segment is the log it came from, record for record), and the live log
segment is read on from where the previous refresh stopped. A query then costs a pass over the
rows in memory, never a scan of the journal's files; a restarted orchestrator's historian builds
the index once, from its files.

Besides the rows (:mod:`orchester.journal.history`), the index keeps roll-ups per minute and per
``(kind, tags)``: tasks finished (done, failed, other endings), seconds of work (from each
attempt's start to its end) and the satellites that worked. :meth:`~HistoryIndex.rollup` sums
them over a date range, in steps of whole minutes, for a kind and tags: the history page's
throughput and utilisation, at the cost of the minutes shown, whatever the number of tasks.

It also keeps where each task's transitions lie (8 bytes each): :meth:`~HistoryIndex.timeline`
reads them back, for a task the orchestrator no longer holds in memory.

A segment removed under the index (retention never removes one; an operator might) makes the
next refresh start over.
"""

from __future__ import annotations

import logging
import math
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchester.journal.folder import JournalError
from orchester.journal.history import Row, select
from orchester.journal.manifest import number
from orchester.journal.records import RESULT, SUBMITTED, TRANSITION, RecordError, Result, Transition
from serializers import ProtocolError, unpack
from serializers.messages import MAX_AFTER, MAX_TASK_HEADER
from tracker import TaskState

log = logging.getLogger("orchester.journal")

#: Seconds of one roll-up bucket.
MINUTE = 60
#: Most buckets one roll-up answer holds (a longer range takes longer steps).
MAX_BUCKETS = 2000
#: Most tags one task's roll-up key holds (the rest are not indexed).
MAX_TAGS = 16
#: Most transitions of one task :meth:`HistoryIndex.timeline` gives (the newest): what one task costs the
#: index (8 bytes each) and one timeline costs the historian, whatever the journal holds.
MAX_TIMELINE = 10_000

_RUNNING = int(TaskState.RUNNING)
_ENDINGS = {int(s): s.name.lower() for s in TaskState if s.terminal}
_NAMES = {int(s): s.name.lower() for s in TaskState}
_TERMINAL = frozenset(_ENDINGS)
#: A transition's place in the journal: segment number << 40 | (byte offset + 1) in a log segment,
#: or 0 in a compacted one (found there through the task id index).
_POSITION = struct.Struct("<Q")
_SEGMENT_SHIFT = 40
_OFFSET_MASK = (1 << _SEGMENT_SHIFT) - 1

Key = tuple[str, frozenset[str]]


@dataclass
class Bucket:
    """One minute of one ``(kind, tags)``."""

    ended: dict[str, int] = field(default_factory=dict)  #: tasks that ended, by final state
    busy: float = 0.0  #: seconds of work within the minute
    satellites: set[str] = field(default_factory=set)  #: satellites that worked within it


class HistoryIndex:
    """Rows and roll-ups of one journal folder (see the module's docstring). One thread uses it."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self._reset()

    def _reset(self) -> None:
        self.table: dict[str, Row] = {}  #: one row per task, by id
        self.messages: dict[str, str] = {}  #: error messages of failed tasks read from log records
        self.tags: dict[str, frozenset[str]] = {}  #: tags of the tasks that have some
        self.after: dict[str, tuple[str, ...]] = {}  #: the dependencies of the tasks that have some
        #: finished tasks whose records come again (a snapshot's copy, or repeated before a task that waits for
        #: it): their transitions and result until the final one are not counted twice
        self._copies: set[str] = set()
        self.buckets: dict[int, dict[Key, Bucket]] = defaultdict(dict)
        #: where each task's transitions lie: packed positions (:data:`_POSITION`), for :meth:`timeline`
        #: (a ``bytearray`` once it is long: appended to in place, never copied whole)
        self.where: dict[str, bytes | bytearray] = {}
        self._running: dict[str, tuple[float, str]] = {}  #: task -> (start of its attempt, satellite)
        self._done: set[int] = set()  #: segments read to their end
        self._partial: tuple[int, int, int] | None = None  #: (segment, byte offset, records) of the live log
        self.records = 0

    # ------------------------------------------------------------- reading
    def refresh(self) -> int:
        """Read what the journal gained since the last refresh (everything, the first time); the
        number of records read."""
        from orchester.journal.segments import verified_parts

        before = self.records
        for _ in range(5):  # a segment may be compacted (renamed) while we read
            try:
                found = verified_parts(self.dir)
                numbers = {number(p) for p, _ in found}
                if not self._done <= numbers:
                    log.info("journal segments vanished under the history index: it is built again")
                    self._reset()
                    before = 0
                last = max(numbers, default=-1)
                for path, kind in found:
                    n = number(path)
                    if n in self._done:
                        continue
                    skip = self._partial[2] if self._partial is not None and self._partial[0] == n else 0
                    if kind == "h5":
                        self._read_h5(path, n, skip)
                        self._done.add(n)
                        self._partial = None
                    else:
                        closed = n < last
                        self._read_log(path, n, closed)
                return self.records - before
            except FileNotFoundError:
                continue
        raise RuntimeError("the journal kept changing while it was read")

    def _read_h5(self, path: Path, n: int, skip: int) -> None:
        from orchester.journal.hdf5 import read_h5

        where = n << _SEGMENT_SHIFT  # a compacted segment's records are found through its task id index
        for i, record in enumerate(read_h5(path)):
            if i >= skip:
                self._add(record, where)

    def _read_log(self, path: Path, n: int, closed: bool) -> None:
        from orchester.journal.wal import read_from

        offset, count = (self._partial[1], self._partial[2]) if self._partial and self._partial[0] == n else (0, 0)
        base = n << _SEGMENT_SHIFT
        for record, end in read_from(path, offset):
            self._add(record, base | (offset + 1))
            offset, count = end, count + 1
        if closed:
            self._done.add(n)
            self._partial = None
        else:
            self._partial = (n, offset, count)

    def _row(self, tid: str) -> Row:
        row = self.table.get(tid)
        if row is None:
            row = self.table[tid] = Row(tid)
        return row

    def _add(self, record: Any, where: int) -> None:
        """Fold one record of the journal (``where``: its packed position) into the rows and roll-ups.

        Every record of the journal passes here once: the fields it reads are checked (types,
        known states) inline, a header is unpacked once, payload frames are never read; a record
        of the wrong shape is skipped.
        """
        if type(record) is not list or len(record) < 4:
            return
        code, tid = record[0], record[1]
        if type(tid) is not str:
            return
        if tid in self._copies and code in (TRANSITION, RESULT):
            if code == TRANSITION and len(record) > 2 and record[2] in _ENDINGS:
                self._copies.discard(tid)  # the copy's last record: what follows is news
            return
        if code == TRANSITION:
            if len(record) < 7:
                return
            state, attempt, sat, t = record[2], record[3], record[4], record[6]
            if (type(state) is not int or state not in _NAMES or type(attempt) is not int
                    or not (sat is None or type(sat) is str) or not (t is None or _number(t))):
                return
            t = float(t or 0.0)
            self.records += 1
            row = self._row(tid)
            row.state = _NAMES[state]
            if attempt > row.attempts:
                row.attempts = attempt
            if sat:
                row.satellite = sat
            if state in _TERMINAL:
                row.finished = t
            self._place(tid, where)
            running = self._running.pop(tid, None)
            if running is not None:
                self._work(tid, running[0], t, running[1])
            if state == _RUNNING:
                self._running[tid] = (t, sat or "")
            elif state in _ENDINGS and math.isfinite(t):
                bucket = self._bucket(tid, t)
                name = _ENDINGS[state]
                bucket.ended[name] = bucket.ended.get(name, 0) + 1
        elif code == SUBMITTED:
            if len(record) < 6:
                return
            header, t = record[3], record[5]
            owner = record[7] if len(record) > 7 else None
            if type(header) is not bytes or not _number(t) or not (owner is None or type(owner) is str):
                return
            try:
                hdr = unpack(header, MAX_TASK_HEADER)
            except ProtocolError:
                return
            self.records += 1
            known = self.table.get(tid)
            if known is not None and known.finished and known.submitted == float(t):
                self._copies.add(tid)  # the same finished task's records again: counted once
                return
            if tid in self.table:  # an id submitted again (once its first task left the orchestrator's memory, by
                # whichever key; or a snapshot's copy after a barrier): a task of its own, that inherits nothing
                # of the earlier one (its state, error and message, tags, transitions)
                self._forget(tid)
            row = self._row(tid)
            row.kind, row.submitted, row.owner = str(hdr.get("k", "")), float(t), owner or ""
            tg = hdr.get("tg")
            if type(tg) is list and tg:
                tags = frozenset(x for x in tg[:MAX_TAGS] if type(x) is str and 0 < len(x) <= 256)
                if tags:
                    self.tags[tid] = tags
            af = hdr.get("af")
            if type(af) is list and af:
                deps = tuple(x for x in af[:MAX_AFTER] if type(x) is str and 0 < len(x) <= 256)
                if deps:
                    self.after[tid] = deps
        elif code == RESULT:
            frames, t = record[2], record[3]
            if type(frames) is not list or not frames or type(frames[0]) is not bytes \
                    or not (t is None or _number(t)):
                return
            try:
                hdr = unpack(frames[0])
            except ProtocolError:
                return
            self.records += 1
            row = self._row(tid)
            err = hdr.get("err") if not hdr.get("ok") else None
            etype = str(err.get("type", "")) if isinstance(err, dict) else ""
            if etype:
                row.error = etype
                msg = error_message(record)
                if msg:
                    self.messages[tid] = msg

    def _forget(self, tid: str) -> None:
        """Forget what the index holds of ``tid`` (its roll-ups stay: they count what happened)."""
        del self.table[tid]
        self.messages.pop(tid, None)
        self.tags.pop(tid, None)
        self.after.pop(tid, None)
        self.where.pop(tid, None)
        self._running.pop(tid, None)

    def _place(self, tid: str, where: int) -> None:
        """Keep where one more transition of ``tid`` lies (the newest :data:`MAX_TIMELINE`)."""
        blob = self.where.get(tid)
        packed = _POSITION.pack(where)
        if blob is None:
            blob = packed
        elif type(blob) is bytearray:
            blob += packed  # in place: a long one is never copied whole
        elif len(blob) < 32 * _POSITION.size:  # most tasks: a few transitions, a few bytes each
            blob = blob + packed
        else:
            blob = bytearray(blob)
            blob += packed
        excess = len(blob) - MAX_TIMELINE * _POSITION.size
        if excess > 0:
            if type(blob) is bytearray:
                del blob[:excess]  # (cheap: a bytearray drops its head without moving the rest)
            else:
                blob = blob[excess:]
        self.where[tid] = blob

    def timeline(self, tid: str) -> list[dict[str, Any]]:
        """Every transition of ``tid`` (the newest :data:`MAX_TIMELINE`), oldest first, read back from the
        journal's files: time, state, attempt, satellite, reason (as :meth:`tracker.history.History.entries`
        gives them).

        The index keeps where each transition lies; a log segment's records are read at their
        offsets, a compacted segment's through its task id index (those of an earlier task of the
        same id, before its submission, are left out). Segments removed since, or that fail
        verification, give nothing; a record that cannot be read is skipped (and logged).
        """
        from orchester.journal.segments import read_task_records, verified_parts

        blob = self.where.get(tid)
        if not blob:
            return []
        segments: dict[int, list[int]] = {}
        for (packed,) in _POSITION.iter_unpack(blob):
            segments.setdefault(packed >> _SEGMENT_SHIFT, []).append((packed & _OFFSET_MASK) - 1)
        files = {number(p): (p, kind) for p, kind in verified_parts(self.dir)}
        out: list[dict[str, Any]] = []
        for n in sorted(segments):
            if n not in files:
                continue
            path, kind = files[n]
            if kind == "h5":
                try:
                    records = read_task_records(path, tid)
                except (OSError, JournalError) as exc:
                    log.warning("the transitions of task %s in %s could not be read: %s", tid[:64], path.name, exc)
                    continue
            else:
                records = _read_log_records(path, segments[n], tid)
            for record in records:
                if record[0] == SUBMITTED and record[1] == tid:  # what came before was an earlier task of this id
                    out.clear()
                    continue
                try:
                    v = Transition.of(record) if record[0] == TRANSITION else None
                except RecordError:
                    v = None
                if v is not None and v.task_id == tid:
                    out.append({"t": v.time, "state": v.state.name.lower(), "attempt": v.attempt,
                                "sat": v.satellite, "reason": v.reason})
        return out[-MAX_TIMELINE:]

    def _key(self, tid: str) -> Key:
        row = self.table.get(tid)
        return (row.kind if row is not None else "", self.tags.get(tid, frozenset()))

    def _bucket(self, tid: str, t: float) -> Bucket:
        minutes = self.buckets[int(t // MINUTE)]
        key = self._key(tid)
        b = minutes.get(key)
        if b is None:
            b = minutes[key] = Bucket()
        return b

    def _work(self, tid: str, start: float, end: float, sat: str) -> None:
        """An attempt's work from ``start`` to ``end``: its seconds into each minute it spans."""
        if not (math.isfinite(start) and math.isfinite(end)) or end <= start or end - start > 366 * 86400:
            return
        t = start
        while t < end:
            edge = min(end, (t // MINUTE + 1) * MINUTE)
            b = self._bucket(tid, t)
            b.busy += edge - t
            if sat:
                b.satellites.add(sat)
            t = edge

    # ------------------------------------------------------------- queries
    def rows(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        """History rows (as :func:`~orchester.journal.history.select`), also by ``owner`` and ``tag``."""
        filters = dict(filters)
        owner, tag = filters.pop("owner", None), filters.pop("tag", None)
        table: dict[str, Row] = self.table
        if filters.get("ids"):  # a few tasks: looked up, not searched for
            table = {tid: table[tid] for tid in filters["ids"] if tid in table}
        if owner is not None or tag is not None:
            table = {tid: r for tid, r in table.items()
                     if (owner is None or r.owner == owner) and (tag is None or tag in self.tags.get(tid, ()))}
        out = select(table, **filters)
        for row in out:
            row["tags"] = sorted(self.tags.get(row["id"], ()))
            row["after"] = list(self.after.get(row["id"], ()))
        return out

    def rollup(self, since: float, until: float, step: float, kind: str | None = None,
               tag: str | None = None) -> dict[str, Any]:
        """Per ``step`` seconds (whole minutes, at least one) from ``since`` to ``until``: tasks ended
        (by final state), seconds of work, and satellites that worked — for ``kind`` and ``tag`` if given."""
        step = max(MINUTE, int(step // MINUTE) * MINUTE)
        first, last = int(since // MINUTE), int(math.ceil(until / MINUTE))
        if (last - first) * MINUTE / step > MAX_BUCKETS:
            step = int(math.ceil((last - first) / MAX_BUCKETS)) * MINUTE
        per = step // MINUTE
        count = max(0, math.ceil((last - first) / per))
        ended: list[dict[str, int]] = [{} for _ in range(count)]
        busy = [0.0] * count
        sats: list[set[str]] = [set() for _ in range(count)]
        for minute, keys in self.buckets.items():  # the minutes that hold something: whatever the range's length
            if not first <= minute < last:
                continue
            i = (minute - first) // per
            for (k, tags), b in keys.items():
                if (kind is not None and k != kind) or (tag is not None and tag not in tags):
                    continue
                for name, n in b.ended.items():
                    ended[i][name] = ended[i].get(name, 0) + n
                busy[i] += b.busy
                sats[i] |= b.satellites
        out = [{"t": (first + i * per) * MINUTE, "ended": ended[i], "done": ended[i].get("done", 0),
                "failed": ended[i].get("failed", 0), "busy_seconds": round(busy[i], 3), "satellites": len(sats[i])}
               for i in range(count)]
        return {"step": step, "buckets": out}


def _number(v: Any) -> bool:
    return (type(v) is float or type(v) is int)


def _read_log_records(path: Path, offsets: list[int], tid: str) -> list[list[Any]]:
    """The records at ``offsets`` of a log segment (those that cannot be read: skipped, logged once)."""
    from orchester.journal.wal import read_at

    out: list[list[Any]] = []
    bad = 0
    for offset in offsets:
        if offset < 0:
            continue
        try:
            record = read_at(path, offset)
        except FileNotFoundError:  # compacted (renamed) meanwhile: the next timeline finds it as such
            break
        except (OSError, JournalError, ValueError, TypeError, struct.error):
            bad += 1
            continue
        if len(record) > 1:
            out.append(record)
    if bad:
        log.warning("%d transition(s) of task %s in %s could not be read", bad, tid[:64], path.name)
    return out


def error_message(record: list[Any]) -> str:
    """The error message of a failed task's result record (``""`` when it has none)."""
    try:
        err = unpack(Result.of(record).header).get("err")
    except (ProtocolError, RecordError):
        return ""
    return str(err.get("msg", ""))[:2000] if isinstance(err, dict) else ""
