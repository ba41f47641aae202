"""Journal files without a running orchestrator: log segments, PyTables compaction, history folding."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchester.journal.folder import JournalError
from orchester.journal.hdf5 import read_h5, read_h5_fields
from orchester.journal.historian import history
from orchester.journal.history import HistoryFold, fields, select
from orchester.journal.manifest import h5_segments
from orchester.journal.segments import compact, compact_closed, read_journal
from orchester.journal.wal import ReadReport, SegmentWriter, encode_record, read_all
from orchester.journal.writer import replay
from serializers import pack
from serializers import protocol as P
from tracker import TaskState


def submit(tid: str, kind: str = "echo", t: float = 100.0) -> list:
    return ["S", tid, b"client", pack({"id": tid, "k": kind}), [b"\x92\x90\x80"], t, None]


def transition(tid: str, state: TaskState, attempt: int = 1, sat: str | None = "s1", t: float = 101.0) -> list:
    return ["T", tid, int(state), attempt, sat, None, t]


def result(tid: str, ok: bool = True, t: float = 102.0) -> list:
    hdr = {"id": tid, "a": 1, "ok": ok, "sat": "s1"}
    if not ok:
        hdr["err"] = {"type": "ValueError", "msg": "bad", "tb": ""}
    return ["R", tid, [pack(hdr), b"\xc0"], t]


def write(directory: Path, records: list[list]) -> Path:
    w = SegmentWriter(directory)
    w.write([encode_record(r) for r in records])
    w.sync()
    path = w.path
    w.close()
    return path


RECORDS = [submit("a"), transition("a", TaskState.DISPATCHED), transition("a", TaskState.DONE), result("a"),
           submit("b", "genx.fit", t=200.0), transition("b", TaskState.DISPATCHED),
           transition("b", TaskState.FAILED), result("b", ok=False), submit("c", t=300.0)]


def test_segments_round_trip_and_one_writer_only(tmp_path: Path) -> None:
    write(tmp_path, RECORDS[:4])
    write(tmp_path, RECORDS[4:])
    assert [r[0] for r in read_all(tmp_path)] == [r[0] for r in RECORDS]
    w = SegmentWriter(tmp_path)
    with pytest.raises(JournalError, match="another process"):
        SegmentWriter(tmp_path)
    w.close()


def test_compaction_to_pytables_keeps_every_record_and_indexes_columns(tmp_path: Path) -> None:
    log = write(tmp_path, RECORDS)
    h5 = compact(log)
    assert not log.exists() and h5.name == "seg-000001.h5"
    back = list(read_h5(h5))
    assert [r[0] for r in back] == [r[0] for r in RECORDS] and back[0][3] == RECORDS[0][3]
    cols = list(read_h5_fields(h5))
    assert cols[4]["kind"] == "genx.fit" and cols[7]["etype"] == "ValueError" and cols[2]["state"] == 3
    import tables

    with tables.open_file(str(h5)) as f:
        t = f.root.records
        assert t.cols.task_id.is_indexed and t.cols.t.is_indexed
        assert f.root.bodies.filters.complib.startswith("blosc") and t.chunkshape == (4096,)
        assert t.filters.complib.startswith("blosc")


def test_compaction_recovers_from_a_crash_at_any_step(tmp_path: Path) -> None:
    first = write(tmp_path, RECORDS[:4])
    h5 = compact(first)
    first.write_bytes(b"".join(encode_record(r) for r in RECORDS[:4]))  # killed before the unlink
    (tmp_path / "seg-000009.h5.tmp").write_bytes(b"half a file")  # killed while writing another
    second = write(tmp_path, RECORDS[4:])
    compact_closed(tmp_path, keep=second)
    assert not first.exists() and not (tmp_path / "seg-000009.h5.tmp").exists() and second.exists()
    assert h5_segments(tmp_path) == [h5]
    assert [r[1] for r in read_journal(tmp_path)] == [r[1] for r in RECORDS]


def test_replay_reports_damage_and_keeps_what_precedes_it(tmp_path: Path) -> None:
    log = write(tmp_path, RECORDS)
    data = log.read_bytes()
    log.write_bytes(data[: len(data) - 5])  # a torn last write
    report = ReadReport()
    records = list(read_journal(tmp_path, report))
    assert len(records) == len(RECORDS) - 1 and report.damaged and report.damaged[0][0] == log.name
    records, report = replay(tmp_path)  # compacts the closed log, dropping the torn record
    assert len(records) == len(RECORDS) - 1 and h5_segments(tmp_path)


def test_history_rows_from_journal_files(tmp_path: Path) -> None:
    log = write(tmp_path, RECORDS[:4])
    compact(log)
    write(tmp_path, RECORDS[4:])
    rows = history(tmp_path, {})
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["state"] == "done" and rows[0]["satellite"] == "s1" and rows[0]["finished"] == 101.0
    assert rows[1]["error"] == "ValueError: bad" and rows[2]["state"] == "pending"  # type and message
    assert [r["id"] for r in history(tmp_path, {"state": "failed"})] == ["b"]
    assert [r["id"] for r in history(tmp_path, {"kind": "echo", "since": 150.0})] == ["c"]
    assert [r["id"] for r in history(tmp_path, {"limit": 1})] == ["c"]
    assert [r["id"] for r in history(tmp_path, {"ids": ["a", "zz"]})] == ["a"]


def test_fields_of_bad_records_are_none() -> None:
    for bad in (["S"], ["S", "x", b"", b"\xc1", [], 1.0], ["T", "x", "not a state"], ["R", "x", []], ["?", "x"]):
        assert fields(bad) is None
    fold = HistoryFold()
    fold.add(fields(transition("orphan", TaskState.DONE)))  # type: ignore[arg-type]
    assert select(fold.rows) == []  # no submit record: not a task we can describe
    assert P.HISTORY == b"\x15"


def test_a_log_damaged_at_any_byte_yields_an_intact_prefix(tmp_path: Path) -> None:
    log = write(tmp_path, RECORDS)
    data = log.read_bytes()
    for cut in range(0, len(data), 7):
        for damage in ("truncate", "flip"):
            log.write_bytes(data[:cut] if damage == "truncate" else
                            data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1:])
            report = ReadReport()
            got = list(read_all(tmp_path, report))
            assert got == RECORDS[:len(got)]  # a prefix, never garbage, never an exception
            if damage == "flip":
                assert report.damaged and len(got) < len(RECORDS)  # the checksum catches every flip
