"""The journal thread: group commit of the orchestrator's critical records.

The broker hands records (accepted tasks with their payload, state transitions, results) to
:meth:`Journal.append`, which returns a sequence number. The journal thread takes whatever
has queued — up to ``batch_max`` records, waiting at most ``batch_wait`` seconds for more —
writes it with one ``write``, makes it durable, and tells the broker the highest durable
sequence number through an inproc socket. The broker releases an acknowledgement or a result
only once the records it depends on are durable.

Durability (``--durability``):

``full``
    fsync every batch before anything depending on it is released: nothing acknowledged is
    lost, even to a power cut.
``batch``
    release once the batch is written to the operating system (it survives ``kill -9`` of the
    orchestrator, not a crash of the machine); fsync every ``sync_every`` seconds.
``off``
    records are written in the background and nothing waits for them (the history is kept; a
    crash can lose the last accepted tasks).

The journal holds payloads and results in the clear: its folder is private to the user that
runs the orchestrator (0700, every file 0600, a folder others can write refused; see
:func:`orchester.journal.wal.private_directory`). Spilled payloads are not copied anywhere: they are
read back from the journal's own records (:func:`load_spilled`), so they are as private.

No HDF5 segment is opened unless its SHA-256 matches the journal's manifest: at start,
:func:`replay` sets damaged segments aside and recovers what it can (see
:mod:`orchester.journal.recovery`); the history and spilled payloads check each segment again (a
``stat`` when it has not changed since, :mod:`orchester.journal.segments`).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from orchester.journal.folder import JournalError
from orchester.journal.index import HistoryIndex
from orchester.journal.records import RESULT, RecordError, Result, Submitted, payload_bytes
from orchester.journal.recovery import recover
from orchester.journal.segments import compact, compact_closed, read_journal, read_task_record, verified_parts
from orchester.journal.wal import ReadReport, SegmentWriter, encode_record, read_at
from serializers.header import ProtocolError, unpack

log = logging.getLogger("orchester.journal")
DURABILITY = ("full", "batch", "off")
_SEQ = struct.Struct(">Q")


class Journal:
    """A writer thread over a :class:`~orchester.journal.wal.SegmentWriter`."""

    def __init__(self, directory: str | Path, durability: str = "full", context: zmq.Context[Any] | None = None,
                 batch_max: int = 1024, batch_wait: float = 0.002, sync_every: float = 0.1,
                 segment_bytes: int = 64 << 20) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, not {durability!r}")
        self.dir = Path(directory)
        self.durability = durability
        self.batch_max, self.batch_wait, self.sync_every = batch_max, batch_wait, sync_every
        self.writer = SegmentWriter(self.dir, segment_bytes)  # takes the lock: one writer per journal
        self.ctx = context or zmq.Context.instance()
        addr = f"inproc://orchester-journal-{id(self)}"
        self.notify = self.ctx.socket(zmq.PAIR)  # the broker polls this one
        self.notify.linger = 0
        self.notify.bind(addr)
        self._addr = addr
        self._queue: deque[tuple[int, list[Any]]] = deque()
        #: where spillable records landed: (seq, segment path, offset), read by the broker
        self.locations: deque[tuple[int, Path, int]] = deque()
        self.spillable: set[int] = set()  #: seqs whose location the broker wants (broker thread adds)
        self._cond = threading.Condition()
        self._stop = False
        self.seq = 0  #: last sequence number handed out (broker thread only)
        self.durable = 0  #: last sequence number known durable (broker thread, from notifications)
        self._stats = {"batches": 0, "records": 0, "flush_sum": 0.0, "flush_max": 0.0}
        self.queued_bytes = 0  #: payload bytes handed to the journal (broker thread only)
        self.written_bytes = 0  #: payload bytes written (journal thread only)
        self._compactions: deque[Path] = deque()
        self._compactor: threading.Thread | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="orchester-journal", daemon=True)
        self._thread.start()

    @property
    def waits(self) -> bool:
        """Whether acknowledgements and results wait for durability."""
        return self.durability != "off"

    def append(self, record: list[Any], spill: bool = False) -> int:
        """Queue a record; return its sequence number (called from the broker thread).

        ``spill``: report where the record lands (:attr:`locations`), so that its payload can be
        dropped from memory and read back later.
        """
        self.seq += 1
        if spill:
            self.spillable.add(self.seq)
        self.queued_bytes += payload_bytes(record)
        with self._cond:
            self._queue.append((self.seq, record))
            if len(self._queue) == 1:
                self._cond.notify()
        return self.seq

    def drain_notifications(self) -> int:
        """Read the durable sequence numbers the thread reported; return the highest."""
        while True:
            try:
                msg = self.notify.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.durable
            self.durable = max(self.durable, _SEQ.unpack(msg)[0])

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.PAIR)
        sock.linger = 0
        sock.connect(self._addr)
        last_sync = time.monotonic()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop:
                        self._cond.wait(self.sync_every)
                        if not self._queue and self.durability != "full" and \
                                time.monotonic() - last_sync >= self.sync_every:
                            break  # a periodic sync is due
                    if self._stop and not self._queue:
                        break
                if self.batch_wait and len(self._queue) < self.batch_max:
                    time.sleep(self.batch_wait)  # let a group gather (group commit)
                with self._cond:
                    n = min(len(self._queue), self.batch_max)
                    batch = [self._queue.popleft() for _ in range(n)]
                t_write = time.perf_counter()
                if batch:
                    self.written_bytes += sum(payload_bytes(rec) for _, rec in batch)
                    path = self.writer.path
                    offsets = self.writer.write([encode_record(rec) for _, rec in batch])
                    for (seq, _), offset in zip(batch, offsets, strict=True):
                        if seq in self.spillable:
                            self.locations.append((seq, path, offset))
                now = time.monotonic()
                closed = None
                if (self.durability == "full" and batch) or now - last_sync >= self.sync_every:
                    closed = self.writer.sync()
                    last_sync = now
                if closed is not None:  # a full segment: to PyTables, off this thread, one at a time
                    self._compactions.append(closed)
                    if self._compactor is None or not self._compactor.is_alive():
                        self._compactor = threading.Thread(target=self._compact_all, name="orchester-compact",
                                                           daemon=True)
                        self._compactor.start()
                if batch:
                    took = time.perf_counter() - t_write
                    st = self._stats
                    st["batches"] += 1
                    st["records"] += len(batch)
                    st["flush_sum"] += took
                    st["flush_max"] = max(st["flush_max"], took)
                    sock.send(_SEQ.pack(batch[-1][0]))
        except BaseException as exc:  # a full disk, say: the broker must know, not hang
            self.error = exc
            log.critical("journal writer failed: %s", exc)
            raise
        finally:
            try:
                self.writer.sync()
            except Exception:
                pass
            sock.close(0)

    def take_stats(self) -> dict[str, float]:
        """Batches, records and flush times (sum, max) since the last call; resets them."""
        stats, self._stats = self._stats, {"batches": 0, "records": 0, "flush_sum": 0.0, "flush_max": 0.0}
        return stats

    @property
    def backlog(self) -> int:
        """Payload bytes queued for the journal and not yet written."""
        return self.queued_bytes - self.written_bytes

    def _compact_all(self) -> None:
        while self._compactions:
            path = self._compactions.popleft()
            try:
                compact(path)
            except Exception:
                log.exception("compacting %s failed; it stays a log segment", path.name)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, sync, stop the thread, release the journal."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._compactor is not None:
            self._compactor.join(timeout)  # a compaction cut short leaves its log: it is redone at start
        self.writer.close()
        self.notify.close(0)


def load_spilled(task: Any) -> list[Any]:
    """Read a spilled task's payload from its journal record (in the log, or once compacted)."""
    path, offset = task.spilled
    record: list[Any] | None
    try:
        record = read_at(path, offset)
    except FileNotFoundError:  # the segment went to PyTables meanwhile
        record = None
        for _ in range(50):  # the compaction renames the HDF5 file before removing the log
            h5 = path.with_name(path.name.replace("wal-", "seg-").replace(".log", ".h5"))
            if h5.exists():
                try:
                    record = read_task_record(h5, task.id)  # only once its checksum matches the manifest
                except JournalError as exc:
                    raise RuntimeError(f"the spilled payload of task {task.id} is in a damaged segment: "
                                       f"{exc}") from None
                break
            time.sleep(0.01)
    if record is None:
        raise RuntimeError(f"the spilled payload of task {task.id} is missing from the journal")
    try:
        submission = Submitted.of(record)
    except RecordError as exc:
        raise RuntimeError(f"the spilled payload of task {task.id} is not in a task record: {exc}") from None
    return [bytes(f) for f in submission.payload]


def replay(directory: str | Path, live: Path | None = None) -> tuple[list[list[Any]], ReadReport]:
    """Verify the HDF5 segments, compact the closed log segments (all but ``live``), read every intact record.

    Segments that fail verification are moved aside and what they held recovered where it can
    be (:func:`orchester.journal.recovery.recover`); the report says what was lost
    (:attr:`ReadReport.damaged`, :attr:`ReadReport.damaged_segments`, :meth:`ReadReport.counters`).
    Raises :class:`~orchester.journal.manifest.ManifestError` (a :class:`JournalError`) when the
    manifest is damaged: what is lost cannot be known.
    """
    report = ReadReport()
    d = Path(directory)
    if not d.exists():
        return [], report
    recover(d, live, report)  # before anything opens an HDF5 file
    compact_closed(d, keep=live, damage=report)
    return list(read_journal(d, report)), report


def history(directory: Path, filters: dict[str, Any], index: HistoryIndex | None = None) -> list[dict[str, Any]]:
    """History rows from a journal folder (through ``index``, refreshed first; a new one when not given).

    A failed task's ``error`` is its type and message; the message only for the rows of the
    key named by the ``viewer`` filter (``None`` or absent: every row — no keys, or an admin).
    """
    filters = dict(filters)
    viewer = filters.pop("viewer", None)
    index = index if index is not None else HistoryIndex(directory)
    index.refresh()
    rows = index.rows(filters)
    _add_messages(directory, rows, dict(index.messages), viewer)
    return rows


def _error_message(record: list[Any]) -> str:
    """The error message of a result record (``""`` when it has none)."""
    try:
        err = unpack(Result.of(record).header).get("err")
    except (ProtocolError, RecordError):
        return ""
    return str(err.get("msg", ""))[:2000] if isinstance(err, dict) else ""


def _add_messages(directory: Path, rows: list[dict[str, Any]], messages: dict[str, str], viewer: str | None) -> None:
    """Complete the ``error`` of the failed rows the viewer may read with the error's message (from the
    log tail, else from the compacted segments, newest first, through their task id index)."""
    wanted = {r["id"] for r in rows if r["error"] and (viewer is None or r["owner"] == viewer)}
    missing = wanted - set(messages)
    if missing:
        for path, kind in reversed(verified_parts(directory)):
            if kind != "h5" or not missing:
                continue
            for tid in list(missing):
                try:
                    record = read_task_record(path, tid, RESULT)
                except JournalError:
                    break
                if record is not None:
                    messages[tid] = _error_message(record)
                    missing.discard(tid)
    for row in rows:
        msg = messages.get(row["id"]) if row["id"] in wanted else None
        if msg:
            row["error"] = f"{row['error']}: {msg}"


#: Seconds between two reads of what the journal gained, while history queries come.
REFRESH_EVERY = 5.0
#: Seconds after the last query during which the index keeps up by itself.
KEEP_CURRENT_FOR = 600.0


class HistoryReader:
    """Answers history queries from the journal in a thread; replies come back on ``results``."""

    def __init__(self, directory: Path, context: zmq.Context[Any]) -> None:
        self.dir = directory
        self.ctx = context
        addr = f"inproc://orchester-history-{id(self)}"
        self.results = context.socket(zmq.PAIR)
        self.results.linger = 0
        self.results.bind(addr)
        self._addr = addr
        self._queue: deque[tuple[int, dict[str, Any]] | None] = deque()
        self._pending: dict[int, tuple[Any, bytes, Any]] = {}  #: token -> (socket key, identity, rid)
        self._query_ids = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="orchester-history", daemon=True)
        self._thread.start()

    def ask_all(self, queries: list[tuple[Any, bytes, Any, dict[str, Any]]]) -> None:
        """Queue the core's history queries ``(socket key, identity, rid, filters)``."""
        for sock, ident, rid, filters in queries:
            self._query_ids += 1
            self._pending[self._query_ids] = (sock, ident, rid)
            self.ask(self._query_ids, filters)

    def replies(self) -> Iterator[tuple[Any, list[Any]]]:
        """``(socket key, frames)`` of the answers that arrived on :attr:`results` (broker thread)."""
        import msgpack

        from serializers import protocol as P
        from serializers.header import error_frames

        while True:
            try:
                token, body = self.results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            query = self._pending.pop(_SEQ.unpack(token)[0], None)
            if query is None:
                continue
            sock, ident, rid = query
            reply = msgpack.unpackb(body, raw=False)
            if "error" in reply:
                yield sock, [ident, *error_frames(P.E_BAD_REQUEST, reply["error"], rid=rid)]
            else:
                reply["rid"] = rid
                yield sock, [ident, P.SIGNATURE, P.REPLY, msgpack.packb(reply, use_bin_type=True)]

    def ask(self, token: int, filters: dict[str, Any]) -> None:
        """Queue a query; its answer arrives on :attr:`results` as ``[token, msgpack body]``."""
        with self._cond:
            self._queue.append((token, filters))
            self._cond.notify()

    def _run(self) -> None:
        import msgpack

        sock = self.ctx.socket(zmq.PAIR)
        sock.linger = 0
        sock.connect(self._addr)
        index = HistoryIndex(self.dir)  # this thread's: built once, then read on from where it stopped
        asked = None  # when the last query came (monotonic): while history is in use, the index keeps up
        try:
            self._warm(index)  # at start: the first query does not wait for the whole journal
            while True:
                with self._cond:
                    while not self._queue:
                        in_use = asked is not None and time.monotonic() - asked < KEEP_CURRENT_FOR
                        if not self._cond.wait(REFRESH_EVERY if in_use else None) and in_use:
                            break
                    if not self._queue:  # idle while history is in use: read what the journal gained meanwhile
                        item = None
                    else:
                        item = self._queue.popleft()
                        if item is None:
                            return
                if item is None:
                    self._warm(index)
                    continue
                asked = time.monotonic()
                token, filters = item
                try:
                    if "rollup" in filters:
                        index.refresh()
                        f = dict(filters)
                        body = {**index.rollup(f["since"], f["until"], f["rollup"], f.get("kind"), f.get("tag")),
                                "source": "journal"}
                    else:
                        rows = history(self.dir, filters, index)
                        body = {"rows": rows, "count": len(rows), "source": "journal"}
                except Exception as exc:
                    log.exception("history query failed")
                    body = {"error": f"{type(exc).__name__}: {exc}"}
                sock.send_multipart([_SEQ.pack(token), msgpack.packb(body, use_bin_type=True)])
        finally:
            sock.close(0)

    @staticmethod
    def _warm(index: HistoryIndex) -> None:
        try:
            index.refresh()
        except Exception:  # a query will say what is wrong; the thread goes on
            log.exception("the history index could not be brought up to date")

    def close(self) -> None:
        """Stop the thread."""
        with self._cond:
            self._queue.append(None)
            self._cond.notify()
        self._thread.join(10)
        self.results.close(0)
