"""Typed messages: every command's header fields, named and checked in one place.

Each command has a dataclass here (read-only by convention: not frozen, because a frozen
dataclass costs about 0.5 µs more to make, and a task makes about ten of them on its way).
``decode(header)`` checks every field of a decoded header map (type, range, finite, printable, bounded) and raises only
:class:`~serializers.header.ProtocolError`; ``header()`` gives the map back with the wire's
short keys (a field left unset is omitted, as the senders always omitted it), ``encode()`` the
header frame and ``frames()`` the message without its payload. For a valid message,
``decode(unpack(m.encode())) == m``.

* What the orchestrator receives (:data:`INBOUND`, picked by :func:`decode`): from clients
  :class:`Submit`, :class:`Status`, :class:`Fetch`, :class:`Cancel`, :class:`Control`,
  :class:`History`, :class:`Heartbeat`; from satellites :class:`Register`, :class:`Started`,
  :class:`Done`, :class:`Progress`, :class:`Leave`, :class:`Heartbeat`; from either
  :class:`PeerError`. Clients and satellites build what they send with these classes.
* What the orchestrator sends: to clients (:data:`TO_CLIENT`, :func:`decode_for_client`)
  :class:`Ack`, :class:`Result`, :class:`Reply`, :class:`Error`, :class:`Beat`; to satellites
  (:data:`TO_SATELLITE`, :func:`decode_for_satellite`) :class:`Welcome`, :class:`Dispatch`,
  :class:`Abort`, :class:`Reconnect`, :class:`Beat`, :class:`Error`. The orchestrator builds them
  with the builders at the end (:func:`welcome`, :func:`ack`, ...), which use the same classes.

The orchestrator decodes a message once, before anything changes; past that point any exception
is its own (the one error boundary of :mod:`orchester.server.core`). Clients and satellites decode
what they receive the same way: a malformed message is theirs to count and drop, never an
exception in their I/O loop.

Several messages travel as one ``BATCH`` (:func:`batch`, read back by :func:`unbatch`): each keeps its
command, header and payload frames, and is decoded and answered as if it had come alone. Their small
frames travel packed in one body frame, so a batch costs one send and one receive, not one per frame.

The short keys of the wire (``"k"`` for a task's kind, ``"a"`` for its attempt, ...) are spelled
only here. ``docs/protocol.rst`` is the specification and names this module as the reference of
every header's fields.

Example, a round trip::

    >>> frames = Fetch("3f2a", rid=7).frames()
    >>> frames[2]
    b'\\x82\\xa2id\\xa43f2a\\xa3rid\\x07'
    >>> Fetch.decode(unpack(frames[2]))
    Fetch(id='3f2a', rid=7)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, ClassVar, Self

from . import protocol as P
from .codecs import MAX_CODEC_NAME, PICKLE_CONSENT, header_codec
from .header import (
    MAX_HEADER,
    MAX_NAME,
    MAX_PRIORITY,
    MAX_SECONDS,
    ProtocolError,
    check_signature,
    names,
    number,
    pack,
    text,
    unpack,
)
from .header import field as typed

#: Most tasks a REGISTER may claim back (``running`` and ``recent``), an ACK acknowledge or a HISTORY name.
MAX_CLAIMS = 100_000
#: Most tasks one HISTORY may ask the timelines of (each is read back from the journal's files).
MAX_TIMELINES = 10
#: Most entries of a satellite's self-report (``m`` of its heartbeat) kept; keys cut to 64 characters.
MAX_REPORT = 64
#: Most kinds one satellite may offer.
MAX_KINDS = 4096
#: A request id is echoed in the answer: a string of at most this many characters, or an integer.
MAX_RID = 256
#: Longest satellite id.
MAX_SID = 128
#: Longest error code (``code`` of an ERROR).
MAX_CODE = 64
#: Most array frames a payload may announce (``arr``), and most dimensions of each.
MAX_ARRAYS = 100_000
MAX_DIMS = 64
#: Most tasks one task may wait for (``after``): a fan-in of this many is one SUBMIT.
MAX_AFTER = 20_000
#: Largest SUBMIT header (the one header that lists task ids by the thousand: ``after``); the header
#: travels to the satellite unchanged, which reads it with the same limit. Other headers are at most
#: :data:`~serializers.header.MAX_HEADER`.
MAX_TASK_HEADER = 1024 * 1024
#: Most cores one task may ask for, and one satellite announce.
MAX_CORES = 65_536
#: Most light tasks one satellite may take in flight at once (REGISTER ``light``).
MAX_LIGHT = 65_536
#: Light tasks a satellite with light kinds takes in flight beside its slots, by default (``satellite run
#: --light-credit``).
LIGHT_CREDIT = 128
#: Most bytes of memory one task may ask for, and one satellite announce (1 PiB).
MAX_MEMORY = 2**50
#: What a task whose dependency did not succeed does: fail (the default) or run anyway.
ON_FAILURE = ("fail", "run")
#: Longest batch job id a satellite or an autoscaler names (Slurm's ``123_4``, PBS's ``123.server``).
MAX_JOB = 128
#: Most jobs one autoscaler reports (``CONTROL jobs``).
MAX_JOBS_REPORTED = 4096
#: A reported job's states: pending in the scheduler's queue, running, or ending (drained, to be cancelled).
JOB_STATES = ("pending", "running", "ending")
#: Satellites a STATUS summary lists when it does not say (``sats``); the fleet is summed up whatever its size.
SATELLITES_SHOWN = 100
#: Most satellites one STATUS page lists (``sats``).
MAX_SATELLITES_PAGE = 1000
#: Largest REPLY header a client takes (a status of a large fleet, many history rows); other
#: headers are at most :data:`~serializers.header.MAX_HEADER`.
MAX_REPLY = 256 * 1024 * 1024

RequestId = int | str | None
_NO_TAGS: frozenset[str] = frozenset()
#: ``(dtype, shape)`` of each array frame of a payload (``arr`` on the wire: ``[[dtype, [dims]], ...]``).
Arrays = tuple[tuple[str, tuple[int, ...]], ...]


# ------------------------------------------------------------------ field checks
def _rid(hdr: dict[str, Any]) -> RequestId:
    """The request id a client chose (echoed in the reply): an int, a short string, or absent."""
    rid = hdr.get("rid")
    if rid is None or (isinstance(rid, int) and not isinstance(rid, bool) and -2**63 <= rid < 2**64):
        return rid
    if isinstance(rid, str) and len(rid) <= MAX_RID:
        return rid
    raise ProtocolError(P.E_MALFORMED, "header field 'rid' must be an integer or a string of at most "
                        f"{MAX_RID} characters")


def _attempt(hdr: dict[str, Any], key: str = "a", default: Any = ...) -> Any:
    return number(hdr, key, 0, 2**31, default, integer=True)


def _optional_text(hdr: dict[str, Any], key: str, limit: int) -> str | None:
    """A string field that may be absent or nil (``None``), checked as :func:`~serializers.header.text` otherwise."""
    if hdr.get(key) is None:
        return None
    value: str = text(hdr, key, limit=limit)
    return value


def _flag(hdr: dict[str, Any], key: str) -> bool:
    """A boolean field, false when absent (``1`` is no boolean)."""
    return bool(typed(hdr, key, bool, False))


def _claims(hdr: dict[str, Any], key: str) -> tuple[tuple[str, int], ...]:
    """``[[task id, attempt], ...]``: the tasks a registering satellite runs or just ran."""
    items = typed(hdr, key, list, [])
    if len(items) > MAX_CLAIMS:
        raise ProtocolError(P.E_MALFORMED, f"REGISTER lists more than {MAX_CLAIMS:,} tasks in {key!r}")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            raise ProtocolError(P.E_MALFORMED, f"REGISTER {key} entries are [task id, attempt]")
        out.append((item[0], item[1]))
    return tuple(out)


def _dimension(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63


def _arrays(hdr: dict[str, Any]) -> Arrays:
    """``arr``: ``[dtype, [dims]]`` of each array frame that follows the body (none when absent)."""
    if "arr" not in hdr:
        return ()
    items = typed(hdr, "arr", list)
    if len(items) > MAX_ARRAYS:
        raise ProtocolError(P.E_MALFORMED, f"header field 'arr' announces more than {MAX_ARRAYS:,} arrays")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and 0 < len(item[0]) <= 64
                and isinstance(item[1], list) and len(item[1]) <= MAX_DIMS and all(map(_dimension, item[1]))):
            raise ProtocolError(P.E_MALFORMED, "header field 'arr' must list [dtype, [dimensions]] for each "
                                "array frame")
        out.append((item[0], tuple(item[1])))
    return tuple(out)


def _arr(arrays: Arrays) -> list[list[Any]]:
    return [[dtype, list(shape)] for dtype, shape in arrays]


def arrays_of(meta: Iterable[Sequence[Any]]) -> Arrays:
    """The array descriptions :func:`serializers.codecs.encode` returns (``[[dtype, [dims]], ...]``),
    as the ``arrays`` field of a :class:`Submit` or :class:`Done`."""
    return tuple((str(m[0]), tuple(int(n) for n in m[1])) for m in meta)


class Wire(ABC):
    """What every message class has: its command, its header map and frames.

    Subclasses are dataclasses (read-only by convention) with a ``decode(header)`` class method that checks every
    field and raises only :class:`~serializers.header.ProtocolError`.
    """

    __slots__ = ()
    command: ClassVar[bytes]

    @abstractmethod
    def header(self) -> dict[str, Any]:
        """The header map with the wire's short keys; unset optional fields are left out."""

    def encode(self) -> bytes:
        """The header frame (msgpack)."""
        return pack(self.header())

    def frames(self) -> list[bytes]:
        """``[SIGNATURE, COMMAND, HEADER]``: the message without payload frames (and without the
        routing envelope a ROUTER puts before it)."""
        return [P.SIGNATURE, self.command, self.encode()]


# ---------------------------------------------------------------- clients -> orchestrator
@dataclass(slots=True)
class Submit(Wire):
    """SUBMIT: a task. The header frame is forwarded to the satellite as the client sent it.

    The same field checks run on a journal's submission records at replay, so a record that a live
    orchestrator would refuse as malformed can never reach the timer wheel after a restart. (The
    consent to a pickle-coded task is not asked again at replay: each DISPATCH carries the consent of
    the server that sends it, and a satellite decodes pickle only with it.)
    """

    command: ClassVar[bytes] = P.SUBMIT
    id: str
    kind: str
    priority: int = 0
    tags: frozenset[str] = frozenset()
    timeout: float | None = None  #: the client's overall timeout (``None`` for none)
    ttl: float = 0.0  #: time-to-live in the queue (0 for the orchestrator's default)
    max_run: float = 0.0  #: maximum run time (0 for the orchestrator's default)
    duration: float = 0.0  #: expected run time (0 if unknown)
    codec: str = "msgpack"  #: how the payload is encoded (checked against the server's consent apart)
    arrays: Arrays = ()  #: ``(dtype, shape)`` of each array frame after the body
    after: tuple[str, ...] = ()  #: the tasks it waits for (each must be known when it is submitted)
    refs: tuple[int, ...] = ()  #: which of ``after`` its payload takes the result of (indexes, ascending)
    run_on_failure: bool = False  #: runs even when a dependency did not succeed (``on_failure="run"``)
    cores: int = 1  #: cores it needs (a satellite's credit is counted in cores)
    memory: int = 0  #: bytes of memory it needs (0: not said)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Submit:
        """Check and convert a decoded SUBMIT header (an absent optional field is not looked at twice:
        this runs for every task)."""
        timeout = number(hdr, "to", -MAX_SECONDS, MAX_SECONDS) if "to" in hdr else None
        after: tuple[str, ...] = ()
        refs: tuple[int, ...] = ()
        if _WORKFLOW_KEYS.isdisjoint(hdr):  # (most tasks: one test, in C)
            run, cores, memory = False, 1, 0
        else:
            after, refs, run = _after(hdr)
            cores = number(hdr, "cr", 1, MAX_CORES, 1, integer=True)
            memory = number(hdr, "mem", 0, MAX_MEMORY, 0, integer=True)
        return cls(
            text(hdr, "id"), text(hdr, "k"),
            number(hdr, "p", -MAX_PRIORITY, MAX_PRIORITY, integer=True) if "p" in hdr else 0,
            frozenset(names(hdr, "tg")) if "tg" in hdr else _NO_TAGS,
            float(timeout) if timeout is not None and timeout > 0 else None,
            max(0.0, float(number(hdr, "ttl", -MAX_SECONDS, MAX_SECONDS))) if "ttl" in hdr else 0.0,
            max(0.0, float(number(hdr, "mr", -MAX_SECONDS, MAX_SECONDS))) if "mr" in hdr else 0.0,
            max(0.0, float(number(hdr, "dur", -MAX_SECONDS, MAX_SECONDS))) if "dur" in hdr else 0.0,
            header_codec(hdr),
            _arrays(hdr) if "arr" in hdr else (),
            after, refs, run, cores, memory,
        )

    def header(self) -> dict[str, Any]:
        """``{id, k, c, p?, tg?, to?, ttl?, mr?, dur?, arr?, af?, rf?, of?, cr?, mem?}``: ``c`` always; the
        others when set (``to`` whenever a timeout is given; a zero priority, time-to-live, run time,
        duration or memory, one core, no dependency and ``on_failure="fail"`` are the defaults and left
        out); tags sorted."""
        return _submit_header(self.id, self.kind, self.codec, self.priority, self.tags, self.timeout, self.ttl,
                              self.max_run, self.duration, self.arrays, self.after, self.refs, self.run_on_failure,
                              self.cores, self.memory)

    @property
    def on_failure(self) -> str:
        """``"run"`` or ``"fail"``: what it does when a dependency did not succeed."""
        return "run" if self.run_on_failure else "fail"

    @property
    def referenced(self) -> tuple[str, ...]:
        """The dependencies whose results its payload takes (``after`` at the indexes ``refs``)."""
        return tuple(self.after[i] for i in self.refs)


#: The SUBMIT fields of dependencies and resources.
_WORKFLOW_KEYS = frozenset({"af", "rf", "of", "cr", "mem"})


def _after(hdr: dict[str, Any]) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
    """``af`` (distinct task ids, at most :data:`MAX_AFTER`), ``rf`` (ascending indexes into ``af``) and
    ``of`` (``"fail"`` or ``"run"``) of a SUBMIT header."""
    listed = typed(hdr, "af", list, [])
    if len(listed) > MAX_AFTER:
        raise ProtocolError(P.E_MALFORMED, f"a task may wait for at most {MAX_AFTER:,} tasks ('af')")
    after = tuple(names(hdr, "af", [], limit=MAX_AFTER)) if listed else ()
    if len(set(after)) != len(after):
        raise ProtocolError(P.E_MALFORMED, "header field 'af' names a task twice")
    if "id" in hdr and hdr["id"] in after:
        raise ProtocolError(P.E_MALFORMED, "a task cannot wait for itself ('af')")
    refs = typed(hdr, "rf", list, [])
    last = -1
    for i in refs:
        if type(i) is not int or not last < i < len(after):
            raise ProtocolError(P.E_MALFORMED, "header field 'rf' must list ascending indexes into 'af'")
        last = i
    run = text(hdr, "of", "fail", limit=8)
    if run not in ON_FAILURE:
        raise ProtocolError(P.E_MALFORMED, f"header field 'of' must be one of {list(ON_FAILURE)}")
    return after, tuple(refs), run == "run"


def _submit_header(task_id: str, kind: str, codec: str, priority: int, tags: Iterable[str], timeout: float | None,
                   ttl: float, max_run: float, duration: float, arrays: Arrays, after: Sequence[str] = (),
                   refs: Sequence[int] = (), run_on_failure: bool = False, cores: int = 1,
                   memory: int = 0) -> dict[str, Any]:
    """A SUBMIT header (:meth:`Submit.header`, and :func:`submit` without building the message)."""
    hdr: dict[str, Any] = {"id": task_id, "k": kind, "c": codec}
    if priority:
        hdr["p"] = priority
    if tags:
        hdr["tg"] = sorted(set(tags), key=str)
    if timeout is not None:
        hdr["to"] = timeout
    if ttl:
        hdr["ttl"] = ttl
    if max_run:
        hdr["mr"] = max_run
    if duration:
        hdr["dur"] = duration
    if arrays:
        hdr["arr"] = _arr(arrays)
    if after:
        hdr["af"] = list(after)
    if refs:
        hdr["rf"] = list(refs)
    if run_on_failure:
        hdr["of"] = "run"
    if cores != 1:
        hdr["cr"] = cores
    if memory:
        hdr["mem"] = memory
    return hdr


@dataclass(slots=True)
class Status(Wire):
    """STATUS: the summary (no ``task``) or one task (``task``: its id).

    A summary lists at most ``sats`` satellites (:data:`SATELLITES_SHOWN` when absent, at most
    :data:`MAX_SATELLITES_PAGE`), those whose id sorts after ``after`` (a page's ``next``): the
    fleet as a whole is summed up in the reply's ``fleet``, whatever its size."""

    command: ClassVar[bytes] = P.STATUS
    rid: RequestId = None
    task: str | None = None
    sats: int | None = None
    after: str | None = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Status:
        """Check a STATUS header."""
        sats = number(hdr, "sats", 0, MAX_SATELLITES_PAGE, None, integer=True)
        return cls(_rid(hdr), text(hdr, "task", None), sats, _optional_text(hdr, "after", MAX_SID))

    def header(self) -> dict[str, Any]:
        """``{task?, sats?, after?, rid}``."""
        hdr: dict[str, Any] = {}
        if self.task is not None:
            hdr["task"] = self.task
        if self.sats is not None:
            hdr["sats"] = self.sats
        if self.after is not None:
            hdr["after"] = self.after
        if self.rid is not None:
            hdr["rid"] = self.rid
        return hdr


@dataclass(slots=True)
class Fetch(Wire):
    """FETCH: a task's result (or its state, and delivery to this connection when it ends)."""

    command: ClassVar[bytes] = P.FETCH
    id: str
    rid: RequestId = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Fetch:
        """Check a FETCH header."""
        return cls(text(hdr, "id"), _rid(hdr))

    def header(self) -> dict[str, Any]:
        """``{id, rid}``."""
        return {"id": self.id} if self.rid is None else {"id": self.id, "rid": self.rid}


@dataclass(slots=True)
class Cancel(Wire):
    """CANCEL: end a task that has not finished."""

    command: ClassVar[bytes] = P.CANCEL
    id: str
    rid: RequestId = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Cancel:
        """Check a CANCEL header."""
        return cls(text(hdr, "id"), _rid(hdr))

    def header(self) -> dict[str, Any]:
        """``{id, rid}``."""
        return {"id": self.id} if self.rid is None else {"id": self.id, "rid": self.rid}


#: The CONTROL fields :class:`Control` names; any other is an operation's own (``fields``).
_CONTROL_KEYS = frozenset({"op", "name", "sid", "force", "rid"})


@dataclass(frozen=True, slots=True)
class JobsReport:
    """What an autoscaler says of its batch jobs (``CONTROL`` operation ``jobs``): the orchestrator keeps the
    last report of each tag and shows it in ``status``, ``top``, the web page and carbon."""

    tag: str  #: the autoscaler's tag (its jobs' names carry it)
    scheduler: str  #: slurm or pbs
    jobs: tuple[tuple[str, str, float], ...] = ()  #: [job id, state (:data:`JOB_STATES`), seconds since submitted]
    max_jobs: int = 0
    min_jobs: int = 0
    error: str = ""  #: the scheduler's last error, while it lasts ("" when the last command worked)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> JobsReport:
        """Check the fields of a ``jobs`` report (every job before any is kept)."""
        items = typed(hdr, "jobs", list)
        if len(items) > MAX_JOBS_REPORTED:
            raise ProtocolError(P.E_MALFORMED, f"a jobs report lists at most {MAX_JOBS_REPORTED} jobs")
        jobs = []
        for item in items:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                    and 0 < len(item[0]) <= MAX_JOB and item[0].isprintable() and item[1] in JOB_STATES
                    and isinstance(item[2], (int, float)) and not isinstance(item[2], bool)
                    and math.isfinite(item[2]) and 0 <= item[2] <= MAX_SECONDS):
                raise ProtocolError(P.E_MALFORMED, "jobs are [job id, pending|running|ending, seconds since "
                                    "submitted]")
            jobs.append((item[0], item[1], float(item[2])))
        if len({job for job, _, _ in jobs}) != len(jobs):
            raise ProtocolError(P.E_MALFORMED, "a jobs report names each job once")
        scheduler = text(hdr, "scheduler", limit=16)
        max_jobs = number(hdr, "max", 0, MAX_JOBS_REPORTED, 0, integer=True)
        min_jobs = number(hdr, "min", 0, MAX_JOBS_REPORTED, 0, integer=True)
        error = typed(hdr, "error", str, "")
        return cls(text(hdr, "tag", limit=64), scheduler, tuple(jobs), max_jobs, min_jobs,
                   "".join(c if c.isprintable() else " " for c in error[:500]))

    def header(self) -> dict[str, Any]:
        """``{tag, scheduler, jobs: [[id, state, age]], max, min, error?}`` (the fields of the CONTROL)."""
        hdr: dict[str, Any] = {"tag": self.tag, "scheduler": self.scheduler,
                               "jobs": [[j, st, round(age, 1)] for j, st, age in self.jobs],
                               "max": self.max_jobs, "min": self.min_jobs}
        if self.error:
            hdr["error"] = self.error
        return hdr


@dataclass(slots=True)
class Control(Wire):
    """CONTROL: an operator's operation (``strategy``, ``drain``, ``promote``, ``peer_link``, ``jobs``).

    ``fields`` keeps the header for the binary-star operations, which check their own fields
    (``up`` of the ``peer_link`` test hook); when encoding, its keys other than those named here
    follow the named ones.
    """

    command: ClassVar[bytes] = P.CONTROL
    op: str
    rid: RequestId = None
    name: str | None = None  #: the routing strategy to switch to (``strategy``)
    sid: str | None = None  #: the satellite to drain (``drain``)
    force: bool = False  #: even while the peer is active and alive (``promote``)
    fields: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    report: JobsReport | None = field(default=None, compare=False, repr=False)  #: ``jobs``: checked fields

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Control:
        """Check a CONTROL header (the operation's own fields are checked when it needs them)."""
        op = text(hdr, "op", limit=64)
        name = text(hdr, "name", limit=4096) if op == "strategy" else None
        sid = text(hdr, "sid", limit=MAX_SID) if op == "drain" else None
        force = _flag(hdr, "force") if op == "promote" else False
        report = JobsReport.decode(hdr) if op == "jobs" else None
        return cls(op, _rid(hdr), name, sid, force, hdr, report)

    def header(self) -> dict[str, Any]:
        """``{op, name?, sid?, force?, …, rid}``: ``force`` for ``promote`` only."""
        hdr: dict[str, Any] = {"op": self.op}
        if self.name is not None:
            hdr["name"] = self.name
        if self.sid is not None:
            hdr["sid"] = self.sid
        if self.op == "promote":
            hdr["force"] = self.force
        for key, value in self.fields.items():
            if key not in _CONTROL_KEYS:
                hdr[key] = value
        if self.rid is not None:
            hdr["rid"] = self.rid
        return hdr


@dataclass(slots=True)
class History(Wire):
    """HISTORY: rows of the task history, filtered."""

    command: ClassVar[bytes] = P.HISTORY
    rid: RequestId = None
    state: str | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None
    ids: tuple[str, ...] | None = None
    owner: str | None = None  #: submitted by this key's name (CurveZMQ), ``""``: without keys
    tag: str | None = None  #: tasks with this tag
    #: instead of rows: roll-ups in steps of this many seconds (whole minutes) from ``since`` to ``until``
    rollup: float | None = None
    #: each row also has its ``history``: every transition (only with ``ids``, at most :data:`MAX_TIMELINES`)
    timeline: bool = False

    #: The filters, by keyword (those of :meth:`orchester.Client.history`).
    FILTERS: ClassVar[tuple[str, ...]] = ("state", "kind", "since", "until", "limit", "ids", "owner", "tag",
                                          "timeline")

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> History:
        """Check a HISTORY header."""
        listed = typed(hdr, "ids", list, None)
        if listed is not None and len(listed) > MAX_CLAIMS:
            raise ProtocolError(P.E_MALFORMED, f"header field 'ids' lists more than {MAX_CLAIMS:,} task ids")
        ids = None if listed is None else tuple(i for i in listed if isinstance(i, str))  # (no other id exists)
        since, until = (number(hdr, key, -1e12, 1e12, None) for key in ("since", "until"))
        rollup = number(hdr, "rollup", 60, MAX_SECONDS, None)
        if rollup is not None and (since is None or until is None or until <= since):
            raise ProtocolError(P.E_MALFORMED, "a roll-up needs 'since' and 'until', 'since' first")
        timeline = _flag(hdr, "timeline")
        if timeline and (ids is None or len(ids) > MAX_TIMELINES or rollup is not None):
            raise ProtocolError(P.E_MALFORMED, f"a timeline is for the tasks named by 'ids', at most {MAX_TIMELINES}")
        owner = hdr.get("owner")
        if owner is not None and not (isinstance(owner, str) and len(owner) <= MAX_NAME and owner.isprintable()):
            raise ProtocolError(P.E_MALFORMED, f"header field 'owner' must be a name of at most {MAX_NAME} "
                                "printable characters")
        return cls(_rid(hdr), text(hdr, "state", None, limit=64), text(hdr, "kind", None),
                   None if since is None else float(since), None if until is None else float(until),
                   number(hdr, "limit", -2**62, 2**62, None, integer=True), ids, owner, text(hdr, "tag", None),
                   None if rollup is None else float(rollup), timeline)

    def filters(self) -> dict[str, Any]:
        """The filters given, by name (as the journal reader takes them)."""
        out: dict[str, Any] = {}
        for key in ("state", "kind", "since", "until", "limit", "owner", "tag", "rollup"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.ids is not None:
            out["ids"] = list(self.ids)
        if self.timeline:
            out["timeline"] = True
        return out

    def header(self) -> dict[str, Any]:
        """``{state?, kind?, since?, until?, limit?, owner?, tag?, rollup?, ids?, timeline?, rid}``: the filters given,
        then the request id."""
        hdr = self.filters()
        if self.rid is not None:
            hdr["rid"] = self.rid
        return hdr


@dataclass(slots=True)
class Heartbeat(Wire):
    """HEARTBEAT to the orchestrator: a satellite's (``sid``; with its self-report ``m`` now and
    then) or a client's (with ``rx``, how many results it received on this connection).

    ``vote``: the sender failed over because the other server of a binary-star pair went silent.
    """

    command: ClassVar[bytes] = P.HEARTBEAT
    sid: str | None = None
    report: dict[str, float] | None = None
    rx: int | None = None
    vote: bool = False

    @property
    def satellite(self) -> bool:
        """Whether a satellite sent it (it names itself)."""
        return self.sid is not None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Heartbeat:
        """Check a HEARTBEAT header; a self-report keeps finite numbers only (they go to carbon)."""
        report = hdr.get("m")
        kept = None
        if isinstance(report, dict):
            kept = {str(k)[:64]: float(v) for k, v in list(report.items())[:MAX_REPORT]
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        return cls(_optional_text(hdr, "sid", MAX_SID), kept, number(hdr, "rx", 0, 2**62, None, integer=True),
                   _flag(hdr, "vote"))

    def header(self) -> dict[str, Any]:
        """A client's ``{vote?, rx}``, a satellite's ``{sid, m?}``."""
        hdr: dict[str, Any] = {}
        if self.vote:
            hdr["vote"] = True
        if self.sid is not None:
            hdr["sid"] = self.sid
        if self.report is not None:
            hdr["m"] = self.report
        if self.rx is not None:
            hdr["rx"] = self.rx
        return hdr


@dataclass(slots=True)
class PeerError(Wire):
    """ERROR from a peer: logged (quoted and cut) and counted, never answered."""

    command: ClassVar[bytes] = P.ERROR
    code: str
    msg: str
    sid: str | None = None  #: the satellite that sends it

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> PeerError:
        """Any ERROR header decodes: its fields are shown cut, never trusted."""
        sid = hdr.get("sid")
        return cls(str(hdr.get("code"))[:64], str(hdr.get("msg"))[:200],
                   sid[:MAX_SID] if isinstance(sid, str) else None)

    def header(self) -> dict[str, Any]:
        """``{code, msg, sid?}``."""
        hdr: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.sid is not None:
            hdr["sid"] = self.sid
        return hdr


# ------------------------------------------------------------- satellites -> orchestrator
@dataclass(slots=True)
class Register(Wire):
    """REGISTER: a satellite joins (or joins again, claiming back what it runs and just ran)."""

    command: ClassVar[bytes] = P.REGISTER
    sid: str
    slots: int
    kinds: tuple[str, ...]
    tags: tuple[str, ...] = ()
    progress: dict[str, float] = field(default_factory=dict)  #: kind -> stall timeout, for kinds that report
    walltime: float | None = None  #: seconds until the satellite's allocation ends
    pid: int = 0
    workers: int = 0
    host: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    running: tuple[tuple[str, int], ...] = ()  #: [task id, attempt] it runs
    recent: tuple[tuple[str, int], ...] = ()  #: [task id, attempt] it just finished (results follow)
    vote: bool = False  #: it failed over because the other server of a pair went silent
    cores: int = 0  #: cores its tasks may use together (0: not said; its workers count then)
    memory: int = 0  #: bytes of memory its tasks may use together (0: not said)
    job: str = ""  #: the batch job it runs in (Slurm's or PBS's job id; "" outside one)
    #: its light kinds (of ``kinds``): a task of one of them asking for one core and no memory runs in its own
    #: thread, and counts against ``light`` instead of ``slots``
    inline: tuple[str, ...] = ()
    light: int = 0  #: light tasks it takes in flight at once, beside ``slots`` (0: they count against ``slots``)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Register:
        """Check a REGISTER header (every claimed task too, before any is taken back)."""
        progress = typed(hdr, "progress", dict, {})
        if len(progress) > MAX_KINDS or not all(isinstance(k, str) and 0 < len(k) <= MAX_NAME and k.isprintable()
                                                and isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and 0 <= v <= MAX_SECONDS for k, v in progress.items()):
            raise ProtocolError(P.E_MALFORMED, "REGISTER progress must map kinds to stall timeouts in seconds")
        walltime = number(hdr, "walltime", 0, MAX_SECONDS, None)
        versions = hdr.get("versions")
        kinds = tuple(names(hdr, "kinds", limit=MAX_KINDS))
        inline = tuple(names(hdr, "inline", [], limit=MAX_KINDS))
        if inline and not set(inline) <= set(kinds):
            raise ProtocolError(P.E_MALFORMED, "REGISTER inline must name kinds the satellite offers (of kinds)")
        return cls(
            sid=text(hdr, "sid", limit=MAX_SID), slots=number(hdr, "slots", 1, 2**31, integer=True),
            kinds=kinds, tags=tuple(names(hdr, "tags", [])), inline=inline,
            light=number(hdr, "light", 0, MAX_LIGHT, 0, integer=True),
            progress={k: float(v) for k, v in progress.items()},
            walltime=None if walltime is None else float(walltime),
            pid=number(hdr, "pid", 0, 2**31, 0, integer=True),
            workers=number(hdr, "workers", 0, 2**20, 0, integer=True),
            host="".join(c for c in hdr["host"][:256] if c.isprintable()) if isinstance(hdr.get("host"), str) else "",
            versions={str(k)[:64]: str(v)[:64] for k, v in list(versions.items())[:64]}
            if isinstance(versions, dict) else {},
            running=_claims(hdr, "running"), recent=_claims(hdr, "recent"), vote=_flag(hdr, "vote"),
            cores=number(hdr, "cores", 0, MAX_CORES, 0, integer=True),
            memory=number(hdr, "mem", 0, MAX_MEMORY, 0, integer=True),
            job="" if hdr.get("job") == "" else text(hdr, "job", "", limit=MAX_JOB))  # ("": no job, as absent)

    def header(self) -> dict[str, Any]:
        """``{vote?, sid, slots, workers, kinds, progress, versions, walltime?, tags, host, pid,
        running, recent, cores?, mem?, job?, inline?, light?}``."""
        hdr: dict[str, Any] = {"vote": True} if self.vote else {}
        hdr["sid"] = self.sid
        hdr["slots"] = self.slots
        hdr["workers"] = self.workers
        hdr["kinds"] = list(self.kinds)
        hdr["progress"] = dict(self.progress)
        hdr["versions"] = dict(self.versions)
        if self.walltime is not None:
            hdr["walltime"] = self.walltime
        hdr["tags"] = list(self.tags)
        hdr["host"] = self.host
        hdr["pid"] = self.pid
        hdr["running"] = [[tid, attempt] for tid, attempt in self.running]
        hdr["recent"] = [[tid, attempt] for tid, attempt in self.recent]
        if self.cores:
            hdr["cores"] = self.cores
        if self.memory:
            hdr["mem"] = self.memory
        if self.job:
            hdr["job"] = self.job
        if self.inline:
            hdr["inline"] = list(self.inline)
        if self.light:
            hdr["light"] = self.light
        return hdr


@dataclass(slots=True)
class Started(Wire):
    """STARTED: the tasks (``[task id, attempt]``) a satellite's workers began."""

    command: ClassVar[bytes] = P.STARTED
    tasks: tuple[tuple[Any, Any], ...]

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Started:
        """Check a STARTED header (an entry naming no task of this satellite is ignored later)."""
        items = typed(hdr, "t", list)
        if len(items) > MAX_CLAIMS or not all(isinstance(i, list) and len(i) == 2 for i in items):
            raise ProtocolError(P.E_MALFORMED, "STARTED entries are [task id, attempt]")
        return cls(tuple((i[0], i[1]) for i in items))

    def header(self) -> dict[str, Any]:
        """``{t: [[task id, attempt], ...]}``."""
        return _started_header(self.tasks)


def _started_header(tasks: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    return {"t": [[tid, attempt] for tid, attempt in tasks]}


@dataclass(slots=True)
class Done(Wire):
    """DONE: a task's outcome. The header frame is forwarded to the client as the result's
    (:class:`Result`)."""

    command: ClassVar[bytes] = P.DONE
    id: str
    attempt: int
    ok: bool
    #: the error of a failed task as sent (``{"type", "msg", "tb"}``; its shape is checked by
    #: :attr:`error`, and one of the wrong shape is replaced, not refused)
    err: Any = None
    sat: str | None = None  #: the satellite that ran it (none for an outcome the orchestrator decided)
    codec: str | None = None  #: how the result's payload is encoded (``None`` for the default, ``msgpack``)
    duration: float | None = None  #: seconds the handler ran (``dt``)
    arrays: Arrays = ()  #: ``(dtype, shape)`` of each array frame after the body

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Self:
        """Check a DONE header."""
        tid = hdr.get("id")
        attempt = hdr.get("a")
        ok = hdr.get("ok")
        # the common shapes are checked inline (this runs for every task, in the orchestrator and
        # in the client); anything else goes through the checking helpers, which raise the errors
        sat, codec, dt = hdr.get("sat"), hdr.get("c"), hdr.get("dt")
        if (type(tid) is str and type(attempt) is int and type(ok) is bool and "arr" not in hdr
                and (sat is None or (type(sat) is str and 0 < len(sat) <= MAX_SID and sat.isprintable()))
                and ("c" not in hdr or (type(codec) is str and 0 < len(codec) <= MAX_CODEC_NAME))
                and ("dt" not in hdr or ((type(dt) is float or type(dt) is int) and 0 <= dt <= MAX_SECONDS))):
            return cls(tid, attempt, ok, hdr.get("err"), sat, codec, None if dt is None else float(dt))
        return cls(tid if type(tid) is str else typed(hdr, "id", str),
                   attempt if type(attempt) is int else typed(hdr, "a", int),
                   ok if type(ok) is bool else _flag(hdr, "ok"), hdr.get("err"),
                   _optional_text(hdr, "sat", MAX_SID) if "sat" in hdr else None,
                   header_codec(hdr) if "c" in hdr else None,
                   float(number(hdr, "dt", 0, MAX_SECONDS)) if "dt" in hdr else None,
                   _arrays(hdr) if "arr" in hdr else ())

    @property
    def error(self) -> dict[str, str] | None:
        """The error, if it has the shape clients read (a type of 1 to 256 characters, strings)."""
        err = self.err
        if (isinstance(err, dict) and isinstance(err.get("type"), str) and 0 < len(err["type"]) <= 256
                and isinstance(err.get("msg", ""), str) and isinstance(err.get("tb", ""), str)):
            return err
        return None

    def header(self) -> dict[str, Any]:
        """``{id, a, ok, c?, sat?, dt?, arr?, err?}``: a worker's success carries ``c``, ``sat``,
        ``dt`` (and ``arr``), a failure ``sat`` and ``err``."""
        hdr: dict[str, Any] = {"id": self.id, "a": self.attempt, "ok": self.ok}
        if self.codec is not None:
            hdr["c"] = self.codec
        if self.sat is not None:
            hdr["sat"] = self.sat
        if self.duration is not None:
            hdr["dt"] = self.duration
        if self.arrays:
            hdr["arr"] = _arr(self.arrays)
        if self.err is not None:
            hdr["err"] = self.err
        return hdr


#: The PROGRESS fields :class:`Progress` names; the others are the handler's keywords.
_PROGRESS_KEYS = frozenset({"id", "a", "sat"})


@dataclass(slots=True)
class Progress(Wire):
    """PROGRESS: a running task reports how far it is (the header is published as the event).

    ``info``: the handler's keywords (``generation``, ``fom``, ...), anything msgpack carries; a
    keyword named like a field of its own (``id``, ``a``, ``sat``) is left out.
    """

    command: ClassVar[bytes] = P.PROGRESS
    id: str
    attempt: int | None
    sat: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Progress:
        """Check a PROGRESS header (a report without a usable attempt is refused later, counted)."""
        a = hdr.get("a")
        return cls(typed(hdr, "id", str), a if isinstance(a, int) and not isinstance(a, bool) else None,
                   _optional_text(hdr, "sat", MAX_SID),
                   {k: v for k, v in hdr.items() if k not in _PROGRESS_KEYS})

    def header(self) -> dict[str, Any]:
        """``{id, a, sat, …}``: the handler's keywords after the fields."""
        hdr: dict[str, Any] = {"id": self.id}
        if self.attempt is not None:
            hdr["a"] = self.attempt
        if self.sat is not None:
            hdr["sat"] = self.sat
        for key, value in self.info.items():
            if key not in _PROGRESS_KEYS:
                hdr[key] = value
        return hdr


@dataclass(slots=True)
class Leave(Wire):
    """LEAVE: a satellite stops; its tasks are rerouted at once."""

    command: ClassVar[bytes] = P.LEAVE
    sid: str | None = None  #: (the orchestrator knows the satellite by its connection)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Leave:
        """Check a LEAVE header."""
        return cls(_optional_text(hdr, "sid", MAX_SID))

    def header(self) -> dict[str, Any]:
        """``{sid}``."""
        return {} if self.sid is None else {"sid": self.sid}


@dataclass(slots=True)
class TaskHeader:
    """What a satellite's worker reads of a dispatched task's header (the client's SUBMIT header,
    forwarded unchanged): its kind and its array frames. The codec and its consent are checked
    apart (:func:`serializers.codecs.check_run_codec`); nothing else of it is needed to run it."""

    kind: str
    arrays: Arrays = ()

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> TaskHeader:
        """Check the fields a worker reads."""
        kind = hdr.get("k")
        if "arr" not in hdr and type(kind) is str and 0 < len(kind) <= MAX_NAME and kind.isprintable():
            return cls(kind)  # the common shape, checked inline (this runs for every task)
        return cls(text(hdr, "k"), _arrays(hdr))


Message = (Submit | Status | Fetch | Cancel | Control | History | Heartbeat | PeerError | Register | Started
           | Done | Progress | Leave)

#: The class of each command the orchestrator receives.
INBOUND: dict[bytes, Any] = {cls.command: cls for cls in (
    Submit, Status, Fetch, Cancel, Control, History, Heartbeat, PeerError, Register, Started, Done, Progress,
    Leave)}


def decode(command: bytes, header: bytes | memoryview) -> Message:
    """The typed message of ``command`` from its header frame; :class:`ProtocolError` on anything else."""
    cls = INBOUND.get(command)
    if cls is None:
        raise ProtocolError(P.E_UNKNOWN_COMMAND, f"unknown command {P.command_name(command)}")
    if command == P.SUBMIT:
        hdr = unpack(header, MAX_TASK_HEADER)
        if len(header) > MAX_HEADER and len(header) - _edge_bytes(hdr) > MAX_HEADER:
            raise ProtocolError(P.E_TOO_LARGE, f"a SUBMIT header may pass {MAX_HEADER} bytes only by the task ids it "
                                "waits for ('af', 'rf')")
        return Submit.decode(hdr)
    msg: Message = cls.decode(unpack(header))
    return msg


def _edge_bytes(hdr: dict[str, Any]) -> int:
    """About the bytes ``af`` and ``rf`` take in a SUBMIT header (what may take it past 64 KiB)."""
    af, rf = hdr.get("af"), hdr.get("rf")
    size = sum(len(x) + 2 for x in af if isinstance(x, str)) if isinstance(af, list) else 0
    return size + (5 * len(rf) if isinstance(rf, list) else 0)


# ------------------------------------------------------------- orchestrator -> peers
@dataclass(slots=True)
class Welcome(Wire):
    """WELCOME: the satellite is registered; beat every ``heartbeat`` s, lost after ``liveness`` misses."""

    command: ClassVar[bytes] = P.WELCOME
    epoch: str
    heartbeat: float
    liveness: int

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Welcome:
        """Check a WELCOME header."""
        return cls(text(hdr, "e"), float(number(hdr, "hb", 0, MAX_SECONDS)),
                   number(hdr, "liveness", 1, 2**31, integer=True))

    def header(self) -> dict[str, Any]:
        """``{e, hb, liveness}``."""
        return {"e": self.epoch, "hb": self.heartbeat, "liveness": self.liveness}


@dataclass(slots=True)
class Beat(Wire):
    """HEARTBEAT from the orchestrator: its run (``e``, the epoch) and nothing else. A client
    that sees a new epoch resends what it waits for."""

    command: ClassVar[bytes] = P.HEARTBEAT
    epoch: str

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Self:
        """Check the header: ``{e}``."""
        return cls(text(hdr, "e"))

    def header(self) -> dict[str, Any]:
        """``{e}``."""
        return {"e": self.epoch}


@dataclass(slots=True)
class Reconnect(Beat):
    """RECONNECT: the orchestrator (of epoch ``e``) does not know this satellite: register again."""

    command: ClassVar[bytes] = P.RECONNECT


@dataclass(slots=True)
class Ack(Wire):
    """ACK: these submitted tasks are accepted (journaled, when there is a journal)."""

    command: ClassVar[bytes] = P.ACK
    ids: tuple[str, ...]
    epoch: str

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Ack:
        """Check an ACK header."""
        ids = typed(hdr, "ids", list)
        if len(ids) > MAX_CLAIMS or not all(isinstance(i, str) for i in ids):
            raise ProtocolError(P.E_MALFORMED, f"header field 'ids' must list at most {MAX_CLAIMS:,} task ids")
        return cls(tuple(ids), text(hdr, "e"))

    def header(self) -> dict[str, Any]:
        """``{ids, e}``."""
        return {"ids": list(self.ids), "e": self.epoch}


@dataclass(slots=True)
class Result(Done):
    """RESULT: a task's outcome for its client: the satellite's DONE header forwarded unchanged, or
    one the orchestrator built for an outcome it decided (``sat`` then names the satellite the
    task was on, if any). The payload frames follow it when ``ok``."""

    command: ClassVar[bytes] = P.RESULT


@dataclass(slots=True)
class Reply(Wire):
    """REPLY: the answer to a request, carrying its request id; ``body`` is the rest (its fields
    depend on the request: ``docs/protocol.rst``, *Replies*)."""

    command: ClassVar[bytes] = P.REPLY
    rid: RequestId
    body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Reply:
        """Check the request id; the body is the request's own."""
        return cls(_rid(hdr), {k: v for k, v in hdr.items() if k != "rid"})

    def header(self) -> dict[str, Any]:
        """``{…, rid}``: the body, then the request id."""
        return {**self.body, "rid": self.rid}


@dataclass(slots=True)
class Error(Wire):
    """ERROR from the orchestrator: a message it refused, with the request's ``id`` or ``rid`` when
    it could read them (echoed as sent: a string or an integer)."""

    command: ClassVar[bytes] = P.ERROR
    code: str
    msg: str
    id: str | int | None = None
    rid: RequestId = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Error:
        """Check an ERROR header."""
        tid = hdr.get("id")
        if not (tid is None or isinstance(tid, str) or (isinstance(tid, int) and not isinstance(tid, bool))):
            raise ProtocolError(P.E_MALFORMED, "header field 'id' must be a string or an integer")
        return cls(text(hdr, "code", limit=MAX_CODE), typed(hdr, "msg", str), tid, _rid(hdr))

    def header(self) -> dict[str, Any]:
        """``{code, msg, id?, rid?}``."""
        hdr: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.id is not None:
            hdr["id"] = self.id
        if self.rid is not None:
            hdr["rid"] = self.rid
        return hdr


@dataclass(slots=True)
class Dispatch(Wire):
    """DISPATCH: run this attempt of a task; the client's header and payload frames follow it.

    ``pickle``: the orchestrator accepts pickle-coded tasks (``pk``; consent is exactly ``true``:
    any other value is no consent, never an error).
    """

    command: ClassVar[bytes] = P.DISPATCH
    id: str
    attempt: int
    pickle: bool = False
    #: the results that follow the task's payload, in order: ``(task id, frames)`` of each (header first)
    results: tuple[tuple[str, int], ...] = ()
    cores: int = 1  #: cores the task asked for (the satellite starts it only when it has them free)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Dispatch:
        """Check a DISPATCH header."""
        tid, attempt = hdr.get("id"), hdr.get("a")
        # the common shape checked inline (this runs twice for every task: satellite and worker);
        # anything else goes through the checking helpers, which raise the errors
        if type(tid) is str and 0 < len(tid) <= MAX_NAME and tid.isprintable() \
                and type(attempt) is int and 0 <= attempt <= 2**31 and "rs" not in hdr and "cr" not in hdr:
            return cls(tid, attempt, hdr.get(PICKLE_CONSENT) is True)
        return cls(text(hdr, "id"), _attempt(hdr), hdr.get(PICKLE_CONSENT) is True, _results(hdr),
                   number(hdr, "cr", 1, MAX_CORES, 1, integer=True))

    def header(self) -> dict[str, Any]:
        """``{id, a, pk?, rs?, cr?}``."""
        hdr: dict[str, Any] = {"id": self.id, "a": self.attempt}
        if self.pickle:
            hdr[PICKLE_CONSENT] = True
        if self.results:
            hdr["rs"] = [[tid, n] for tid, n in self.results]
        if self.cores != 1:
            hdr["cr"] = self.cores
        return hdr


def _results(hdr: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """``rs``: ``[[task id, frames], ...]``, the dependencies' results a DISPATCH carries after the payload."""
    items = typed(hdr, "rs", list, [])
    if len(items) > MAX_AFTER:
        raise ProtocolError(P.E_MALFORMED, f"a DISPATCH carries at most {MAX_AFTER:,} results ('rs')")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and 0 < len(item[0]) <= MAX_NAME
                and type(item[1]) is int and 1 <= item[1] <= MAX_ARRAYS + 2):
            raise ProtocolError(P.E_MALFORMED, "DISPATCH 'rs' entries are [task id, frames]")
        out.append((item[0], item[1]))
    return tuple(out)


@dataclass(slots=True)
class Abort(Wire):
    """ABORT: stop this attempt of the task (cancelled, timed out, rerouted)."""

    command: ClassVar[bytes] = P.ABORT
    id: str
    attempt: int

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Abort:
        """Check an ABORT header."""
        return cls(text(hdr, "id"), _attempt(hdr))

    def header(self) -> dict[str, Any]:
        """``{id, a}``."""
        return {"id": self.id, "a": self.attempt}


ToClient = Ack | Result | Reply | Error | Beat
ToSatellite = Welcome | Dispatch | Abort | Reconnect | Beat | Error

#: The class of each command a client receives.
TO_CLIENT: dict[bytes, Any] = {P.ACK: Ack, P.RESULT: Result, P.REPLY: Reply, P.ERROR: Error, P.HEARTBEAT: Beat}
#: The class of each command a satellite receives.
TO_SATELLITE: dict[bytes, Any] = {P.WELCOME: Welcome, P.DISPATCH: Dispatch, P.ABORT: Abort, P.RECONNECT: Reconnect,
                                  P.HEARTBEAT: Beat, P.ERROR: Error}


def decode_for_client(command: bytes, header: bytes | memoryview) -> ToClient:
    """What a client received: the typed message of ``command`` from its header frame (a REPLY may
    be up to :data:`MAX_REPLY` bytes); :class:`ProtocolError` on anything else."""
    cls = TO_CLIENT.get(command)
    if cls is None:
        raise ProtocolError(P.E_UNKNOWN_COMMAND, f"unexpected command {P.command_name(command)}")
    msg: ToClient = cls.decode(unpack(header, MAX_REPLY if command == P.REPLY else MAX_HEADER))
    return msg


def decode_for_satellite(command: bytes, header: bytes | memoryview) -> ToSatellite:
    """What a satellite received: the typed message of ``command`` from its header frame (a DISPATCH, which
    lists the results it carries, may be up to :data:`MAX_TASK_HEADER` bytes); :class:`ProtocolError` on
    anything else."""
    cls = TO_SATELLITE.get(command)
    if cls is None:
        raise ProtocolError(P.E_UNKNOWN_COMMAND, f"unknown command {P.command_name(command)}")
    msg: ToSatellite = cls.decode(unpack(header, MAX_TASK_HEADER if command == P.DISPATCH else MAX_HEADER))
    return msg


# ------------------------------------------------------------- what the orchestrator sends
def welcome(epoch: str, heartbeat: float, liveness: int) -> list[bytes]:
    """WELCOME frames: the satellite is registered; beat every ``heartbeat`` s, lost after ``liveness`` misses."""
    return Welcome(epoch, heartbeat, liveness).frames()


# (the builders the orchestrator calls for every task write the header their message's ``header()``
#  gives, key for key, without building the message: tests/test_messages.py checks they agree)
def beat(command: bytes, epoch: str) -> list[bytes]:
    """HEARTBEAT or RECONNECT frames: this orchestrator's run (``e``) and nothing else."""
    return [P.SIGNATURE, command, pack({"e": epoch})]


def ack(ids: list[str], epoch: str) -> list[bytes]:
    """ACK frames: these submitted tasks are accepted (journaled, when there is a journal)."""
    return [P.SIGNATURE, P.ACK, pack({"ids": ids, "e": epoch})]


#: Bytes of task ids one ACK carries at most: its header stays well within what a peer reads
#: (:data:`~serializers.header.MAX_HEADER`), however many tasks one wake-up accepted.
ACK_IDS_BYTES = 48 * 1024
#: Task ids that always fit one ACK (at most 256 characters, 1 KiB in UTF-8, each): counted no further.
ACK_AT_ONCE = ACK_IDS_BYTES // (4 * MAX_NAME + 3)


def _cut(items: Sequence[Any], ids: Sequence[str], extra: int) -> list[list[Any]]:
    """``items`` in order, cut so that the task ids they carry (``ids``, one each) and ``extra`` bytes of
    msgpack around each id stay within :data:`ACK_IDS_BYTES` a part."""
    out: list[list[Any]] = []
    part: list[Any] = []
    size = 0
    for item, tid in zip(items, ids, strict=True):
        cost = (len(tid) * 4 if not tid.isascii() else len(tid)) + extra
        if part and size + cost > ACK_IDS_BYTES:
            out.append(part)
            part, size = [], 0
        part.append(item)
        size += cost
    if part:
        out.append(part)
    return out


def acks(ids: Sequence[str], epoch: str) -> list[list[bytes]]:
    """ACK messages for ``ids``, in order, cut so that each header is well within a peer's limit (a client
    that resends tens of thousands of tasks after a failover gets them accepted in several ACKs)."""
    if len(ids) <= ACK_AT_ONCE:  # (the common case: one ACK, however long its ids)
        return [ack(list(ids), epoch)]
    return [ack(part, epoch) for part in _cut(ids, ids, 3)]  # (msgpack's str head: at most 3 bytes)


def reply(rid: RequestId, body: dict[str, Any]) -> list[bytes]:
    """REPLY frames: the answer to a request, carrying its request id."""
    return Reply(rid, body).frames()


def dispatch(task_id: str, attempt: int, consent: dict[str, Any], results: Sequence[tuple[str, int]] = (),
             cores: int = 1) -> list[bytes]:
    """DISPATCH frames (without the client's header and payload frames that follow them, and the
    dependencies' results after those); ``consent``: :func:`serializers.codecs.dispatch_consent`."""
    hdr: dict[str, Any] = {"id": task_id, "a": attempt}
    if consent.get(PICKLE_CONSENT) is True:
        hdr[PICKLE_CONSENT] = True
    if results:
        hdr["rs"] = results  # (pairs: msgpack writes each as an array)
    if cores != 1:
        hdr["cr"] = cores
    return [P.SIGNATURE, P.DISPATCH, pack(hdr)]


def abort(task_id: str, attempt: int) -> list[bytes]:
    """ABORT frames: stop this attempt of the task (cancelled, timed out, rerouted)."""
    return [P.SIGNATURE, P.ABORT, pack({"id": task_id, "a": attempt})]


# ------------------------------------------------------------- what clients and satellites send per task
# (as above: the header their message's ``header()`` gives, key for key, without building the message)
def submit(task_id: str, kind: str, codec: str, priority: int = 0, tags: Iterable[str] = (),
           timeout: float | None = None, ttl: float = 0.0, max_run: float = 0.0, duration: float = 0.0,
           arrays: Arrays = (), after: Sequence[str] = (), refs: Sequence[int] = (), run_on_failure: bool = False,
           cores: int = 1, memory: int = 0) -> list[bytes]:
    """SUBMIT frames (without the payload frames): what ``Submit(...).frames()`` gives."""
    return [P.SIGNATURE, P.SUBMIT,
            pack(_submit_header(task_id, kind, codec, priority, tags, timeout, ttl, max_run, duration, arrays,
                                after, refs, run_on_failure, cores, memory))]


def done(task_id: str, attempt: int, sat: str, codec: str, duration: float, arrays: Arrays = ()) -> bytes:
    """The DONE header of a task that succeeded: what ``Done(task_id, attempt, True, sat=sat,
    codec=codec, duration=duration, arrays=arrays).encode()`` gives."""
    hdr: dict[str, Any] = {"id": task_id, "a": attempt, "ok": True, "c": codec, "sat": sat, "dt": duration}
    if arrays:
        hdr["arr"] = _arr(arrays)
    return pack(hdr)


def started(tasks: Iterable[tuple[str, int]]) -> bytes:
    """The STARTED header: what ``Started(tuple(tasks)).encode()`` gives."""
    return pack(_started_header(tasks))


def started_parts(tasks: Sequence[tuple[str, int]]) -> list[bytes]:
    """STARTED headers for ``tasks``, in order, cut as :func:`acks` cuts an ACK: each well within a peer's
    limit, however many tasks began together and however long their ids."""
    # (the str, int and array heads of an entry: at most 13 bytes)
    return [started(part) for part in _cut(tasks, [tid for tid, _ in tasks], 13)]


# ------------------------------------------------------------- batches (several messages in one)
def batch(messages: Sequence[Sequence[Any]], lengths: Sequence[list[int]] | None = None) -> list[Any]:
    """BATCH frames carrying ``messages``, each ``[COMMAND, HEADER, PAYLOAD...]`` (no signature), in order.

    The header lists how many frames each message has (``"n": [3, 3, 5]``) and how long each of those
    frames is (``"z"``, one entry per frame, in order). Every frame shorter than
    :data:`~serializers.protocol.BATCH_ALONE` is packed into one body frame, back to back; a longer one
    (a large payload) travels as its own frame after the body, sent without a copy, its length given as
    ``-1``. A command and a header are always packed. So a batch of small messages is four frames, however
    many messages it carries: one send and one receive, not one per frame. ``lengths``: each message's frame
    lengths, when the caller has them already (:func:`grouped`)."""
    counts: list[int] = []
    sizes: list[int] = []
    packed: list[Any] = []
    alone: list[Any] = []
    limit = P.BATCH_ALONE
    for j, m in enumerate(messages):
        counts.append(len(m))
        frame_lengths = lengths[j] if lengths is not None else list(map(len, m))
        if memoryview in map(type, m):  # (a memoryview's len counts its items: its bytes are what travel)
            frame_lengths = [f.nbytes if type(f) is memoryview else n for f, n in zip(m, frame_lengths, strict=True)]
        if max(frame_lengths) < limit:  # (the common case: every frame small)
            sizes.extend(frame_lengths)
            packed.extend(m)
            continue
        for i, f in enumerate(m):
            size = frame_lengths[i]
            if size >= limit and i > 1:
                sizes.append(-1)
                alone.append(f)
            else:
                sizes.append(size)
                packed.append(f)
    return [P.SIGNATURE, P.BATCH, pack({"n": counts, "z": sizes}), b"".join(packed), *alone]


def unbatch(frames: Sequence[Any], head: int) -> list[list[Any]]:
    """The messages of a BATCH, each as ``frames[:head]`` (the envelope and signature it came with) then its
    own frames (command, header and packed payload frames as ``bytes``; a payload frame that travelled alone
    as it came).

    ``frames[head - 1]`` is the signature, ``frames[head]`` the BATCH command, ``frames[head + 1]`` its
    header and ``frames[head + 2]`` its body (:func:`batch`). Checked before anything is returned: the
    signature (:func:`~serializers.header.check_signature`: a batch of another version is refused whole);
    the header, a map whose ``n`` lists 1 to :data:`~serializers.protocol.BATCH_MAX` counts, each at least 2
    (a command and a header), and whose ``z`` gives one length per frame they count, each a length in the
    body or ``-1`` (alone; never a command or a header); the lengths add up to the body's, and the ``-1`` to
    the frames after it; no message is itself a BATCH. Anything else is :class:`ProtocolError`."""
    if len(frames) < head + 3:
        raise ProtocolError(P.E_MALFORMED, "BATCH needs a header and a body")
    check_signature(bytes(frames[head - 1]))
    hdr = unpack(bytes(frames[head + 1]))
    counts, sizes = hdr.get("n"), hdr.get("z")
    if not isinstance(counts, list) or not 1 <= len(counts) <= P.BATCH_MAX:
        raise ProtocolError(P.E_MALFORMED, f"BATCH 'n' must list 1 to {P.BATCH_MAX} frame counts")
    if not all(type(n) is int and n >= 2 for n in counts):
        raise ProtocolError(P.E_MALFORMED, "BATCH 'n' must be counts of at least 2 frames")
    if not isinstance(sizes, list) or len(sizes) != sum(counts):
        raise ProtocolError(P.E_MALFORMED, "BATCH 'z' must give one length per frame 'n' counts")
    body = frames[head + 2]
    if len(body) > P.BATCH_BYTES:  # (a sender packs at most that much: nothing to copy past it)
        raise ProtocolError(P.E_TOO_LARGE, f"a BATCH body holds at most {P.BATCH_BYTES} bytes")
    if type(body) is not bytes:
        body = memoryview(body)  # (each part is copied out of it once)
    alone = frames[head + 3:]
    if not set(map(type, sizes)) <= {int} or min(sizes) < -1:
        raise ProtocolError(P.E_MALFORMED, "BATCH 'z' must list lengths (-1: the frame travels alone)")
    lone = sizes.count(-1)
    if sum(sizes) + lone != len(body) or lone != len(alone):
        raise ProtocolError(P.E_MALFORMED, f"BATCH 'z' must add up to its body ({len(body)} bytes) and list "
                            f"-1 for each of the {len(alone)} frames after it")
    if lone:  # a lone frame takes its place; the body is cut by the others
        others = iter(alone)
        ends = list(accumulate(z if z >= 0 else 0 for z in sizes))
        parts = [next(others) if z < 0 else body[e - z:e] for z, e in zip(sizes, ends, strict=True)]
    else:
        ends = list(accumulate(sizes))
        parts = [body[e - z:e] for z, e in zip(sizes, ends, strict=True)]
    if type(body) is memoryview:
        parts = [bytes(p) if type(p) is memoryview else p for p in parts]
    prefix = list(frames[:head])
    out: list[list[Any]] = []
    at = 0
    for n in counts:
        if sizes[at] < 0 or sizes[at + 1] < 0:
            raise ProtocolError(P.E_MALFORMED, "a BATCH carries each command and header in its body")
        if parts[at] == P.BATCH:
            raise ProtocolError(P.E_MALFORMED, "a BATCH may not carry a BATCH")
        out.append(prefix + parts[at:at + n])
        at += n
    return out


def runs(sizes: Sequence[int], limit: int = P.BATCH_MESSAGES, max_bytes: int = P.BATCH_BYTES,
         frames: Sequence[int] | None = None, max_frames: int = P.BATCH_FRAMES) -> list[slice]:
    """Messages of these ``sizes`` (bytes of their frames), in order, cut into runs that one BATCH each may
    carry: at most ``limit`` messages, ``max_bytes`` bytes and (given each message's number of ``frames``)
    ``max_frames`` frames; a message larger than that alone."""
    out: list[slice] = []
    start, size, count = 0, 0, 0
    for i, n in enumerate(sizes):
        k = frames[i] if frames is not None else 0
        if i > start and (i - start >= limit or size + n > max_bytes or count + k > max_frames):
            out.append(slice(start, i))
            start, size, count = i, 0, 0
        size += n
        count += k
    if len(sizes) > start:
        out.append(slice(start, len(sizes)))
    return out


def grouped(messages: Sequence[Sequence[Any]], limit: int = P.BATCH_MESSAGES,
            max_bytes: int = P.BATCH_BYTES) -> Iterator[tuple[slice, list[Any]]]:
    """``messages`` (each ``[COMMAND, HEADER, PAYLOAD...]``, in order) cut into the runs one BATCH each may carry
    (:func:`runs`), each with the frames that carry it: a run of several as one BATCH, a message alone as
    itself after the signature. Each frame's length is taken once, for the runs and for the batch."""
    lengths = [list(map(len, m)) for m in messages]
    for run in runs([sum(n) for n in lengths], limit, max_bytes, [len(n) for n in lengths]):
        group = messages[run]
        yield run, batch(group, lengths[run]) if len(group) > 1 else [P.SIGNATURE, *group[0]]


def batches(messages: Sequence[Sequence[Any]], limit: int = P.BATCH_MESSAGES,
            max_bytes: int = P.BATCH_BYTES) -> list[list[Any]]:
    """``messages`` as few messages as the limits allow (:func:`grouped`): a run of several as one BATCH, a
    message alone as itself, the signature before it."""
    return [frames for _, frames in grouped(messages, limit, max_bytes)]
