"""The journal's live tail: append-only segments of length-prefixed, checksummed records.

A record on disk is ``length (4 bytes, big-endian) | crc32 (4 bytes) | body``; the body is a
msgpack list (:mod:`orchester.journal.records`). A segment is a file ``wal-<n>.log`` in the
journal folder. A reader stops at the first record that is short or whose checksum does not
match: everything before it is intact (it was fsync'ed before anything depending on it was
released), everything from it on is reported lost. A writer never appends to a damaged or
older segment: it starts a new one.

Two processes cannot write one journal: the writer holds an exclusive ``flock`` on
``DIR/LOCK`` for its lifetime. The folder and every file in it are private to the user that
runs the orchestrator (:mod:`orchester.journal.folder`).

A new segment takes the number after the highest the journal has used (logs, HDF5 segments,
segments set aside as damaged, the manifest's entries:
:func:`orchester.journal.manifest.highest_number`): a number is never reused, so a new log can
neither overwrite an HDF5 segment nor be taken for one already compacted. Damaged HDF5
segments are reported in :attr:`ReadReport.damaged_segments` (see
:mod:`orchester.journal.recovery`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from orchester.journal.folder import JournalError, fsync_directory, open_lock, open_private, private_directory
from orchester.journal.manifest import highest_number

_HEAD = struct.Struct(">II")
#: Largest record accepted (a task with its payload).
MAX_RECORD = 1 << 30
log = logging.getLogger("orchester.journal")


@dataclass
class DamagedSegment:
    """A compacted (HDF5) segment that failed verification, or went missing, and what became of it."""

    name: str  #: its file name (``seg-<n>.h5``)
    reason: str  #: what was wrong with it, in words
    size: int  #: its size in bytes (the manifest's figure when the file is gone)
    records: int | None = None  #: records it held, when the manifest says
    moved_to: str | None = None  #: the name it was moved aside to (``None``: gone, or only read past)
    recovered_from: str | None = None  #: where records were recovered from (its raw log, or the file itself)
    recovered: int = 0  #: records recovered
    lost_records: int | None = None  #: records lost (``None``: unknown)
    lost_bytes: int = 0  #: bytes lost: the file's size, or the bodies of the records not recovered

    def describe(self) -> str:
        """One line for the log: what was wrong, where the file went, what was recovered and lost."""
        parts = [f"journal segment {self.name} {self.reason}"]
        if self.moved_to:
            parts.append(f"moved aside to {self.moved_to}")
        if self.recovered_from:
            held = f" of {self.records}" if self.records is not None else ""
            parts.append(f"{self.recovered}{held} record(s) recovered from {self.recovered_from}")
        if self.lost_records is None:
            size = f", {self.lost_bytes:,} bytes" if self.lost_bytes else ""
            parts.append(f"lost: an unknown number of record(s){size}")
        elif self.lost_bytes or self.lost_records:
            parts.append(f"lost: {self.lost_records} record(s), {self.lost_bytes:,} bytes")
        else:
            parts.append("nothing lost")
        return "; ".join(parts)


@dataclass
class ReadReport:
    """What reading the segments found."""

    records: int = 0
    segments: int = 0
    #: (segment file name, byte offset of the first bad record, bytes after it) per damaged log segment
    damaged: list[tuple[str, int, int]] = field(default_factory=list)
    #: compacted segments that failed verification or went missing (moved aside, recovered or lost)
    damaged_segments: list[DamagedSegment] = field(default_factory=list)
    #: (file, segment whose bytes it held): swapped or renamed segments put back in their place
    restored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def lost_bytes(self) -> int:
        """Bytes lost in all: damaged log tails and damaged compacted segments."""
        return sum(lost for _, _, lost in self.damaged) + sum(d.lost_bytes for d in self.damaged_segments)

    def counters(self) -> dict[str, int]:
        """The orchestrator's counters for what was found: ``journal_lost_bytes``, ``journal_damaged_segments``."""
        return {"journal_lost_bytes": self.lost_bytes, "journal_damaged_segments": len(self.damaged_segments)}


def frame(body: bytes) -> bytes:
    """One on-disk record around an already-encoded msgpack ``body``."""
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def encode_record(body: list[Any]) -> bytes:
    """One on-disk record."""
    return frame(msgpack.packb(body, use_bin_type=True))


def segments(directory: Path) -> list[Path]:
    """The journal's segments, oldest first."""
    return sorted(directory.glob("wal-*.log"))


def _records(data: bytes, base: int = 0) -> Iterator[tuple[list[Any], int]]:
    """The intact records at the start of ``data`` (read from byte ``base`` of a segment), each with
    the segment offset after it; it stops at the first incomplete or damaged one."""
    pos, end = 0, len(data)
    while end - pos >= _HEAD.size:
        length, crc = _HEAD.unpack_from(data, pos)
        body = data[pos + _HEAD.size: pos + _HEAD.size + length]
        if length > MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
            return
        try:
            record = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:
            return
        if not isinstance(record, list) or not record:
            return
        pos += _HEAD.size + length
        yield record, base + pos


def read_segment(path: Path, report: ReadReport) -> Iterator[list[Any]]:
    """Yield the intact records of one segment; note where it is damaged, if it is."""
    data = path.read_bytes()
    pos = 0  # where the intact records end
    for record, after in _records(data):
        report.records += 1
        pos = after
        yield record
    if pos < len(data):
        report.damaged.append((path.name, pos, len(data) - pos))


def read_from(path: Path, offset: int = 0) -> Iterator[tuple[list[Any], int]]:
    """The intact records of a log segment from byte ``offset`` on, each with the offset after it.

    It stops at the first record that is incomplete or damaged, without a word: in the live
    segment that is the record being written (the next call starts there again).
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    yield from _records(data, offset)


def read_at(path: Path, offset: int) -> list[Any]:
    """The record at ``offset`` of a log segment (checked like any other)."""
    with open(path, "rb") as f:
        f.seek(offset)
        head = f.read(_HEAD.size)
        length, crc = _HEAD.unpack(head)
        body = f.read(length)
    if len(body) != length or zlib.crc32(body) != crc:
        raise JournalError(f"the record at {path.name}:{offset} is damaged")
    record = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(record, list):
        raise JournalError(f"the record at {path.name}:{offset} is not a record")
    return record


def read_all(directory: Path, report: ReadReport | None = None) -> Iterator[list[Any]]:
    """Every intact record of every segment, in order."""
    report = report if report is not None else ReadReport()
    for seg in segments(directory):
        report.segments += 1
        yield from read_segment(seg, report)


class SegmentWriter:
    """Appends records to a new segment; rotates at ``segment_bytes``. Not thread-safe: one owner."""

    def __init__(self, directory: str | os.PathLike[str], segment_bytes: int = 64 << 20) -> None:
        self.dir = Path(directory)
        before, tightened = private_directory(self.dir)
        if before & 0o077 or tightened:
            log.warning("journal %s was readable by others (folder mode %04o, %d entries not private): made it "
                        "0700 and its files 0600", self.dir, before, tightened)
        self.segment_bytes = segment_bytes
        self._lock_fd = open_lock(self.dir)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalError(f"journal {self.dir} is open for writing by another process") from None
        try:
            self._n = highest_number(self.dir)  # never reuse the number of a segment, compacted or set aside
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._file: Any = None
        self._size = 0
        self._open_next()

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        self._n += 1
        self.path = self.dir / f"wal-{self._n:06d}.log"
        self._file = os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "ab", buffering=0)
        self._size = 0
        fsync_directory(self.dir)  # the new file's directory entry is durable too

    def write(self, chunks: list[bytes]) -> list[int]:
        """Append encoded records (one ``write`` call for the whole batch); return each one's offset."""
        offsets = []
        pos = self._size
        for c in chunks:
            offsets.append(pos)
            pos += len(c)
        fd = self._file.fileno()
        for start in range(0, len(chunks), 512):  # writev: no copy of the batch into one buffer
            part = chunks[start:start + 512]
            total = sum(len(c) for c in part)
            written = os.writev(fd, part)
            if written != total:  # a short write (a full disk, say): finish it or fail loudly
                rest = b"".join(part)[written:]
                while rest:
                    n = os.write(fd, rest)
                    rest = rest[n:]
        self._size = pos
        return offsets

    def sync(self) -> Path | None:
        """Make everything written so far durable (fsync); rotate a full segment and return its path."""
        os.fsync(self._file.fileno())
        if self._size >= self.segment_bytes:
            closed = self.path
            self._open_next()
            return closed
        return None

    def close(self) -> None:
        """Close the segment and release the lock."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
