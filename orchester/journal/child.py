"""Reading an HDF5 segment that may be damaged, in a separate process: validation and salvage.

HDF5 is a C library: on a damaged file it raises errors PyTables does not expect, or crashes
the process. A segment this process may not open (no manifest lists its checksum) is read by a
child Python process instead (``python -P -c`` :data:`_CHILD`, which runs :func:`_child_main`),
whose crash or hang cannot take the orchestrator down; it answers with one JSON line.

* :func:`validate` (and :func:`validate_in_subprocess`, remembered until the file changes):
  read everything the orchestrator may read — every record, every column, both indexes — and
  check every record.
* :func:`salvage`: copy the records that still read back to a log segment, all of them when the
  bodies hash to the manifest's figure, else those whose body matches the CRC-32 of its row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import msgpack

from orchester.journal.folder import JournalError, open_private
from orchester.journal.hdf5 import ROWS, identity, read_h5_fields, tables
from orchester.journal.manifest import Signature, stat_signature
from orchester.journal.wal import MAX_RECORD, frame

_ERROR = "orchester-segment-error: "
#: The child's program: it imports this module and runs :func:`_child_main` with its arguments.
_CHILD = "import sys; from orchester.journal.child import _child_main; sys.exit(_child_main(sys.argv[1:]))"
_VALIDATED: dict[str, tuple[Signature, dict[str, Any] | None]] = {}  #: path → validation of unlisted files
_CACHE_LOCK = threading.Lock()


# -- this process's side -----------------------------------------------------------------------------

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


def validate(path: Path) -> tuple[dict[str, Any] | None, str]:
    """Read a segment whole in a separate process: what :func:`validate_in_subprocess` says, and why it failed."""
    return _run_child(["validate", str(path)], path)


def validate_in_subprocess(path: Path) -> dict[str, Any] | None:
    """Read a segment whole in a separate process (a crash there cannot harm this one).

    Returns ``{"records", "bodies_sha256", "bodies_bytes"}`` when every record, every column and
    both indexes read back and every body is a record (and matches its CRC-32, where the segment
    has them), else ``None``. Remembered until the file changes.
    """
    st = os.stat(path)
    with _CACHE_LOCK:
        hit = _VALIDATED.get(str(path))
    if hit is not None and hit[0] == stat_signature(st):
        return hit[1]
    answer, _ = validate(path)
    with _CACHE_LOCK:
        _VALIDATED[str(path)] = (stat_signature(st), answer)
    return answer


def salvage(path: Path, out: Path, expected: str) -> tuple[dict[str, Any] | None, str]:
    """Copy what still reads back of a damaged segment to the log segment ``out``, in a separate process.

    ``expected`` is the SHA-256 of its bodies the manifest lists (``"-"``: unknown). The answer
    says whether the bodies were ``whole``, whether the rows had CRC-32s (``crc``), how many
    ``rows`` and ``records`` were copied, and the file's ``journal`` and ``segment``; ``None``
    and why when the child failed.
    """
    return _run_child(["salvage", str(path), str(out), expected], path)


# -- the child's side ----------------------------------------------------------------------------------

def _validate_file(path: str) -> dict[str, Any]:
    """In the child: read everything the orchestrator may read, check every record (raises if bad)."""
    tb = tables()
    with tb.open_file(path, "r") as h5:
        table, bodies = h5.root.records, h5.root.bodies
        if not isinstance(table, tb.Table) or not isinstance(bodies, tb.EArray):
            raise ValueError("not a journal segment")
        offsets, lengths = table.read(field="offset"), table.read(field="length")
        crcs = table.read(field="crc") if "crc" in table.colnames else None
        far = table.read(field="outside") if "outside" in table.colnames else None
        if far is not None and far.any() and crcs is None:
            raise ValueError("records in a payload file, without CRC-32s to check them by")
        data = bodies.read().tobytes()
        for col in (table.cols.task_id, table.cols.t):
            if col.is_indexed:  # read_where (a spilled payload) goes through them
                col.index.read_sorted()
                col.index.read_indices()
        ident = identity(h5)
    list(read_h5_fields(Path(path)))  # the columns decode (the history reads them)
    expected = 0
    outside = outside_bytes = 0
    for i, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        if far is not None and far[i]:  # its body lies in the payload file, checked when read
            if int(offset) < 0 or not 0 < int(length) <= MAX_RECORD:
                raise ValueError(f"record {i} is out of place")
            outside += 1
            outside_bytes += int(length)
            continue
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
            "outside": outside, "outside_bytes": outside_bytes, **ident}


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
    tb = tables()
    copied = errors = nrows = 0
    has_crc = whole = False
    fd = open_private(out, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f, tb.open_file(path, "r") as h5:
        ident = identity(h5)
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
            for start in range(0, nrows if has_crc else 0, ROWS):
                try:
                    rows = table.read(start, min(start + ROWS, nrows))
                except Exception:
                    errors += 1
                    continue
                far = "outside" in rows.dtype.names
                for row in rows:
                    offset, length = int(row["offset"]), int(row["length"])
                    if offset < 0 or not 0 < length <= MAX_RECORD or (far and row["outside"]):
                        continue  # (a body in the payload file: not in this one)
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
    return {"whole": whole, "crc": has_crc, "rows": nrows, "records": copied, "errors": errors, **ident}


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
