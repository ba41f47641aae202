"""The journal's writer thread and its on-disk encoding, without an orchestrator: records written from their
own buffers (byte for byte what a whole encoding gives), group commit without waiting, and the ``batch``
durability's fsync beside the writer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from orchester.journal import wal
from orchester.journal import writer as writer_module
from orchester.journal.wal import WRITE_ALONE, ReadReport, SegmentWriter, encode_record, read_all, record_chunks
from orchester.journal.writer import Journal

BIG = bytes(range(256)) * (WRITE_ALONE // 256 + 5)  # just over the threshold
HUGE = os.urandom(1 << 20)


def flat(chunks: list[Any]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


@pytest.mark.parametrize("record", [
    ["T", "a", 3, 1, "s1", None, 1.5],  # no large field: one buffer
    ["S", "a", b"client", b"\x81\xa1k\xa4echo", [memoryview(HUGE)], 1.0, None, "alice"],
    ["S", "a", b"c", b"h", [b"small", memoryview(BIG), b"", memoryview(HUGE), b"x" * 100], 2.0, 5.0, None],
    ["R", "a", [b"\x84", memoryview(np.arange(WRITE_ALONE, dtype=np.float64))], 3.0],  # not bytes-shaped
    ["R", "a", [b"h"] * 20 + [BIG], 3.0],  # a 16-bit array header
    ["R", "a", [b""] * 70_000 + [BIG], 3.0],  # a 32-bit one
    ["X", HUGE, "a big field at the top level"],
    ["S", "a", b"c", b"h", [b"x" * (WRITE_ALONE - 1)], 1.0, None],  # just under: packed
    ["S", "a"], ["R", "a", HUGE, 3.0], ["T", "a", [memoryview(HUGE)]], [7, HUGE], [[], 1],  # not of their code's shape
])
def test_a_record_from_its_own_buffers_is_byte_for_byte_the_whole_encoding(record: list[Any]) -> None:
    chunks = record_chunks(record)
    assert flat(chunks) == encode_record(record)
    # as the journal's thread writes it: looking only where the record's code keeps its frames, with its packer
    pack = msgpack.Packer(use_bin_type=True).pack
    assert flat(record_chunks(record, writer_module._frames_at(record), pack)) == encode_record(record)
    # as the broker's thread writes small ones: in a run, each record as it would be alone
    run = wal.encode_run([record, record], pack)
    assert run is not None and bytes(run) == encode_record(record) * 2
    assert wal.encode_run([record] * 3, pack, limit=len(encode_record(record)) + 1) is None  # stops at its limit
    fields = [*record, *(x for f in record if isinstance(f, list) for x in f)]
    large = [f for f in fields if isinstance(f, (bytes, memoryview)) and memoryview(f).nbytes >= WRITE_ALONE]
    alone = chunks[1::2] if large else []  # [head + packed, large, packed, large, ...]
    assert len(alone) == len(large)
    for chunk, field in zip(alone, large, strict=True):  # the very buffer, not a copy
        assert chunk is field or (isinstance(chunk, memoryview) and np.shares_memory(chunk, field))


def test_records_written_from_buffers_read_back_at_their_offsets(tmp_path: Path) -> None:
    records = [["T", f"t{i}", 1, 1, None, None, float(i)] for i in range(3)]
    records.insert(1, ["S", "big", b"c", b"h", [memoryview(HUGE), b"tail"], 1.0, None, None])
    w = SegmentWriter(tmp_path)
    offsets = w.write([record_chunks(r) if i % 2 else encode_record(r) for i, r in enumerate(records)])
    w.sync()
    w.close()
    back = list(read_all(tmp_path, ReadReport()))
    assert back[1][4] == [HUGE, b"tail"] and [r[1] for r in back] == ["t0", "big", "t1", "t2"]
    data = (tmp_path / "wal-000001.log").read_bytes()
    assert [data[o:o + len(encode_record(r))] for o, r in zip(offsets, records, strict=True)] == \
        [encode_record(r) for r in records]


def test_a_short_write_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev

    def short(fd: int, buffers: list[Any]) -> int:  # a disk that takes a few bytes at a time
        return real(fd, [memoryview(flat(buffers))[:1000]])

    monkeypatch.setattr(wal.os, "writev", short)
    rec = ["S", "a", b"c", b"h", [memoryview(HUGE)], 1.0, None, None]
    w = SegmentWriter(tmp_path)
    w.write([record_chunks(rec), encode_record(["T", "a", 1, 1, None, None, 2.0])])
    w.sync()
    w.close()
    assert [r[0] for r in read_all(tmp_path, ReadReport())] == ["S", "T"]  # (a generator)


def durable(journal: Journal, seq: int, timeout: float = 20.0) -> bool:
    poller = zmq.Poller()
    poller.register(journal.notify, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while journal.drain_notifications() < seq and time.monotonic() < deadline:
        poller.poll(100)
    return journal.durable >= seq


def test_batch_durability_releases_while_a_sync_is_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``batch``: the periodic fsync runs beside the writer; a slow disk's fsync holds back no release."""
    in_sync, release = threading.Event(), threading.Event()
    real = os.fsync

    def slow(fd: int) -> None:
        in_sync.set()
        release.wait(30)
        real(fd)

    journal = Journal(tmp_path / "j", durability="batch", sync_every=0.05)
    monkeypatch.setattr(writer_module.os, "fsync", slow)  # (the os module's: after the folder's fsync)
    try:
        assert durable(journal, journal.append(["T", "a", 1, 1, None, None, 1.0]))
        assert in_sync.wait(20)  # the syncer is inside its fsync now, and stays there
        seqs = [journal.append(["T", f"b{i}", 1, 1, None, None, 2.0]) for i in range(50)]
        assert durable(journal, seqs[-1])  # written and released all the same
    finally:
        release.set()
        journal.close()
    assert len(list(read_all(tmp_path / "j", ReadReport()))) == 51


def test_full_durability_syncs_each_batch_and_batch_syncs_only_after_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    journal = Journal(tmp_path / "full", durability="full")
    calls.clear()  # the new log's folder
    try:
        for i in range(3):
            assert durable(journal, journal.append(["T", f"a{i}", 1, 1, None, None, 1.0]))
            assert len(calls) >= i + 1  # each released batch was synced first
    finally:
        journal.close()
    journal = Journal(tmp_path / "batch", durability="batch", sync_every=0.02)
    calls.clear()
    try:
        time.sleep(0.3)  # idle: nothing written, nothing to sync
        assert calls == []
        assert durable(journal, journal.append(["T", "a", 1, 1, None, None, 1.0]))
        deadline = time.monotonic() + 20
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls  # synced within a period of the write
    finally:
        journal.close()


def test_close_ends_both_threads_and_keeps_every_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", durability="batch", sync_every=10.0)  # a period longer than the test
    for i in range(200):
        journal.append(["S", f"t{i}", b"c", b"h", [memoryview(BIG)], 1.0, None, None])
    t0 = time.monotonic()
    journal.close()
    assert time.monotonic() - t0 < 10  # the syncer did not wait out its period
    assert not [t for t in threading.enumerate() if t.name.startswith("orchester-journal")]
    assert [r[1] for r in read_all(tmp_path / "j", ReadReport())] == [f"t{i}" for i in range(200)]


def test_a_lone_record_is_written_at_once_and_a_busy_journal_gathers(tmp_path: Path) -> None:
    """Group commit waits for records to gather only after a batch of ``gather_after`` or more: a lone
    record is not held back by ``batch_wait`` (here far longer than the test's own timeout)."""
    journal = Journal(tmp_path / "j", durability="full", batch_wait=60.0, gather_after=64)
    try:
        for i in range(3):
            assert durable(journal, journal.append(["T", f"a{i}", 1, 1, None, None, 1.0]), timeout=30.0)
    finally:
        journal.close(timeout=1.0)
    busy = Journal(tmp_path / "k", durability="batch", batch_wait=2.0, gather_after=4)
    try:
        with busy._writing:  # the writer takes the first five, then waits here to write them
            with busy._cond:
                for i in range(5):
                    busy.seq += 1
                    busy._queue.append((busy.seq, ["T", f"b{i}", 1, 1, None, None, 1.0]))
                busy._cond.notify()
            for _ in range(2000):
                if not busy._queue:
                    break
                time.sleep(0.01)
            assert not busy._queue
            busy.append(["T", "c0", 1, 1, None, None, 1.0])  # queued while it writes: it stays busy
        assert durable(busy, 5)
        assert not durable(busy, 6, timeout=0.3)  # held while a group gathers (2 s)...
        busy.append(["T", "c1", 1, 1, None, None, 1.0])
        assert durable(busy, 7)  # ...then written together
        assert busy.take_stats()["batches"] == 2
    finally:
        busy.close()
    idle = Journal(tmp_path / "m", durability="batch", batch_wait=60.0, gather_after=4)
    try:  # a busy batch, then idle: the next lone record is written at once all the same
        with idle._cond:
            for i in range(5):
                idle.seq += 1
                idle._queue.append((idle.seq, ["T", f"d{i}", 1, 1, None, None, 1.0]))
            idle._cond.notify()
        assert durable(idle, 5)
        for _ in range(2000):  # (until the writer waits for records again)
            if idle._cond._waiters:  # type: ignore[attr-defined]
                break
            time.sleep(0.01)
        assert durable(idle, idle.append(["T", "e", 1, 1, None, None, 1.0]), timeout=30.0)
    finally:
        idle.close(timeout=1.0)


def test_a_batch_journal_writes_a_small_batch_at_once_when_its_thread_is_idle_and_keeps_the_order(
        tmp_path: Path) -> None:
    """``batch``: :meth:`Journal.extend` writes small records on the caller's thread while the writer thread
    is idle (durable when it returns); records with large frames, and any that come while the thread holds a
    batch, go through the thread. Whatever path each took, the log holds them in their order."""
    journal = Journal(tmp_path / "j", durability="batch", sync_every=0.05)
    small = [["T", "a", 1, 1, None, None, 1.0], ["R", "a", [b"h", b"r" * 100], 1.0]]
    try:
        journal.take_stats()
        last = journal.extend(small)
        assert journal.durable == last == 2 and journal._direct_writes == 1  # no hand-over: durable at once
        stats = journal.take_stats()  # (what the metrics say: journal.direct_batches, .direct_slow)
        assert (stats["batches"], stats["records"], stats["direct"], stats["direct_slow"]) == (1, 2, 1, 0)
        big = ["S", "b", b"c", b"h", [memoryview(BIG)], 1.0, None, None]
        last = journal.extend([big, ["T", "b", 1, 1, None, None, 1.0]])
        assert journal.durable < last and journal._direct_writes == 1  # the thread writes large frames
        assert durable(journal, last)
        big_result = ["R", "b", [b"h", memoryview(BIG)], 2.0]
        assert journal.extend([big_result]) > journal.durable  # a large result too
        assert durable(journal, journal.seq)
        with journal._writing:  # the thread takes the next batch, then waits here to write it
            journal.extend([big])
            for _ in range(2000):
                if journal._busy:
                    break
                time.sleep(0.01)
            assert journal._busy
            seqs: list[int] = []  # small, but the thread is busy: queued behind its batch, not written ahead of it
            side = threading.Thread(target=lambda: seqs.append(journal.extend([["T", "c", 1, 1, None, None, 3.0]])))
            side.start()
            side.join(10)  # (a write ahead of the thread's would wait here for the lock this thread holds)
            assert seqs and journal.durable < seqs[0]
        small_seq = seqs[0]
        assert durable(journal, small_seq)
        for i in range(300):  # and many more, small and large mixed, the thread busy or not
            journal.extend([["T", f"m{i}", 1, 1, None, None, 4.0]] if i % 7 else [big])
            if i % 50 == 49:  # (now and then the thread's done: the next small ones go at once)
                assert durable(journal, journal.seq)
        assert durable(journal, journal.seq)
        assert journal._direct_writes > 1
        spilled = journal.extend([["S", "s", b"c", b"h", [b"p"], 5.0, None, None]], spill=[0])
        assert durable(journal, spilled) and journal.locations[-1][0] == spilled  # a spilled one: its place told
    finally:
        journal.close()
    written = [r[1] for r in read_all(tmp_path / "j", ReadReport())]
    assert written == ["a", "a", "b", "b", "b", "b", "c", *(f"m{i}" if i % 7 else "b" for i in range(300)), "s"]


def test_full_and_off_journals_never_write_on_the_callers_thread(tmp_path: Path) -> None:
    for durability in ("full", "off"):
        journal = Journal(tmp_path / durability, durability=durability)
        try:
            seq = journal.extend([["T", "a", 1, 1, None, None, 1.0]])
            assert journal._direct_writes == 0
            assert durable(journal, seq)
        finally:
            journal.close()


def test_a_batch_journal_leaves_long_records_and_slow_writes_to_its_thread(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """What the broker's thread writes is bounded once encoded (a long header counts, not only frames); a write
    that took long (a throttled disk) leaves the writes to the thread for a while."""
    journal = Journal(tmp_path / "j", durability="batch", sync_every=0.05)
    try:
        long_header = ["S", "h", b"c", b"\x81" + b"h" * writer_module.DIRECT_MAX, [b"p"], 1.0, None, None]
        seq = journal.extend([long_header])
        assert journal._direct_writes == 0 and journal.durable < seq  # the thread writes it
        assert durable(journal, seq)
        many = [["T", f"t{i}", 1, 1, None, "r" * 1000, 1.0] for i in range(100)]  # 100 kB of reasons
        seq = journal.extend(many)
        assert journal._direct_writes == 0 and durable(journal, seq)
        crowd = [["T", f"u{i}", 1, 1, None, None, 1.0] for i in range(writer_module.DIRECT_RECORDS + 1)]
        seq = journal.extend(crowd)  # small, but more than the loop writes at once
        assert journal._direct_writes == 0 and durable(journal, seq)
        real = journal.writer.write

        def slow(chunks: list[Any]) -> list[int]:
            time.sleep(writer_module.DIRECT_SLOW * 4)
            return real(chunks)

        monkeypatch.setattr(journal.writer, "write", slow)
        seq = journal.extend([["T", "slow", 1, 1, None, None, 1.0]])
        assert journal._direct_writes == 1 and journal.durable == seq  # written, and found slow:
        assert journal.take_stats()["direct_slow"] == 1
        monkeypatch.setattr(journal.writer, "write", real)
        seq = journal.extend([["T", "after", 1, 1, None, None, 1.0]])
        assert journal._direct_writes == 1 and journal.durable < seq  # the next one is the thread's
        assert durable(journal, seq)
        journal._direct_after = time.monotonic() - 1  # (the pause over)
        seq = journal.extend([["T", "again", 1, 1, None, None, 1.0]])
        assert journal._direct_writes == 2 and journal.durable == seq
    finally:
        journal.close()
    assert [r[1] for r in read_all(tmp_path / "j", ReadReport())] == [
        "h", *(f"t{i}" for i in range(100)), *(f"u{i}" for i in range(writer_module.DIRECT_RECORDS + 1)),
        "slow", "after", "again"]


def test_a_failed_write_on_the_brokers_thread_is_the_journals_failure(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path / "j", durability="batch", sync_every=0.05)
    try:
        first = journal.extend([["T", "a", 1, 1, None, None, 1.0]])
        assert journal.durable == first

        def full(chunks: list[Any]) -> list[int]:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(journal.writer, "write", full)
        seq = journal.extend([["T", "b", 1, 1, None, None, 1.0]])
        assert isinstance(journal.error, OSError) and journal.durable == first  # nothing of it durable
        monkeypatch.undo()
        seq = journal.extend([["T", "c", 1, 1, None, None, 1.0]])  # nor anything after it, by either thread
        assert not durable(journal, seq, timeout=0.5)
    finally:
        journal.close()
    assert [r[1] for r in read_all(tmp_path / "j", ReadReport())] == ["a"]
