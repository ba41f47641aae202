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
from collections.abc import Callable, Iterable, Iterator, Sequence
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


#: A bytes field at least this large (a payload or result frame) is written from its own buffer, never
#: copied into the record's encoded body (:func:`record_chunks`).
WRITE_ALONE = 64 * 1024
_BIN16, _BIN32 = struct.Struct(">BH"), struct.Struct(">BI")  # msgpack's bin 16 and bin 32 heads


def _large(value: Any) -> bool:
    return isinstance(value, (bytes, memoryview)) and (value.nbytes if isinstance(value, memoryview)
                                                      else len(value)) >= WRITE_ALONE


def _bin_head(n: int) -> bytes:  # only for fields of WRITE_ALONE bytes or more: never the 8-bit form
    return _BIN16.pack(0xC5, n) if n < 65536 else _BIN32.pack(0xC6, n)


def encode_run(bodies: Iterable[list[Any]], pack: Callable[[Any], bytes], limit: int = MAX_RECORD) -> bytearray | None:
    """Records one after another in one buffer, each byte for byte :func:`encode_record`'s (for small
    records: a large field is copied in). ``pack``: a msgpack packer's ``pack`` (``use_bin_type``).
    ``None`` as soon as the buffer reaches ``limit`` bytes (the rest is not encoded)."""
    out = bytearray()
    head, crc32 = _HEAD.pack, zlib.crc32
    for body in bodies:
        packed = pack(body)
        out += head(len(packed), crc32(packed))
        out += packed
        if len(out) >= limit:
            return None
    return out


#: :func:`record_chunks`'s default ``frames_at``: look at every field for a large one.
EVERY_FIELD = -1


def record_chunks(body: list[Any], frames_at: int | None = EVERY_FIELD,
                  pack: Callable[[Any], bytes] | None = None) -> list[Any]:
    """One on-disk record, byte for byte :func:`encode_record`'s, as buffers to write one after another
    (``writev``): a bytes field of :data:`WRITE_ALONE` bytes or more (at the top level, or
    in a list at the top level: payload and result frames) is its own buffer, neither copied into the
    encoded body nor joined to it; the checksum runs over the buffers in turn.

    ``frames_at``: where the record keeps its list of frames, the only field then looked at for large
    ones (``None``: it has none; by default every field is looked at). A large field elsewhere is then
    copied into the body: the bytes written are the same. ``pack``: a msgpack packer's ``pack`` (with
    ``use_bin_type``) of the calling thread, reused from one record to the next (a packer is not
    thread-safe)."""
    frames = body[frames_at] if frames_at is not None and 0 <= frames_at < len(body) else None
    if frames_at is None:
        large = False
    elif isinstance(frames, list):
        large = any(map(_large, frames))
    else:  # every field (by default, and for a record not of the shape said)
        large = any(_large(f) or (isinstance(f, list) and any(map(_large, f))) for f in body)
    if not large:
        return [frame(pack(body) if pack is not None else msgpack.packb(body, use_bin_type=True))]
    pieces: list[Any] = []
    array_head = msgpack.Packer().pack_array_header  # (msgpack has no such method for bin heads)
    small = bytearray(array_head(len(body)))

    def alone(value: Any) -> None:
        nonlocal small
        view = memoryview(value).cast("B") if isinstance(value, memoryview) else value
        small += _bin_head(len(view))
        pieces.append(bytes(small))
        pieces.append(view)
        small = bytearray()

    for f in body:
        if _large(f):
            alone(f)
        elif isinstance(f, list) and any(map(_large, f)):
            small += array_head(len(f))
            for item in f:
                if _large(item):
                    alone(item)
                else:
                    small += msgpack.packb(item, use_bin_type=True)
        else:
            small += msgpack.packb(f, use_bin_type=True)
    if small:
        pieces.append(bytes(small))
    crc = 0
    length = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
        length += len(piece)
    pieces[0] = _HEAD.pack(length, crc) + pieces[0]
    return pieces


def segments(directory: Path) -> list[Path]:
    """The journal's segments, oldest first."""
    return sorted(directory.glob("wal-*.log"))


def _records(data: bytes, base: int = 0) -> Iterator[tuple[list[Any], int]]:
    """The intact records at the start of ``data`` (read from byte ``base`` of a segment), each with
    the segment offset after it; it stops at the first incomplete or damaged one."""
    pos, end = 0, len(data)
    view = memoryview(data)  # a body is checked and decoded where it lies, not copied out first
    while end - pos >= _HEAD.size:
        length, crc = _HEAD.unpack_from(data, pos)
        body = view[pos + _HEAD.size: pos + _HEAD.size + length]
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
    for record, *_ in read_placed(path, report):
        yield record


def read_placed(path: Path, report: ReadReport, digest: Any = None) -> Iterator[tuple[list[Any], int, int, int]]:
    """:func:`read_segment`'s records, each with where its body lies in the file: ``(record, offset,
    length, crc)`` (a compaction leaves a large one there: :mod:`orchester.journal.segments`).
    ``digest``: a hash object, given the whole file's bytes."""
    data = path.read_bytes()
    if digest is not None:
        digest.update(data)
    pos = 0  # where the intact records end
    for record, after in _records(data):
        report.records += 1
        crc = _HEAD.unpack_from(data, pos)[1]
        yield record, pos + _HEAD.size, after - pos - _HEAD.size, crc
        pos = after
    if pos < len(data):
        report.damaged.append((path.name, pos, len(data) - pos))


def read_body(fd: int, offset: int, length: int, crc: int) -> bytes | None:
    """The record body at ``offset`` of an open file, if it is ``length`` bytes that match ``crc``; else ``None``."""
    if offset < 0 or not 0 < length <= MAX_RECORD:
        return None
    try:
        body = os.pread(fd, length, offset)
    except OSError:
        return None
    return body if len(body) == length and zlib.crc32(body) == crc else None


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

    def write(self, records: Sequence[bytes | Sequence[Any]]) -> list[int]:
        """Append encoded records, each one ``bytes`` (:func:`encode_record`) or a list of buffers
        (:func:`record_chunks`), with ``writev``: no copy of a record or of the batch into one buffer.
        Return each record's offset."""
        offsets = []
        pos = self._size
        iov: list[Any] = []
        for r in records:
            offsets.append(pos)
            if isinstance(r, bytes):
                iov.append(r)
                pos += len(r)
            else:
                iov.extend(r)
                pos += sum(map(len, r))
        fd = self._file.fileno()
        for start in range(0, len(iov), 512):  # at most 512 buffers a call (IOV_MAX is 1,024)
            part = iov[start:start + 512]
            total = sum(map(len, part))
            written = os.writev(fd, part)
            if written < total:  # a short write (a full disk, say): finish it or fail loudly
                rest = memoryview(b"".join(part))
                while written < total:
                    written += os.write(fd, rest[written:])
        self._size = pos
        return offsets

    @property
    def full(self) -> bool:
        """Whether the live segment reached its size (the next :meth:`rotate` starts another)."""
        return self._size >= self.segment_bytes

    def sync(self) -> Path | None:
        """Make everything written so far durable (fsync); rotate a full segment and return its path."""
        os.fsync(self._file.fileno())
        return self.rotate()

    def rotate(self) -> Path | None:
        """Start the next segment once this one is full (after an ``fsync`` of it); return the closed
        segment's path, or ``None``."""
        if self._size < self.segment_bytes:
            return None
        os.fsync(self._file.fileno())  # (nothing to write back when sync() just did)
        closed = self.path
        self._open_next()
        return closed

    def dup(self) -> int:
        """A duplicate of the live segment's descriptor (an ``fsync`` from another thread, while this
        one writes on or rotates); the caller closes it."""
        return os.dup(self._file.fileno())

    def close(self) -> None:
        """Close the segment and release the lock."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
