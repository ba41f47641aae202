"""The journal's HDF5 segment files: their names and numbers, and the manifest of their checksums.

HDF5 is a C library that fails, or crashes the process, on a damaged file. So no segment
reaches it unverified: ``DIR/MANIFEST`` records the SHA-256 and size of every segment as it was
written (with its record count and a SHA-256 of its record bodies), and a segment is opened in
this process only if its bytes match (:func:`orchester.journal.segments.segment_ok`). The
manifest is JSON with a checksum of its own, written atomically (``MANIFEST.tmp``, 0600,
fsync, rename, fsync of the folder) under an ``flock`` of the journal folder
(:func:`manifest_lock`), so the orchestrator's compaction thread and ``orchester journal
compact`` can both update it. A damaged manifest cannot tell what is missing: the journal is
refused (:class:`ManifestError`).

Segment ``n`` is ``wal-<n>.log`` while it is a log, ``seg-<n>.h5`` once compacted and
``seg-<n>.h5.damaged-<UTC time>`` once set aside (:func:`move_aside`); a number is never used
twice (:func:`highest_number`). A file's checksum is remembered by its ``stat`` until the file
changes (:func:`file_digest`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchester.journal.folder import JournalError, fsync_directory, open_private

#: The manifest's file name in the journal folder.
MANIFEST = "MANIFEST"
_FORMAT = "orchester-journal-manifest"
_VERSION = 1
_SEGMENT = re.compile(r"seg-(\d{1,12})\.h5")
_LOG = re.compile(r"wal-(\d{1,12})\.log")
_PAYLOADS = re.compile(r"pay-(\d{1,12})\.log")
_NUMBERED = re.compile(r"(?:seg|wal|pay)-(\d{1,12})\.")  #: (a longer number is no segment of ours)
_SHA = re.compile(r"[0-9a-f]{64}")
#: A journal's identity, in its manifest and on the root of each of its HDF5 segments.
JOURNAL_ID = re.compile(r"[0-9a-f]{32}")


class ManifestError(JournalError):
    """The manifest is unreadable or damaged: which segments are intact or missing cannot be known."""


# -- segment files: names, numbers, setting one aside --------------------------------------------------

def number(path: Path | str) -> int:
    """The segment number a file name carries (``wal-<n>.log``, ``seg-<n>.h5``…); ``ValueError`` if none."""
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


def h5_segments(directory: Path) -> list[Path]:
    """Compacted segments, oldest first."""
    return sorted(p for p in directory.glob("seg-*.h5") if _SEGMENT.fullmatch(p.name))


def log_segments(directory: Path) -> list[Path]:
    """Log segments, oldest first."""
    return sorted(p for p in directory.glob("wal-*.log") if _LOG.fullmatch(p.name))


def payload_name(segment: str) -> str:
    """The name of an HDF5 segment's payload file: ``seg-<n>.h5`` → ``pay-<n>.log`` (the same digits)."""
    return "pay-" + segment[len("seg-"):].split(".", 1)[0] + ".log"


def payload_files(directory: Path) -> list[Path]:
    """Payload files (``pay-<n>.log``: logs kept for the large records their HDF5 segments point into)."""
    return sorted(p for p in directory.glob("pay-*.log") if _PAYLOADS.fullmatch(p.name))


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
        pay = e.get("payloads")
        if pay is not None and not (isinstance(pay, dict) and pay.get("name") == payload_name(name)
                                    and isinstance(pay.get("sha256"), str) and _SHA.fullmatch(pay["sha256"])
                                    and all(isinstance(pay.get(k), int) and pay[k] >= 0
                                            for k in ("size", "records", "bytes"))):
            raise ValueError(f"the entry of {name} has a bad payload file")
        if not isinstance(e.get("recovering", ""), str) or (pay and not isinstance(pay.get("lost", ""), str)):
            raise ValueError(f"the entry of {name} has a bad recovery mark")


def _new_id() -> str:
    return secrets.token_hex(16)


@dataclass
class Manifest:
    """Checksums of a journal's HDF5 segments (``segments``: file name → entry) and the damage seen."""

    #: the journal's identity, also written into each of its segments: a salvaged record must come from it
    journal: str = field(default_factory=_new_id)
    #: file name → ``{"sha256", "size", "records", "bodies_sha256", "bodies_bytes", "written"[, "pending"]
    #: [, "payloads": {"name", "size", "sha256", "records", "bytes"[, "lost"]}][, "recovering"]}``
    #: (``payloads``: its payload file; ``lost``, ``recovering``: why, in words)
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
            if not isinstance(journal, str) or not JOURNAL_ID.fullmatch(journal):
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

    def accepts(self, name: str, sha: str) -> bool:
        """Whether a file of checksum ``sha`` is segment ``name`` as listed (or as a pending rewrite of it)."""
        entry = self.segments.get(name)
        if entry is None:
            return False
        pending = entry.get("pending")
        return sha == entry["sha256"] or (pending is not None and sha == pending["sha256"])


def _refusal(directory: Path, why: str) -> str:
    return (f"journal {directory}: its {MANIFEST} is damaged ({why}), so which segments are intact or missing "
            f"cannot be known: refusing it. Move {directory / MANIFEST} aside to have every segment validated "
            f"again (each in a separate process) and the manifest rebuilt at the next start")


#: What ``stat`` says of a file: changed bytes change it.
Signature = tuple[int, int, int, int, int]
_READ_MANIFESTS: dict[str, tuple[Signature, Manifest]] = {}
_DIGESTS: dict[str, tuple[Signature, str]] = {}  #: path → (stat signature, sha256) of files hashed
_CACHE_LOCK = threading.Lock()


def stat_signature(st: os.stat_result) -> Signature:
    """A file's device, inode, size, modification and change times: what changes when its bytes do."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load_manifest(directory: Path) -> Manifest | None:
    """The manifest for reading only (do not change it): :meth:`Manifest.load`, remembered until the file changes.

    ``None`` for a journal without one; :class:`ManifestError` if it is damaged.
    """
    path = directory / MANIFEST
    try:
        sig = stat_signature(os.stat(path))
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
        if p.name.startswith(("seg-", "wal-", "pay-")) and not p.name.endswith(".tmp"):
            with contextlib.suppress(ValueError):  # a name that holds no number counts for none
                numbers.append(number(p))
    manifest = Manifest.load(directory)
    if manifest is not None:
        numbers += [number(name) for name in manifest.segments]
        for d in manifest.damaged:
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # an entry without a usable name
                numbers.append(number(str(d.get("name", ""))))
    return max(numbers, default=0)


# -- checksums -----------------------------------------------------------------------------------

def file_digest(path: Path, cached: bool = True) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file; remembered by its ``stat`` until the file changes."""
    with open(path, "rb") as f:
        sig = stat_signature(os.fstat(f.fileno()))
        if cached:
            with _CACHE_LOCK:
                hit = _DIGESTS.get(str(path))
            if hit is not None and hit[0] == sig:
                return hit[1], sig[2]
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        after = stat_signature(os.fstat(f.fileno()))
    if after == sig:
        with _CACHE_LOCK:
            _DIGESTS[str(path)] = (sig, digest)
    return digest, sig[2]


def remember_digest(path: Path, sha: str) -> None:
    """Note that ``path`` (as it is now) has checksum ``sha``: it was just written or renamed."""
    with _CACHE_LOCK:
        _DIGESTS[str(path)] = (stat_signature(os.stat(path)), sha)
