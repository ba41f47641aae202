"""An HDF5 segment file itself: its layout, writing one whole, reading it back.

A closed ``wal-<n>.log`` becomes ``seg-<n>.h5``: a table ``records`` with one row of indexed
columns per record (code, task id, time, kind, state, attempt, satellite, error type, where its
body lies and the body's CRC-32; indexes on task id and time) and an ``EArray`` ``bodies`` of
bytes holding the records (msgpack) end to end, both blosc2-compressed with explicit chunk
shapes (HDF5 does not compress variable-length arrays). A large record (a payload or a result of
64 KiB or more) is not copied: its row says it lies ``outside``, in the segment's **payload
file** ``pay-<n>.log`` — the log itself, kept under that name — at ``offset``, and it is read
from there and checked against the row's CRC-32 (:func:`payload_path`). The file's root carries its
segment number and the journal's identity. HDF5 files are only ever read once closed; the live
tail stays in the checksummed log, because an HDF5 file open for writing does not survive
``kill -9``.

Nothing here checks a file before opening it: this process opens only segments whose checksum
the manifest lists (:mod:`orchester.journal.segments`), any other is read in a separate process
(:mod:`orchester.journal.child`). Like every file of the journal, a segment is private (0600):
its temporary file is created 0600 before PyTables opens it (HDF5 truncates it and keeps its
mode), and set 0600 again as soon as PyTables has it open, before any record is written.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import stat
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from orchester.journal.folder import FILE_MODE, JournalError, open_private
from orchester.journal.history import fields
from orchester.journal.manifest import load_manifest, log_path_of, number, payload_name
from orchester.journal.records import head
from orchester.journal.wal import read_body

log = logging.getLogger("orchester.journal")

#: HDF5 is not thread-safe: every PyTables call of this process goes through this lock.
HDF5_LOCK = threading.RLock()
#: Rows of the ``records`` table per chunk (and read at a time when salvaging a damaged one).
ROWS = 4096
#: HDF5's file signature: the first 8 bytes of every HDF5 file.
SIGNATURE = b"\x89HDF\r\n\x1a\n"


def tables() -> Any:
    """The ``tables`` module (PyTables), imported when first needed."""
    import tables

    return tables


def _description() -> Any:
    tb = tables()

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
        crc = tb.UInt32Col(pos=10)  # CRC-32 of the body: a salvaged record is kept only if it matches
        outside = tb.BoolCol(pos=11)  # the body lies in the payload file (pay-<n>.log), at ``offset``

    return Record


def _columns(record: list[Any]) -> dict[str, Any]:
    """A record's indexed columns; for one without any (a key, a barrier, a record no view accepts) its code and id."""
    f = fields(record)
    if f is not None:
        return f
    code, subject = head(record)
    return {"code": code[:1], "task_id": subject[:64], "t": 0.0, "kind": "", "state": -1, "attempt": 0,
            "satellite": "", "etype": ""}


#: The width in bytes of each text column (a longer value is cut, on a character boundary).
_WIDTHS = {"code": 1, "task_id": 64, "kind": 48, "satellite": 64, "etype": 32}
#: What the small integer columns can hold (a larger value is clamped: the body keeps the true one).
_RANGES = {"state": (-128, 127), "attempt": (-32768, 32767)}


def _cut(text: str, width: int) -> bytes:
    """``text`` in UTF-8, at most ``width`` bytes, never ending inside a character."""
    raw = text.encode()
    if len(raw) <= width:
        return raw
    return raw[:width].decode("utf-8", "ignore").encode()


def _cell(key: str, value: Any) -> Any:
    """What an index column stores of ``value``: cut or clamped to fit (it only indexes; the body is the record)."""
    if isinstance(value, str):
        return _cut(value, _WIDTHS.get(key, 64))
    bounds = _RANGES.get(key)
    if bounds is not None and isinstance(value, int):
        return min(max(value, bounds[0]), bounds[1])
    return value


#: A record placed outside the HDF5 file: ``(record, offset, length, crc)`` of its body in the payload file.
Placed = tuple[list[Any], int, int, int]


def payload_path(segment: Path) -> Path:
    """The payload file of an HDF5 segment: ``pay-<n>.log`` beside ``seg-<n>.h5`` (the log it was compacted
    from, kept for the large records it holds)."""
    return segment.with_name(payload_name(segment.name))


def write_file(tmp: Path, records: Iterable[list[Any] | Placed], segment: int,
               journal: str | None) -> dict[str, Any]:
    """Write ``records`` to a new HDF5 file ``tmp`` (0600), fsync it; return its record count and bodies' hash.

    A record given as :data:`Placed` gets a row only: its body stays where it lies, in the
    segment's payload file (``outside``); the answer counts them (``outside``, ``outside_bytes``).
    The file's root carries the segment's number (``segment``) and the journal's identity
    (``journal``), which a salvage checks before trusting records it reads back.
    """
    tb = tables()
    filters = tb.Filters(complevel=5, complib="blosc2:lz4", shuffle=True)
    n = outside = outside_bytes = 0
    bodies_hash = hashlib.sha256()
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted rewrite
    os.close(open_private(tmp, os.O_WRONLY | os.O_EXCL))  # 0600 before PyTables writes a byte into it
    with HDF5_LOCK, tb.open_file(str(tmp), "w") as h5:
        os.chmod(tmp, FILE_MODE)  # should HDF5 have made the file anew: private before any record lands
        h5.root._v_attrs.orchester_segment = segment
        h5.root._v_attrs.orchester_journal = journal or ""
        table = h5.create_table("/", "records", _description(), filters=filters, chunkshape=(ROWS,))
        bodies = h5.create_earray("/", "bodies", tb.UInt8Atom(), shape=(0,), filters=filters,
                                  chunkshape=(1 << 16,))
        row = table.row
        offset = 0
        for item in records:
            record = item[0] if isinstance(item, tuple) else item
            for key, value in _columns(record).items():
                row[key] = _cell(key, value)
            if isinstance(item, tuple):
                _, at, length, crc = item
                row["offset"], row["length"], row["crc"], row["outside"] = at, length, crc, True
                row.append()
                outside += 1
                outside_bytes += length
            else:
                body = msgpack.packb(record, use_bin_type=True)
                row["offset"], row["length"], row["crc"], row["outside"] = offset, len(body), zlib.crc32(body), False
                row.append()
                bodies.append(np.frombuffer(body, dtype=np.uint8))
                bodies_hash.update(body)
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
    return {"records": n, "bodies_sha256": bodies_hash.hexdigest(), "bodies_bytes": offset, "journal": journal,
            "outside": outside, "outside_bytes": outside_bytes}


class _Outside:
    """Reads the records a segment keeps in its payload file, each checked against its row: the body's
    length and CRC-32, then its code and task id once decoded.

    The file is opened before the HDF5 file (:meth:`open`): a compaction renaming the log, or a retention
    rewrite removing the file, cannot come between the two. Until a compaction has renamed it, the file is
    still the log ``wal-<n>.log`` (numbers are never reused). Only a regular file is read (never a link,
    a pipe or a folder planted under its name). A record that is missing or fails is skipped, noted in
    ``report`` (when given) and logged once; a payload file the manifest marks lost (reported at the
    start that found it gone) is skipped without a word."""

    def __init__(self, segment: Path, report: Any = None) -> None:
        self.path = payload_path(segment)
        self.report = report
        self._fd = -1
        self._missing = False
        self.lost = _marked_lost(segment)

    def open(self) -> None:
        if self._fd >= 0 or self._missing or self.lost:
            return
        log_path = log_path_of(self.path.parent, number(self.path))
        for candidate in (self.path, log_path, self.path):  # (renamed between the first two tries: the third)
            fd = _open_regular(candidate)
            if fd >= 0:
                self._fd = fd
                return
        self._missing = True

    def record(self, offset: int, length: int, crc: int, code: bytes, task_id: bytes) -> list[Any] | None:
        """The record at ``offset``, if it is the row's (``code``, ``task_id``: the row's columns)."""
        if self.lost:
            return None
        self.open()
        record = None
        body = None if self._fd < 0 else read_body(self._fd, offset, length, crc)
        if body is not None:
            try:
                got = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception:
                got = None
            if isinstance(got, list) and got:
                cells = _columns(got)  # what its row was written from
                if _cell("code", cells["code"]) == code and _cell("task_id", cells["task_id"]) == task_id:
                    record = got
        if record is None:
            self._skipped(offset, length, "missing (the file is gone)" if self._missing else "damaged")
        return record

    def _skipped(self, offset: int, length: int, why: str) -> None:
        if self.report is not None:
            self.report.damaged.append((self.path.name, offset, length))
        key = (str(self.path), offset, why)
        with _LOGGED_LOCK:
            first = key not in _LOGGED
            _LOGGED.add(key)
        if first:
            log.error("journal payload file %s: the record at byte %d is %s: skipped", self.path.name, offset, why)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _open_regular(path: Path) -> int:
    """A descriptor of ``path`` if it is a regular file (not followed if a link; a pipe does not block), else -1."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return -1
    return fd


def _marked_lost(segment: Path) -> bool:
    """Whether the manifest marks the segment's payload file lost (reported once, when it was found gone)."""
    try:
        manifest = load_manifest(segment.parent)
    except JournalError:
        return False
    entry = manifest.segments.get(segment.name) if manifest is not None else None
    return bool(entry and (entry.get("payloads") or {}).get("lost"))


_LOGGED: set[tuple[str, int, str]] = set()  #: records of payload files already logged as missing or damaged
_LOGGED_LOCK = threading.Lock()


def _places(table: Any) -> tuple[Any, Any, Any, Any]:
    """A table's offset, length, CRC-32 and outside columns (the last two ``None`` in files older than them)."""
    names = table.colnames
    return (table.read(field="offset"), table.read(field="length"),
            table.read(field="crc") if "crc" in names else None,
            table.read(field="outside") if "outside" in names else None)


def find_record(path: Path, task_id: str, code: str) -> list[Any] | None:
    """The ``code`` record of ``task_id`` in a segment, found through the task id index (``None``: none)."""
    found = find_records(path, task_id, code, most=1)
    return found[0] if found else None


#: Most rows one search by task id examines in a segment: the column holds an id's first 64 bytes, and
#: ids sharing them (anyone may submit such ids) all match; the body says which is which.
MAX_EXAMINED = 100_000


def find_records(path: Path, task_id: str, code: str | None = None, most: int = 1000) -> list[Any]:
    """The records of ``task_id`` in a segment (only its ``code`` records if given), in order: the newest
    ``most``, found through the task id index."""
    tb = tables()
    condition = "(task_id == tid)" if code is None else "(task_id == tid) & (code == c)"
    condvars: dict[str, Any] = {"tid": _cut(task_id, _WIDTHS["task_id"])}
    if code is not None:
        condvars["c"] = code.encode()
    out: list[Any] = []
    outside = _Outside(path)
    outside.open()
    try:
        wanted: list[tuple[int, int, int, int, bytes, bool]] = []
        inside: dict[int, bytes] = {}
        with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
            table = h5.root.records
            has_crc = "crc" in table.colnames
            far = "outside" in table.colnames and has_crc  # (the validation refuses outside rows without CRCs)
            for r in itertools.islice(table.where(condition, condvars=condvars), MAX_EXAMINED):
                away = far and bool(r["outside"])
                wanted.append((r.nrow, int(r["offset"]), int(r["length"]), int(r["crc"]) if has_crc else 0,
                               bytes(r["code"]), away))
            for nrow, offset, length, _, _, away in wanted:
                if not away:
                    inside[nrow] = h5.root.bodies[offset:offset + length].tobytes()
        tid = _cut(task_id, _WIDTHS["task_id"])
        for nrow, offset, length, crc, row_code, away in sorted(wanted, reverse=True):  # newest first
            if away:  # read from the payload file outside the HDF5 lock
                record = outside.record(offset, length, crc, row_code, tid)
            else:
                record = msgpack.unpackb(inside[nrow], raw=False, strict_map_key=False)
            if isinstance(record, list) and len(record) > 1 and record[1] == task_id \
                    and (code is None or record[0] == code):
                out.append(record)
                if len(out) >= most:
                    break
    finally:
        outside.close()
    out.reverse()
    return out


def read_h5(path: Path, report: Any = None) -> Iterator[list[Any]]:
    """The records of a compacted segment, in order (the caller verified it: see :mod:`orchester.journal.segments`).

    A large record is read from the payload file and checked against its row (:class:`_Outside`); one that
    is missing or damaged is skipped, noted in ``report`` (a :class:`~orchester.journal.wal.ReadReport`)."""
    tb = tables()
    outside = _Outside(path, report)
    outside.open()
    try:
        with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
            table = h5.root.records
            offsets, lengths, crcs, far = _places(table)
            data = h5.root.bodies.read().tobytes()
            away_rows = far is not None and crcs is not None and bool(far.any())
            if away_rows:
                codes, tids = table.read(field="code"), table.read(field="task_id")
        if not away_rows:  # (a segment written before payload files, or without a large record)
            for offset, length in zip(offsets, lengths, strict=True):
                yield msgpack.unpackb(data[offset:offset + length], raw=False, strict_map_key=False)
            return
        for i, (offset, length, crc, away) in enumerate(zip(offsets.tolist(), lengths.tolist(), crcs.tolist(),
                                                            far.tolist(), strict=True)):
            if away:
                record = outside.record(offset, length, crc, bytes(codes[i]), bytes(tids[i]))
                if record is not None:
                    yield record
            else:
                yield msgpack.unpackb(data[offset:offset + length], raw=False, strict_map_key=False)
    finally:
        outside.close()


def read_h5_fields(path: Path) -> Iterator[dict[str, Any]]:
    """The indexed columns of a compacted segment (without the bodies: fast; the caller verified it)."""
    tb = tables()
    with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
        data = h5.root.records.read()
    for r in data:
        yield {"code": _text(r["code"]), "task_id": _text(r["task_id"]), "t": float(r["t"]),
               "kind": _text(r["kind"]), "state": int(r["state"]), "attempt": int(r["attempt"]),
               "satellite": _text(r["satellite"]), "etype": _text(r["etype"])}


def _text(cell: bytes) -> str:
    """A text column as text (one written by an older version may end inside a character)."""
    return cell.decode("utf-8", "replace")


def identity(h5: Any) -> dict[str, Any]:
    """The journal identity and segment number an open segment's root carries (``None`` each if it does not)."""
    try:
        attrs = h5.root._v_attrs
        journal = str(attrs.orchester_journal) if "orchester_journal" in attrs._v_attrnames else None
        segment = int(attrs.orchester_segment) if "orchester_segment" in attrs._v_attrnames else None
    except Exception:
        return {"journal": None, "segment": None}
    return {"journal": journal or None, "segment": segment}


def has_signature(path: Path) -> bool:
    """Whether a file starts with HDF5's signature (one zeroed or overwritten does not)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == SIGNATURE
    except OSError:
        return False
