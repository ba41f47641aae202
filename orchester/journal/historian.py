"""The historian: the journal's history index in a process of its own, so that history never costs the bus.

History queries (``orchester history``, the web's tasks and history pages) are answered from a
:class:`~orchester.journal.index.HistoryIndex` of the journal's files. Building it costs about
15 µs per task, and keeping it current costs as much again for every task the bus runs: in the
orchestrator's process that time would be taken from routing (the interpreter runs one thread
at a time). So the index lives in a child process, the historian:

* the orchestrator's :class:`~orchester.journal.writer.HistoryReader` starts it (``python -P -c``
  :data:`_CHILD` with the journal's folder) and hands it the queries the core accepted, one at
  a time, over its standard input; the answers come back on its standard output, ready to send
  (the orchestrator forwards them without decoding them);
* it reads the journal's files only, never writes them; it builds the index at start, then
  reads what the journal gained every :data:`REFRESH_EVERY` seconds, so that a query pays only
  for the last moments' records, never for a day's;
* the bus comes first: it runs at a lower CPU priority (:data:`NICENESS`), and reads on by
  itself only while the machine has idle CPU (:data:`IDLE_CORES`, from ``/proc/stat``) or
  after :data:`MAX_DEFER` seconds without; a query reads on first, whatever the load;
* it ends when its standard input closes (the orchestrator stopped, or died: the pipe closes
  with it) or with the orchestrator's thread that started it (``PR_SET_PDEATHSIG``, Linux);
  ``SIGINT`` and ``SIGHUP`` are the orchestrator's to handle (it stops the historian);
* it fails alone: a crash, a hang (:data:`ANSWER_TIMEOUT`) or a damaged file that kills it makes
  the query it was answering fail with a clear error, and the next query starts a new one.

Frames on both pipes are a 4-byte big-endian length and a msgpack body. A query is
``[token, filters]`` (the filters of :meth:`~orchester.client.sync.Client.history` plus ``rid``,
``viewer``, and ``rollup`` or ``timeline``); an answer is ``[token, ok, body]`` where ``body`` is
the reply's msgpack map (``{"rows", "count", "source", "rid"}``, the roll-up's, or ``{"error"}``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from orchester.journal.folder import JournalError
from orchester.journal.index import HistoryIndex, error_message
from orchester.journal.records import RESULT

log = logging.getLogger("orchester.journal")

#: Seconds between two reads of what the journal gained, while no query comes.
REFRESH_EVERY = 1.0
#: How much lower the historian's CPU priority is than the orchestrator's.
NICENESS = 10
#: Idle CPU (in cores, over the last :data:`REFRESH_EVERY`) the machine must have for the historian to
#: read on by itself: while the machine is busier, it waits (the bus comes first)...
IDLE_CORES = 0.5
#: ...at most this many seconds; a query reads on first, whatever the machine's load.
MAX_DEFER = 30.0
#: Seconds an answer may take before the historian is taken for hung (and replaced); the index's first
#: build, before the historian says it is ready, is not timed: it takes what the journal holds.
ANSWER_TIMEOUT = 600.0
#: The token of the frame a historian sends once its index is built (queries count from 1).
_READY = 0
#: Most rows of one answer (the newest matching; as many without a ``limit``): what one query costs the
#: historian, the pipe and the orchestrator, who holds the answer until it is sent, whatever the journal holds.
MAX_ROWS = 10_000
#: Most bytes of one frame (a query is small; an answer holds at most :data:`MAX_ROWS` rows).
MAX_FRAME = 1 << 30

_LENGTH = struct.Struct(">I")
_CHILD = ("import sys; from orchester.journal.historian import main; sys.exit(main(sys.argv[1:]))")
_PR_SET_PDEATHSIG = 1
#: The folder ``orchester`` (and ``serializers``, ``tracker``) is imported from.
_ROOT = Path(__file__).resolve().parents[2]


class HistorianGone(Exception):
    """The historian stopped, hung or answered nonsense: it is replaced at the next query."""


# -- the queries -------------------------------------------------------------------------------------

def history(directory: Path, filters: dict[str, Any], index: HistoryIndex | None = None) -> list[dict[str, Any]]:
    """History rows from a journal folder (through ``index``, refreshed first; a new one when not given).

    A failed task's ``error`` is its type and message; the message only for the rows of the
    key named by the ``viewer`` filter (``None`` or absent: every row — no keys, or an admin).
    With ``timeline`` true, each row also has its ``history``: every transition, read back from
    the journal (:meth:`~orchester.journal.index.HistoryIndex.timeline`); the transitions' reasons
    only for the rows whose message the viewer may read (a failure's reason is its message: a
    timeout's, a quarantine's with the worker's last words).
    """
    filters = dict(filters)
    viewer = filters.pop("viewer", None)
    timeline = bool(filters.pop("timeline", False))
    index = index if index is not None else HistoryIndex(directory)
    index.refresh()
    rows = index.rows(filters)
    _add_messages(directory, rows, index.messages, viewer)
    if timeline:
        for row in rows:
            entries = index.timeline(row["id"])
            if viewer is not None and row["owner"] != viewer:
                for entry in entries:
                    entry["reason"] = None
            row["history"] = entries
    return rows


def answer(index: HistoryIndex, filters: dict[str, Any]) -> dict[str, Any]:
    """The reply map to one query (see the module's docstring): rows, or roll-ups with ``rollup``."""
    f = dict(filters)
    rid = f.pop("rid", None)
    if "rollup" in f:
        index.refresh()
        body = {**index.rollup(f["since"], f["until"], f["rollup"], f.get("kind"), f.get("tag")), "source": "journal"}
    else:
        limit = f.get("limit")
        f["limit"] = MAX_ROWS if limit is None or limit < 0 else min(limit, MAX_ROWS)
        rows = history(index.dir, f, index)
        body = {"rows": rows, "count": len(rows), "source": "journal"}
    body["rid"] = rid
    return body


def _add_messages(directory: Path, rows: list[dict[str, Any]], messages: dict[str, str], viewer: str | None) -> None:
    """Complete the ``error`` of the failed rows the viewer may read with the error's message (from the
    index's ``messages``, else from the compacted segments, newest first, through their task id index).

    What a search finds, or not (``""``), goes into ``messages``: a failed task without a message
    (there are: a satellite may send none) is searched for once, not at every query.
    """
    from orchester.journal.segments import read_task_record, verified_parts

    wanted = {r["id"] for r in rows if r["error"] and (viewer is None or r["owner"] == viewer)}
    missing = wanted - set(messages)
    if missing:
        for path, kind in reversed(verified_parts(directory)):
            if kind != "h5" or not missing:
                continue
            for tid in list(missing):
                try:
                    record = read_task_record(path, tid, RESULT)
                except JournalError:
                    break
                if record is not None:
                    messages[tid] = error_message(record)
                    missing.discard(tid)
        for tid in missing:
            messages[tid] = ""
    for row in rows:
        msg = messages.get(row["id"]) if row["id"] in wanted else None
        if msg:
            row["error"] = f"{row['error']}: {msg}"


# -- frames ----------------------------------------------------------------------------------------

def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd`` (``None``: end of file first); :class:`TimeoutError` past ``deadline``."""
    parts: list[bytes] = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_frame(fd: int, deadline: float | None = None) -> bytes | None:
    head = _read_exact(fd, _LENGTH.size, deadline)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"a frame of {length:,} bytes")
    return _read_exact(fd, length, deadline)


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


# -- the orchestrator's side -------------------------------------------------------------------------

class Historian:
    """The historian process of one journal folder, from the orchestrator's side (one thread uses it)."""

    def __init__(self, directory: Path) -> None:
        if not sys.executable:
            raise JournalError(f"journal {directory}: no Python executable to start the historian with")
        # -P: nothing imported from the working folder; the folder this orchester comes from is named
        # instead (a checkout run as ``python -m orchester`` from it, not installed, imports from there)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", _CHILD, str(directory)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
        self.ready = False  #: its index is built (it said so)

    def wait_ready(self, timeout: float | None) -> bool:
        """Wait at most ``timeout`` seconds (``None``: as long as it takes) for the historian to have
        built its index; whether it has. Raises :class:`HistorianGone` if it ended or said nonsense."""
        if self.ready:
            return True
        try:
            raw = _read_frame(self._stdout.fileno(), None if timeout is None else time.monotonic() + timeout)
        except TimeoutError:
            return False
        except (OSError, ValueError) as exc:
            raise HistorianGone(f"the history process failed: {exc}") from None
        if raw is None:
            code = self.proc.poll()
            raise HistorianGone("the history process ended" + ("" if code is None else f" (exit code {code})"))
        try:
            got = msgpack.unpackb(raw, raw=False)
        except ValueError as exc:
            raise HistorianGone(f"the history process answered nonsense: {exc}") from None
        if not (isinstance(got, list) and got and got[0] == _READY):
            raise HistorianGone("the history process answered before it was ready")
        self.ready = True
        return True

    def ask(self, token: int, filters: dict[str, Any], timeout: float = ANSWER_TIMEOUT) -> tuple[bool, bytes]:
        """Send one query; ``(ok, body)``: the reply's msgpack map, ready to send. Raises
        :class:`HistorianGone` when the historian ended, hung past ``timeout`` or answered nonsense;
        :class:`ValueError` for a query that cannot be sent (nothing was: the historian is fine).
        A historian that is still building its index is waited for first, however long that takes."""
        self.wait_ready(None)
        try:
            query = _frame(msgpack.packb([token, filters], use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"a history query that cannot be sent: {exc}") from None
        try:
            _write_all(self._stdin.fileno(), query)
            raw = _read_frame(self._stdout.fileno(), time.monotonic() + timeout)
        except (OSError, ValueError) as exc:
            raise HistorianGone(f"the history process failed: {exc}") from None
        except TimeoutError:
            raise HistorianGone(f"the history process gave no answer in {timeout:.0f} s") from None
        if raw is None:
            code = self.proc.poll()
            raise HistorianGone("the history process ended" + ("" if code is None else f" (exit code {code})"))
        try:
            got, ok, body = msgpack.unpackb(raw, raw=False)
        except (ValueError, TypeError) as exc:
            raise HistorianGone(f"the history process answered nonsense: {exc}") from None
        if got != token or not isinstance(body, bytes):
            raise HistorianGone("the history process answered another query")
        return bool(ok), body

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def terminate(self) -> None:
        """Send it ``SIGTERM`` (its pipes stay open: the thread reading them sees them end)."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        """Kill it and reap it (its pipes stay open)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        """Close its input (it ends by itself), then terminate it, then kill it."""
        for pipe in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        try:
            self.proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the historian's side --------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask Linux for a SIGTERM when the orchestrator's thread that started this process ends."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the end of standard input stops it
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class IdleCpu:
    """The machine's idle CPU since the last look, in cores (from ``/proc/stat``; elsewhere: always idle)."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", "rb") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    def cores(self) -> float:
        """Idle cores, on average, since the previous call."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return float(os.cpu_count() or 1)
        return (now[1] - last[1]) / (now[0] - last[0]) * (os.cpu_count() or 1)


def _refresh(index: HistoryIndex) -> None:
    try:
        index.refresh()
    except Exception:  # a query will say what is wrong; the historian goes on
        log.exception("the history index could not be brought up to date")


def main(argv: list[str]) -> int:
    """The historian's loop (see the module's docstring): ``argv`` is the journal's folder."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    if len(argv) != 1:
        print("usage: historian JOURNAL_DIR", file=sys.stderr)
        return 2
    # answers go to a private copy of standard output; whatever else prints lands on standard error
    out = os.dup(1)
    os.dup2(2, 1)
    inp = 0
    with contextlib.suppress(OSError):  # (already as low as it goes)
        os.nice(NICENESS)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s orchester-historian %(levelname)s %(message)s")
    index = HistoryIndex(Path(argv[0]))
    _refresh(index)
    try:  # built: from here on, its answers are timed
        _write_all(out, _frame(msgpack.packb([_READY, True, b""], use_bin_type=True)))
    except BrokenPipeError:
        return 0
    idle = IdleCpu()
    last = time.monotonic()
    while True:
        if not select.select([inp], [], [], REFRESH_EVERY)[0]:
            now = time.monotonic()
            if idle.cores() >= IDLE_CORES or now - last >= MAX_DEFER:
                _refresh(index)
                last = time.monotonic()
            continue
        last = time.monotonic()  # (the query reads on first)
        try:
            raw = _read_frame(inp)
        except ValueError as exc:
            log.error("a query that is no query: %s; the historian stops", exc)
            return 2
        if raw is None:
            return 0
        try:
            token, filters = msgpack.unpackb(raw, raw=False)
        except (ValueError, TypeError) as exc:
            log.error("a query that is no query: %s; the historian stops", exc)
            return 2
        try:
            body, ok = msgpack.packb(answer(index, filters), use_bin_type=True), True
        except Exception as exc:
            log.exception("history query failed")
            body, ok = msgpack.packb({"error": f"{type(exc).__name__}: {exc}"}, use_bin_type=True), False
        try:
            _write_all(out, _frame(msgpack.packb([token, ok, body], use_bin_type=True)))
        except BrokenPipeError:
            return 0
