"""At start, before anything reads the journal: verify every HDF5 segment, set the damaged ones
aside, recover.

Called by :func:`orchester.journal.writer.replay` under the journal's lock. Every segment is
checked against the manifest (:mod:`orchester.journal.manifest`). One that fails (truncated,
zeroed, bytes flipped, not listed, holding another segment's bytes) is moved aside as
``seg-<n>.h5.damaged-<UTC time>``, never deleted; a listed one that is gone is noted. Two segments
whose bytes were swapped (or a segment renamed) are put back where their checksums say they
belong. Records are recovered where that is safe: from the raw log the segment was compacted from,
when it still exists (its payload file is that log, kept); otherwise by reading the damaged file
**in a separate process** (:func:`orchester.journal.child.salvage`: a crash there cannot take the
orchestrator down), keeping the records whose CRC-32 matches, or all of them when their bodies
hash to the manifest's figure. What is lost is logged and reported
(:class:`~orchester.journal.wal.DamagedSegment`), and recorded in the manifest. A journal written
before the manifest existed has each segment validated once, by reading it whole in a separate
process, before its checksums are recorded. A damaged manifest cannot tell what is missing: the
journal is refused (:class:`~orchester.journal.manifest.ManifestError`). A payload file that is
gone is reported once and marked lost in the manifest; one no segment lists is moved aside.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchester.journal.child import salvage, validate
from orchester.journal.folder import fsync_directory
from orchester.journal.hdf5 import has_signature, payload_path
from orchester.journal.manifest import (
    JOURNAL_ID,
    MANIFEST,
    Manifest,
    file_digest,
    h5_segments,
    log_path_of,
    log_segments,
    manifest_lock,
    move_aside,
    number,
    payload_files,
    remember_digest,
    segment_path,
)
from orchester.journal.segments import compact_log
from orchester.journal.wal import DamagedSegment, ReadReport

log = logging.getLogger("orchester.journal")


def _salvage(moved: Path, n: int, entry: dict[str, Any] | None, journal: str) -> tuple[int, int, int] | None:
    """Recover what can safely be recovered from a damaged segment into ``wal-<n>.log``; (records, bytes, rows).

    The file is read in a separate process (:func:`orchester.journal.child.salvage`). Its records
    are kept when their bodies hash to the manifest's figure (all of them, exactly as written),
    or one by one when each matches its CRC-32 and the file says it is segment ``n`` of this
    ``journal``; otherwise nothing is kept (``None``).
    """
    directory = moved.parent
    if not has_signature(moved):
        log.info("journal segment %s: nothing to salvage (no HDF5 signature: zeroed or overwritten)", moved.name)
        return None
    out = directory / f"seg-{n:06d}.h5.salvage.tmp"
    expected = str(entry.get("bodies_sha256") or "-") if entry is not None else "-"
    answer, why = salvage(moved, out, expected)
    try:
        if answer is None or not answer.get("records"):
            log.info("journal segment %s: nothing could be salvaged (%s)", moved.name,
                     why if answer is None else "no record reads back intact")
            return None
        bodies = list(_frames(out.read_bytes()))
        if answer.get("whole"):  # exactly the bodies written: no identity needed
            digest = hashlib.sha256(b"".join(bodies)).hexdigest()
            inside = entry.get("records", 0) - (entry.get("payloads") or {}).get("records", 0) if entry else None
            if entry is None or digest != expected or len(bodies) != inside:
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


def _mismatch(size: int, sha: str, entry: dict[str, Any], manifest: Manifest, path: Path) -> str:
    """Why a listed file fails, in words."""
    for other, e in manifest.segments.items():
        if other != path.name and e["sha256"] == sha:
            return f"holds the bytes of {other}"
    if size < entry["size"]:
        return f"is truncated ({size:,} of {entry['size']:,} bytes)"
    if size > entry["size"]:
        return f"is longer than written ({size:,} bytes, not {entry['size']:,})"
    if not has_signature(path):
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
        logs = {number(p): p for p in log_segments(directory) if p != live}
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
        for name in [f.name for f in failed] + missing:
            if name not in refilled:
                _raw_log_from_payloads(directory, name, manifest, logs)
        settle = [f for f in failed if f.name not in refilled]
        for f in failed:
            if f.name in refilled and f.moved is not None:
                log.warning("journal segment %s: the file that was there (it %s) is kept aside as %s; the segment's "
                            "own bytes were found elsewhere", f.name, f.reason, f.moved.name)
        for name in missing:
            if name in refilled:
                continue
            entry = manifest.segments[name]
            if number(name) in logs:
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
        found = [_settle(directory, f, logs.get(number(f.name)), manifest.journal, report) for f in settle]
        if found:
            manifest = Manifest.load(directory) or Manifest()  # the recoveries listed their segments
            manifest.damaged += found
            manifest.save(directory)
        _check_payload_files(directory, logs, report)
    return report


def _raw_log_from_payloads(directory: Path, name: str, manifest: Manifest, logs: dict[int, Path]) -> None:
    """A failed or missing segment whose payload file is there: that file is the log it was compacted from, whole
    (small records and large), so it becomes the raw log again, compacted anew: nothing is lost."""
    try:
        n = number(name)
    except ValueError:  # a gap's name
        return
    pay = payload_path(segment_path(directory, n))
    entry = manifest.segments.get(name)
    if n in logs or not pay.exists() or entry is None or not entry.get("payloads"):
        return
    target = log_path_of(directory, n)
    os.replace(pay, target)
    fsync_directory(directory)
    logs[n] = target
    log.warning("journal segment %s failed or is missing: its payload file %s is the log it came from; compacting "
                "it again from there", name, pay.name)


def _check_payload_files(directory: Path, logs: dict[int, Path], report: ReadReport) -> None:
    """Every segment's payload file is there (each record read from one is checked against the CRC-32 of its
    row when read: hashing them all at every start would read every payload). One that is gone is reported
    once, with what it held; a payload file no segment lists is moved aside."""
    manifest = Manifest.load(directory)
    if manifest is None:
        return
    listed = set()
    changed = False
    for name, entry in manifest.segments.items():
        for e in (entry, entry.get("pending") or {}):
            pay = e.get("payloads")
            if not pay:
                continue
            listed.add(pay["name"])
            if e is entry and not pay.get("lost") and not (directory / pay["name"]).exists() \
                    and number(name) not in logs:  # (a log compacted, then killed: it becomes the file next)
                pay["lost"] = "is missing"
                changed = True
                d = DamagedSegment(pay["name"], f"is missing (the payload file of {name})", pay["size"],
                                   pay["records"], lost_records=pay["records"], lost_bytes=pay["bytes"])
                report.damaged_segments.append(d)
                log.error("%s", d.describe())
                manifest.damaged.append({"name": pay["name"], "reason": d.reason, "moved_to": None,
                                         "size": pay["size"], "records": pay["records"], "recovered": 0,
                                         "lost_records": pay["records"], "lost_bytes": pay["bytes"],
                                         "at": round(time.time(), 3)})
    if changed:
        manifest.save(directory)
    for pay in payload_files(directory):
        if pay.name not in listed and number(pay) not in logs:
            moved = move_aside(pay)
            log.warning("journal payload file %s belongs to no segment (a retention rewrite stopped before removing "
                        "it?): moved aside to %s", pay.name, moved.name)


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
        answer, why = validate(path)
        if answer is not None and file_digest(path)[0] == sha:
            manifest.segments[name] = {"sha256": sha, "size": size, "records": int(answer["records"]),
                                       "bodies_sha256": answer["bodies_sha256"],
                                       "bodies_bytes": int(answer["bodies_bytes"]), "written": None}
            if answer.get("journal"):
                identities.add(str(answer["journal"]))
        else:
            failed.append(_Failed(name, f"fails validation ({why})", size, sha, None))
    if len(identities) == 1 and JOURNAL_ID.fullmatch(next(iter(identities))):
        manifest.journal = identities.pop()  # its segments' own identity: a later salvage can check it
    known = {number(name) for name in files} | logs
    for p in directory.glob("seg-*.h5.damaged-*"):
        with contextlib.suppress(ValueError):  # a name that holds no number of ours counts for none
            known.add(number(p))
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
                remember_digest(directory / name, f.sha)
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
    n = number(f.name)
    salvaged: tuple[int, int, int] | None = None
    if log_path is not None and log_path.exists():
        _, count = compact_log(log_path, report)  # the log it was compacted from is still there
        d.recovered_from, d.recovered = log_path.name, count
        d.lost_records = max(0, records - count) if records is not None else 0
    elif f.moved is not None and f.salvage:
        salvaged = _salvage(f.moved, n, entry, journal)
    if salvaged is not None:
        count, nbytes, rows = salvaged
        compact_log(log_path_of(directory, n), report)
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
