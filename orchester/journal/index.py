"""The history index: every task's row and per-minute roll-ups, kept current from the journal's files.

The journal reader thread (:class:`~orchester.journal.writer.HistoryReader`) keeps one
:class:`HistoryIndex`. Each query first :meth:`~HistoryIndex.refresh`\\ es it: segments read
before are not read again (a compacted segment is the log it came from, record for record), and
the live log segment is read on from where the previous refresh stopped. A query then costs a
pass over the rows in memory, never a scan of the journal's files; a restarted orchestrator
builds the index once, from its files.

Besides the rows (:mod:`orchester.journal.history`), the index keeps roll-ups per minute and per
``(kind, tags)``: tasks finished (done, failed, other endings), seconds of work (from each
attempt's start to its end) and the satellites that worked. :meth:`~HistoryIndex.rollup` sums
them over a date range, in steps of whole minutes, for a kind and tags: the history page's
throughput and utilisation, at the cost of the minutes shown, whatever the number of tasks.

A segment removed under the index (retention never removes one; an operator might) makes the
next refresh start over.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchester.journal.history import HistoryFold, Row, select
from orchester.journal.manifest import number
from orchester.journal.records import RESULT, SUBMITTED, TRANSITION, RecordError, Result
from serializers import ProtocolError, unpack
from tracker import TaskState

log = logging.getLogger("orchester.journal")

#: Seconds of one roll-up bucket.
MINUTE = 60
#: Most buckets one roll-up answer holds (a longer range takes longer steps).
MAX_BUCKETS = 2000
#: Most tags one task's roll-up key holds (the rest are not indexed).
MAX_TAGS = 16

_RUNNING = int(TaskState.RUNNING)
_ENDINGS = {int(s): s.name.lower() for s in TaskState if s.terminal}

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
        self.fold = HistoryFold()
        self.messages: dict[str, str] = {}  #: error messages of failed tasks read from log records
        self.tags: dict[str, frozenset[str]] = {}  #: tags of the tasks that have some
        self.buckets: dict[int, dict[Key, Bucket]] = defaultdict(dict)
        self._running: dict[str, tuple[float, str]] = {}  #: task -> (start of its attempt, satellite)
        self._done: set[int] = set()  #: segments read to their end
        self._partial: tuple[int, int, int] | None = None  #: (segment, byte offset, records) of the live log
        self.records = 0

    # ------------------------------------------------------------- reading
    def refresh(self) -> None:
        """Read what the journal gained since the last refresh (everything, the first time)."""
        from orchester.journal.segments import verified_parts

        for _ in range(5):  # a segment may be compacted (renamed) while we read
            try:
                found = verified_parts(self.dir)
                numbers = {number(p) for p, _ in found}
                if not self._done <= numbers:
                    log.info("journal segments vanished under the history index: it is built again")
                    self._reset()
                last = max(numbers, default=-1)
                for path, kind in found:
                    n = number(path)
                    if n in self._done:
                        continue
                    skip = self._partial[2] if self._partial is not None and self._partial[0] == n else 0
                    if kind == "h5":
                        self._read_h5(path, skip)
                        self._done.add(n)
                        self._partial = None
                    else:
                        closed = n < last
                        self._read_log(path, n, closed)
                return
            except FileNotFoundError:
                continue
        raise RuntimeError("the journal kept changing while it was read")

    def _read_h5(self, path: Path, skip: int) -> None:
        from orchester.journal.hdf5 import read_h5

        for i, record in enumerate(read_h5(path)):
            if i >= skip:
                self._add(record)

    def _read_log(self, path: Path, n: int, closed: bool) -> None:
        from orchester.journal.wal import read_from

        offset, count = (self._partial[1], self._partial[2]) if self._partial and self._partial[0] == n else (0, 0)
        for record, end in read_from(path, offset):
            self._add(record)
            offset, count = end, count + 1
        if closed:
            self._done.add(n)
            self._partial = None
        else:
            self._partial = (n, offset, count)

    def _add(self, record: list[Any]) -> None:
        found = columns(record)
        if found is None:
            return
        cols, tags = found
        self.records += 1
        self.fold.add(cols)
        code, tid, t = cols["code"], cols["task_id"], cols["t"]
        if code == SUBMITTED:
            if tags:
                self.tags[tid] = tags
        elif code == TRANSITION:
            running = self._running.pop(tid, None)
            if running is not None:
                self._work(tid, running[0], t, running[1])
            state = cols["state"]
            if state == _RUNNING:
                self._running[tid] = (t, cols["satellite"])
            elif state in _ENDINGS and math.isfinite(t):
                bucket = self._bucket(tid, t)
                name = _ENDINGS[state]
                bucket.ended[name] = bucket.ended.get(name, 0) + 1
        elif code == RESULT and cols["etype"]:
            msg = _message(record)
            if msg:
                self.messages[tid] = msg

    def _key(self, tid: str) -> Key:
        row = self.fold.rows.get(tid)
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
        table: dict[str, Row] = self.fold.rows
        if owner is not None or tag is not None:
            table = {tid: r for tid, r in table.items()
                     if (owner is None or r.owner == owner) and (tag is None or tag in self.tags.get(tid, ()))}
        out = select(table, **filters)
        for row in out:
            row["tags"] = sorted(self.tags.get(row["id"], ()))
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


_STATES = frozenset(int(s) for s in TaskState)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def columns(record: Any) -> tuple[dict[str, Any], frozenset[str]] | None:
    """The history columns of a task's record (those of :func:`~orchester.journal.history.fields`) and
    a submission's tags; ``None`` for any other record or one of the wrong shape.

    The index reads every record of the journal once: this checks the fields it reads (types,
    known states) and unpacks a header once, never the payload frames it does not read.
    """
    if not isinstance(record, list) or len(record) < 4:
        return None
    code, tid = record[0], record[1]
    if not isinstance(tid, str):
        return None
    if code == SUBMITTED and len(record) >= 6:
        header, t = record[3], record[5]
        owner = record[7] if len(record) > 7 else None
        if not isinstance(header, (bytes, bytearray)) or not _number(t) \
                or not (owner is None or isinstance(owner, str)):
            return None
        try:
            hdr = unpack(bytes(header))
        except ProtocolError:
            return None
        tg = hdr.get("tg")
        tags = frozenset(x for x in tg[:MAX_TAGS] if isinstance(x, str) and 0 < len(x) <= 256) \
            if isinstance(tg, list) else frozenset()
        return ({"code": SUBMITTED, "task_id": tid, "t": float(t), "kind": str(hdr.get("k", "")),
                 "state": int(TaskState.PENDING), "attempt": 0, "satellite": owner or "", "etype": ""}, tags)
    if code == TRANSITION and len(record) >= 7:
        state, attempt, sat, t = record[2], record[3], record[4], record[6]
        if (state not in _STATES or not isinstance(attempt, int) or isinstance(attempt, bool)
                or not (sat is None or isinstance(sat, str)) or not (t is None or _number(t))):
            return None
        return ({"code": TRANSITION, "task_id": tid, "t": float(t or 0.0), "kind": "", "state": int(state),
                 "attempt": attempt, "satellite": sat or "", "etype": ""}, frozenset())
    if code == RESULT:
        frames, t = record[2], record[3]
        if not isinstance(frames, list) or not frames or not isinstance(frames[0], (bytes, bytearray)) \
                or not (t is None or _number(t)):
            return None
        try:
            hdr = unpack(bytes(frames[0]))
        except ProtocolError:
            return None
        err = hdr.get("err") if not hdr.get("ok") else None
        attempt = hdr.get("a", 0)
        return ({"code": RESULT, "task_id": tid, "t": float(t or 0.0), "kind": "", "state": -1,
                 "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
                 "satellite": str(hdr.get("sat") or ""),
                 "etype": str(err.get("type", "")) if isinstance(err, dict) else ""}, frozenset())
    return None


def _message(record: list[Any]) -> str:
    """The error message of a failed task's result record (``""`` when it has none)."""
    try:
        err = unpack(Result.of(record).header).get("err")
    except (ProtocolError, RecordError):
        return ""
    return str(err.get("msg", ""))[:2000] if isinstance(err, dict) else ""
