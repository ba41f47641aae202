"""The peer link's messages, in one place: every kind, its fields, builders and decoders.

The two servers of a pair talk over PUB/SUB (:class:`~orchester.ha.pair.Pair` owns the sockets).
A message is a list of frames: the kind (``b"STATE"``, ``b"REC"``, ...), a header (a msgpack
map with short keys), and, for the kinds that carry them, one frame per journal record (a
msgpack list, as in the journal). :data:`KINDS` describes each kind and each field of its
header; ``docs/ha.rst`` prints it (:func:`table_rst`).

The builders (:func:`encode_state`, :func:`encode_records`, ...) turn typed values into frames.
:func:`decode` turns frames into a small frozen dataclass per kind (:class:`State`,
:class:`Records`, :class:`Sync`, :class:`Ack`, :class:`Orphans`, :class:`SnapChunk`) after
checking every field (its type and range: no field is a float, so there is nothing to check
for finiteness) and raises :class:`LinkError`, and only that, on anything malformed.
:func:`read` is what a receiver calls: a malformed message is counted (``ha_bad_messages``),
logged and dropped. Once a message has decoded, an exception in handling it is the receiver's
own failure, never blamed on the peer.

Example, a round trip::

    >>> frames = encode_ack("0f3c2a", 41)
    >>> frames[0]
    b'ACK'
    >>> decode(frames)
    Ack(stream='0f3c2a', seq=41)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from orchester.errors import shown
from orchester.ha.star import HAState
from serializers.header import ProtocolError, pack, unpack

log = logging.getLogger("orchester.ha")

STATE: Final = b"STATE"
REC: Final = b"REC"
SYNC: Final = b"SYNC"
ACK: Final = b"ACK"
ORPHANS: Final = b"ORPHANS"
SNAP: Final = b"SNAP"

#: Largest record number, chunk number or acknowledgement accepted (msgpack's signed 64 bits).
MAX_SEQ: Final = 2**63 - 1
#: Longest epoch accepted (an orchestrator's epoch is 16 hexadecimal digits).
MAX_EPOCH: Final = 64
#: The roles a server can be configured in.
ROLES: Final = ("primary", "backup")


class LinkError(ValueError):
    """A peer-link message that does not follow :data:`KINDS`: the peer's fault, counted and dropped."""


# ------------------------------------------------------------------ messages
@dataclass(frozen=True, slots=True)
class State:
    """``STATE``: a server's state, sent by both every heartbeat."""

    state: HAState  #: the sender's state
    role: str  #: how the sender was configured: ``primary`` or ``backup``
    epoch: str  #: the sender's epoch (an active's records are numbered in it)
    last: int  #: the last record the sender journaled (a passive that applied fewer lost some)
    streaming: bool  #: (an active) its passive follows its stream
    stream: str | None = None  #: (a passive) the epoch of the stream it follows
    acked: int | None = None  #: (a passive) its acknowledgement on that stream, repeated

    def __post_init__(self) -> None:
        if (self.stream is None) != (self.acked is None):
            raise LinkError("STATE carries a stream (st) and its acknowledgement (a) together or neither")


@dataclass(frozen=True, slots=True)
class Records:
    """``REC``: journal records streamed by the active, numbered ``first``, ``first + 1``, ..."""

    epoch: str  #: the active's epoch
    first: int  #: the number of the first record
    records: tuple[list[Any], ...]  #: at least one record


@dataclass(frozen=True, slots=True)
class Sync:
    """``SYNC``: a passive asks the active for a snapshot."""

    epoch: str  #: the passive's own epoch


@dataclass(frozen=True, slots=True)
class Ack:
    """``ACK``: a passive's records up to ``seq`` of ``stream`` are in its journal."""

    stream: str  #: the epoch of the stream acknowledged
    seq: int  #: the last record acknowledged


@dataclass(frozen=True, slots=True)
class Orphans:
    """``ORPHANS``: the records of tasks a rejoining passive knew and the active did not (hand-back)."""

    stream: str  #: the epoch of the stream the passive now follows
    records: tuple[list[Any], ...]


@dataclass(frozen=True, slots=True)
class SnapChunk:
    """``SNAP``: one chunk of a snapshot, the active's table as of record ``seq``."""

    epoch: str  #: the active's epoch
    seq: int  #: the last record the snapshot covers; the stream resumes at ``seq + 1``
    index: int  #: the chunk's number, from 0
    last: bool  #: the snapshot's last chunk
    records: tuple[list[Any], ...]


#: Any decoded peer-link message.
Message = State | Records | Sync | Ack | Orphans | SnapChunk


# ------------------------------------------------------------------ field checks
def _natural(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise LinkError(f"an integer from 0 to 2**63 - 1, not {shown(value, 40)}")
    return value


def _epoch(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_EPOCH:
        raise LinkError(f"a string of 1 to {MAX_EPOCH} characters, not {shown(value, 80)}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise LinkError(f"true or false, not {shown(value, 40)}")
    return value


def _state(value: Any) -> HAState:
    if isinstance(value, int) and not isinstance(value, bool):
        with suppress(ValueError):
            return HAState(value)
    raise LinkError(f"a state from 1 to {len(HAState)}, not {shown(value, 40)}")


def _role(value: Any) -> str:
    if value not in ROLES:
        raise LinkError(f"primary or backup, not {shown(value, 40)}")
    return str(value)


def _record(frame: bytes) -> list[Any]:
    try:
        record = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of exception types on garbage
        raise LinkError(f"a record frame is not msgpack: {type(exc).__name__}") from None
    if not isinstance(record, list) or not record or not isinstance(record[0], str):
        raise LinkError(f"a record is a list that starts with its code, not {shown(record)}")
    return record


# ------------------------------------------------------------------ the kinds, as data
@dataclass(frozen=True)
class Field:
    """One field of a header: its key on the wire, the attribute it fills, its check."""

    key: str
    attr: str
    check: Callable[[Any], Any]  #: returns the value, or raises :class:`LinkError`
    value: str  #: its type and range, for the docs
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Kind:
    """One kind of message: who sends it, its header fields, the record frames after them."""

    name: bytes
    message: type[Message]
    sender: str
    fields: tuple[Field, ...]
    min_records: int | None  #: None: no frame after the header; else at least this many records
    doc: str


#: The value columns of the docs' table.
_EPOCH, _NUMBER, _BOOL = "str, 1–64 characters", "int ≥ 0", "bool"
_E_ACTIVE = Field("e", "epoch", _epoch, _EPOCH, "the active's epoch")
KINDS: Final[dict[bytes, Kind]] = {kind.name: kind for kind in (
    Kind(STATE, State, "both", (
        Field("s", "state", _state, "int 1–4", "the sender's state (PRIMARY, BACKUP, ACTIVE, PASSIVE)"),
        Field("role", "role", _role, "``primary``, ``backup``", "how the sender was configured"),
        Field("e", "epoch", _epoch, _EPOCH, "the sender's epoch"),
        Field("q", "last", _natural, _NUMBER, "the last record the sender journaled"),
        Field("f", "streaming", _flag, _BOOL, "an active: its passive follows its stream"),
        Field("st", "stream", _epoch, _EPOCH, "a passive: the stream it follows (with ``a``)", optional=True),
        Field("a", "acked", _natural, _NUMBER, "a passive: its acknowledgement on ``st``, repeated",
              optional=True),
    ), None, "every heartbeat; the peer expires after two heartbeats without one"),
    Kind(REC, Records, "active", (
        _E_ACTIVE,
        Field("q", "first", _natural, _NUMBER, "the number of the first record"),
    ), 1, "journal records as they are written, numbered ``q``, ``q + 1``, ..."),
    Kind(SYNC, Sync, "passive", (
        Field("e", "epoch", _epoch, _EPOCH, "the passive's epoch"),
    ), None, "asks for a snapshot: the passive has none, or saw a gap in the stream"),
    Kind(ACK, Ack, "passive", (
        Field("e", "stream", _epoch, _EPOCH, "the stream acknowledged (the active's epoch)"),
        Field("q", "seq", _natural, _NUMBER, "records up to ``q`` are in the passive's journal"),
    ), None, "acknowledges records once durable (at once without a journal)"),
    Kind(ORPHANS, Orphans, "passive", (
        Field("e", "stream", _epoch, _EPOCH, "the stream the passive now follows"),
    ), 0, "hands back the tasks the passive knew and the new snapshot does not"),
    Kind(SNAP, SnapChunk, "active", (
        _E_ACTIVE,
        Field("q", "seq", _natural, _NUMBER, "the last record the snapshot covers"),
        Field("i", "index", _natural, _NUMBER, "the chunk's number, from 0"),
        Field("last", "last", _flag, _BOOL, "the snapshot's last chunk"),
    ), 0, "a chunk of the snapshot that answers ``SYNC`` (a barrier record first)"),
)}


# ------------------------------------------------------------------ builders
def pack_record(record: list[Any]) -> bytes:
    """One journal record as a record frame (packed when streamed, so the frame is ready to send)."""
    return msgpack.packb(record, use_bin_type=True)


def _encode(kind: bytes, values: dict[str, Any], records: Sequence[bytes] = ()) -> list[bytes]:
    """Frames of a ``kind`` message; ``values`` by attribute name (an optional one may be None)."""
    head = {f.key: values[f.attr] for f in KINDS[kind].fields if values.get(f.attr) is not None}
    return [kind, pack(head), *records]


def encode_state(state: HAState, role: str, epoch: str, last: int, streaming: bool,
                 stream: str | None = None, acked: int = 0) -> list[bytes]:
    """``STATE``; ``stream`` and ``acked`` only from a passive that follows a stream."""
    return _encode(STATE, {"state": int(state), "role": role, "epoch": epoch, "last": last, "streaming": streaming,
                           "stream": stream, "acked": acked if stream is not None else None})


def encode_records(epoch: str, first: int, records: Sequence[bytes]) -> list[bytes]:
    """``REC`` of packed records (:func:`pack_record`) numbered from ``first``."""
    return _encode(REC, {"epoch": epoch, "first": first}, records)


def encode_sync(epoch: str) -> list[bytes]:
    """``SYNC`` from the passive of epoch ``epoch``."""
    return _encode(SYNC, {"epoch": epoch})


def encode_ack(stream: str, seq: int) -> list[bytes]:
    """``ACK`` of the records of ``stream`` up to ``seq``."""
    return _encode(ACK, {"stream": stream, "seq": seq})


def encode_orphans(stream: str, records: Sequence[bytes]) -> list[bytes]:
    """``ORPHANS``: packed records handed back to the active of ``stream``."""
    return _encode(ORPHANS, {"stream": stream}, records)


def encode_snap(epoch: str, seq: int, index: int, last: bool, records: Sequence[bytes]) -> list[bytes]:
    """``SNAP`` chunk ``index`` of the snapshot as of record ``seq``, of packed records."""
    return _encode(SNAP, {"epoch": epoch, "seq": seq, "index": index, "last": last}, records)


# ------------------------------------------------------------------ decoders
def decode(frames: Sequence[bytes]) -> Message:
    """The message ``frames`` carry, every field checked; :class:`LinkError` on anything malformed."""
    if len(frames) < 2:
        raise LinkError(f"a peer message has a kind and a header, not {len(frames)} frame(s)")
    name = bytes(frames[0])
    kind = KINDS.get(name)
    if kind is None:
        raise LinkError(f"unknown message kind {name[:20]!r}")
    label = name.decode()
    try:
        head = unpack(frames[1])
    except ProtocolError as exc:
        raise LinkError(f"{label} header: {exc.detail}") from None
    values: dict[str, Any] = {}
    for field in kind.fields:
        if field.key not in head:
            if field.optional:
                continue
            raise LinkError(f"{label} lacks its field {field.key!r}")
        try:
            values[field.attr] = field.check(head[field.key])
        except LinkError as exc:
            raise LinkError(f"{label} field {field.key!r} must be {exc}") from None
    extra = frames[2:]
    if kind.min_records is None:
        if extra:
            raise LinkError(f"{label} has {len(extra)} frame(s) after its header")
    elif len(extra) < kind.min_records:
        raise LinkError(f"{label} carries no record")
    else:
        try:
            values["records"] = tuple(_record(frame) for frame in extra)
        except LinkError as exc:
            raise LinkError(f"{label}: {exc}") from None
    message: Message = kind.message(**values)
    return message


def read(frames: Sequence[bytes], counters: MutableMapping[str, int]) -> Message | None:
    """:func:`decode`; a malformed message is counted (``ha_bad_messages``), logged and dropped (None)."""
    try:
        return decode(frames)
    except (LinkError, RecursionError, MemoryError) as exc:  # (a value nested a thousand deep is malformed too)
        counters["ha_bad_messages"] += 1
        log.warning("bad message on the peer link: %s", exc)
        return None


def table_rst() -> str:
    """:data:`KINDS` as a reStructuredText list-table (pasted in ``docs/ha.rst``; a test keeps them equal)."""
    lines = [".. list-table::", "   :header-rows: 1", "",
             "   * - message", "     - from", "     - header fields", "     - then", "     - what for"]
    for kind in KINDS.values():
        lines += [f"   * - ``{kind.name.decode()}``", f"     - {kind.sender}"]
        for n, f in enumerate(kind.fields):
            lead = "     - " if n == 0 else "       "
            lines.append(f"{lead}* ``{f.key}`` ({f.value}{', optional' if f.optional else ''}): {f.doc}")
        records = {None: "nothing", 0: "records", 1: "one or more records"}[kind.min_records]
        lines += [f"     - {records}", f"     - {kind.doc}"]
    return "\n".join(lines) + "\n"
