"""The history index: read once, then on from where it stopped; roll-ups per minute; real journal files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from orchester.journal import records as R
from orchester.journal.historian import history
from orchester.journal.index import HistoryIndex
from orchester.journal.segments import compact
from orchester.journal.wal import encode_record
from tracker import TaskState as TS

T0 = 1_800_000_000.0  # a whole minute


def header(kind: str, tags: list[str] | None = None) -> bytes:
    hdr: dict[str, Any] = {"id": "x", "k": kind, "c": "msgpack"}
    if tags:
        hdr["tg"] = tags
    return msgpack.packb(hdr)


def task(tid: str, kind: str, start: float, run: float, end_state: TS = TS.DONE, sat: str = "s1",
         tags: list[str] | None = None, owner: str | None = None) -> list[list[Any]]:
    """The records of one task: submitted at ``start``, running from ``start + 1`` for ``run`` seconds."""
    recs = [R.submitted(tid, b"c", header(kind, tags), [], start, None, owner),
            R.transition(tid, TS.DISPATCHED, 1, sat, None, start + 0.5),
            R.transition(tid, TS.RUNNING, 1, sat, None, start + 1)]
    ok = end_state is TS.DONE
    hdr = {"id": tid, "a": 1, "ok": ok, "sat": sat} if ok else {"id": tid, "a": 1, "ok": False, "sat": sat,
                                                                 "err": {"type": "ValueError", "msg": "bad input"}}
    recs.append(R.result(tid, [msgpack.packb(hdr)], start + 1 + run))
    recs.append(R.transition(tid, end_state, 1, sat, None, start + 1 + run))
    return recs


def append(path: Path, recs: list[list[Any]]) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(encode_record(r) for r in recs))


def test_rows_come_from_every_segment_and_only_new_records_are_read(tmp_path: Path) -> None:
    first = tmp_path / "wal-000001.log"
    append(first, task("a", "echo", T0, 10) + task("b", "fit", T0 + 5, 100, TS.FAILED, tags=["gpu"], owner="ann"))
    index = HistoryIndex(tmp_path)
    index.refresh()
    assert {r["id"]: r["state"] for r in index.rows({})} == {"a": "done", "b": "failed"}
    read = index.records
    index.refresh()
    assert index.records == read  # nothing new: nothing read again
    append(first, task("c", "echo", T0 + 120, 3))  # the live segment grows
    index.refresh()
    assert index.records == read + 5 and [r["id"] for r in index.rows({"kind": "echo"})] == ["a", "c"]
    # the segment closes and is compacted while a new one is written: its records are not read twice
    compact(first)
    append(tmp_path / "wal-000002.log", task("d", "echo", T0 + 200, 1))
    index.refresh()
    assert index.records == read + 10
    assert [r["id"] for r in index.rows({})] == ["a", "b", "c", "d"]
    assert [r["id"] for r in index.rows({"tag": "gpu"})] == ["b"] and index.rows({"tag": "gpu"})[0]["tags"] == ["gpu"]
    assert [r["id"] for r in index.rows({"owner": "ann"})] == ["b"]
    # what the reader thread answers, with the error's message
    rows = history(tmp_path, {"state": "failed"}, index)
    assert [(r["id"], r["error"]) for r in rows] == [("b", "ValueError: bad input")]
    # and a fresh index reads the same from the files
    assert history(tmp_path, {}) == history(tmp_path, {}, index)


def test_a_half_written_record_is_read_once_it_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "wal-000001.log"
    recs = task("a", "echo", T0, 1)
    whole = b"".join(encode_record(r) for r in recs)
    path.write_bytes(whole[:-7])  # the writer is in the middle of the last record
    index = HistoryIndex(tmp_path)
    index.refresh()
    assert index.rows({})[0]["state"] == "running" and index.records == len(recs) - 1
    path.write_bytes(whole)
    index.refresh()
    assert index.rows({})[0]["state"] == "done" and index.records == len(recs)


def test_a_segment_compacted_between_two_reads_is_read_on_from_its_records(tmp_path: Path) -> None:
    first = tmp_path / "wal-000001.log"
    append(first, task("a", "echo", T0, 1))
    index = HistoryIndex(tmp_path)
    index.refresh()
    append(first, task("b", "echo", T0 + 1, 1))  # more records, then closed and compacted before the next read
    compact(first)
    append(tmp_path / "wal-000002.log", task("c", "echo", T0 + 2, 1))
    index.refresh()
    assert [r["id"] for r in index.rows({})] == ["a", "b", "c"] and index.records == 15


def test_a_vanished_segment_makes_the_index_start_over(tmp_path: Path) -> None:
    append(tmp_path / "wal-000001.log", task("a", "echo", T0, 1))
    append(tmp_path / "wal-000002.log", task("b", "echo", T0 + 1, 1))
    index = HistoryIndex(tmp_path)
    index.refresh()
    (tmp_path / "wal-000001.log").unlink()
    index.refresh()
    assert [r["id"] for r in index.rows({})] == ["b"]


def test_rollups_count_endings_work_and_satellites_per_minute(tmp_path: Path) -> None:
    recs = (task("a", "echo", T0, 10, sat="s1")  # runs T0+1 .. T0+11
            + task("b", "fit", T0 + 50, 30, TS.FAILED, sat="s2", tags=["gpu"])  # T0+51 .. T0+81: two minutes
            + task("c", "echo", T0 + 125, 2, sat="s1"))  # the third minute
    append(tmp_path / "wal-000001.log", recs)
    index = HistoryIndex(tmp_path)
    index.refresh()
    roll = index.rollup(T0, T0 + 180, 60)
    assert roll["step"] == 60 and [b["t"] for b in roll["buckets"]] == [T0, T0 + 60, T0 + 120]
    first, second, third = roll["buckets"]
    assert (first["done"], first["failed"], second["done"], second["failed"], third["done"]) == (1, 0, 0, 1, 1)
    assert first["busy_seconds"] == 10 + 9 and second["busy_seconds"] == 21 and third["busy_seconds"] == 2
    assert (first["satellites"], second["satellites"], third["satellites"]) == (2, 1, 1)
    # filtered by kind and tag; and in longer steps
    assert [b["failed"] for b in index.rollup(T0, T0 + 180, 60, tag="gpu")["buckets"]] == [0, 1, 0]
    assert [b["done"] for b in index.rollup(T0, T0 + 180, 60, kind="echo")["buckets"]] == [1, 0, 1]
    whole = index.rollup(T0, T0 + 180, 180)["buckets"]
    assert len(whole) == 1 and whole[0]["ended"] == {"done": 2, "failed": 1} and whole[0]["busy_seconds"] == 42
    # a range too long for its step gets longer steps, never more than MAX_BUCKETS points
    long = index.rollup(T0 - 10 * 86400, T0 + 86400, 60)
    assert len(long["buckets"]) <= 2000 and long["step"] % 60 == 0


def test_records_of_the_wrong_shape_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "wal-000001.log"
    append(path, [["T", "a", "not a state", 1, None, None, T0], ["S"], ["Q", 1, 2]] + task("a", "echo", T0, 1))
    index = HistoryIndex(tmp_path)
    index.refresh()
    assert [r["id"] for r in index.rows({})] == ["a"]
    assert index.rollup(T0, T0 + 60, 60)["buckets"][0]["done"] == 1


def _states(rows: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(h["state"], h["sat"]) for h in rows]


def test_a_tasks_timeline_is_read_back_from_log_and_compacted_segments(tmp_path: Path) -> None:
    first = tmp_path / "wal-000001.log"
    # task "a" starts in the first segment and ends in the second, retried on another satellite
    append(first, task("b", "echo", T0, 1) + [
        R.submitted("a", b"c", header("fit"), [], T0, None, None),
        R.transition("a", TS.DISPATCHED, 1, "s1", "dispatched", T0 + 1),
        R.transition("a", TS.RUNNING, 1, "s1", "started", T0 + 2),
        R.transition("a", TS.STALLED, 1, "s1", "satellite silent", T0 + 3)])
    second = tmp_path / "wal-000002.log"
    append(second, [R.transition("a", TS.RETRY, 1, None, "lost", T0 + 4),
                    R.transition("a", TS.DISPATCHED, 2, "s2", "dispatched", T0 + 5),
                    R.transition("a", TS.DONE, 2, "s2", "done", T0 + 6)])
    index = HistoryIndex(tmp_path)
    index.refresh()
    want = [("dispatched", "s1"), ("running", "s1"), ("stalled", "s1"), ("retry", None), ("dispatched", "s2"),
            ("done", "s2")]
    timeline = index.timeline("a")
    assert _states(timeline) == want
    assert [h["reason"] for h in timeline][2:4] == ["satellite silent", "lost"] and timeline[0]["t"] == T0 + 1
    assert timeline[-1]["attempt"] == 2 and index.timeline("nobody") == []
    # the first segment is compacted after it was read: its part is found through the task id index
    compact(first)
    assert _states(index.timeline("a")) == want
    # a fresh index reads the compacted segment as such
    fresh = HistoryIndex(tmp_path)
    fresh.refresh()
    assert _states(fresh.timeline("a")) == want and fresh.timeline("b")[-1]["state"] == "done"
    rows = history(tmp_path, {"ids": ["a"], "timeline": True}, fresh)
    assert [r["id"] for r in rows] == ["a"] and _states(rows[0]["history"]) == want
    # a removed segment gives what is left
    second.unlink()
    assert _states(index.timeline("a")) == want[:3]


def test_the_historian_answers_from_its_own_process_and_keeps_current(tmp_path: Path) -> None:
    import msgpack as mp

    from orchester.journal.historian import Historian

    path = tmp_path / "wal-000001.log"
    append(path, task("a", "echo", T0, 1))
    historian = Historian(tmp_path)
    try:
        assert historian.wait_ready(60) and historian.ready  # it says when its index is built
        ok, body = historian.ask(1, {"rid": 7, "limit": 10})
        reply = mp.unpackb(body)
        assert ok and reply["rid"] == 7 and [r["id"] for r in reply["rows"]] == ["a"]
        append(path, task("b", "fit", T0 + 60, 5, TS.FAILED))
        ok, body = historian.ask(2, {"rid": "x", "ids": ["b"], "timeline": True})
        (row,) = mp.unpackb(body)["rows"]
        assert ok and row["error"] == "ValueError: bad input" and row["history"][-1]["state"] == "failed"
        ok, body = historian.ask(3, {"rid": 1, "rollup": 60.0, "since": T0, "until": T0 + 180})
        assert ok and sum(b["done"] for b in mp.unpackb(body)["buckets"]) == 1
        ok, body = historian.ask(4, {"rid": 1, "rollup": 60.0})  # a query it cannot answer: an error, it goes on
        assert not ok and "KeyError" in mp.unpackb(body)["error"]
        assert historian.ask(5, {"rid": 2})[0] and historian.alive()
    finally:
        historian.stop()
    assert historian.proc.returncode == 0  # its input closed: it ended by itself


def test_a_historian_that_dies_fails_its_query_and_the_reader_starts_another(tmp_path: Path) -> None:
    import signal

    import msgpack as mp
    import zmq

    from orchester.journal import writer

    append(tmp_path / "wal-000001.log", task("a", "echo", T0, 1))
    ctx = zmq.Context()
    reader = writer.HistoryReader(tmp_path, ctx)
    poller = zmq.Poller()
    poller.register(reader.results, zmq.POLLIN)

    def one(token: int) -> list[bytes]:
        reader.ask(token, {"rid": token})
        assert poller.poll(60_000), "no answer"
        return reader.results.recv_multipart()

    old_every = writer.RESTART_EVERY
    writer.RESTART_EVERY = 0.0
    try:
        token, ok, body = one(1)
        assert ok == b"1" and [r["id"] for r in mp.unpackb(body)["rows"]] == ["a"]
        first = reader._historian
        assert first is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        token, ok, body = one(2)  # a new historian answers
        assert ok == b"1" and mp.unpackb(body)["rid"] == 2 and reader._historian is not first
    finally:
        writer.RESTART_EVERY = old_every
        historian = reader._historian
        reader.close()
        ctx.term()
    assert historian is not None and historian.proc.poll() is not None  # closed with the reader


def test_an_id_submitted_again_is_a_task_of_its_own(tmp_path: Path) -> None:
    """Once a task has left the orchestrator's memory its id may be submitted again, by any key: the
    new task's row, error message and timeline inherit nothing of the earlier one (another key's)."""
    first = tmp_path / "wal-000001.log"
    append(first, task("a", "fit", T0, 5, TS.FAILED, owner="ann", sat="s1"))
    append(first, [R.submitted("a", b"c", header("echo"), [], T0 + 100, None, "bob"),
                   R.transition("a", TS.DISPATCHED, 1, "s2", None, T0 + 101)])
    index = HistoryIndex(tmp_path)
    index.refresh()
    (row,) = history(tmp_path, {"ids": ["a"], "timeline": True, "viewer": "bob"}, index)
    assert (row["owner"], row["kind"], row["state"], row["error"]) == ("bob", "echo", "dispatched", "")
    assert _states(row["history"]) == [("dispatched", "s2")]
    # and the same once the segment is compacted (the earlier task's records share it)
    compact(first)
    append(tmp_path / "wal-000002.log", [R.transition("a", TS.RUNNING, 1, "s2", None, T0 + 102)])
    fresh = HistoryIndex(tmp_path)
    fresh.refresh()
    (row,) = history(tmp_path, {"ids": ["a"], "timeline": True, "viewer": "bob"}, fresh)
    assert row["error"] == "" and _states(row["history"]) == [("dispatched", "s2"), ("running", "s2")]
    index.refresh()
    assert _states(index.timeline("a")) == [("dispatched", "s2"), ("running", "s2")]


def test_a_snapshot_after_a_barrier_does_not_repeat_a_timeline(tmp_path: Path) -> None:
    recs = task("a", "echo", T0, 1)
    append(tmp_path / "wal-000001.log", [*recs, R.barrier(T0 + 10), *recs])  # a passive server's resync
    index = HistoryIndex(tmp_path)
    index.refresh()
    assert _states(index.timeline("a")) == [("dispatched", "s1"), ("running", "s1"), ("done", "s1")]


def test_a_timelines_reasons_only_to_whom_may_read_the_error(tmp_path: Path) -> None:
    append(tmp_path / "wal-000001.log", [
        R.submitted("a", b"c", header("fit"), [], T0, None, "ann"),
        R.transition("a", TS.FAILED, 0, None, "quarantined after 3 crashes; last: secret path /home/ann", T0 + 1)])
    index = HistoryIndex(tmp_path)
    reasons = {who: [h["reason"] for h in history(tmp_path, {"ids": ["a"], "timeline": True, "viewer": who},
                                                  index)[0]["history"]] for who in ("ann", "bob", None)}
    assert reasons["ann"] == reasons[None] == ["quarantined after 3 crashes; last: secret path /home/ann"]
    assert reasons["bob"] == [None]


def test_a_timeline_skips_a_record_it_cannot_read_and_keeps_the_newest(tmp_path: Path, monkeypatch: Any) -> None:
    from orchester.journal import index as index_module

    path = tmp_path / "wal-000001.log"
    recs = [R.submitted("a", b"c", header("fit"), [], T0, None, None)]
    recs += [R.transition("a", TS.RETRY if i % 2 else TS.DISPATCHED, i // 2 + 1, None, f"r{i}", T0 + i)
             for i in range(10)]
    append(path, recs)
    index = HistoryIndex(tmp_path)
    index.refresh()
    assert len(index.timeline("a")) == 10
    # the bytes of the third transition damaged under the index; the file's tail cut off
    data = bytearray(path.read_bytes())
    at = len(encode_record(recs[0])) + len(encode_record(recs[1])) + len(encode_record(recs[2])) + 10
    data[at] ^= 0xFF
    path.write_bytes(bytes(data[:-5]))
    got = [h["reason"] for h in index.timeline("a")]
    assert got == [f"r{i}" for i in range(10) if i not in (2, 9)]
    # a task with more transitions than MAX_TIMELINE: the newest are kept (and only they cost memory)
    monkeypatch.setattr(index_module, "MAX_TIMELINE", 3)
    append(tmp_path / "wal-000002.log", [R.submitted("b", b"c", header("fit"), [], T0, None, None)]
           + [R.transition("b", TS.RETRY, i + 1, None, f"b{i}", T0 + i) for i in range(40)])
    index.refresh()
    assert [h["reason"] for h in index.timeline("b")] == ["b37", "b38", "b39"]
    assert len(index.where["b"]) == 3 * 8


def _reader(tmp_path: Path) -> tuple[Any, Any, Any]:
    import zmq

    from orchester.journal import writer

    ctx = zmq.Context()
    reader = writer.HistoryReader(tmp_path, ctx)
    poller = zmq.Poller()
    poller.register(reader.results, zmq.POLLIN)
    return ctx, reader, poller


def test_queries_beyond_those_that_may_wait_are_refused_busy(tmp_path: Path, monkeypatch: Any) -> None:
    from orchester.journal import writer
    from serializers import protocol as P

    append(tmp_path / "wal-000001.log", task("a", "echo", T0, 1))
    monkeypatch.setattr(writer, "MAX_WAITING", 0)
    ctx, reader, poller = _reader(tmp_path)
    try:
        reader.ask_all([("s", b"client", 5, {"limit": 1})])
        assert poller.poll(60_000), "no answer"
        ((sock, frames),) = list(reader.replies())
        assert sock == "s" and frames[0] == b"client" and P.E_BUSY.encode() in b"".join(frames[1:])
    finally:
        reader.close()
        ctx.term()


def test_a_query_that_cannot_be_sent_is_answered_and_the_reader_goes_on(tmp_path: Path) -> None:
    append(tmp_path / "wal-000001.log", task("a", "echo", T0, 1))
    ctx, reader, poller = _reader(tmp_path)
    try:
        reader.ask(1, {"rid": 1, "bad": object()})  # (the core never sends one: the thread must not die of it)
        assert poller.poll(60_000), "no answer"
        _, ok, _ = reader.results.recv_multipart()
        assert ok == b"0"
        reader.ask(2, {"rid": 2})
        assert poller.poll(60_000), "no answer"
        _, ok, _ = reader.results.recv_multipart()
        assert ok == b"1"
    finally:
        reader.close()
        ctx.term()


def test_close_while_a_query_is_in_flight_stops_the_historian_at_once(tmp_path: Path, monkeypatch: Any) -> None:
    import subprocess
    import sys
    import time

    from orchester.journal import historian as hmod
    from orchester.journal import writer

    class Silent(hmod.Historian):  # a historian that reads its query and never answers
        def __init__(self, directory: Path) -> None:
            self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self._stdin, self._stdout = self.proc.stdin, self.proc.stdout

    monkeypatch.setattr(writer, "Historian", Silent)
    ctx, reader, _ = _reader(tmp_path)
    reader.ask(1, {"rid": 1})
    deadline = time.monotonic() + 30
    while reader._historian is None and time.monotonic() < deadline:
        time.sleep(0.01)
    historian = reader._historian
    time.sleep(0.2)  # the thread waits for its answer
    began = time.monotonic()
    reader.close()
    ctx.term()
    assert time.monotonic() - began < 1.5 and not reader._thread.is_alive()
    assert historian is not None and historian.proc.poll() is not None and historian._stdout.closed


def test_an_answer_holds_at_most_max_rows_and_a_message_is_searched_for_once(tmp_path: Path,
                                                                             monkeypatch: Any) -> None:
    from orchester.journal import historian as hmod
    from orchester.journal import segments

    first = tmp_path / "wal-000001.log"
    recs = [r for i in range(5) for r in task(f"t{i}", "echo", T0 + i, 1)]
    recs += [R.submitted("f", b"c", header("fit"), [], T0 + 10, None, None),
             R.result("f", [msgpack.packb({"id": "f", "a": 1, "ok": False, "err": {"type": "E", "msg": ""}})], T0 + 11),
             R.transition("f", TS.FAILED, 1, "s1", "E", T0 + 11)]
    append(first, recs)
    compact(first)
    append(tmp_path / "wal-000002.log", task("z", "echo", T0 + 20, 1))
    index = HistoryIndex(tmp_path)
    searched: list[str] = []
    real = segments.read_task_record
    monkeypatch.setattr(segments, "read_task_record", lambda *a: searched.append(a[1]) or real(*a))
    monkeypatch.setattr(hmod, "MAX_ROWS", 3)
    for limit in (None, -1, 100):
        assert [r["id"] for r in hmod.answer(index, {"rid": 1, "limit": limit})["rows"]] == ["t4", "f", "z"]
    assert len(hmod.answer(index, {"rid": 1, "limit": 2})["rows"]) == 2
    for _ in range(3):
        (row,) = hmod.answer(index, {"rid": 1, "state": "failed"})["rows"]
        assert row["error"] == "E"
    assert searched == ["f"]
