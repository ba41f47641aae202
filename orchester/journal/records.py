"""Journal records: every kind, its code and its fields, with a builder and a checked view for each.

A record is a msgpack list: its code (one letter), then its fields by position. The journal
writes records as ``length | CRC-32 | body`` (:mod:`orchester.journal.wal`), an active server
streams the same lists to its passive peer, and a snapshot is made of them too.

* A **builder** (:func:`submitted`, :func:`transition`, :func:`result`, :func:`satellite_key`,
  :func:`barrier`) returns the list exactly as the orchestrator writes it. It checks nothing:
  the orchestrator builds thousands a second from values it has already checked.
* A **view** (:class:`Submitted`, :class:`Transition`, :class:`Result`, :class:`SatelliteKey`,
  :class:`Barrier`) is made from a decoded list — read back from disk, or received from the
  peer — by :func:`view` or the class's ``of``, which checks its shape: its code, its arity
  and the type of every field. Anything wrong raises :class:`RecordError`, and only that.
  Fields added by later versions are optional at the end of a record: a record of an older
  version has them ``None``. :meth:`Submitted.record` and the like give the list back as
  today's builder writes it.

Cheap unchecked helpers serve the broker's hot path and records no view accepts:
:func:`payload_bytes` and :func:`head`; :func:`without_payload` drops a record's payload and
keeps every other field as it was (retention, finished tasks). :func:`table_rst` is the table
of ``docs/journal.rst`` (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from orchester.errors import OrchesterError, shown
from tracker import TaskState

#: A task accepted (``SUBMIT``), with its payload.
SUBMITTED = "S"
#: A task changed state.
TRANSITION = "T"
#: A task's result (its header and payload frames).
RESULT = "R"
#: The key a satellite id belongs to (CurveZMQ).
SATELLITE_KEY = "K"
#: A snapshot barrier: the records before it are superseded by the snapshot after it.
BARRIER = "Z"

#: Highest attempt number a transition may carry (what a replay accepts).
MAX_ATTEMPT = 1_000_000

#: A record as written and as read back: its code, then its fields.
Record = list[Any]
#: A frame of a payload or a result: ``bytes`` once decoded, a ``memoryview`` while in memory.
Frame = bytes | memoryview

_S_HEADER = 3  #: where an ``S`` record holds its task header
_S_PAYLOAD = 4  #: where an ``S`` record holds its payload frames
_R_FRAMES = 2  #: where an ``R`` record holds its result frames
_WIDTH = 100  #: the docs' table lines


class RecordError(OrchesterError, ValueError):
    """A journal record of the wrong shape: not a list, an unknown arity, a field of the wrong type."""


def _doc(kind: str, text: str) -> dict[str, str]:
    """A field's documentation: its type as msgpack decodes it, and what it holds."""
    return {"type": kind, "doc": text}


def _shape(record: Any, cls: type[_View]) -> None:
    """Check a record's code and arity against its view class."""
    if not isinstance(record, list) or not record:
        raise RecordError(f"a record is a non-empty list, not {type(record).__name__}")
    if record[0] != cls.CODE:
        raise RecordError(f"a {cls.TITLE} record has code {cls.CODE!r}, not {shown(record[0])}")
    low, high = cls.arity()
    if not low <= len(record) <= high:
        span = str(low) if low == high else f"{low} to {high}"
        raise RecordError(f"a {cls.TITLE} record has {span} elements, not {len(record)}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, not {type(value).__name__}")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{what} must be a string or nil, not {type(value).__name__}")
    return value


def _blob(value: Any, what: str) -> bytes:
    if not isinstance(value, (bytes, memoryview)):
        raise RecordError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _frames(value: Any, what: str) -> list[Frame]:
    if not isinstance(value, list) or not all(isinstance(f, (bytes, memoryview)) for f in value):
        raise RecordError(f"{what} must be a list of byte strings")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{what} must be a number, not {type(value).__name__}")
    return float(value)


def _optional_number(value: Any, what: str) -> float | None:
    return None if value is None else _number(value, what)


def _state(value: Any) -> TaskState:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"a task state must be an integer, not {type(value).__name__}")
    try:
        return TaskState(value)
    except ValueError:
        raise RecordError(f"{shown(value)} is no task state") from None


def _count(value: Any, what: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise RecordError(f"{what} must be an integer from 0 to {high}, not {shown(value)}")
    return value


_ARITY: dict[type, tuple[int, int]] = {}  #: each view class's arity, worked out once


class _View:
    """What every view has: its code, a title for messages and docs, and its arity."""

    __slots__ = ()
    CODE: ClassVar[str]
    TITLE: ClassVar[str]
    ABOUT: ClassVar[str] = ""

    @classmethod
    def arity(cls) -> tuple[int, int]:
        """Fewest and most elements a record of this kind has (its code included)."""
        found = _ARITY.get(cls)
        if found is None:
            fs = dataclasses.fields(cls)  # type: ignore[arg-type]
            found = _ARITY[cls] = (1 + sum(1 for f in fs if f.default is dataclasses.MISSING), 1 + len(fs))
        return found


@dataclass(frozen=True, slots=True)
class Submitted(_View):
    """A task accepted: written before its ``ACK``."""

    CODE: ClassVar[str] = SUBMITTED
    TITLE: ClassVar[str] = "task accepted"

    task_id: str = field(metadata=_doc("string", "the task's id"))
    client: bytes = field(metadata=_doc("bytes", "the ZeroMQ identity of the client that submitted it"))
    header: bytes = field(metadata=_doc("bytes", "its ``SUBMIT`` header frame, as received (msgpack)"))
    payload: list[Frame] = field(metadata=_doc("list of bytes", "its payload frames (none once they are dropped: "
                                                                 "retention)"))
    time: float = field(metadata=_doc("number", "when it was accepted (seconds since the epoch)"))
    timeout: float | None = field(default=None, metadata=_doc("number or nil",
                                                              "the client's overall timeout in seconds"))
    owner: str | None = field(default=None, metadata=_doc(
        "string or nil", "the name of the key that submitted it (CurveZMQ); absent in records older than keys"))

    @classmethod
    def of(cls, record: Any) -> Submitted:
        """The view of an ``S`` record; :class:`RecordError` if it has the wrong shape."""
        _shape(record, cls)
        n = len(record)
        return cls(_text(record[1], "a task id"), _blob(record[2], "a client identity"),
                   _blob(record[3], "a task header"), _frames(record[4], "a task's payload"),
                   _number(record[5], "a submission time"),
                   _optional_number(record[6], "a timeout") if n > 6 else None,
                   _optional_text(record[7], "an owner") if n > 7 else None)

    def record(self) -> Record:
        """The record as :func:`submitted` writes it (an older record gains its optional fields, nil)."""
        return submitted(self.task_id, self.client, self.header, self.payload, self.time, self.timeout, self.owner)


@dataclass(frozen=True, slots=True)
class Transition(_View):
    """A task changed state (every ``task:`` event)."""

    CODE: ClassVar[str] = TRANSITION
    TITLE: ClassVar[str] = "transition"

    task_id: str = field(metadata=_doc("string", "the task's id"))
    state: TaskState = field(metadata=_doc("integer", "its new state (:class:`~tracker.TaskState`)"))
    attempt: int = field(metadata=_doc("integer", f"its attempt number, 0 to {MAX_ATTEMPT:,}"))
    satellite: str | None = field(metadata=_doc("string or nil", "the satellite it is on"))
    reason: str | None = field(metadata=_doc("string or nil", "why, in a word or two"))
    time: float | None = field(default=None, metadata=_doc(
        "number", "when (seconds since the epoch); absent in the records of the journal's first version"))

    @classmethod
    def of(cls, record: Any) -> Transition:
        """The view of a ``T`` record; :class:`RecordError` if it has the wrong shape."""
        _shape(record, cls)
        return cls(_text(record[1], "a task id"), _state(record[2]), _count(record[3], "an attempt", MAX_ATTEMPT),
                   _optional_text(record[4], "a satellite id"), _optional_text(record[5], "a reason"),
                   _number(record[6], "a transition time") if len(record) > 6 else None)

    def record(self) -> Record:
        """The record as :func:`transition` writes it; without a time if it had none (the first version's)."""
        if self.time is None:
            return [TRANSITION, self.task_id, int(self.state), self.attempt, self.satellite, self.reason]
        return transition(self.task_id, self.state, self.attempt, self.satellite, self.reason, self.time)


@dataclass(frozen=True, slots=True)
class Result(_View):
    """A task's result: written before the ``RESULT`` goes to the client."""

    CODE: ClassVar[str] = RESULT
    TITLE: ClassVar[str] = "result"

    task_id: str = field(metadata=_doc("string", "the task's id"))
    frames: list[Frame] = field(metadata=_doc(
        "list of bytes", "the result header frame (outcome, attempt, satellite, error), then its payload frames "
                         "(none once they are dropped: retention)"))
    time: float | None = field(default=None, metadata=_doc(
        "number", "when it came (seconds since the epoch); absent in the records of the journal's first version"))

    @classmethod
    def of(cls, record: Any) -> Result:
        """The view of an ``R`` record; :class:`RecordError` if it has the wrong shape."""
        _shape(record, cls)
        frames = _frames(record[2], "a result")
        if not frames:
            raise RecordError("a result has at least its header frame")
        return cls(_text(record[1], "a task id"), frames,
                   _number(record[3], "a result time") if len(record) > 3 else None)

    @property
    def header(self) -> bytes:
        """The result header frame (msgpack)."""
        return bytes(self.frames[0])

    def record(self) -> Record:
        """The record as :func:`result` writes it; without a time if it had none (the first version's)."""
        if self.time is None:
            return [RESULT, self.task_id, [memoryview(f) for f in self.frames]]
        return result(self.task_id, self.frames, self.time)


@dataclass(frozen=True, slots=True)
class SatelliteKey(_View):
    """The key a satellite id belongs to."""

    CODE: ClassVar[str] = SATELLITE_KEY
    TITLE: ClassVar[str] = "satellite key (CurveZMQ)"
    ABOUT: ClassVar[str] = ("written when the id first registers; after a restart only that key may register the "
                            "id and claim its tasks (:doc:`security`)")

    satellite: str = field(metadata=_doc("string", "the satellite's id"))
    key: str = field(metadata=_doc("string", "the name of its key"))
    time: float | None = field(default=None, metadata=_doc("number", "when (seconds since the epoch)"))

    @classmethod
    def of(cls, record: Any) -> SatelliteKey:
        """The view of a ``K`` record; :class:`RecordError` if it has the wrong shape."""
        _shape(record, cls)
        return cls(_text(record[1], "a satellite id"), _text(record[2], "a key name"),
                   _number(record[3], "a time") if len(record) > 3 else None)

    def record(self) -> Record:
        """The record as :func:`satellite_key` writes it; without a time if it had none."""
        if self.time is None:
            return [SATELLITE_KEY, self.satellite, self.key]
        return satellite_key(self.satellite, self.key, self.time)


@dataclass(frozen=True, slots=True)
class Barrier(_View):
    """A snapshot barrier: what came before it is superseded by the snapshot that follows."""

    CODE: ClassVar[str] = BARRIER
    TITLE: ClassVar[str] = "snapshot barrier"
    ABOUT: ClassVar[str] = ("begins a snapshot (:doc:`ha`): found in the journal of a passive server that "
                            "resynchronised")

    subject: str = field(metadata=_doc("string", "empty: a barrier is about no task"))
    time: float = field(metadata=_doc("number", "when the snapshot was taken (seconds since the epoch)"))

    @classmethod
    def of(cls, record: Any) -> Barrier:
        """The view of a ``Z`` record; :class:`RecordError` if it has the wrong shape."""
        _shape(record, cls)
        return cls(_text(record[1], "a barrier's subject"), _number(record[2], "a barrier's time"))

    def record(self) -> Record:
        """The record as :func:`barrier` writes it."""
        return barrier(self.time)


#: A view of any record kind.
View = Submitted | Transition | Result | SatelliteKey | Barrier
#: The view class of each code, in the order of the docs' table.
VIEWS: dict[str, type[Submitted] | type[Transition] | type[Result] | type[SatelliteKey] | type[Barrier]] = {
    c.CODE: c for c in (Submitted, Transition, Result, SatelliteKey, Barrier)}


def view(record: Any) -> View | None:
    """The checked view of a decoded record; ``None`` for a code this version does not know.

    Raises :class:`RecordError` for anything that is not a list starting with a code (a
    string), or for a record of a known code with the wrong shape.
    """
    if not isinstance(record, list) or not record or not isinstance(record[0], str):
        raise RecordError("a record is a non-empty list starting with its code")
    cls = VIEWS.get(record[0])
    return None if cls is None else cls.of(record)


# -- builders ---------------------------------------------------------------------------------------

def submitted(task_id: str, client: bytes, header: bytes, payload: Iterable[Any], time: float,
              timeout: float | None, owner: str | None) -> Record:
    """An ``S`` record: a task accepted. Payload frames are referenced (memoryviews), not copied."""
    return [SUBMITTED, task_id, client, header, [memoryview(f) for f in payload], time, timeout, owner]


def transition(task_id: str, state: int, attempt: int, satellite: str | None, reason: str | None,
               time: float) -> Record:
    """A ``T`` record: a task changed state (``state`` is written as a plain integer)."""
    return [TRANSITION, task_id, int(state), attempt, satellite, reason, time]


def result(task_id: str, frames: Iterable[Any], time: float) -> Record:
    """An ``R`` record: the result header frame and payload frames (referenced, not copied)."""
    return [RESULT, task_id, [memoryview(f) for f in frames], time]


def satellite_key(satellite: str, key: str, time: float) -> Record:
    """A ``K`` record: satellite id ``satellite`` belongs to the key named ``key``."""
    return [SATELLITE_KEY, satellite, key, time]


def barrier(time: float) -> Record:
    """A ``Z`` record: a snapshot taken at ``time`` follows."""
    return [BARRIER, "", time]


# -- unchecked helpers --------------------------------------------------------------------------------

def payload_bytes(record: Record) -> int:
    """Bytes of input payload a record carries: its payload frames for an ``S`` record, else 0.

    Unchecked and cheap (the broker's hot path): a record of another shape counts 0.
    """
    try:
        return sum(map(len, record[_S_PAYLOAD])) if record[0] == SUBMITTED else 0
    except (IndexError, TypeError):
        return 0


#: Where a record of each kind keeps its list of frames (``None``: it has none), for the journal's writer
#: (:func:`orchester.journal.wal.record_chunks`).
FRAMES_AT: dict[str, int | None] = {SUBMITTED: _S_PAYLOAD, TRANSITION: None, RESULT: _R_FRAMES,
                                     SATELLITE_KEY: None, BARRIER: None}


def sizes(record: Record) -> tuple[int, int]:
    """``(payload, large)``: the bytes of input payload a record carries (as :func:`payload_bytes`), and the
    bytes that make it large: an ``S`` record's payload frames and task header, an ``R`` record's result
    frames (its header frame included); 0 for anything else. Unchecked and cheap, as :func:`payload_bytes`."""
    try:
        code = record[0]
        if code == SUBMITTED:
            payload = sum(map(len, record[_S_PAYLOAD]))
            return payload, payload + len(record[_S_HEADER])
        return (0, sum(map(len, record[_R_FRAMES]))) if code == RESULT else (0, 0)
    except (IndexError, TypeError):
        return 0, 0


def head(record: Sequence[Any]) -> tuple[str, str]:
    """The code and subject (a task or satellite id) of any record, known or not, well-formed or not.

    As text, ``""`` where absent: what the index columns of a compacted segment show of a record
    no view accepts (and a cheap look at the records the orchestrator built itself).
    """
    code = record[0] if len(record) > 0 else ""
    subject = record[1] if len(record) > 1 else ""
    return _as_text(code), _as_text(subject)


def _as_text(value: Any) -> str:
    """A scalar as text; a list or map as nothing (one nested a thousand deep cannot be printed)."""
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, (int, float, bytes)) else ""


def without_payload(record: Record) -> Record:
    """A copy of ``record`` without its payload, every other field as it was (its arity too).

    An ``S`` record loses its input frames, an ``R`` record keeps its header frame alone; any
    other record is copied as it is. The record must be one a view accepts.
    """
    out = list(record)
    if out[0] == SUBMITTED:
        out[_S_PAYLOAD] = []
    elif out[0] == RESULT:
        out[_R_FRAMES] = out[_R_FRAMES][:1]
    return out


# -- documentation ------------------------------------------------------------------------------------

def table_rst() -> str:
    """Every record kind as a reStructuredText list-table (in ``docs/journal.rst``; a test keeps them equal)."""
    lines = [".. list-table:: Journal records (:mod:`orchester.journal.records`)", "   :header-rows: 1",
             "   :widths: 18 32 50", "", "   * - record", "     - body", "     - fields"]
    for cls in VIEWS.values():
        fs = dataclasses.fields(cls)
        names = [f.name + ("?" if f.default is not dataclasses.MISSING else "") for f in fs]
        body = ", ".join([f'"{cls.CODE}"', *names])
        lines += [f"   * - {cls.TITLE}", f"     - ``[{body}]``"]
        first = "     - "
        if cls.ABOUT:
            lines += textwrap.wrap(f"{cls.ABOUT[0].upper()}{cls.ABOUT[1:]}.", _WIDTH, initial_indent=first,
                                   subsequent_indent="       ", break_on_hyphens=False) + [""]
            first = "       "
        for f in fs:
            lines += textwrap.wrap(f"``{f.name}`` ({f.metadata['type']}): {f.metadata['doc']}", _WIDTH,
                                   initial_indent=first + "* ", subsequent_indent="         ",
                                   break_on_hyphens=False)
            first = "       "
    return "\n".join(line.rstrip() for line in lines) + "\n"
