"""Damaged HDF5 journal segments (issue 15, item 1), with real PyTables files and no orchestrator.

A truncated, zeroed, bit-flipped, deleted, swapped or foreign ``seg-*.h5`` used to reach HDF5
(an uncaught ``HDF5ExtError``, ``'UnImplemented' object has no attribute 'read'``, or SIGSEGV).
Now every segment is checked against the manifest before anything opens it: a failing one is
moved aside, what it held is recovered where that is safe, and the rest is replayed.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
from test_journal_files import write as write_log

from orchester.journal import child, segments
from orchester.journal.folder import JournalError
from orchester.journal.hdf5 import read_h5
from orchester.journal.historian import history
from orchester.journal.manifest import Manifest, ManifestError, h5_segments
from orchester.journal.segments import apply_retention, compact
from orchester.journal.wal import SegmentWriter, encode_record
from orchester.journal.writer import replay
from serializers import pack
from tracker import TaskState

MANIFEST = "MANIFEST"  #: beside the segments (not imported: these tests also show what failed before it)


def submit(tid: str, t: float, payload: bytes = b"\x92\x90\x80") -> list[Any]:
    return ["S", tid, b"client", pack({"id": tid, "k": "echo"}), [payload], t, None]


def done(tid: str, t: float) -> list[Any]:
    return ["T", tid, int(TaskState.DONE), 1, "s1", None, t]


def result(tid: str, t: float) -> list[Any]:
    return ["R", tid, [pack({"id": tid, "a": 1, "ok": True, "sat": "s1"}), b"\xa2ok"], t]


def task(tid: str, t: float, payload: bytes = b"\x92\x90\x80") -> list[list[Any]]:
    return [submit(tid, t, payload), done(tid, t + 1), result(tid, t + 2)]


def journal(directory: Path, per_segment: int = 10, n: int = 3) -> list[list[str]]:
    """A journal of ``n`` compacted segments of ``per_segment`` finished tasks each; their ids per segment."""
    ids = []
    for s in range(n):
        tids = [f"s{s}-t{i}" for i in range(per_segment)]
        compact(write_log(directory, [r for i, tid in enumerate(tids) for r in task(tid, 1000.0 * s + i)]))
        ids.append(tids)
    return ids


def task_ids(records: list[list[Any]]) -> set[str]:
    return {r[1] for r in records if r[0] == "S"}


def seg(directory: Path, n: int) -> Path:
    return directory / f"seg-{n:06d}.h5"


def aside(directory: Path, n: int) -> list[Path]:
    return sorted(directory.glob(f"seg-{n:06d}.h5.damaged-*"))


def flip(path: Path, offset: int, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_segment_privately_and_atomically(tmp_path: Path) -> None:
    journal(tmp_path, n=2)
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(doc["segments"]) == ["seg-000001.h5", "seg-000002.h5"]
    entry = doc["segments"]["seg-000001.h5"]
    assert entry["records"] == 30 and entry["size"] == seg(tmp_path, 1).stat().st_size
    assert stat.S_IMODE(os.stat(tmp_path / MANIFEST).st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))
    records, report = replay(tmp_path)
    assert len(records) == 60 and not report.damaged_segments and report.counters() == {
        "journal_lost_bytes": 0, "journal_damaged_segments": 0}


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage", "empty"])
def test_a_damaged_segment_is_moved_aside_counted_and_the_rest_replayed(tmp_path: Path, damage: str) -> None:
    ids = journal(tmp_path)
    victim = seg(tmp_path, 2)
    size = victim.stat().st_size
    data = victim.read_bytes()
    damaged = {"truncate": data[:size // 2], "zero": b"\0" * 4096 + data[4096:], "garbage": os.urandom(size),
               "empty": b""}[damage]
    victim.write_bytes(damaged)
    records, report = replay(tmp_path)
    assert task_ids(records) == set(ids[0]) | set(ids[2])  # the undamaged segments, whole
    [d] = report.damaged_segments
    assert d.name == victim.name and d.records == 30 and d.lost_records == 30 and d.lost_bytes == size
    assert report.counters() == {"journal_lost_bytes": size, "journal_damaged_segments": 1}
    [moved] = aside(tmp_path, 2)  # never deleted
    assert d.moved_to == moved.name and moved.read_bytes() == damaged and not victim.exists()
    lost = json.loads((tmp_path / MANIFEST).read_text())["damaged"]
    assert [e["name"] for e in lost] == [victim.name] and lost[0]["lost_records"] == 30
    records, report = replay(tmp_path)  # the next start: nothing new to report
    assert task_ids(records) == set(ids[0]) | set(ids[2]) and not report.damaged_segments


def test_flipped_bytes_anywhere_never_reach_hdf5_and_never_give_garbage(tmp_path: Path) -> None:
    """16 flipped bytes at offsets spread over the whole file: a crash came 2 times in 3 before."""
    golden = tmp_path / "golden"
    ids = journal(golden)
    originals = {json.dumps(r, default=repr) for r in read_h5(seg(golden, 2))}
    size = seg(golden, 2).stat().st_size
    rng = random.Random(15)
    offsets = sorted(rng.sample(range(0, size - 16), 10)) + [0, size // 2, size - 16]
    for k, offset in enumerate(offsets):
        d = tmp_path / f"j{k}"
        d.mkdir(mode=0o700)
        for p in golden.iterdir():
            (d / p.name).write_bytes(p.read_bytes())
            os.chmod(d / p.name, 0o600)
        flip(seg(d, 2), offset)
        records, report = replay(d)
        got = task_ids(records)
        assert set(ids[0]) | set(ids[2]) <= got, offset
        for r in records:
            if r[1].startswith("s1-"):
                assert json.dumps(r, default=repr) in originals, (offset, r)  # recovered exactly, or not at all
        [dmg] = report.damaged_segments
        back = sum(1 for r in records if r[1].startswith("s1-"))
        assert aside(d, 2) and dmg.lost_records == 30 - back and dmg.recovered == back, offset
        assert (dmg.lost_bytes > 0) == (dmg.lost_records > 0)


def test_a_segment_whose_log_is_still_there_is_recovered_from_it(tmp_path: Path) -> None:
    """Killed between compaction and the log's removal, then the HDF5 file was damaged."""
    ids = journal(tmp_path)
    records2 = list(read_h5(seg(tmp_path, 2)))
    (tmp_path / "wal-000002.log").write_bytes(b"".join(encode_record(r) for r in records2))
    seg(tmp_path, 2).write_bytes(b"\0" * seg(tmp_path, 2).stat().st_size)
    records, report = replay(tmp_path)
    assert task_ids(records) == set(ids[0]) | set(ids[1]) | set(ids[2])
    [d] = report.damaged_segments
    assert d.recovered_from == "wal-000002.log" and d.recovered == 30 and d.lost_bytes == 0 and d.lost_records == 0
    assert aside(tmp_path, 2) and seg(tmp_path, 2).exists() and not (tmp_path / "wal-000002.log").exists()
    assert report.counters()["journal_lost_bytes"] == 0


def test_deleted_swapped_copied_and_foreign_segments(tmp_path: Path) -> None:
    foreign = tmp_path / "other"
    tmp_path = tmp_path / "j"
    ids = journal(tmp_path, n=4)
    s1, s2, s3, s4 = (seg(tmp_path, n) for n in (1, 2, 3, 4))
    size1 = s1.stat().st_size
    s1.unlink()  # deleted
    tmp = tmp_path / "x"
    s2.rename(tmp)
    s3.rename(s2)
    tmp.rename(s3)  # swapped: put back
    journal(foreign, n=5)
    seg(foreign, 5).rename(tmp_path / "seg-000005.h5")  # never listed here
    records, report = replay(tmp_path)
    assert task_ids(records) == set(ids[1]) | set(ids[2]) | set(ids[3])
    assert sorted(report.restored) == [(s2.name, s3.name), (s3.name, s2.name)]
    by_name = {d.name: d for d in report.damaged_segments}
    assert set(by_name) == {s1.name, "seg-000005.h5"}
    assert by_name[s1.name].reason.startswith("is missing") and by_name[s1.name].lost_bytes == size1
    assert by_name[s1.name].lost_records == 30 and by_name[s1.name].moved_to is None
    assert by_name["seg-000005.h5"].reason == "is not in the manifest" and aside(tmp_path, 5)
    assert by_name["seg-000005.h5"].recovered == 0  # a file this journal never wrote: nothing taken from it
    records, report = replay(tmp_path)
    assert not report.damaged_segments and not report.restored
    s4.write_bytes(s2.read_bytes())  # a copy of another segment over this one
    records, report = replay(tmp_path)
    [d] = report.damaged_segments
    assert d.name == s4.name and d.reason == f"holds the bytes of {s2.name}" and d.recovered == 0
    assert task_ids(records) == set(ids[1]) | set(ids[2])  # and s2's records are not replayed twice
    assert len([r for r in records if r[0] == "S"]) == 20


def test_a_damaged_manifest_refuses_the_journal_in_one_line(tmp_path: Path) -> None:
    journal(tmp_path, n=1)
    path = tmp_path / MANIFEST
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        replay(tmp_path)
    assert isinstance(info.value, JournalError) and "\n" not in str(info.value)
    assert "MANIFEST is damaged" in str(info.value) and "Move" in str(info.value)
    with pytest.raises(ManifestError):
        SegmentWriter(tmp_path)  # before a new log segment is made in it
    assert sorted(p.name for p in tmp_path.glob("wal-*")) == []
    path.rename(tmp_path / "MANIFEST.bad")  # as the message says: the segments are validated again
    records, report = replay(tmp_path)
    assert len(records) == 30 and not report.damaged_segments and path.exists()


def old_journal(directory: Path) -> list[list[str]]:
    """A journal as versions before the manifest left it."""
    ids = journal(directory, n=4)
    (directory / MANIFEST).unlink()
    return ids


def test_an_old_journal_is_validated_in_subprocesses_then_listed(tmp_path: Path) -> None:
    ids = old_journal(tmp_path)
    seg(tmp_path, 2).write_bytes(seg(tmp_path, 2).read_bytes()[:5000])  # damaged
    seg(tmp_path, 3).unlink()  # a gap in the numbers
    records, report = replay(tmp_path)
    assert task_ids(records) == set(ids[0]) | set(ids[3])
    by_name = {d.name: d for d in report.damaged_segments}
    assert set(by_name) == {"seg-000002.h5", "seg-000003.h5"}
    assert by_name["seg-000002.h5"].reason.startswith("fails validation") and aside(tmp_path, 2)
    assert by_name["seg-000002.h5"].lost_bytes == 5000 and by_name["seg-000002.h5"].lost_records is None
    assert "gap" in by_name["seg-000003.h5"].reason
    doc = json.loads((tmp_path / MANIFEST).read_text())
    assert sorted(doc["segments"]) == ["seg-000001.h5", "seg-000004.h5"]
    assert doc["segments"]["seg-000001.h5"]["records"] == 30
    records, report = replay(tmp_path)
    assert not report.damaged_segments and task_ids(records) == set(ids[0]) | set(ids[3])


def test_a_stray_high_number_is_one_gap_and_a_huge_one_no_segment(tmp_path: Path) -> None:
    """A planted ``seg-99999999.h5.damaged-x`` once meant a hundred million gap entries (and log lines)."""
    ids = old_journal(tmp_path)
    (tmp_path / "seg-99999999.h5.damaged-x").write_bytes(b"")
    (tmp_path / ("seg-" + "9" * 200 + ".h5")).write_bytes(b"")  # no segment of ours
    records, report = replay(tmp_path)
    assert task_ids(records) == {t for seg_ids in ids for t in seg_ids}
    assert [d.name for d in report.damaged_segments] == ["seg-000005.h5..seg-99999998.h5"]


def test_a_crashing_reader_is_a_failed_validation_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = old_journal(tmp_path)
    monkeypatch.setattr(child, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    records, report = replay(tmp_path)
    assert task_ids(records) == set()  # nothing could be validated: nothing opened in this process
    assert len(report.damaged_segments) == 4 and "SIGSEGV" in report.damaged_segments[0].reason
    assert len(list(tmp_path.glob("seg-*.h5.damaged-*"))) == 4 and ids


def test_partial_salvage_keeps_exactly_the_records_whose_crc_matches(tmp_path: Path) -> None:
    import tables

    rng = random.Random(7)
    tids = [f"big-{i}" for i in range(200)]
    compact(write_log(tmp_path, [r for i, tid in enumerate(tids) for r in task(tid, float(i), rng.randbytes(1500))]))
    path = seg(tmp_path, 1)
    originals = {json.dumps(r, default=repr) for r in read_h5(path)}
    with tables.open_file(str(path)) as h5:
        chunk = h5.root.bodies.chunk_info(((1 << 16) * 2,))  # the third 64 KB chunk of the bodies
    flip(path, chunk.offset + chunk.size // 2)
    records, report = replay(tmp_path)
    [d] = report.damaged_segments
    assert 0 < d.recovered < 600 and d.lost_records == 600 - d.recovered and d.lost_bytes > 0
    assert len(records) == d.recovered and all(json.dumps(r, default=repr) in originals for r in records)
    assert aside(tmp_path, 1) and seg(tmp_path, 1).exists()  # what was recovered is a segment again


def test_a_damaged_table_with_intact_bodies_is_recovered_whole(tmp_path: Path) -> None:
    import tables

    ids = journal(tmp_path, n=1)
    with tables.open_file(str(seg(tmp_path, 1))) as h5:
        chunk = h5.root.records.chunk_info((0,))
    flip(seg(tmp_path, 1), chunk.offset + 8)
    records, report = replay(tmp_path)
    [d] = report.damaged_segments
    assert d.recovered == 30 and d.lost_records == 0 and d.lost_bytes == 0 and task_ids(records) == set(ids[0])


def test_a_start_killed_while_setting_a_segment_aside_is_finished_by_the_next(tmp_path: Path) -> None:
    import tables

    ids = journal(tmp_path, n=2)
    with tables.open_file(str(seg(tmp_path, 2))) as h5:
        chunk = h5.root.records.chunk_info((0,))
    flip(seg(tmp_path, 2), chunk.offset + 8)
    seg(tmp_path, 2).rename(tmp_path / "seg-000002.h5.damaged-20260101T000000Z")  # renamed, then killed
    records, report = replay(tmp_path)
    [d] = report.damaged_segments
    assert d.reason.startswith("was being set aside") and d.recovered == 30 and d.lost_bytes == 0
    assert task_ids(records) == set(ids[0]) | set(ids[1])


def test_readers_never_open_a_segment_damaged_after_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tables

    ids = journal(tmp_path)
    replay(tmp_path)
    flip(seg(tmp_path, 2), 3000)
    opened: list[str] = []
    real_open = tables.open_file

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.path.basename(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tables, "open_file", spy)
    rows = history(tmp_path, {})
    assert {r["id"] for r in rows} == set(ids[0]) | set(ids[2])
    with pytest.raises(JournalError, match="fails verification"):
        segments.read_task_record(seg(tmp_path, 2), ids[1][0])
    assert segments.read_task_record(seg(tmp_path, 3), ids[2][0]) is not None
    counts = apply_retention(tmp_path, results_before=1e12)  # leaves the damaged one alone
    assert counts["segments_rewritten"] == 2
    assert "seg-000002.h5" not in opened


def test_retention_rewrites_keep_the_manifest_right_at_every_crash_point(tmp_path: Path) -> None:
    import hashlib

    ids = journal(tmp_path, n=2)
    name, path = "seg-000001.h5", seg(tmp_path, 1)
    before = path.read_bytes()
    old = Manifest.load(tmp_path).segments[name]  # type: ignore[union-attr]
    assert apply_retention(tmp_path, results_before=1e12)["segments_rewritten"] == 2
    after = path.read_bytes()
    new = Manifest.load(tmp_path).segments[name]  # type: ignore[union-attr]
    assert new["sha256"] == hashlib.sha256(after).hexdigest() and "pending" not in new and after != before
    # killed after the manifest named the new file as pending: before the rename, or after it
    for on_disk in (before, after):
        manifest = Manifest.load(tmp_path)
        assert manifest is not None
        manifest.segments[name] = {**old, "pending": new}
        manifest.save(tmp_path)
        path.write_bytes(on_disk)
        records, report = replay(tmp_path)
        assert not report.damaged_segments and task_ids(records) == set(ids[0]) | set(ids[1])
        saved = Manifest.load(tmp_path).segments[name]  # type: ignore[union-attr]
        assert saved["sha256"] == hashlib.sha256(on_disk).hexdigest() and "pending" not in saved


def test_an_interrupted_compaction_is_done_again_from_its_log(tmp_path: Path) -> None:
    """Killed after the manifest listed the new segment, before its rename: nothing is lost or reported."""
    ids = journal(tmp_path, n=1)
    log = write_log(tmp_path, [r for tid in ("late-1", "late-2") for r in task(tid, 5000.0)])
    logged = log.read_bytes()
    compact(log)
    seg(tmp_path, 2).rename(tmp_path / "seg-000002.h5.tmp")  # as if the rename had not happened
    log.write_bytes(logged)
    records, report = replay(tmp_path)
    assert task_ids(records) == set(ids[0]) | {"late-1", "late-2"} and not report.damaged_segments
    assert not list(tmp_path.glob("*.tmp")) and not log.exists()


def test_new_segments_never_reuse_a_number(tmp_path: Path) -> None:
    """All logs compacted (``journal compact`` with no orchestrator): the next log was wal-000001 again,
    whose compaction then overwrote seg-000001.h5, or was dropped as already compacted."""
    ids = journal(tmp_path, n=2)
    seg(tmp_path, 2).unlink()
    assert replay(tmp_path)[1].damaged_segments[0].reason.startswith("is missing")
    w = SegmentWriter(tmp_path)
    try:
        assert w.path.name == "wal-000003.log"
    finally:
        w.close()
    log = write_log(tmp_path, task("new", 9000.0))
    assert log.name == "wal-000004.log"
    records, _ = replay(tmp_path)
    assert task_ids(records) == set(ids[0]) | {"new"}
    assert [p.name for p in h5_segments(tmp_path)] == ["seg-000001.h5", "seg-000003.h5", "seg-000004.h5"]
