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
import stat
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchester.journal.child import salvage, validate
from orchester.journal.folder import fsync_directory
from orchester.journal.hdf5 import has_signature
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
    payload_name,
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
            _adopt_payload_logs(directory, manifest, logs, failed)
        else:
            _verify(directory, manifest, files, failed)
        missing = [name for name in manifest.segments if name not in files]
        for f in failed:
            if (directory / f.name).exists():  # not a gap in the numbers
                f.moved = move_aside(directory / f.name)
        _put_back(directory, manifest, failed, missing, report)
        refilled = {f.put_back_as for f in failed if f.put_back_as is not None}
        _sort_payload_files(directory, manifest, logs, report, {f.name for f in failed} | set(missing))
        rebuilt = {name for name in [f.name for f in failed] + missing
                   if name not in refilled and _raw_log_from_payloads(directory, name, manifest, logs)}
        settle = [f for f in failed if f.name not in refilled]
        for f in failed:
            if f.name in refilled and f.moved is not None:
                log.warning("journal segment %s: the file that was there (it %s) is kept aside as %s; the segment's "
                            "own bytes were found elsewhere", f.name, f.reason, f.moved.name)
        for name in missing:
            if name in refilled:
                continue
            entry = manifest.segments[name]
            if name in rebuilt or (number(name) in logs and entry.get("recovering")):
                # rebuilt whole from its payload file (by this start, or one killed before it was done): reported
                settle.append(_Failed(name, entry.get("recovering") or "is missing (listed in the manifest)",
                                      entry["size"], "", entry))
                continue
            if number(name) in logs:
                continue  # listed, then killed before the rename: compacted again from its log, nothing lost
            left = sorted(directory.glob(f"{name}.damaged-*"))  # the newest last (UTC times in the names)
            if left:  # set aside by a start that was killed before it was done: salvage it now
                settle.append(_Failed(name, "was being set aside when the orchestrator stopped", entry["size"], "",
                                      entry, moved=left[-1]))
            else:
                settle.append(_Failed(name, "is missing (listed in the manifest)", entry["size"], "", entry))
        settling = {f.name for f in settle}
        for name in missing:
            if name not in refilled and name not in settling:
                manifest.segments.pop(name, None)  # its log is compacted again (below, by the caller)
        for f in settle:  # kept listed until recovered: a start killed meanwhile finds it again
            if f.name in manifest.segments:
                manifest.segments[f.name]["recovering"] = f.reason
        manifest.save(directory)
        found = [_settle(directory, f, logs.get(number(f.name)), manifest.journal, report) for f in settle]
        if found:
            manifest = Manifest.load(directory) or Manifest()  # the recoveries listed their segments anew
            for name in settling:
                if not (directory / name).exists():
                    manifest.segments.pop(name, None)  # nothing recovered: no longer listed
            manifest.damaged += found
            manifest.save(directory)
    return report


def _raw_log_from_payloads(directory: Path, name: str, manifest: Manifest, logs: dict[int, Path]) -> bool:
    """A failed or missing segment whose payload file is there, whole: that file is the log it was compacted
    from, record for record (small records and large), so it becomes the raw log again, to be compacted
    anew, and nothing is lost. Whole: its SHA-256 is the one the manifest recorded (another log, or a
    damaged one, would rebuild the segment wrong). Returns whether it did."""
    try:
        n = number(name)
    except ValueError:  # a gap's name
        return False
    pay = directory / payload_name(name)
    entry = manifest.segments.get(name)
    expected = (entry or {}).get("payloads") or {}
    if n in logs or not expected or expected.get("lost") or _regular_size(pay) is None:
        return False
    if file_digest(pay, cached=False)[0] != expected["sha256"]:
        log.error("journal segment %s failed or is missing, and its payload file %s is not the log it was compacted "
                  "from (its checksum differs): not rebuilt from it", name, pay.name)
        return False
    assert entry is not None
    entry["recovering"] = "is missing or damaged; rebuilt from its payload file"
    manifest.save(directory)  # before the rename: a start killed after it still reports the segment
    _payload_to_log(directory, pay, logs)
    return True


def _payload_to_log(directory: Path, pay: Path, logs: dict[int, Path]) -> None:
    """A payload file becomes the log it was (``wal-<n>.log``), to be compacted again."""
    n = number(pay)
    target = log_path_of(directory, n)
    os.replace(pay, target)
    fsync_directory(directory)
    logs[n] = target
    log.warning("journal segment %s is missing or failed: its payload file %s is the log it came from; compacting "
                "it again from there", segment_path(directory, n).name, pay.name)


def _adopt_payload_logs(directory: Path, manifest: Manifest, logs: dict[int, Path], failed: list[_Failed]) -> None:
    """A journal without a manifest: the payload file of a segment that is missing or failed validation is the
    log it was compacted from (a log is trusted as its per-record CRC-32s allow, as any log is here): it
    becomes ``wal-<n>.log`` again, and the segment is reported and rebuilt from it."""
    for pay in payload_files(directory):
        n = number(pay)
        name = segment_path(directory, n).name
        if n in logs or name in manifest.segments or _regular_size(pay) is None:
            continue  # a log of its own, or a valid segment's payload file (listed by _adopt)
        _payload_to_log(directory, pay, logs)
        failed[:] = [f for f in failed if f.name != name or f.salvage]  # (a gap's entry, if it was one)
        if not any(f.name == name for f in failed):
            failed.append(_Failed(name, "is missing (its payload file, the log it came from, is there)", 0, "", None))


def _regular_size(path: Path) -> int | None:
    """The size of ``path`` if it is a regular file (not a link, a pipe or a folder), else ``None``."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _sort_payload_files(directory: Path, manifest: Manifest, logs: dict[int, Path], report: ReadReport,
                        reported: set[str]) -> None:
    """Check every segment's payload file before anything reads one (the manifest is changed in memory; the
    caller saves it).

    One that is a regular file of the size the manifest lists is taken as it is: each record read
    from it is checked against its row when read (hashing them all at every start would read every
    payload). Any other — another size, not a regular file, gone — is looked for among the payload
    files by its SHA-256 (files swapped or renamed go back where they belong); one still not found
    is set aside if something else has its name, reported once with the records it held, and marked
    lost (unless its segment is reported whole: ``reported``). A payload file marked lost that is
    back (from a backup, say: its size and SHA-256 the listed ones) is taken again. A payload file
    no segment lists is moved aside."""
    wanted: dict[str, dict[str, Any]] = {}
    listed: set[str] = set()
    for name, entry in manifest.segments.items():
        for e in (entry, entry.get("pending") or {}):
            pay = e.get("payloads")
            if pay:
                listed.add(pay["name"])
        pay = entry.get("payloads")
        if not pay or number(name) in logs:  # (a log compacted, then killed: it is the file)
            continue
        if pay.get("lost") or _regular_size(directory / pay["name"]) != pay["size"]:
            wanted[name] = pay
    moving = sorted(directory.glob("pay-*.log.moving*.tmp"))  # a put-back killed between its two renames
    if wanted:
        by_sha: dict[str, Path] = {}
        for p in payload_files(directory) + moving:
            if p.name not in listed or any(p.name == pay["name"] for pay in wanted.values()):
                if _regular_size(p) is not None:
                    by_sha.setdefault(file_digest(p, cached=False)[0], p)
        moves = {by_sha[pay["sha256"]]: directory / pay["name"] for pay in wanted.values() if pay["sha256"] in by_sha}
        moves = {src: dst for src, dst in moves.items() if src != dst}
        for dst in moves.values():  # whatever holds a wanted name and is not moving elsewhere: aside
            if os.path.lexists(dst) and dst not in moves:
                move_aside(dst)
        staged = {}
        for src, dst in moves.items():  # two steps: a swap must not overwrite its other half
            tmp = src  # (one in ``moving`` was staged already, by a start that was killed)
            if src not in moving:
                k = 0
                while os.path.lexists(tmp := src.with_name(f"{src.name}.moving{k or ''}.tmp")):
                    k += 1  # never over a leftover (maybe the only copy of another file) or a folder
                os.rename(src, tmp)
            staged[tmp] = dst
        for tmp, dst in staged.items():
            os.rename(tmp, dst)
            log.warning("journal payload file %s held the bytes of %s (swapped or renamed): put back",
                        tmp.name.split(".moving", 1)[0], dst.name)
        if staged:
            fsync_directory(directory)
        for name, pay in wanted.items():
            if _regular_size(directory / pay["name"]) == pay["size"]:
                if not pay.get("lost"):
                    continue  # put back
                if file_digest(directory / pay["name"], cached=False)[0] == pay["sha256"]:
                    del pay["lost"]
                    log.warning("journal payload file %s, marked lost, is back: its records are read again",
                                pay["name"])
                    continue
            if pay.get("lost") or name in reported:
                continue  # said already, or said with its segment
            where = directory / pay["name"]
            moved = move_aside(where) if os.path.lexists(where) else None
            why = "is missing" if moved is None else "is not the file written (another size, or not a file)"
            pay["lost"] = why
            d = DamagedSegment(pay["name"], f"{why} (the payload file of {name})", pay["size"], pay["records"],
                               moved_to=moved.name if moved else None, lost_records=pay["records"],
                               lost_bytes=pay["bytes"])
            manifest.damaged.append(_reported(d, report))
    for p in payload_files(directory) + [m for m in moving if m.exists()]:
        if p.name not in listed and number(p) not in logs:
            moved = move_aside(p)
            log.warning("journal payload file %s belongs to no segment (a retention rewrite stopped before removing "
                        "it?): moved aside to %s", p.name, moved.name)


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
            if answer.get("outside"):  # records in its payload file: listed (checked, reported if gone, below)
                pay = directory / payload_name(name)
                there = _regular_size(pay)
                manifest.segments[name]["payloads"] = {
                    "name": pay.name, "size": there or 0,
                    "sha256": file_digest(pay, cached=False)[0] if there is not None else "0" * 64,
                    "records": int(answer["outside"]), "bytes": int(answer.get("outside_bytes", 0))}
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
            # (a salvage reads the file alone: the records of its payload file are lost with it)
            outside = int((entry.get("payloads") or {}).get("bytes", 0))
            d.lost_bytes = max(0, int(entry["bodies_bytes"]) - nbytes) + outside
        elif d.lost_records != 0:
            d.lost_bytes = size if not total else size * (total - count) // total
    elif d.recovered_from is None:
        d.lost_records, d.lost_bytes = records, size
    return _reported(d, report)


def _reported(d: DamagedSegment, report: ReadReport) -> dict[str, Any]:
    """Report and log a damaged file; what the manifest records of it (``damaged``)."""
    report.damaged_segments.append(d)
    log.error("%s", d.describe())
    return {"name": d.name, "reason": d.reason, "moved_to": d.moved_to, "size": d.size, "records": d.records,
            "recovered": d.recovered, "lost_records": d.lost_records, "lost_bytes": d.lost_bytes,
            "at": round(time.time(), 3)}
