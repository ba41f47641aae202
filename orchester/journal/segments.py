"""Closed journal segments as HDF5 files: verification before a read, compaction, reads, retention.

No segment is opened in this process unless its checksum is the manifest's
(:func:`segment_ok`; :mod:`orchester.journal.manifest`); a journal without a manifest (written by
an older version) has each segment validated once in a separate process instead
(:mod:`orchester.journal.child`). Readers skip a segment that fails and log it once: it is set
aside at the orchestrator's next start (:mod:`orchester.journal.recovery`).

**Writing.** A segment is written as ``seg-<n>.h5.tmp`` (:mod:`orchester.journal.hdf5`), closed
and fsync'ed; its entry goes into the manifest; it is renamed to ``seg-<n>.h5`` (and the folder
fsync'ed); only then is its log removed — or, when it holds records of :data:`OUTSIDE` bytes or
more, renamed to the segment's payload file ``pay-<n>.log``: those records are never copied, their
rows say where they lie (:mod:`orchester.journal.hdf5`), and the manifest lists the file. A crash
at any moment leaves either the log (the compaction is done again) or a complete, listed HDF5 file
(when both exist, the HDF5 file wins and the log is removed or kept as the payload file). A
retention rewrite of an existing segment records the new file as ``pending`` in the old one's
entry before the rename, so that either version is accepted after a crash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from orchester.journal.child import validate_in_subprocess
from orchester.journal.folder import JournalError, fsync_directory
from orchester.journal.hdf5 import Placed, find_record, find_records, payload_path, read_h5, read_h5_fields, write_file
from orchester.journal.manifest import (
    Manifest,
    Signature,
    file_digest,
    h5_segments,
    load_manifest,
    log_segments,
    manifest_lock,
    move_aside,
    number,
    remember_digest,
    segment_path,
    stat_signature,
)
from orchester.journal.records import SUBMITTED, TRANSITION, RecordError, Result, Submitted, view, without_payload
from orchester.journal.wal import WRITE_ALONE, DamagedSegment, ReadReport, read_placed, read_segment
from tracker import TaskState

log = logging.getLogger("orchester.journal")
_REPORTED: set[tuple[str, Signature]] = set()  #: failing files already logged
_REPORTED_LOCK = threading.Lock()


# -- verification --------------------------------------------------------------------------------------

def segment_ok(path: Path, manifest: Manifest | None) -> bool:
    """Whether a segment may be opened in this process: its bytes are those the manifest lists.

    Without a manifest (a journal of an older version, not yet opened by an orchestrator of this
    one) the segment is validated once by reading it whole in a separate process.
    """
    if manifest is None:
        return validate_in_subprocess(path) is not None
    if path.name not in manifest.segments:
        return False
    return manifest.accepts(path.name, file_digest(path)[0])


def _readable(path: Path, manifest: Manifest | None, report: ReadReport | None = None) -> bool:
    """:func:`segment_ok`, logging a failing segment once (it is set aside at the orchestrator's next start)."""
    if segment_ok(path, manifest):
        return True
    st = os.stat(path)  # FileNotFoundError: it was renamed meanwhile, the caller lists the folder again
    key = (str(path), stat_signature(st))
    entry = manifest.segments.get(path.name) if manifest is not None else None
    with _REPORTED_LOCK:
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

def write_h5(out: Path, records: Iterable[list[Any] | Placed], payloads: dict[str, Any] | None = None,
             then: Callable[[int], None] | None = None) -> int:
    """Write ``records`` to the HDF5 segment ``out`` atomically and list it in the manifest; return the count.

    The file is written as ``out.tmp`` and fsync'ed, its entry goes into the manifest, then it is
    renamed (and the folder fsync'ed). Rewriting a listed segment (retention) records the new file
    as ``pending`` first, so that after a crash either version passes verification. A journal of
    an older version (segments but no manifest) gets no manifest here: the orchestrator validates
    every segment and writes it at its next start.

    ``payloads``: the size and SHA-256 of the log the :data:`~orchester.journal.hdf5.Placed` records
    lie in, which becomes the segment's payload file; the entry lists it (``payloads``: its name,
    size, SHA-256, and the number and bytes of the records it holds for the segment). ``then`` is
    called with that number of records once the file is in place, still under the manifest's lock
    (the log is kept or removed there: no reader or rewrite comes between).
    """
    directory = out.parent
    tmp = out.with_name(out.name + ".tmp")
    info = write_file(tmp, records, number(tmp), _journal_id(directory))
    sha, size = file_digest(tmp, cached=False)
    journal = info.pop("journal")
    outside, outside_bytes = info.pop("outside"), info.pop("outside_bytes")
    entry = {"sha256": sha, "size": size, **info, "written": round(time.time(), 3)}
    if outside:
        if payloads is None:
            raise ValueError("records placed outside, but no payload file")
        entry["payloads"] = {"name": payload_path(out).name, "size": int(payloads["size"]),
                             "sha256": str(payloads["sha256"]), "records": outside, "bytes": outside_bytes}
    with manifest_lock(directory):
        manifest = Manifest.load(directory)
        if manifest is None and not any(p != out for p in h5_segments(directory)):
            manifest = Manifest(journal) if journal else Manifest()  # a new journal: every segment listed from now on
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
        remember_digest(out, sha)  # reading it back does not hash it again
        if then is not None:
            then(outside)
    return int(info["records"])


def _journal_id(directory: Path) -> str | None:
    """The journal's identity; a new journal gets its manifest now. ``None``: an older journal, not yet adopted."""
    with manifest_lock(directory):
        manifest = Manifest.load(directory)
        if manifest is None and not h5_segments(directory):
            manifest = Manifest()
            manifest.save(directory)
        return manifest.journal if manifest is not None else None


#: A record whose body is at least this large (a payload or a result) stays in the log when it is compacted:
#: written once, never copied into the HDF5 file.
OUTSIDE = WRITE_ALONE


def _placed(log_path: Path, report: ReadReport, digest: Any = None) -> Iterator[list[Any] | Placed]:
    for record, offset, length, crc in read_placed(log_path, report, digest):
        yield (record, offset, length, crc) if length >= OUTSIDE else record


def compact_log(log_path: Path, damage: ReadReport | None) -> tuple[Path, int]:
    """:func:`compact`, returning the number of records written too."""
    out = segment_path(log_path.parent, number(log_path))
    report = ReadReport()
    digest = hashlib.sha256()
    payloads = {"size": log_path.stat().st_size, "sha256": ""}

    def placed() -> Iterator[list[Any] | Placed]:
        yield from _placed(log_path, report, digest)
        payloads["sha256"] = digest.hexdigest()  # (read whole by now: before the entry is made)

    n = write_h5(out, placed(), payloads, then=lambda outside: keep_log(log_path, out, outside > 0))
    if damage is not None:
        damage.damaged.extend(report.damaged)
    if report.damaged:
        log.error("segment %s was damaged at byte %d: %d bytes after it dropped when compacting",
                  log_path.name, report.damaged[0][1], report.damaged[0][2])
    return out, n


def keep_log(log_path: Path, out: Path, payloads: bool) -> None:
    """A compacted log, once its HDF5 segment ``out`` is durable and listed: kept as the segment's payload
    file when records of it lie there (``payloads``), else removed."""
    if payloads:
        os.replace(log_path, payload_path(out))
    else:
        os.unlink(log_path)
    fsync_directory(log_path.parent)


def compact(log_path: Path, damage: ReadReport | None = None) -> Path:
    """Convert one closed log segment to an HDF5 segment; return its path (the log is removed).

    Damage found in the log (records after it are dropped) is added to ``damage``.
    """
    return compact_log(log_path, damage)[0]


def compact_closed(directory: Path, keep: Path | None = None, damage: ReadReport | None = None) -> list[Path]:
    """Compact every log segment except ``keep`` (the live one); tidy up after a crash mid-way.

    Only with the journal's lock held (``DIR/LOCK``: no orchestrator writes the journal meanwhile; the
    orchestrator at start, or ``orchester journal compact`` when it could take the lock): it works from
    one listing of the folder and the manifest.

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
        h5 = segment_path(directory, number(log_path))
        if h5.exists():
            if segment_ok(h5, manifest):  # compacted, then killed before the log was removed (or kept)
                entry = manifest.segments.get(h5.name) if manifest is not None else None
                with manifest_lock(directory):  # (no manifest to say: kept, lest it hold records of the file)
                    keep_log(log_path, h5, entry is None or bool(entry.get("payloads")))
                continue
            moved = move_aside(h5)
            log.error("journal segment %s fails verification: moved aside to %s; compacted again from %s",
                      h5.name, moved.name, log_path.name)
        try:
            done.append(compact(log_path, damage))
        except Exception as exc:  # a record PyTables cannot hold, say: the log stays, readable as it is
            h5.with_name(h5.name + ".tmp").unlink(missing_ok=True)
            log.error("journal log %s could not be compacted (%s: %s): it is kept as a log and read as one",
                      log_path.name, type(exc).__name__, str(exc)[:200])
    return done


# -- reading -----------------------------------------------------------------------------------------

def read_task_record(path: Path, task_id: str, code: str = SUBMITTED) -> list[Any] | None:
    """The ``code`` record of ``task_id`` in a compacted segment, found through the task id index.

    Raises :class:`JournalError` when the segment fails verification: it is not opened.
    """
    if not _readable(path, load_manifest(path.parent)):
        raise JournalError(f"journal segment {path.name} fails verification: not read")
    return find_record(path, task_id, code)


def read_task_records(path: Path, task_id: str) -> list[list[Any]]:
    """Every record of ``task_id`` in a compacted segment, in order, found through the task id index.

    Raises :class:`JournalError` when the segment fails verification: it is not opened.
    """
    if not _readable(path, load_manifest(path.parent)):
        raise JournalError(f"journal segment {path.name} fails verification: not read")
    return find_records(path, task_id)


def parts(directory: Path) -> list[tuple[Path, str]]:
    """A journal's segments in order, each with its kind: ``"h5"`` (compacted) or ``"log"``."""
    found = [(p, "h5") for p in h5_segments(directory)] + [(p, "log") for p in log_segments(directory)]
    return sorted(found, key=lambda pk: number(pk[0]))


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
            for record in read_h5(path, report):
                report.records += 1
                yield record
        else:
            yield from read_segment(path, report)


# -- retention -------------------------------------------------------------------------------------

def apply_retention(directory: Path, results_before: float) -> dict[str, int]:
    """Drop the bulky parts of old finished tasks from compacted segments; keep every header.

    For tasks that finished before ``results_before`` (wall time): the result's payload is
    dropped (its header, with the outcome and error type, stays) and the input payload too.
    Task records, transitions and headers are kept forever, so the history is unchanged.
    Segments that fail verification, and records of a shape no view accepts, are left alone.
    """
    manifest = Manifest.load(directory)
    segs = [p for p in h5_segments(directory) if _readable(p, manifest)]
    finished: dict[str, float] = {}
    for path in segs:
        for f in read_h5_fields(path):
            if f["code"] == TRANSITION and f["state"] >= 0 and TaskState(f["state"]).terminal:
                finished[f["task_id"]] = f["t"]
    old = {tid for tid, t in finished.items() if t < results_before}
    counts = {"results_dropped": 0, "inputs_dropped": 0, "segments_rewritten": 0}
    for path in segs:
        with manifest_lock(directory):  # a compaction keeping its log, or another rewrite, waits
            report = ReadReport()
            records = list(read_h5(path, report))
            if report.damaged:  # rewritten, they would be gone for good, and unreported: left as they are
                log.error("journal segment %s: %d record(s) of its payload file could not be read: not rewritten",
                          path.name, len(report.damaged))
                continue
            dropped = {"results_dropped": 0, "inputs_dropped": 0}
            for i, rec in enumerate(records):
                try:
                    v = view(rec)
                except RecordError:
                    continue
                if isinstance(v, Result) and v.task_id in old and len(v.frames) > 1:
                    dropped["results_dropped"] += 1
                elif isinstance(v, Submitted) and v.task_id in old and v.payload:
                    dropped["inputs_dropped"] += 1
                else:
                    continue
                records[i] = without_payload(rec)
            if any(dropped.values()):
                write_h5(path, records)  # whole: what it kept of its payload file is in it now
                pay = payload_path(path)
                if pay.exists():
                    os.unlink(pay)
                    fsync_directory(directory)
                for key, k in dropped.items():
                    counts[key] += k
                counts["segments_rewritten"] += 1
    return counts
