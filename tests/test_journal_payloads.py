"""Payloads written once: a compacted segment leaves its large records (payloads and results of 64 KiB or more)
in the log they were written to, kept as the segment's payload file, and reads them from there; what a crash,
a missing or damaged payload file, a damaged segment and retention do to them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchester.journal.child import validate_in_subprocess
from orchester.journal.folder import private_directory
from orchester.journal.hdf5 import find_records, payload_path, read_h5
from orchester.journal.manifest import MANIFEST, Manifest
from orchester.journal.segments import OUTSIDE, _placed, apply_retention, compact_closed, read_journal, write_h5
from orchester.journal.wal import ReadReport, SegmentWriter, encode_record, read_placed, record_chunks
from orchester.journal.writer import Journal, load_spilled, replay
from serializers import pack
from tracker import TaskState

BIG = 3 * OUTSIDE


def submit(tid: str, payload: bytes) -> list[Any]:
    return ["S", tid, b"client", pack({"id": tid, "k": "echo"}), [payload], 100.0, None, "alice"]


def transition(tid: str, state: TaskState, t: float = 101.0) -> list[Any]:
    return ["T", tid, int(state), 1, "s1", None, t]


def result(tid: str, payload: bytes, t: float = 102.0) -> list[Any]:
    return ["R", tid, [pack({"id": tid, "a": 1, "ok": True, "sat": "s1"}), payload], t]


def records_of(n_big: int = 4) -> list[list[Any]]:
    out: list[list[Any]] = []
    for i in range(n_big):
        tid = f"big{i}"
        out += [submit(tid, os.urandom(BIG)), transition(tid, TaskState.DISPATCHED),
                transition(tid, TaskState.DONE), result(tid, os.urandom(BIG))]
    out += [submit("small", b"\x01\x02"), transition("small", TaskState.DONE), result("small", b"\xc0")]
    return out


def write_log(directory: Path, records: list[list[Any]]) -> Path:
    w = SegmentWriter(directory)
    w.write([record_chunks(r) for r in records])
    w.sync()
    path = w.path
    w.close()
    return path


def compacted_and_damaged(directory: Path, records: list[list[Any]]) -> Path:
    """Write ``records`` as one log, compact it, change 100 bytes of the segment; the segment's path."""
    write_log(directory, records)
    compact_closed(directory)
    h5 = directory / "seg-000001.h5"
    data = bytearray(h5.read_bytes())
    for i in range(2000, 2100):
        data[i] ^= 0x5A
    h5.write_bytes(bytes(data))
    return h5


def entry(directory: Path, name: str = "seg-000001.h5") -> dict[str, Any]:
    manifest = Manifest.load(directory)
    assert manifest is not None
    return manifest.segments[name]


def test_compaction_leaves_large_records_in_the_log_it_keeps_as_the_payload_file(tmp_path: Path) -> None:
    records = records_of()
    log = write_log(tmp_path, records)
    written = log.read_bytes()
    compact_closed(tmp_path)
    h5, pay = tmp_path / "seg-000001.h5", tmp_path / "pay-000001.log"
    assert not log.exists() and pay.read_bytes() == written  # the very file: renamed, not rewritten
    assert h5.stat().st_size < BIG  # 8 large records of 3 × 64 KiB stayed out of it
    e = entry(tmp_path)
    assert e["payloads"] == {"name": "pay-000001.log", "size": len(written), "records": 8,
                             "sha256": hashlib.sha256(written).hexdigest(),
                             "bytes": sum(length for _, _, length, _ in read_placed(pay, ReadReport())
                                          if length >= OUTSIDE)}
    assert e["records"] == len(records)
    report = ReadReport()
    assert [encode_record(r) for r in read_journal(tmp_path, report)] == [encode_record(r) for r in records]
    assert not report.damaged and not report.damaged_segments
    found = find_records(h5, "big2")
    assert [r[0] for r in found] == ["S", "T", "T", "R"] and found[0][4] == records[8][4]
    assert validate_in_subprocess(h5) is not None  # a separate process's whole read accepts it too


def test_a_crash_between_listing_the_segment_and_keeping_its_log_loses_nothing(tmp_path: Path) -> None:
    records = records_of(2)
    log = write_log(tmp_path, records)
    h5 = tmp_path / "seg-000001.h5"
    digest = hashlib.sha256(log.read_bytes()).hexdigest()
    write_h5(h5, _placed(log, ReadReport()), {"size": log.stat().st_size, "sha256": digest})  # killed before the rename
    assert log.exists() and not payload_path(h5).exists()
    report = ReadReport()  # a reader in that window (the history, say) finds the large records in the log
    assert [encode_record(r) for r in read_h5(h5, report)] == [encode_record(r) for r in records]
    assert not report.damaged
    got, report = replay(tmp_path)
    assert not log.exists() and payload_path(h5).exists()
    assert [encode_record(r) for r in got] == [encode_record(r) for r in records]
    assert not report.damaged_segments


def test_a_missing_payload_file_loses_its_large_records_only_and_is_reported_once(tmp_path: Path) -> None:
    records = records_of(3)
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    os.unlink(tmp_path / "pay-000001.log")
    got, report = replay(tmp_path)
    small = [r for r in records if len(encode_record(r)) < OUTSIDE]
    assert [encode_record(r) for r in got] == [encode_record(r) for r in small]
    [d] = report.damaged_segments
    assert d.name == "pay-000001.log" and d.lost_records == 6 and "missing" in d.reason
    assert report.counters() == {"journal_damaged_segments": 1, "journal_lost_bytes": d.lost_bytes}  # counted once
    assert d.lost_bytes == entry(tmp_path)["payloads"]["bytes"]
    again, report2 = replay(tmp_path)
    assert len(again) == len(small)  # said once, remembered in the manifest
    assert report2.counters() == {"journal_damaged_segments": 0, "journal_lost_bytes": 0}
    assert entry(tmp_path)["payloads"]["lost"]


def test_a_damaged_large_record_is_skipped_and_reported_the_rest_read(tmp_path: Path) -> None:
    records = records_of(3)
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    pay = tmp_path / "pay-000001.log"
    places = [(o, n) for _, o, n, _ in read_placed(pay, ReadReport())]
    offset, length = places[4]  # big1's submission
    data = bytearray(pay.read_bytes())
    data[offset + length // 2] ^= 0xFF
    pay.write_bytes(bytes(data))
    report = ReadReport()
    got = list(read_journal(tmp_path, report))
    assert [encode_record(r) for r in got] == [encode_record(r) for i, r in enumerate(records) if i != 4]
    assert report.damaged == [("pay-000001.log", offset, length)]
    assert find_records(tmp_path / "seg-000001.h5", "big1", "S") == []  # not handed out either


def test_a_deleted_segment_is_rebuilt_from_its_payload_file_and_reported(tmp_path: Path) -> None:
    records = records_of(2)
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    os.unlink(tmp_path / "seg-000001.h5")
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in records]
    [d] = report.damaged_segments
    assert d.name == "seg-000001.h5" and d.recovered == len(records) and d.lost_records == 0 and d.lost_bytes == 0


def test_a_payload_file_that_is_not_the_log_is_not_used_to_rebuild(tmp_path: Path) -> None:
    write_log(tmp_path, records_of(2))
    compact_closed(tmp_path)
    pay = tmp_path / "pay-000001.log"
    data = bytearray(pay.read_bytes())
    data[100] ^= 1  # same size, other bytes
    pay.write_bytes(bytes(data))
    os.unlink(tmp_path / "seg-000001.h5")
    got, report = replay(tmp_path)  # nothing read from a file that is not the log: the segment is lost, said so
    assert got == [] and [d.name for d in report.damaged_segments] == ["seg-000001.h5"]
    assert pay.exists()  # left where it was, for a person to look at


def test_swapped_payload_files_are_put_back(tmp_path: Path) -> None:
    first, second = records_of(1), [submit("other", os.urandom(BIG)), result("other", os.urandom(2 * BIG))]
    write_log(tmp_path, first)
    write_log(tmp_path, second)
    compact_closed(tmp_path)
    a, b = tmp_path / "pay-000001.log", tmp_path / "pay-000002.log"
    os.rename(a, tmp_path / "x")
    os.rename(b, a)
    os.rename(tmp_path / "x", b)
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in first + second]
    assert not report.damaged_segments and not report.damaged


def test_a_put_back_killed_half_way_is_finished_at_the_next_start(tmp_path: Path) -> None:
    first, second = records_of(1), [submit("other", os.urandom(BIG)), result("other", os.urandom(2 * BIG))]
    write_log(tmp_path, first)
    write_log(tmp_path, second)
    compact_closed(tmp_path)
    a, b = tmp_path / "pay-000001.log", tmp_path / "pay-000002.log"
    os.rename(a, tmp_path / "pay-000002.log.moving.tmp")  # swapped, then the first step of putting them back
    os.rename(b, tmp_path / "pay-000001.log.moving.tmp")
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in first + second]
    assert not report.damaged_segments and not list(tmp_path.glob("*.moving.tmp"))


@pytest.mark.parametrize("what", ["folder", "fifo", "symlink"])
def test_a_payload_file_that_is_not_a_file_is_set_aside_and_start_goes_on(tmp_path: Path, what: str) -> None:
    records = records_of(1)
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    pay = tmp_path / "pay-000001.log"
    real = pay.read_bytes()
    pay.unlink()
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    outside.write_bytes(real)
    {"folder": pay.mkdir, "fifo": lambda: os.mkfifo(pay), "symlink": lambda: pay.symlink_to(outside)}[what]()
    got, report = replay(tmp_path)  # no traceback, no hang, nothing read through a link
    assert [r for r in got if r[1] != "small"] == [r for r in records if r[1] != "small" and r[0] == "T"]
    [d] = report.damaged_segments
    assert d.name == "pay-000001.log" and d.lost_records == 2 and d.moved_to


def test_a_journal_without_a_manifest_keeps_its_payload_files(tmp_path: Path) -> None:
    """``orchester journal compact`` and the rebuilding of a manifest (moved aside, as the docs say to do
    when it is damaged) keep the large records."""
    first, second = records_of(1), records_of(2)[4:]
    write_log(tmp_path, first)
    compact_closed(tmp_path)
    os.rename(tmp_path / MANIFEST, tmp_path / "MANIFEST.aside")
    write_log(tmp_path, second)
    compact_closed(tmp_path)  # no manifest: the log holds large records, so it is kept
    assert (tmp_path / "pay-000002.log").exists()
    got, report = replay(tmp_path)  # the manifest is made anew, payload files listed
    assert [encode_record(r) for r in got] == [encode_record(r) for r in first + second]
    assert not report.damaged_segments and not report.damaged
    assert entry(tmp_path, "seg-000002.h5")["payloads"]["records"] == 2


def test_retention_leaves_a_segment_whose_payload_file_is_damaged_as_it_is(tmp_path: Path) -> None:
    write_log(tmp_path, records_of(2))
    compact_closed(tmp_path)
    pay = tmp_path / "pay-000001.log"
    offset, length = [(o, n) for _, o, n, _ in read_placed(pay, ReadReport())][0]
    data = bytearray(pay.read_bytes())
    data[offset + 10] ^= 0xFF
    pay.write_bytes(bytes(data))
    before = (tmp_path / "seg-000001.h5").read_bytes()
    assert apply_retention(tmp_path, results_before=1e12)["segments_rewritten"] == 0
    assert pay.exists() and (tmp_path / "seg-000001.h5").read_bytes() == before  # the damage stays visible


def test_payload_files_are_made_private(tmp_path: Path) -> None:
    d = tmp_path / "j"
    d.mkdir(mode=0o700)
    write_log(d, records_of(1))
    compact_closed(d)
    os.chmod(d / "pay-000001.log", 0o644)
    os.chmod(d, 0o755)
    private_directory(d)
    assert (d / "pay-000001.log").stat().st_mode & 0o777 == 0o600


def test_a_damaged_segment_is_recovered_whole_from_its_payload_file(tmp_path: Path) -> None:
    records = records_of(2)
    h5 = compacted_and_damaged(tmp_path, records)
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in records]  # small records too
    [d] = report.damaged_segments
    assert d.recovered == len(records) and d.lost_records == 0
    assert payload_path(h5).exists() and entry(tmp_path)["payloads"]["records"] == 4
    assert list(tmp_path.glob("seg-000001.h5.damaged-*"))  # set aside, never deleted


def test_retention_keeps_the_headers_and_removes_the_payload_file(tmp_path: Path) -> None:
    records = records_of(2)
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    counts = apply_retention(tmp_path, results_before=1e12)
    assert counts == {"results_dropped": 3, "inputs_dropped": 3, "segments_rewritten": 1}
    assert not (tmp_path / "pay-000001.log").exists() and "payloads" not in entry(tmp_path)
    got = list(read_journal(tmp_path))
    assert [r[:2] for r in got] == [r[:2] for r in records]
    assert all(r[4] == [] for r in got if r[0] == "S")


def test_a_payload_file_no_segment_lists_is_moved_aside(tmp_path: Path) -> None:
    write_log(tmp_path, records_of(1))
    compact_closed(tmp_path)
    manifest = Manifest.load(tmp_path)
    assert manifest is not None
    del manifest.segments["seg-000001.h5"]["payloads"]  # as a retention rewrite leaves it, killed before the unlink
    manifest.save(tmp_path)
    replay(tmp_path)
    assert not (tmp_path / "pay-000001.log").exists() and list(tmp_path.glob("pay-000001.log.damaged-*"))


def test_a_manifest_entry_with_a_bad_payload_file_refuses_the_journal(tmp_path: Path) -> None:
    write_log(tmp_path, records_of(1))
    compact_closed(tmp_path)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    from orchester.journal.manifest import ManifestError

    for name in ("../../etc/passwd", "pay-1.log", "pay-000002.log"):
        doc["segments"]["seg-000001.h5"]["payloads"]["name"] = name
        body = {k: v for k, v in doc.items() if k != "sha256"}
        doc["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        (tmp_path / MANIFEST).write_text(json.dumps(doc))
        with pytest.raises(ManifestError, match="bad payload file"):
            Manifest.load(tmp_path)


@pytest.mark.parametrize("where, mark", [("entry", "recovering"), ("payloads", "lost")])
def test_a_recovery_mark_that_is_not_words_refuses_the_journal(tmp_path: Path, where: str, mark: str) -> None:
    from orchester.journal.manifest import ManifestError

    write_log(tmp_path, records_of(1))
    compact_closed(tmp_path)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    e = doc["segments"]["seg-000001.h5"]
    (e if where == "entry" else e["payloads"])[mark] = {"not": "words"}
    body = {k: v for k, v in doc.items() if k != "sha256"}
    doc["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="bad recovery mark"):
        Manifest.load(tmp_path)


def test_a_spilled_payload_is_read_from_the_payload_file_once_compacted(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", durability="full", segment_bytes=1 << 20)
    payload = os.urandom(BIG)
    journal.append(submit("spilled", payload), spill=True)
    for i in range(12):  # past a segment: it is compacted
        journal.append(submit(f"more{i}", os.urandom(BIG)))
    journal.close()
    compact_closed(tmp_path / "j")
    seq, path, offset = journal.locations[0]
    assert not path.exists() and payload_path(tmp_path / "j" / f"seg-{path.name[4:10]}.h5").exists()
    task = SimpleNamespace(id="spilled", spilled=(path, offset))
    assert load_spilled(task) == [payload]
    assert [len(r[4][0]) for r in read_h5(tmp_path / "j" / "seg-000001.h5")][:1] == [BIG]


@pytest.mark.parametrize("large", [True, False])
def test_a_start_killed_while_recovering_a_segment_finishes_it_at_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, large: bool) -> None:
    from orchester.journal import recovery

    records = records_of(2) if large else [transition(f"t{i}", TaskState.DONE) for i in range(20)]
    compacted_and_damaged(tmp_path, records)

    twin = tmp_path.parent / f"{tmp_path.name}-twin"
    shutil.copytree(tmp_path, twin)  # the same damage, recovered by a start nobody kills
    expected, expected_report = replay(twin)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed while recovering")

    with monkeypatch.context() as m:
        m.setattr(recovery, "_settle", killed)
        with pytest.raises(KeyboardInterrupt):
            replay(tmp_path)
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in expected]
    if large:  # rebuilt from its payload file: nothing lost
        assert [encode_record(r) for r in got] == [encode_record(r) for r in records]
    [d] = report.damaged_segments  # reported, by the start that finished it, as the other start did
    [e] = expected_report.damaged_segments
    assert (d.name, d.lost_records, d.lost_bytes) == (e.name, e.lost_records, e.lost_bytes)
    assert replay(tmp_path)[1].counters() == {"journal_lost_bytes": 0, "journal_damaged_segments": 0}


def test_a_manifest_made_anew_rebuilds_a_deleted_segment_from_its_payload_file(tmp_path: Path) -> None:
    first, second = records_of(1), records_of(2)[4:]
    write_log(tmp_path, first)
    write_log(tmp_path, second)
    compact_closed(tmp_path)
    os.rename(tmp_path / MANIFEST, tmp_path / "MANIFEST.aside")
    os.unlink(tmp_path / "seg-000002.h5")  # the newest: no gap in the numbers tells
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in first + second]
    [d] = report.damaged_segments
    assert d.name == "seg-000002.h5" and d.lost_records == 0


def test_a_payload_file_marked_lost_is_read_again_once_it_is_back(tmp_path: Path) -> None:
    records = records_of(2)
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    pay = tmp_path / "pay-000001.log"
    backup = pay.read_bytes()
    pay.unlink()
    assert len(replay(tmp_path)[0]) == 7  # the small records
    pay.write_bytes(backup)  # from a backup
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in records]
    assert "lost" not in entry(tmp_path)["payloads"]


def test_a_large_record_of_a_kind_this_version_does_not_know_is_kept(tmp_path: Path) -> None:
    records = [["XY", 42, os.urandom(BIG)], submit("a", os.urandom(BIG))]
    write_log(tmp_path, records)
    compact_closed(tmp_path)
    got, report = replay(tmp_path)
    assert [encode_record(r) for r in got] == [encode_record(r) for r in records]
    assert not report.damaged
