"""The journal thread: group commit of the orchestrator's critical records.

The broker hands records (accepted tasks with their payload, state transitions, results) to
:meth:`Journal.append`, which returns a sequence number. The journal thread takes whatever
has queued — up to ``batch_max`` records; it waits ``batch_wait`` seconds for more only after a
batch of ``gather_after`` records or more (busy), else the records that queue while one batch is
written and synced make the next —
writes it with ``writev`` (payload and result frames from their own buffers, never copied:
:func:`~orchester.journal.wal.record_chunks`), makes it durable, and tells the broker the highest
durable sequence number through an inproc socket. The broker releases an acknowledgement or a
result only once the records it depends on are durable.

Durability (``--durability``):

``full``
    fsync every batch before anything depending on it is released: nothing acknowledged is
    lost, even to a power cut.
``batch``
    release once the batch is written to the operating system (it survives ``kill -9`` of the
    orchestrator, not a crash of the machine); a second thread fsyncs every ``sync_every`` seconds
    while the writer goes on writing (and the writer fsyncs a full segment before it starts the next).
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
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq

from orchester.journal.folder import JournalError
from orchester.journal.historian import Historian, HistorianGone
from orchester.journal.records import FRAMES_AT, RecordError, Submitted, payload_bytes, sizes
from orchester.journal.recovery import recover
from orchester.journal.segments import compact, compact_closed, read_journal, read_task_record
from orchester.journal.wal import EVERY_FIELD, ReadReport, SegmentWriter, encode_run, read_at, record_chunks

log = logging.getLogger("orchester.journal")
DURABILITY = ("full", "batch", "off")
#: With ``batch`` durability, a wake-up's records of fewer bytes than this, encoded, are written by the
#: broker's thread itself when the writer thread is idle (:meth:`Journal.extend`).
DIRECT_MAX = 64 * 1024
#: Most records the broker's thread writes at once (a wake-up of more goes to the writer thread).
DIRECT_RECORDS = 1024
#: Seconds a write on the broker's thread may take (its ``writev``; above Python's 5 ms switch interval, so
#: that waiting for the GIL back is not taken for a slow disk); a slower one leaves the writes to the writer
#: thread for :data:`DIRECT_PAUSE` seconds.
DIRECT_SLOW = 0.02
DIRECT_PAUSE = 1.0
#: A msgpack packer that packed a record larger than this is replaced: it keeps the largest buffer it grew to.
PACKER_KEEP = 1 << 20
_SEQ = struct.Struct(">Q")


class Journal:
    """A writer thread over a :class:`~orchester.journal.wal.SegmentWriter`."""

    def __init__(self, directory: str | Path, durability: str = "full", context: zmq.Context[Any] | None = None,
                 batch_max: int = 1024, batch_wait: float = 0.002, gather_after: int = 64, sync_every: float = 0.1,
                 segment_bytes: int = 64 << 20) -> None:
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, not {durability!r}")
        self.dir = Path(directory)
        self.durability = durability
        self.batch_max, self.batch_wait, self.sync_every = batch_max, batch_wait, sync_every
        self.gather_after = gather_after
        #: ``batch``: the broker writes a small batch itself when the writer thread is idle (:meth:`extend`)
        self.direct = durability == "batch"
        self._busy = False  #: the writer thread holds records it took from the queue (under ``_cond``)
        self._pack = msgpack.Packer(use_bin_type=True).pack  # the broker thread's
        self._direct_writes = 0  #: batches the broker wrote itself (broker thread only)
        self._direct_after = 0.0  #: no direct write before this (monotonic; 0: none held back)
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
        self._writing = threading.Lock()  #: held by the writer while it writes or rotates, by the syncer to dup
        self._halt = threading.Event()  #: set when the writer ends: the syncer ends too
        self._batches_written = 0  #: batches written (the syncer skips a sync when none was since the last)
        self._stop = False
        self.seq = 0  #: last sequence number handed out (broker thread only)
        self.durable = 0  #: last sequence number known durable (broker thread, from notifications)
        self._stats = _fresh_stats()
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
        return self.extend([record], (0,) if spill else (), direct=False)

    def extend(self, records: list[list[Any]], spill: Iterable[int] = (), direct: bool = True) -> int:
        """Queue ``records`` in order, under one lock (a wake-up's records); return the last one's sequence
        number (called from the broker thread). ``spill``: positions in ``records`` of those whose location
        to report (:meth:`append`). ``direct=False``: never written on the calling thread (its caller
        learns of durability from the writer thread's notifications only).

        With ``batch`` durability, records of fewer than :data:`DIRECT_MAX` bytes in all, once encoded, are
        written at once by the calling thread when the writer thread is idle (nothing queued, nothing in its
        hands) and the live segment is not full: they are durable (:attr:`durable`) when this returns, and
        what waits for them goes out in the same wake-up, without a hand-over to the writer thread and back.
        ``writev`` into the page cache only: no ``fsync`` (the syncer's) and no rotation (the thread's) on the
        caller's thread; a write that took longer than :data:`DIRECT_SLOW` (a disk that throttles writers,
        say) leaves the writes to the thread for :data:`DIRECT_PAUSE` seconds. A failed write is the
        journal's failure (:attr:`error`): nothing of it is durable, nothing more is written."""
        if not records:
            return self.seq
        first = self.seq + 1
        spilled = False
        for i in spill:
            self.spillable.add(first + i)
            spilled = True
        queued = sized = 0  # payloads; payloads, results and task headers (what makes a record large)
        for record in records:
            payload, large = sizes(record)
            queued += payload
            sized += large
        self.queued_bytes += queued
        numbered = list(enumerate(records, first))
        self.seq += len(records)
        direct = (direct and self.direct and not spilled and sized < DIRECT_MAX and len(records) <= DIRECT_RECORDS
                  and self.error is None and (not self._direct_after or time.monotonic() >= self._direct_after))
        with self._cond:
            if direct and not self._queue and not self._busy and not self.writer.full \
                    and self._wrote_direct(numbered, queued):
                return self.seq
            was_empty = not self._queue
            self._queue.extend(numbered)
            if was_empty:
                self._cond.notify()
        return self.seq

    def _wrote_direct(self, batch: list[tuple[int, list[Any]]], payload: int) -> bool:
        """:meth:`extend`'s write on the broker's thread (under ``_cond``: the writer thread cannot take a
        batch meanwhile, so records reach the log in their order). ``False``: the batch is
        :data:`DIRECT_MAX` bytes or more once encoded (long headers, say), for the writer thread."""
        try:
            # (no frame of WRITE_ALONE bytes here, fewer than DIRECT_MAX in all: the records in one buffer)
            run = encode_run((rec for _, rec in batch), self._pack, DIRECT_MAX)
            if run is None:  # too large (long reasons, say; rare: sizes were counted above): the thread's
                self._pack = msgpack.Packer(use_bin_type=True).pack  # (a packer keeps the largest buffer it grew to)
                return False
            with self._writing:
                t_write = time.perf_counter()  # (the write alone: not the encoding, nor waiting for the GIL before it)
                self.writer.write([[run]])  # (as one: their offsets are not needed, none of them spills)
                took = time.perf_counter() - t_write
                self._batches_written += 1
        except Exception as exc:  # a full disk, say: the journal failed (the broker stops at its next wake-up)
            self.error = exc
            log.critical("journal write failed: %s", exc)
            return True
        self.written_bytes += payload
        self.durable = batch[-1][0]
        self._direct_writes += 1
        slow = took > DIRECT_SLOW
        if slow:
            self._direct_after = time.monotonic() + DIRECT_PAUSE
            log.info("a journal write took %.1f ms on the broker's thread: the writer thread writes for the next "
                     "%.0f s", took * 1000, DIRECT_PAUSE)
        self._count(len(batch), took, direct=True, slow=slow)
        return True

    def _count(self, records: int, took: float, direct: bool = False, slow: bool = False) -> None:
        """Count a batch written (by either thread, never both at once) in :meth:`take_stats`'s figures."""
        st = self._stats
        st["batches"] += 1
        st["records"] += records
        st["flush_sum"] += took
        st["flush_max"] = max(st["flush_max"], took)
        st["direct"] += direct
        st["direct_slow"] += slow

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
        full = self.durability == "full"
        pack = msgpack.Packer(use_bin_type=True).pack  # this thread's, one for every record
        last = 0  # records in the last batch
        syncer = None if full else threading.Thread(target=self._sync_periodically, name="orchester-journal-sync",
                                                    daemon=True)
        if syncer is not None:
            syncer.start()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stop:
                        last = 0  # idle: the next record is written at once
                        self._cond.wait()
                    if self._stop and not self._queue:
                        break
                if self.batch_wait and last >= self.gather_after and len(self._queue) < self.batch_max:
                    time.sleep(self.batch_wait)  # busy: let a group gather (group commit)
                with self._cond:
                    if self.error is not None:  # a write on the broker's thread failed: nothing more is written
                        break
                    n = last = min(len(self._queue), self.batch_max)
                    batch = [self._queue.popleft() for _ in range(n)]
                    self._busy = True
                t_write = time.perf_counter()
                self.written_bytes += sum(payload_bytes(rec) for _, rec in batch)
                chunks = [record_chunks(rec, _frames_at(rec), pack) for _, rec in batch]  # (before the syncer's lock)
                if max(len(chunk[0]) for chunk in chunks) > PACKER_KEEP:  # (it keeps the largest buffer it grew to)
                    pack = msgpack.Packer(use_bin_type=True).pack
                with self._writing:
                    path = self.writer.path
                    offsets = self.writer.write(chunks)
                    self._batches_written += 1
                    closed = self.writer.sync() if full else self.writer.rotate()
                for (seq, _), offset in zip(batch, offsets, strict=True):
                    if seq in self.spillable:
                        self.locations.append((seq, path, offset))
                if closed is not None:  # a full segment: to PyTables, off this thread, one at a time
                    self._compactions.append(closed)
                    if self._compactor is None or not self._compactor.is_alive():
                        self._compactor = threading.Thread(target=self._compact_all, name="orchester-compact",
                                                           daemon=True)
                        self._compactor.start()
                took = time.perf_counter() - t_write
                self._count(len(batch), took)
                with self._cond:  # (idle before it says so: the broker, woken by it, may write at once)
                    self._busy = False
                sock.send(_SEQ.pack(batch[-1][0]))
        except BaseException as exc:  # a full disk, say: the broker must know, not hang
            if self.error is None:
                self.error = exc
            log.critical("journal writer failed: %s", exc)
            raise
        finally:
            with self._cond:
                self._busy = True  # ended: the broker's thread writes no more either
            self._halt.set()
            if syncer is not None:
                syncer.join()
            try:  # (after a failed write too: what was written before it reaches the disk)
                with self._writing:
                    self.writer.sync()
            except Exception:
                pass
            sock.close(0)

    def _sync_periodically(self) -> None:
        """``batch`` and ``off``: fsync the live segment every ``sync_every`` seconds, beside the writer
        (which goes on writing meanwhile), until the journal stops."""
        try:
            synced = 0
            while not self._halt.wait(self.sync_every):
                if self._batches_written == synced:
                    continue  # nothing written since the last one
                with self._writing:
                    synced = self._batches_written
                    fd = self.writer.dup()
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException as exc:  # an I/O error: as fatal as one of the writer's
            self.error = exc
            log.critical("journal sync failed: %s", exc)

    def take_stats(self) -> dict[str, float]:
        """Batches, records and flush times (sum, max) since the last call, and how many of the batches
        the broker's thread wrote itself (``direct``; ``direct_slow``: slower than :data:`DIRECT_SLOW`);
        resets them."""
        stats, self._stats = self._stats, _fresh_stats()
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


def _fresh_stats() -> dict[str, float]:
    return {"batches": 0, "records": 0, "flush_sum": 0.0, "flush_max": 0.0, "direct": 0, "direct_slow": 0}


def _frames_at(record: list[Any]) -> int | None:
    """Where ``record`` keeps its frames, by its code (:data:`~orchester.journal.records.FRAMES_AT`); a
    record of another code (one replicated from a newer peer, say) has every field looked at."""
    code = record[0] if record else None
    return FRAMES_AT.get(code, EVERY_FIELD) if isinstance(code, str) else EVERY_FIELD


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


#: Seconds between two starts of the historian (one that keeps failing costs little).
RESTART_EVERY = 5.0
#: Seconds a query waits for a new historian to build its index before it is answered "retry".
READY_WAIT = 30.0
#: Most history queries waiting for the historian: those beyond are refused at once (busy), so that
#: queries coming faster than it answers cost neither memory without end nor answers hours late.
MAX_WAITING = 256


class HistoryReader:
    """Answers history queries through the historian process (:mod:`orchester.journal.historian`).

    The broker hands the core's queries to :meth:`ask_all`; a thread passes them to the
    historian one at a time (waiting on its pipe, it holds no lock the broker needs) and puts
    each answer on :attr:`results`, an inproc socket the broker polls; :meth:`replies` turns
    them into reply frames. A historian that ended or hung is replaced at the next query; the
    query it was answering gets an error. Nothing of the index lives in this process.
    """

    def __init__(self, directory: Path, context: zmq.Context[Any]) -> None:
        self.dir = directory
        self.ctx = context
        addr = f"inproc://orchester-history-{id(self)}"
        self.results = context.socket(zmq.PAIR)
        self.results.linger = 0
        self.results.bind(addr)
        self._addr = addr
        self._queue: deque[tuple[int, dict[str, Any] | None] | None] = deque()  #: None filters: refused
        self._pending: dict[int, tuple[Any, bytes, Any]] = {}  #: token -> (socket key, identity, rid)
        self._query_ids = 0
        self._cond = threading.Condition()
        self._historian: Historian | None = None
        self._started = 0.0  #: when the last historian was started (monotonic)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="orchester-history", daemon=True)
        self._thread.start()

    def ask_all(self, queries: list[tuple[Any, bytes, Any, dict[str, Any]]]) -> None:
        """Queue the core's history queries ``(socket key, identity, rid, filters)`` (beyond
        :data:`MAX_WAITING` waiting, a query is refused: answered busy, ahead of the others)."""
        for sock, ident, rid, filters in queries:
            self._query_ids += 1
            self._pending[self._query_ids] = (sock, ident, rid)
            with self._cond:
                if len(self._queue) >= MAX_WAITING:
                    self._queue.appendleft((self._query_ids, None))
                    self._cond.notify()
                    continue
            self.ask(self._query_ids, {**filters, "rid": rid})

    def replies(self) -> Iterator[tuple[Any, list[Any]]]:
        """``(socket key, frames)`` of the answers that arrived on :attr:`results` (broker thread)."""
        import msgpack

        from serializers import protocol as P
        from serializers.header import error_frames

        while True:
            try:
                token, ok, body = self.results.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            query = self._pending.pop(_SEQ.unpack(token)[0], None)
            if query is None:
                continue
            sock, ident, rid = query
            if ok == b"1":  # the historian's reply map, with the rid: sent as it came
                yield sock, [ident, P.SIGNATURE, P.REPLY, body]
            elif ok == b"busy":
                yield sock, [ident, *error_frames(P.E_BUSY, f"{MAX_WAITING} history queries wait already: "
                                                  "retry later", rid=rid)]
            else:
                try:
                    got = msgpack.unpackb(body, raw=False)
                except ValueError:
                    got = None
                why = str(got.get("error", "") if isinstance(got, dict) else "")[:2000] or "the history query failed"
                yield sock, [ident, *error_frames(P.E_BAD_REQUEST, why, rid=rid)]

    def ask(self, token: int, filters: dict[str, Any]) -> None:
        """Queue a query; its answer arrives on :attr:`results` as ``[token, ok, msgpack body]`` (``ok``:
        ``b"1"``, ``b"0"``, or ``b"busy"`` for a query refused)."""
        with self._cond:
            self._queue.append((token, filters))
            self._cond.notify()

    def _start(self) -> Historian | None:
        """A historian (the running one, or a new one: at most one start every :data:`RESTART_EVERY` s)."""
        if self._historian is not None and self._historian.alive():
            return self._historian
        if self._historian is not None:
            self._historian.stop(1.0)
            self._historian = None
        if self._started and time.monotonic() - self._started < RESTART_EVERY:
            return None
        self._started = time.monotonic()
        try:
            historian = Historian(self.dir)
        except (OSError, JournalError) as exc:
            log.error("the history process could not be started: %s", exc)
            return None
        with self._cond:
            if self._stopping:
                historian.stop(1.0)
                return None
            self._historian = historian
        return historian

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.PAIR)
        sock.linger = 0
        sock.connect(self._addr)
        try:
            self._start()  # at start: it builds its index while no query waits for it
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    item = self._queue.popleft()
                if item is None:
                    return
                token, filters = item
                if filters is None:  # refused: too many wait
                    sock.send_multipart([_SEQ.pack(token), b"busy", b""])
                    continue
                ok, body = self._answer(token, filters)
                sock.send_multipart([_SEQ.pack(token), b"1" if ok else b"0", body])
        finally:
            sock.close(0)

    def _answer(self, token: int, filters: dict[str, Any]) -> tuple[bool, bytes]:
        """The historian's answer to one query; an error map when it failed (never an exception: the
        thread goes on, and every query gets an answer)."""
        import msgpack

        historian = self._start()
        if historian is None:
            return False, msgpack.packb({"error": "the history process is not running: it is "
                                                  f"started again within {RESTART_EVERY:.0f} s"})
        try:
            if not historian.wait_ready(READY_WAIT):
                return False, msgpack.packb({"error": "the history index is still being built from the journal "
                                                      "(about 70,000 tasks a second): retry in a moment"})
            return historian.ask(token, filters)
        except ValueError as exc:  # never sent: the historian is fine
            log.error("%s", exc)
            return False, msgpack.packb({"error": str(exc)})
        except HistorianGone as exc:
            log.error("%s: it is started again", exc)
            why = f"{exc}; it is started again"
        except Exception as exc:  # (a bug) its pipes may be out of step: it is replaced too
            log.exception("history query failed")
            why = f"{type(exc).__name__}: {exc}"
        historian.stop(1.0)
        with self._cond:
            if self._historian is historian:
                self._historian = None
        return False, msgpack.packb({"error": why})

    def close(self) -> None:
        """Stop the thread and the historian."""
        with self._cond:
            self._stopping = True
            self._queue.clear()  # (their askers are answered no more: the orchestrator stops)
            self._queue.append(None)
            self._cond.notify()
            historian = self._historian
        if historian is not None:
            # a signal, not its pipes closed under the thread that may be reading them (their numbers
            # could be reused meanwhile): a query it was answering fails at once, the thread ends
            historian.terminate()
        self._thread.join(10)
        with self._cond:
            historian = self._historian
            self._historian = None
        if historian is not None:
            if self._thread.is_alive():  # (stuck: its pipes are left to it, the process is not)
                historian.kill()
            else:
                historian.stop(2.0)
        self.results.close(0)
