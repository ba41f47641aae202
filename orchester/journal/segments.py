"""Closed journal segments as PyTables (HDF5) files: compaction, verification, replay and history reads.

A closed ``wal-<n>.log`` is converted to ``seg-<n>.h5``: a table ``records`` with one row of
indexed columns per record (code, task id, time, kind, state, attempt, satellite, error
type, where its body lies and the body's CRC-32; indexes on task id and time) and an
``EArray`` ``bodies`` of bytes holding every whole record (msgpack) end to end, both
blosc2-compressed with explicit chunk shapes (HDF5 does not compress variable-length arrays).
HDF5 files are only ever read once closed; the live tail stays in the checksummed log, because
an HDF5 file open for writing does not survive ``kill -9``.

**The manifest.** HDF5 is a C library that fails, or crashes the process, on a damaged file.
So no segment reaches it unverified: ``DIR/MANIFEST`` records the SHA-256 and size of every
segment as it was written (with its record count and a SHA-256 of its record bodies), and a
segment is opened in this process only if its bytes match. The manifest is JSON with a
checksum of its own, written atomically (``MANIFEST.tmp``, 0600, fsync, rename, fsync of the
folder) under an ``flock`` of the journal folder, so the orchestrator's compaction thread and
``orchester journal compact`` can both update it.

**Writing.** A segment is written as ``seg-<n>.h5.tmp``, closed and fsync'ed; its entry goes
into the manifest; it is renamed to ``seg-<n>.h5`` (and the folder fsync'ed); only then is its
log removed. A crash at any moment leaves either the log (the compaction is done again) or a
complete, listed HDF5 file (when both exist, the HDF5 file wins and the log is removed). A
retention rewrite of an existing segment records the new file as ``pending`` in the old one's
entry before the rename, so that either version is accepted after a crash.

**At start** (:func:`recover`, under the journal's lock), every segment is checked against the
manifest. One that fails (truncated, zeroed, bytes flipped, not listed, holding another
segment's bytes) is moved aside as ``seg-<n>.h5.damaged-<UTC time>``, never deleted; a listed
one that is gone is noted. Two segments whose bytes were swapped (or a segment renamed) are put
back where their checksums say they belong. Records are recovered where that is safe: from the
raw log the segment was compacted from, when it still exists; otherwise by reading the damaged
file **in a separate process** (a crash there cannot take the orchestrator down), keeping the
records whose CRC-32 matches, or all of them when their bodies hash to the manifest's figure.
What is lost is logged and reported (:class:`~orchester.journal.wal.DamagedSegment`), and recorded in
the manifest. A journal written before the manifest existed has each segment validated once,
by reading it whole in a separate process, before its checksums are recorded. A damaged
manifest cannot tell what is missing: the journal is refused (:class:`ManifestError`).

Like every file of the journal, an HDF5 segment is private (0600): its temporary file is
created 0600 before PyTables opens it (HDF5 truncates it and keeps its mode), and set 0600
again as soon as PyTables has it open, before any record is written; the manifest too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from orchester.journal.history import fields
from orchester.journal.wal import (
    FILE_MODE,
    MAX_RECORD,
    DamagedSegment,
    JournalError,
    ReadReport,
    frame,
    fsync_directory,
    open_private,
    read_segment,
)

log = logging.getLogger("orchester.journal.writer")
#: HDF5 is not thread-safe: every PyTables call of this process goes through this lock.
HDF5_LOCK = threading.RLock()
#: The manifest's file name in the journal folder.
MANIFEST = "MANIFEST"
_FORMAT = "orchester-journal-manifest"
_VERSION = 1
_SEGMENT = re.compile(r"seg-(\d{1,12})\.h5")
_LOG = re.compile(r"wal-(\d{1,12})\.log")
_NUMBERED = re.compile(r"(?:seg|wal)-(\d{1,12})\.")  #: (a longer number is no segment of ours)
_SHA = re.compile(r"[0-9a-f]{64}")
_JOURNAL_ID = re.compile(r"[0-9a-f]{32}")
#: Rows read at a time when salvaging a damaged table (its chunk shape).
_ROWS = 4096
#: HDF5's file signature: the first 8 bytes of every HDF5 file.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class ManifestError(JournalError):
    """The manifest is unreadable or damaged: which segments are intact or missing cannot be known."""


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
        crc = tb.UInt32Col(pos=10)  # CRC-32 of the body: a salvaged record is kept only if it matches

    return Record


def _number(path: Path | str) -> int:
    name = path if isinstance(path, str) else path.name
    m = _NUMBERED.match(name)
    if m is None:
        raise ValueError(f"not a journal segment: {name}")
    return int(m.group(1))


def segment_path(directory: Path, n: int) -> Path:
    """The HDF5 segment of number ``n``."""
    return directory / f"seg-{n:06d}.h5"


def log_path_of(directory: Path, n: int) -> Path:
    """The log segment of number ``n``."""
    return directory / f"wal-{n:06d}.log"


# -- the manifest ------------------------------------------------------------------------------

_DEPTH = threading.local()
_THREADS = threading.RLock()


@contextmanager
def manifest_lock(directory: Path) -> Iterator[None]:
    """Hold the manifest for a read-modify-write: an ``flock`` of the journal folder (re-entrant per thread).

    Threads of this process are serialised by a lock, other processes (``orchester journal
    compact`` beside a running orchestrator) by the ``flock``.
    """
    with _THREADS:
        depth = getattr(_DEPTH, "n", 0)
        if depth:
            _DEPTH.n = depth + 1
            try:
                yield
            finally:
                _DEPTH.n = depth
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _DEPTH.n = 1
            try:
                yield
            finally:
                _DEPTH.n = 0
        finally:
            os.close(fd)  # releases the flock


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _check_entry(name: str, entry: Any) -> None:
    if not _SEGMENT.fullmatch(name) or not isinstance(entry, dict):
        raise ValueError(f"a bad entry {name!r}")
    pending = entry.get("pending")
    for e in [entry] + ([pending] if pending is not None else []):
        if not isinstance(e, dict):
            raise ValueError(f"a bad entry {name!r}")
        if not isinstance(e.get("sha256"), str) or not _SHA.fullmatch(e["sha256"]):
            raise ValueError(f"the entry of {name} has no checksum")
        for key in ("size", "records"):
            if not isinstance(e.get(key), int) or e[key] < 0:
                raise ValueError(f"the entry of {name} has no {key}")


def _new_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Manifest:
    """Checksums of a journal's HDF5 segments (``segments``: file name → entry) and the damage seen."""

    #: the journal's identity, also written into each of its segments: a salvaged record must come from it
    journal: str = field(default_factory=_new_id)
    #: file name → ``{"sha256", "size", "records", "bodies_sha256", "bodies_bytes", "written"[, "pending"]}``
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: one entry per segment found damaged or missing: what it held, where it went, what was recovered
    damaged: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> Manifest | None:
        """The journal's manifest; ``None`` when it has none (a journal of an older version).

        Raises :class:`ManifestError` when it is there but damaged.
        """
        path = directory / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ManifestError(_refusal(directory, exc.strerror or str(exc))) from None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError("not a manifest")
            if doc.get("version") != _VERSION:
                raise ValueError(f"version {doc.get('version')!r}, not {_VERSION}")
            claimed = doc.pop("sha256", None)
            if claimed != hashlib.sha256(_canonical(doc)).hexdigest():
                raise ValueError("its checksum does not match")
            segments, damaged, journal = doc.get("segments"), doc.get("damaged"), doc.get("journal")
            if not isinstance(segments, dict) or not isinstance(damaged, list):
                raise ValueError("no segment list")
            if not isinstance(journal, str) or not _JOURNAL_ID.fullmatch(journal):
                raise ValueError("no journal identity")
            for name, entry in segments.items():
                _check_entry(name, entry)
        except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise ManifestError(_refusal(directory, str(exc) or type(exc).__name__)) from None
        return cls(journal, segments, damaged)

    def save(self, directory: Path) -> None:
        """Write the manifest atomically: ``MANIFEST.tmp`` (0600), fsync, rename, fsync of the folder."""
        doc: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "journal": self.journal,
                               "segments": self.segments, "damaged": self.damaged}
        doc["sha256"] = hashlib.sha256(_canonical(doc)).hexdigest()
        data = json.dumps(doc, sort_keys=True, indent=1, allow_nan=False).encode() + b"\n"
        tmp = directory / (MANIFEST + ".tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / MANIFEST)
        fsync_directory(directory)


def _refusal(directory: Path, why: str) -> str:
    return (f"journal {directory}: its {MANIFEST} is damaged ({why}), so which segments are intact or missing "
            f"cannot be known: refusing it. Move {directory / MANIFEST} aside to have every segment validated "
            f"again (each in a separate process) and the manifest rebuilt at the next start")


_Signature = tuple[int, int, int, int, int]  #: what ``stat`` says of a file: changed bytes change it
_READ_MANIFESTS: dict[str, tuple[_Signature, Manifest]] = {}


def _signature(st: os.stat_result) -> _Signature:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load_manifest(directory: Path) -> Manifest | None:
    """The manifest for reading only (do not change it): :meth:`Manifest.load`, remembered until the file changes.

    ``None`` for a journal without one; :class:`ManifestError` if it is damaged.
    """
    path = directory / MANIFEST
    try:
        sig = _signature(os.stat(path))
    except FileNotFoundError:
        return None
    except OSError:
        return Manifest.load(directory)  # says why, as a ManifestError
    with _CACHE_LOCK:
        hit = _READ_MANIFESTS.get(str(path))
    if hit is not None and hit[0] == sig:
        return hit[1]
    manifest = Manifest.load(directory)
    if manifest is not None:
        with _CACHE_LOCK:
            _READ_MANIFESTS[str(path)] = (sig, manifest)
    return manifest


def highest_number(directory: Path) -> int:
    """The highest segment number the journal has used (logs, segments, set aside or listed), or 0.

    A new log segment takes the next one: a number is never used twice, so that a new segment
    can neither be mistaken for an old one nor overwrite it. Raises :class:`ManifestError`
    when the manifest is damaged.
    """
    numbers = []
    for p in directory.iterdir():
        if p.name.startswith(("seg-", "wal-")) and not p.name.endswith(".tmp"):
            with contextlib.suppress(ValueError):  # a name that holds no number counts for none
                numbers.append(_number(p))
    manifest = Manifest.load(directory)
    if manifest is not None:
        numbers += [_number(name) for name in manifest.segments]
        for d in manifest.damaged:
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # an entry without a usable name
                numbers.append(_number(str(d.get("name", ""))))
    return max(numbers, default=0)


# -- checksums -----------------------------------------------------------------------------------

_DIGESTS: dict[str, tuple[_Signature, str]] = {}  #: path → (stat signature, sha256) of files hashed
_VALIDATED: dict[str, tuple[_Signature, dict[str, Any] | None]] = {}  #: path → validation of unlisted files
_REPORTED: set[tuple[str, _Signature]] = set()  #: failing files already logged
_CACHE_LOCK = threading.Lock()


def file_digest(path: Path, cached: bool = True) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file; remembered by its ``stat`` until the file changes."""
    with open(path, "rb") as f:
        sig = _signature(os.fstat(f.fileno()))
        if cached:
            with _CACHE_LOCK:
                hit = _DIGESTS.get(str(path))
            if hit is not None and hit[0] == sig:
                return hit[1], sig[2]
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        after = _signature(os.fstat(f.fileno()))
    if after == sig:
        with _CACHE_LOCK:
            _DIGESTS[str(path)] = (sig, digest)
    return digest, sig[2]


def _remember(path: Path, sha: str) -> None:
    """Note that ``path`` (as it is now) has checksum ``sha``: we just wrote or renamed it."""
    with _CACHE_LOCK:
        _DIGESTS[str(path)] = (_signature(os.stat(path)), sha)


def _matches(sha: str, entry: dict[str, Any]) -> bool:
    pending = entry.get("pending")
    return sha == entry["sha256"] or (pending is not None and sha == pending["sha256"])


def segment_ok(path: Path, manifest: Manifest | None) -> bool:
    """Whether a segment may be opened in this process: its bytes are those the manifest lists.

    Without a manifest (a journal of an older version, not yet opened by an orchestrator of this
    one) the segment is validated once by reading it whole in a separate process.
    """
    if manifest is None:
        return validate_in_subprocess(path) is not None
    entry = manifest.segments.get(path.name)
    if entry is None:
        return False
    sha, _ = file_digest(path)
    return _matches(sha, entry)


def _readable(path: Path, manifest: Manifest | None, report: ReadReport | None = None) -> bool:
    """:func:`segment_ok`, logging a failing segment once (it is set aside at the orchestrator's next start)."""
    if segment_ok(path, manifest):
        return True
    st = os.stat(path)  # FileNotFoundError: it was renamed meanwhile, the caller lists the folder again
    key = (str(path), _signature(st))
    entry = manifest.segments.get(path.name) if manifest is not None else None
    with _CACHE_LOCK:
        first = key not in _REPORTED
        _REPORTED.add(key)
    if first:
        log.error("journal segment %s fails verification (%s): not read; it is set aside when the orchestrator "
                  "next starts on this journal", path.name,
                  "not in the manifest" if manifest is not None and entry is None else "checksum")
    if report is not None:
        records = entry["records"] if entry is not None else None
        report.damaged_segments.append(DamagedSegment(path.name, "fails verification: skipped", st.st_size,
                                                      records, lost_records=records, lost_bytes=st.st_size))
    return False


# -- writing ---------------------------------------------------------------------------------------

def _write_tmp(tmp: Path, records: Iterable[list[Any]], journal: str | None) -> dict[str, Any]:
    """Write ``records`` to a new HDF5 file ``tmp`` (0600), fsync it; return its record count and bodies' hash.

    The file's root carries the segment's number and the journal's identity (``journal``), which
    a salvage checks before trusting records it reads back.
    """
    tb = _tables()
    filters = tb.Filters(complevel=5, complib="blosc2:lz4", shuffle=True)
    n = 0
    bodies_hash = hashlib.sha256()
    tmp.unlink(missing_ok=True)  # a leftover of an interrupted rewrite
    os.close(open_private(tmp, os.O_WRONLY | os.O_EXCL))  # 0600 before PyTables writes a byte into it
    with HDF5_LOCK, tb.open_file(str(tmp), "w") as h5:
        os.chmod(tmp, FILE_MODE)  # should HDF5 have made the file anew: private before any record lands
        h5.root._v_attrs.orchester_segment = _number(tmp)
        h5.root._v_attrs.orchester_journal = journal or ""
        table = h5.create_table("/", "records", _description(), filters=filters, chunkshape=(_ROWS,))
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
            row["offset"], row["length"], row["crc"] = offset, len(body), zlib.crc32(body)
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
    return {"records": n, "bodies_sha256": bodies_hash.hexdigest(), "bodies_bytes": offset, "journal": journal}


def write_h5(out: Path, records: Iterable[list[Any]]) -> int:
    """Write ``records`` to the HDF5 segment ``out`` atomically and list it in the manifest; return the count.

    The file is written as ``out.tmp`` and fsync'ed, its entry goes into the manifest, then it is
    renamed (and the folder fsync'ed). Rewriting a listed segment (retention) records the new file
    as ``pending`` first, so that after a crash either version passes verification. A journal of
    an older version (segments but no manifest) gets no manifest here: the orchestrator validates
    every segment and writes it at its next start.
    """
    directory = out.parent
    tmp = out.with_name(out.name + ".tmp")
    info = _write_tmp(tmp, records, _journal_id(directory))
    sha, size = file_digest(tmp, cached=False)
    journal = info.pop("journal")
    entry = {"sha256": sha, "size": size, **info, "written": round(time.time(), 3)}
    with manifest_lock(directory):
        manifest = Manifest.load(directory)
        if manifest is None and not any(p != out for p in h5_segments(directory)):
            manifest = Manifest(journal or _new_id())  # a new journal: from now on every segment is listed
        if manifest is None:
            os.replace(tmp, out)
            fsync_directory(directory)
        else:
            old = manifest.segments.get(out.name)
            if old is not None and out.exists():
                manifest.segments[out.name] = {**old, "pending": entry}
                manifest.save(directory)
                os.replace(tmp, out)
                fsync_directory(directory)
                manifest.segments[out.name] = entry
                manifest.save(directory)
            else:
                manifest.segments[out.name] = entry
                manifest.save(directory)
                os.replace(tmp, out)
                fsync_directory(directory)
    _remember(out, sha)  # reading it back does not hash it again
    return int(info["records"])


def _journal_id(directory: Path) -> str | None:
    """The journal's identity; a new journal gets its manifest now. ``None``: an older journal, not yet adopted."""
    with manifest_lock(directory):
        manifest = Manifest.load(directory)
        if manifest is None and not h5_segments(directory):
            manifest = Manifest()
            manifest.save(directory)
        return manifest.journal if manifest is not None else None


def _compact(log_path: Path, damage: ReadReport | None) -> tuple[Path, int]:
    out = segment_path(log_path.parent, _number(log_path))
    report = ReadReport()
    n = write_h5(out, read_segment(log_path, report))
    os.unlink(log_path)  # only now: the HDF5 file is durable and listed
    fsync_directory(log_path.parent)
    if damage is not None:
        damage.damaged.extend(report.damaged)
    if report.damaged:
        log.error("segment %s was damaged at byte %d: %d bytes after it dropped when compacting",
                  log_path.name, report.damaged[0][1], report.damaged[0][2])
    return out, n


def compact(log_path: Path, damage: ReadReport | None = None) -> Path:
    """Convert one closed log segment to an HDF5 segment; return its path (the log is removed).

    Damage found in the log (records after it are dropped) is added to ``damage``.
    """
    return _compact(log_path, damage)[0]


def compact_closed(directory: Path, keep: Path | None = None, damage: ReadReport | None = None) -> list[Path]:
    """Compact every log segment except ``keep`` (the live one); tidy up after a crash mid-way.

    A log whose HDF5 segment exists and verifies was compacted, then the process was killed
    before removing it: the log is removed. One whose HDF5 segment fails verification is
    compacted again, after the damaged file is moved aside.
    """
    for tmp in directory.glob("seg-*.h5.tmp"):
        tmp.unlink()  # an interrupted compaction (its log is still there) or rewrite (the old file is)
    done = []
    manifest = Manifest.load(directory)
    for log_path in log_segments(directory):
        if keep is not None and log_path == keep:
            continue
        h5 = segment_path(directory, _number(log_path))
        if h5.exists():
            if segment_ok(h5, manifest):  # compacted, then killed before the log was removed
                log_path.unlink()
                continue
            moved = move_aside(h5)
            log.error("journal segment %s fails verification: moved aside to %s; compacted again from %s",
                      h5.name, moved.name, log_path.name)
        done.append(compact(log_path, damage))
    return done


# -- reading -----------------------------------------------------------------------------------------

def h5_segments(directory: Path) -> list[Path]:
    """Compacted segments, oldest first."""
    return sorted(p for p in directory.glob("seg-*.h5") if _SEGMENT.fullmatch(p.name))


def log_segments(directory: Path) -> list[Path]:
    """Log segments, oldest first."""
    return sorted(p for p in directory.glob("wal-*.log") if _LOG.fullmatch(p.name))


def read_task_record(path: Path, task_id: str, code: str = "S") -> list[Any] | None:
    """The ``code`` record of ``task_id`` in a compacted segment, found through the task id index.

    Raises :class:`JournalError` when the segment fails verification: it is not opened.
    """
    if not _readable(path, load_manifest(path.parent)):
        raise JournalError(f"journal segment {path.name} fails verification: not read")
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


def read_h5(path: Path) -> Iterator[list[Any]]:
    """The records of a compacted segment, in order (the caller verified it: :func:`segment_ok`)."""
    tb = _tables()
    with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
        index = h5.root.records.read(field="offset"), h5.root.records.read(field="length")
        data = h5.root.bodies.read().tobytes()
    for offset, length in zip(*index, strict=True):
        yield msgpack.unpackb(data[offset:offset + length], raw=False, strict_map_key=False)


def read_h5_fields(path: Path) -> Iterator[dict[str, Any]]:
    """The indexed columns of a compacted segment (without the bodies: fast; the caller verified it)."""
    tb = _tables()
    with HDF5_LOCK, tb.open_file(str(path), "r") as h5:
        data = h5.root.records.read()
    for r in data:
        yield {"code": r["code"].decode(), "task_id": r["task_id"].decode(), "t": float(r["t"]),
               "kind": r["kind"].decode(), "state": int(r["state"]), "attempt": int(r["attempt"]),
               "satellite": r["satellite"].decode(), "etype": r["etype"].decode()}


def parts(directory: Path) -> list[tuple[Path, str]]:
    """A journal's segments in order, each with its kind: ``"h5"`` (compacted) or ``"log"``."""
    found = [(p, "h5") for p in h5_segments(directory)] + [(p, "log") for p in log_segments(directory)]
    return sorted(found, key=lambda pk: _number(pk[0]))


def verified_parts(directory: Path, report: ReadReport | None = None) -> list[tuple[Path, str]]:
    """:func:`parts` less the HDF5 segments that fail verification (logged, and added to ``report``)."""
    manifest = load_manifest(directory)
    return [(p, kind) for p, kind in parts(directory) if kind == "log" or _readable(p, manifest, report)]


def read_journal(directory: Path, report: ReadReport | None = None) -> Iterator[list[Any]]:
    """Every record of a journal: compacted segments (those that verify), then the log segments, in order."""
    report = report if report is not None else ReadReport()
    for path, kind in verified_parts(directory, report):
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
    Segments that fail verification are left alone (and logged).
    """
    from tracker import TaskState

    manifest = Manifest.load(directory)
    segs = [p for p in h5_segments(directory) if _readable(p, manifest)]
    finished: dict[str, float] = {}
    for path in segs:
        for f in read_h5_fields(path):
            if f["code"] == "T" and f["state"] >= 0 and TaskState(f["state"]).terminal:
                finished[f["task_id"]] = f["t"]
    old = {tid for tid, t in finished.items() if t < results_before}
    counts = {"results_dropped": 0, "inputs_dropped": 0, "segments_rewritten": 0}
    for path in segs:
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


# -- damaged segments ---------------------------------------------------------------------------------

def move_aside(path: Path) -> Path:
    """Rename a damaged segment to ``<name>.damaged-<UTC time>`` (never deleted); return its new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{k}")
    try:
        os.rename(path, target)
        fsync_directory(path.parent)
    except OSError as exc:
        raise JournalError(f"journal {path.parent}: segment {path.name} is damaged and cannot be moved aside "
                           f"({exc.strerror}): refusing to read it") from None
    return target


_ERROR = "orchester-segment-error: "
_CHILD = "import sys; from orchester.journal.segments import _child_main; sys.exit(_child_main(sys.argv[1:]))"


def _child_timeout(path: Path) -> float:
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return 60.0 + size / 4e6  # generous: a hang is cut short, a large segment is not


def _run_child(args: list[str], path: Path) -> tuple[dict[str, Any] | None, str]:
    """Run :func:`_child_main` in a separate process; its JSON answer, or ``None`` and why it failed."""
    if not sys.executable:
        raise JournalError(f"journal {path.parent}: no Python executable to validate {path.name} with")
    try:
        r = subprocess.run([sys.executable, "-P", "-c", _CHILD, *args], capture_output=True,
                           timeout=_child_timeout(path), stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return None, "it did not finish in time"
    except OSError as exc:
        raise JournalError(f"journal {path.parent}: cannot start a process to validate {path.name}: "
                           f"{exc.strerror}") from None
    if r.returncode < 0:
        from orchester.signals import signal_name  # (local imports the client: not at the top of the journal)

        return None, f"reading it killed the process reading it ({signal_name(-r.returncode)})"
    lines = r.stdout.decode(errors="replace").strip().splitlines()
    if r.returncode != 0 or not lines:
        err = r.stderr.decode(errors="replace").splitlines()
        why = next((ln[len(_ERROR):] for ln in reversed(err) if ln.startswith(_ERROR)), f"exit code {r.returncode}")
        return None, f"it cannot be read: {why}"
    try:
        answer = json.loads(lines[-1])
    except ValueError:
        return None, "the process reading it gave no answer"
    return (answer if isinstance(answer, dict) else None), "the process reading it gave no answer"


def validate_in_subprocess(path: Path) -> dict[str, Any] | None:
    """Read a segment whole in a separate process (a crash there cannot harm this one).

    Returns ``{"records", "bodies_sha256", "bodies_bytes"}`` when every record, every column and
    both indexes read back and every body is a record (and matches its CRC-32, where the segment
    has them), else ``None``. Remembered until the file changes.
    """
    st = os.stat(path)
    with _CACHE_LOCK:
        hit = _VALIDATED.get(str(path))
    if hit is not None and hit[0] == _signature(st):
        return hit[1]
    answer, _ = _run_child(["validate", str(path)], path)
    with _CACHE_LOCK:
        _VALIDATED[str(path)] = (_signature(st), answer)
    return answer


def _identity(h5: Any) -> dict[str, Any]:
    """The journal identity and segment number a segment's root carries (``None`` each if it does not)."""
    try:
        attrs = h5.root._v_attrs
        journal = str(attrs.orchester_journal) if "orchester_journal" in attrs._v_attrnames else None
        segment = int(attrs.orchester_segment) if "orchester_segment" in attrs._v_attrnames else None
    except Exception:
        return {"journal": None, "segment": None}
    return {"journal": journal or None, "segment": segment}


def _validate_file(path: str) -> dict[str, Any]:
    """In the child: read everything the orchestrator may read, check every record (raises if bad)."""
    tb = _tables()
    with tb.open_file(path, "r") as h5:
        table, bodies = h5.root.records, h5.root.bodies
        if not isinstance(table, tb.Table) or not isinstance(bodies, tb.EArray):
            raise ValueError("not a journal segment")
        offsets, lengths = table.read(field="offset"), table.read(field="length")
        crcs = table.read(field="crc") if "crc" in table.colnames else None
        data = bodies.read().tobytes()
        for col in (table.cols.task_id, table.cols.t):
            if col.is_indexed:  # read_where (a spilled payload) goes through them
                col.index.read_sorted()
                col.index.read_indices()
        identity = _identity(h5)
    list(read_h5_fields(Path(path)))  # the columns decode (the history reads them)
    expected = 0
    for i, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        body = data[int(offset):int(offset) + int(length)]
        if int(offset) != expected or len(body) != int(length):
            raise ValueError(f"record {i} is out of place")
        if crcs is not None and zlib.crc32(body) != int(crcs[i]):
            raise ValueError(f"record {i} fails its CRC")
        record = msgpack.unpackb(body, raw=False, strict_map_key=False)
        if not isinstance(record, list) or not record:
            raise ValueError(f"record {i} is not a record")
        expected += len(body)
    if expected != len(data):
        raise ValueError("the bodies hold more than the records")
    return {"records": len(offsets), "bodies_sha256": hashlib.sha256(data).hexdigest(), "bodies_bytes": len(data),
            **identity}


def _split(data: bytes) -> list[bytes]:
    """The msgpack bodies of ``data`` (records end to end), each as its own bytes."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    out, pos = [], 0
    for _ in unpacker:
        end = unpacker.tell()
        out.append(data[pos:end])
        pos = end
    if pos != len(data):
        raise ValueError("the bodies end in the middle of a record")
    return out


def _salvage_file(path: str, out: str, expected: str) -> dict[str, Any]:
    """In the child: copy the records that still read back to ``out`` as a log segment.

    First the bodies alone (the table may be what is damaged): if they hash to ``expected`` (the
    manifest's figure), every record is copied, split by msgpack. Otherwise the table's rows, one
    chunk at a time: a record is copied if its body matches the CRC-32 of its row (segments
    written before the CRC column existed: none is).
    """
    tb = _tables()
    copied = errors = nrows = 0
    has_crc = whole = False
    fd = open_private(out, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f, tb.open_file(path, "r") as h5:
        identity = _identity(h5)
        bodies = h5.get_node("/bodies")
        try:
            data = bodies.read().tobytes()
            whole = hashlib.sha256(data).hexdigest() == expected
        except Exception:
            errors += 1
        if whole:
            for body in _split(data):
                f.write(frame(body))
                copied += 1
        else:
            table = h5.get_node("/records")
            has_crc = "crc" in table.colnames
            nrows = int(table.nrows)
            for start in range(0, nrows if has_crc else 0, _ROWS):
                try:
                    rows = table.read(start, min(start + _ROWS, nrows))
                except Exception:
                    errors += 1
                    continue
                for row in rows:
                    offset, length = int(row["offset"]), int(row["length"])
                    if offset < 0 or not 0 < length <= MAX_RECORD:
                        continue
                    try:
                        body = bodies[offset:offset + length].tobytes()
                        record = msgpack.unpackb(body, raw=False, strict_map_key=False)
                    except Exception:
                        errors += 1
                        continue
                    if len(body) == length and zlib.crc32(body) == int(row["crc"]) and \
                            isinstance(record, list) and record:
                        f.write(frame(body))
                        copied += 1
        f.flush()
        os.fsync(f.fileno())
    return {"whole": whole, "crc": has_crc, "rows": nrows, "records": copied, "errors": errors, **identity}


def _child_main(argv: list[str]) -> int:
    """Entry point of the separate process: ``validate PATH`` or ``salvage PATH OUT``; prints one JSON line."""
    logging.disable(logging.CRITICAL)
    try:
        if argv[0] == "validate":
            answer = _validate_file(argv[1])
        elif argv[0] == "salvage":
            answer = _salvage_file(argv[1], argv[2], argv[3])
        else:
            return 2
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]  # HDF5's last line says what failed
        print(f"{_ERROR}{type(exc).__name__}: {lines[-1] if lines else ''}"[:300], file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


def _salvage(moved: Path, n: int, entry: dict[str, Any] | None, journal: str) -> tuple[int, int, int] | None:
    """Recover what can safely be recovered from a damaged segment into ``wal-<n>.log``; (records, bytes, rows).

    The file is read in a separate process (:func:`_salvage_file`). Its records are kept when
    their bodies hash to the manifest's figure (all of them, exactly as written), or one by one
    when each matches its CRC-32 and the file says it is segment ``n`` of this ``journal``;
    otherwise nothing is kept (``None``).
    """
    directory = moved.parent
    if not _has_signature(moved):
        log.info("journal segment %s: nothing to salvage (no HDF5 signature: zeroed or overwritten)", moved.name)
        return None
    out = directory / f"seg-{n:06d}.h5.salvage.tmp"
    expected = str(entry.get("bodies_sha256") or "-") if entry is not None else "-"
    answer, why = _run_child(["salvage", str(moved), str(out), expected], moved)
    try:
        if answer is None or not answer.get("records"):
            log.info("journal segment %s: nothing could be salvaged (%s)", moved.name,
                     why if answer is None else "no record reads back intact")
            return None
        bodies = list(_frames(out.read_bytes()))
        if answer.get("whole"):  # exactly the bodies written: no identity needed
            digest = hashlib.sha256(b"".join(bodies)).hexdigest()
            if entry is None or digest != expected or len(bodies) != entry.get("records"):
                return None  # cannot happen unless the file changed under us: trust nothing
        elif not answer.get("crc") or answer.get("journal") != journal or answer.get("segment") != n:
            log.info("journal segment %s: records read back, but nothing says they are segment %d of this journal",
                     moved.name, n)
            return None
        target = log_path_of(directory, n)
        os.replace(out, target)
        fsync_directory(directory)
        return len(bodies), sum(map(len, bodies)), int(answer.get("rows", 0))
    finally:
        out.unlink(missing_ok=True)


def _frames(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos + 8 <= len(data):
        length, crc = int.from_bytes(data[pos:pos + 4], "big"), int.from_bytes(data[pos + 4:pos + 8], "big")
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or zlib.crc32(body) != crc:
            return
        yield body
        pos += 8 + length


def _has_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def _mismatch(size: int, sha: str, entry: dict[str, Any], manifest: Manifest, path: Path) -> str:
    """Why a listed file fails, in words."""
    for other, e in manifest.segments.items():
        if other != path.name and e["sha256"] == sha:
            return f"holds the bytes of {other}"
    if size < entry["size"]:
        return f"is truncated ({size:,} of {entry['size']:,} bytes)"
    if size > entry["size"]:
        return f"is longer than written ({size:,} bytes, not {entry['size']:,})"
    if not _has_signature(path):
        return "does not match its checksum (its HDF5 signature is gone: zeroed or overwritten?)"
    return "does not match its checksum (bytes changed)"


@dataclass
class _Failed:
    name: str
    reason: str
    size: int
    sha: str
    entry: dict[str, Any] | None
    salvage: bool = True  #: whether its records may be salvaged (not for a file the manifest never listed)
    moved: Path | None = None
    put_back_as: str | None = None


def recover(directory: Path, live: Path | None = None, report: ReadReport | None = None) -> ReadReport:
    """Verify every HDF5 segment before anything reads one; set the damaged ones aside, recover what can be.

    Called at start, by the journal's writer (which holds its lock), before the closed logs are
    compacted and the journal read. Raises :class:`ManifestError` when the manifest is damaged.
    """
    report = report if report is not None else ReadReport()
    failed: list[_Failed] = []
    with manifest_lock(directory):
        for tmp in directory.glob("seg-*.h5.tmp"):
            tmp.unlink()  # an interrupted compaction (its log is still there) or rewrite (the old file is)
        manifest = Manifest.load(directory)
        logs = {_number(p): p for p in log_segments(directory) if p != live}
        files = {p.name: p for p in h5_segments(directory)}
        if manifest is None:
            manifest = _adopt(directory, files, set(logs), failed)
        else:
            _verify(directory, manifest, files, failed)
        missing = [name for name in manifest.segments if name not in files]
        for f in failed:
            if (directory / f.name).exists():  # not a gap in the numbers
                f.moved = move_aside(directory / f.name)
        _put_back(directory, manifest, failed, missing, report)
        refilled = {f.put_back_as for f in failed if f.put_back_as is not None}
        settle = [f for f in failed if f.name not in refilled]
        for f in failed:
            if f.name in refilled and f.moved is not None:
                log.warning("journal segment %s: the file that was there (it %s) is kept aside as %s; the segment's "
                            "own bytes were found elsewhere", f.name, f.reason, f.moved.name)
        for name in missing:
            if name in refilled:
                continue
            entry = manifest.segments[name]
            if _number(name) in logs:
                continue  # listed, then killed before the rename: compacted again from its log, nothing lost
            left = sorted(directory.glob(f"{name}.damaged-*"))  # the newest last (UTC times in the names)
            if left:  # set aside by a start that was killed before it was done: salvage it now
                settle.append(_Failed(name, "was being set aside when the orchestrator stopped", entry["size"], "",
                                      entry, moved=left[-1]))
            else:
                settle.append(_Failed(name, "is missing (listed in the manifest)", entry["size"], "", entry))
        for name in [f.name for f in settle] + [m for m in missing if m not in refilled]:
            manifest.segments.pop(name, None)  # a recovery lists it anew
        manifest.save(directory)
        found = [_settle(directory, f, logs.get(_number(f.name)), manifest.journal, report) for f in settle]
        if found:
            manifest = Manifest.load(directory) or Manifest()  # the recoveries listed their segments
            manifest.damaged += found
            manifest.save(directory)
    return report


def _adopt(directory: Path, files: dict[str, Path], logs: set[int], failed: list[_Failed]) -> Manifest:
    """A journal without a manifest: validate each segment in a separate process, list those that pass.

    A number missing from the sequence (segments are numbered from 1 without gaps, each log
    becoming the segment of its number) is a segment that was deleted: noted as lost, its size
    unknown.
    """
    manifest = Manifest()
    identities: set[str] = set()
    if files:
        log.warning("journal %s has no %s (written by an older version, or removed): validating its %d HDF5 "
                    "segment(s), each read whole in a separate process, before recording their checksums",
                    directory, MANIFEST, len(files))
    for name, path in sorted(files.items()):
        sha, size = file_digest(path, cached=False)
        answer, why = _run_child(["validate", str(path)], path)
        if answer is not None and file_digest(path)[0] == sha:
            manifest.segments[name] = {"sha256": sha, "size": size, "records": int(answer["records"]),
                                       "bodies_sha256": answer["bodies_sha256"],
                                       "bodies_bytes": int(answer["bodies_bytes"]), "written": None}
            if answer.get("journal"):
                identities.add(str(answer["journal"]))
        else:
            failed.append(_Failed(name, f"fails validation ({why})", size, sha, None))
    if len(identities) == 1 and _JOURNAL_ID.fullmatch(next(iter(identities))):
        manifest.journal = identities.pop()  # its segments' own identity: a later salvage can check it
    known = {_number(name) for name in files} | logs
    for p in directory.glob("seg-*.h5.damaged-*"):
        with contextlib.suppress(ValueError):  # a name that holds no number of ours counts for none
            known.add(_number(p))
    # a gap is one entry, however wide (a stray seg-99999999 must not make a hundred million of them)
    ordered = sorted(known)
    for before, after in zip([0, *ordered], ordered, strict=False):
        if after - before > 1:
            first, last = segment_path(directory, before + 1).name, segment_path(directory, after - 1).name
            name = first if after - before == 2 else f"{first}..{last}"
            failed.append(_Failed(name, "is missing (a gap in the segment numbers; no manifest says what it "
                                  "held)", 0, "", None, salvage=False))
    return manifest


def _verify(directory: Path, manifest: Manifest, files: dict[str, Path], failed: list[_Failed]) -> None:
    """Hash every segment; keep those that match their entry, note the others."""
    for name, path in sorted(files.items()):
        sha, size = file_digest(path, cached=False)
        entry = manifest.segments.get(name)
        if entry is None:
            failed.append(_Failed(name, "is not in the manifest", size, sha, None, salvage=False))
        elif sha == entry["sha256"]:
            entry.pop("pending", None)  # a rewrite that did not happen: the old file stays
        elif entry.get("pending") is not None and sha == entry["pending"]["sha256"]:
            manifest.segments[name] = entry["pending"]  # a rewrite renamed, then killed
        else:
            why = _mismatch(size, sha, entry, manifest, path)
            failed.append(_Failed(name, why, size, sha, entry, salvage=not why.startswith("holds the bytes")))


def _put_back(directory: Path, manifest: Manifest, failed: list[_Failed], missing: list[str],
              report: ReadReport) -> None:
    """Files moved aside whose bytes are exactly another listed segment's go back under that name."""
    wanted = [f.name for f in failed if f.entry is not None] + missing
    for name in wanted:
        entry = manifest.segments[name]
        for f in failed:
            if f.moved is not None and f.put_back_as is None and f.sha == entry["sha256"] \
                    and f.size == entry["size"]:
                os.rename(f.moved, directory / name)
                fsync_directory(directory)
                f.put_back_as, f.moved = name, None
                _remember(directory / name, f.sha)
                report.restored.append((f.name, name))
                log.warning("journal segment %s held the bytes of %s (swapped or renamed): put back as %s",
                            f.name, name, name)
                break


def _settle(directory: Path, f: _Failed, log_path: Path | None, journal: str, report: ReadReport) -> dict[str, Any]:
    """Recover a failed segment's records (its raw log, else a salvage), report and log what is lost."""
    entry = f.entry
    records = entry["records"] if entry is not None else None
    size = entry["size"] if entry is not None else f.size  # what was written, when the manifest says
    d = DamagedSegment(f.name, f.reason, size, records, moved_to=f.moved.name if f.moved else None)
    if f.put_back_as is not None:
        d.reason += f" (put back as {f.put_back_as})"
    n = _number(f.name)
    salvaged: tuple[int, int, int] | None = None
    if log_path is not None and log_path.exists():
        _, count = _compact(log_path, report)  # the log it was compacted from is still there
        d.recovered_from, d.recovered = log_path.name, count
        d.lost_records = max(0, records - count) if records is not None else 0
    elif f.moved is not None and f.salvage:
        salvaged = _salvage(f.moved, n, entry, journal)
    if salvaged is not None:
        count, nbytes, rows = salvaged
        _compact(log_path_of(directory, n), report)
        d.recovered_from, d.recovered = f"{d.moved_to} (read in a separate process)", count
        total = records if records is not None else (rows if rows >= count else None)
        d.lost_records = None if total is None else total - count
        if entry is not None and entry.get("bodies_bytes") is not None:
            d.lost_bytes = max(0, int(entry["bodies_bytes"]) - nbytes)
        elif d.lost_records != 0:
            d.lost_bytes = size if not total else size * (total - count) // total
    elif d.recovered_from is None:
        d.lost_records, d.lost_bytes = records, size
    report.damaged_segments.append(d)
    log.error("%s", d.describe())
    return {"name": f.name, "reason": d.reason, "moved_to": d.moved_to, "size": size, "records": records,
            "recovered": d.recovered, "lost_records": d.lost_records, "lost_bytes": d.lost_bytes,
            "at": round(time.time(), 3)}
