"""Closed journal segments as PyTables (HDF5) files: compaction, replay and history reads.

A closed ``wal-<n>.log`` is converted to ``seg-<n>.h5``: a table ``records`` with one row of
indexed columns per record (code, task id, time, kind, state, attempt, satellite, error
type, and where its body lies; indexes on task id and time) and an ``EArray`` ``bodies`` of
bytes holding every whole record (msgpack) end to end, both blosc2-compressed with explicit
chunk shapes (HDF5 does not compress variable-length arrays). The file is written as
``seg-<n>.h5.tmp``, closed, fsync'ed and renamed, and only then is the log removed: a crash at
any moment leaves either the log or a complete HDF5 file (when both exist, the HDF5 file wins
and the log is removed). HDF5 files are only ever read once closed; the live tail stays in the
checksummed log, because an HDF5 file open for writing does not survive ``kill -9``.

Like every file of the journal, an HDF5 segment is private (0600): its temporary file is
created 0600 before PyTables opens it (HDF5 truncates it and keeps its mode), and set 0600
again as soon as PyTables has it open, before any record is written.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .history import fields
from .wal import FILE_MODE, ReadReport, open_private, read_segment

log = logging.getLogger("orchester.journal")
#: HDF5 is not thread-safe: every PyTables call of this process goes through this lock.
HDF5_LOCK = threading.RLock()


def _tables() -> Any:
    import tables

    return tables


def _description() -> Any:
    tb = _tables()

    class Record(tb.IsDescription):  # type: ignore[misc, name-defined]
        code = tb.StringCol(1, pos=0)
        task_id = tb.StringCol(64, pos=1)
        t = tb.Float64Col(pos=2)
        kind = tb.StringCol(48, pos=3)
        state = tb.Int8Col(pos=4)
        attempt = tb.Int16Col(pos=5)
        satellite = tb.StringCol(64, pos=6)
        etype = tb.StringCol(32, pos=7)
        offset = tb.Int64Col(pos=8)  # where the record's body starts in ``bodies``
        length = tb.Int32Col(pos=9)

    return Record


def _number(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def write_h5(out: Path, records: Iterator[list[Any]] | list[list[Any]]) -> int:
    """Write ``records`` to a new HDF5 segment ``out`` atomically (tmp, fsync, rename); return the count."""
    tb = _tables()
    tmp = out.with_name(out.name + ".tmp")
    filters = tb.Filters(complevel=5, complib="blosc2:lz4", shuffle=True)
    n = 0
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted rewrite
    os.close(open_private(tmp, os.O_WRONLY | os.O_EXCL))  # 0600 before PyTables writes a byte into it
    with HDF5_LOCK, tb.open_file(str(tmp), "w") as h5:
        os.chmod(tmp, FILE_MODE)  # should HDF5 have made the file anew: private before any record lands
        table = h5.create_table("/", "records", _description(), filters=filters, chunkshape=(4096,))
        bodies = h5.create_earray("/", "bodies", tb.UInt8Atom(), shape=(0,), filters=filters,
                                  chunkshape=(1 << 16,))
        row = table.row
        offset = 0
        for record in records:
            f = fields(record) or {"code": str(record[0])[:1], "task_id": str(record[1])[:64], "t": 0.0,
                                   "kind": "", "state": -1, "attempt": 0, "satellite": "", "etype": ""}
            for key, value in f.items():
                row[key] = value.encode()[:64] if isinstance(value, str) else value
            body = msgpack.packb(record, use_bin_type=True)
            row["offset"], row["length"] = offset, len(body)
            row.append()
            bodies.append(np.frombuffer(body, dtype=np.uint8))
            offset += len(body)
            n += 1
        table.flush()
        table.cols.task_id.create_index()
        table.cols.t.create_index()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, out)
    return n


def compact(log_path: Path, damage: ReadReport | None = None) -> Path:
    """Convert one closed log segment to an HDF5 segment; return its path (the log is removed).

    Damage found in the log (records after it are dropped) is added to ``damage``.
    """
    out = log_path.with_name(f"seg-{_number(log_path):06d}.h5")
    report = ReadReport()
    write_h5(out, read_segment(log_path, report))
    os.unlink(log_path)
    if damage is not None:
        damage.damaged.extend(report.damaged)
    if report.damaged:
        log.error("segment %s was damaged at byte %d: %d bytes after it dropped when compacting",
                  log_path.name, report.damaged[0][1], report.damaged[0][2])
    return out


def compact_closed(directory: Path, keep: Path | None = None, damage: ReadReport | None = None) -> list[Path]:
    """Compact every log segment except ``keep`` (the live one); tidy up after a crash mid-way."""
    for tmp in directory.glob("seg-*.h5.tmp"):
        tmp.unlink()  # an interrupted compaction: its log is still there
    done = []
    for log_path in sorted(directory.glob("wal-*.log")):
        if keep is not None and log_path == keep:
            continue
        h5 = log_path.with_name(f"seg-{_number(log_path):06d}.h5")
        if h5.exists():  # compacted, then killed before the log was removed
            log_path.unlink()
            continue
        done.append(compact(log_path, damage))
    return done


def read_task_record(path: Path, task_id: str, code: str = "S") -> list[Any] | None:
    """The ``code`` record of ``task_id`` in a compacted segment, found through the task id index."""
    tb = _tables()
    with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
        rows = h5.root.records.read_where("(task_id == tid) & (code == c)",
                                          condvars={"tid": task_id.encode(), "c": code.encode()})
        if not len(rows):
            return None
        offset, length = int(rows[0]["offset"]), int(rows[0]["length"])
        body = h5.root.bodies[offset:offset + length].tobytes()
    record = msgpack.unpackb(body, raw=False, strict_map_key=False)
    return record if isinstance(record, list) else None


def h5_segments(directory: Path) -> list[Path]:
    """Compacted segments, oldest first."""
    return sorted(directory.glob("seg-*.h5"))


def read_h5(path: Path) -> Iterator[list[Any]]:
    """The records of a compacted segment, in order."""
    tb = _tables()
    with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
        index = h5.root.records.read(field="offset"), h5.root.records.read(field="length")
        data = h5.root.bodies.read().tobytes()
    for offset, length in zip(*index, strict=True):
        yield msgpack.unpackb(data[offset:offset + length], raw=False, strict_map_key=False)


def read_h5_fields(path: Path) -> Iterator[dict[str, Any]]:
    """The indexed columns of a compacted segment (without the bodies: fast)."""
    tb = _tables()
    with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
        data = h5.root.records.read()
    for r in data:
        yield {"code": r["code"].decode(), "task_id": r["task_id"].decode(), "t": float(r["t"]),
               "kind": r["kind"].decode(), "state": int(r["state"]), "attempt": int(r["attempt"]),
               "satellite": r["satellite"].decode(), "etype": r["etype"].decode()}


def parts(directory: Path) -> list[tuple[Path, str]]:
    """A journal's segments in order, each with its kind: ``"h5"`` (compacted) or ``"log"``."""
    found = [(p, "h5") for p in h5_segments(directory)] + [(p, "log") for p in directory.glob("wal-*.log")]
    return sorted(found, key=lambda pk: _number(pk[0]))


def read_journal(directory: Path, report: ReadReport | None = None) -> Iterator[list[Any]]:
    """Every record of a journal: compacted segments, then the log segments, in order."""
    report = report if report is not None else ReadReport()
    for path, kind in parts(directory):
        report.segments += 1
        if kind == "h5":
            for record in read_h5(path):
                report.records += 1
                yield record
        else:
            yield from read_segment(path, report)


def apply_retention(directory: Path, results_before: float) -> dict[str, int]:
    """Drop the bulky parts of old finished tasks from compacted segments; keep every header.

    For tasks that finished before ``results_before`` (wall time): the result's payload is
    dropped (its header, with the outcome and error type, stays) and the input payload too.
    Task records, transitions and headers are kept forever, so the history is unchanged.
    """
    from tracker import TaskState

    finished: dict[str, float] = {}
    for path in h5_segments(directory):
        for f in read_h5_fields(path):
            if f["code"] == "T" and f["state"] >= 0 and TaskState(f["state"]).terminal:
                finished[f["task_id"]] = f["t"]
    old = {tid for tid, t in finished.items() if t < results_before}
    counts = {"results_dropped": 0, "inputs_dropped": 0, "segments_rewritten": 0}
    for path in h5_segments(directory):
        records = list(read_h5(path))
        changed = False
        for rec in records:
            if rec[1] not in old:
                continue
            if rec[0] == "R" and len(rec[2]) > 1:
                rec[2] = rec[2][:1]
                counts["results_dropped"] += 1
                changed = True
            elif rec[0] == "S" and rec[4]:
                rec[4] = []
                counts["inputs_dropped"] += 1
                changed = True
        if changed:
            write_h5(path, records)
            counts["segments_rewritten"] += 1
    return counts
