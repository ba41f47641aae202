"""Typed messages: every command's header fields, named and checked in one place.

Each command a peer sends to the orchestrator has a frozen dataclass here whose
``decode(header)`` checks every field (type, range, finite, printable, bounded) and raises
only :class:`~serializers.header.ProtocolError`; :func:`decode` picks the class by command.
The orchestrator decodes a message once, before anything changes; past that point any
exception is its own (the one error boundary of :mod:`orchester.server.core`).

The short keys of the wire (``"k"`` for a task's kind, ``"a"`` for its attempt, …) are spelled
only here: senders build headers with the classes' ``encode()`` (or the builders at the end for
what the orchestrator sends), receivers read them with ``decode()``. ``docs/protocol.rst`` is the
specification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import protocol as P
from .codecs import header_codec
from .header import MAX_PRIORITY, MAX_SECONDS, ProtocolError, names, number, pack, text, unpack
from .header import field as typed

#: Most tasks a REGISTER may claim back (``running`` and ``recent``).
MAX_CLAIMS = 100_000
#: Most entries of a satellite's self-report (``m`` of its heartbeat) kept; keys cut to 64 characters.
MAX_REPORT = 64
#: Most kinds one satellite may offer.
MAX_KINDS = 4096
#: A request id is echoed in the answer: a string of at most this many characters, or an integer.
MAX_RID = 256

RequestId = int | str | None


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


# ---------------------------------------------------------------- clients -> orchestrator
@dataclass(frozen=True, slots=True)
class Submit:
    """SUBMIT: a task. The header frame is forwarded to the satellite as the client sent it.

    The same check runs on a journal's submission records at replay, so a record that a live
    orchestrator would refuse can never reach the timer wheel after a restart.
    """

    command: ClassVar[bytes] = P.SUBMIT
    id: str
    kind: str
    priority: int = 0
    tags: frozenset[str] = frozenset()
    timeout: float | None = None  #: the client's overall timeout (``None``: none)
    ttl: float = 0.0  #: time-to-live in the queue (0: the orchestrator's default)
    max_run: float = 0.0  #: maximum run time (0: the orchestrator's default)
    duration: float = 0.0  #: expected run time (0: unknown)
    codec: str = "msgpack"  #: how the payload is encoded (checked against the server's consent apart)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Submit:
        """Check and convert a decoded SUBMIT header."""
        timeout = number(hdr, "to", -MAX_SECONDS, MAX_SECONDS, None)
        return cls(
            id=text(hdr, "id"), kind=text(hdr, "k"),
            priority=number(hdr, "p", -MAX_PRIORITY, MAX_PRIORITY, 0, integer=True),
            tags=frozenset(names(hdr, "tg", [])),
            timeout=float(timeout) if timeout is not None and timeout > 0 else None,
            ttl=max(0.0, float(number(hdr, "ttl", -MAX_SECONDS, MAX_SECONDS, 0))),
            max_run=max(0.0, float(number(hdr, "mr", -MAX_SECONDS, MAX_SECONDS, 0))),
            duration=max(0.0, float(number(hdr, "dur", -MAX_SECONDS, MAX_SECONDS, 0))),
            codec=header_codec(hdr),
        )


@dataclass(frozen=True, slots=True)
class Status:
    """STATUS: the summary (no ``task``) or one task (``task``: its id)."""

    command: ClassVar[bytes] = P.STATUS
    rid: RequestId = None
    task: str | None = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Status:
        """Check a STATUS header."""
        return cls(_rid(hdr), text(hdr, "task", None))


@dataclass(frozen=True, slots=True)
class Fetch:
    """FETCH: a task's result (or its state, and delivery to this connection when it ends)."""

    command: ClassVar[bytes] = P.FETCH
    id: str
    rid: RequestId = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Fetch:
        """Check a FETCH header."""
        return cls(text(hdr, "id"), _rid(hdr))


@dataclass(frozen=True, slots=True)
class Cancel:
    """CANCEL: end a task that has not finished."""

    command: ClassVar[bytes] = P.CANCEL
    id: str
    rid: RequestId = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Cancel:
        """Check a CANCEL header."""
        return cls(text(hdr, "id"), _rid(hdr))


@dataclass(frozen=True, slots=True)
class Control:
    """CONTROL: an operator's operation (``strategy``, ``drain``, ``promote``, ``peer_link``).

    ``fields`` keeps the header for the binary-star operations, which check their own fields.
    """

    command: ClassVar[bytes] = P.CONTROL
    op: str
    rid: RequestId = None
    name: str | None = None  #: ``strategy``: the routing strategy to switch to
    sid: str | None = None  #: ``drain``: the satellite to drain
    fields: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Control:
        """Check a CONTROL header (the operation's own fields are checked when it needs them)."""
        op = text(hdr, "op", limit=64)
        name = text(hdr, "name", limit=4096) if op == "strategy" else None
        sid = text(hdr, "sid", limit=128) if op == "drain" else None
        return cls(op, _rid(hdr), name, sid, hdr)


@dataclass(frozen=True, slots=True)
class History:
    """HISTORY: rows of the task history, filtered."""

    command: ClassVar[bytes] = P.HISTORY
    rid: RequestId = None
    state: str | None = None
    kind: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None
    ids: tuple[str, ...] | None = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> History:
        """Check a HISTORY header."""
        listed = typed(hdr, "ids", list, None)
        if listed is not None and len(listed) > MAX_CLAIMS:
            raise ProtocolError(P.E_MALFORMED, f"header field 'ids' lists more than {MAX_CLAIMS:,} task ids")
        ids = None if listed is None else tuple(i for i in listed if isinstance(i, str))  # (no other id exists)
        since, until = (number(hdr, key, -1e12, 1e12, None) for key in ("since", "until"))
        return cls(_rid(hdr), text(hdr, "state", None, limit=64), text(hdr, "kind", None),
                   None if since is None else float(since), None if until is None else float(until),
                   number(hdr, "limit", -2**62, 2**62, None, integer=True), ids)

    def filters(self) -> dict[str, Any]:
        """The filters given, by name (as the journal reader takes them)."""
        out: dict[str, Any] = {}
        for key in ("state", "kind", "since", "until", "limit"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.ids is not None:
            out["ids"] = list(self.ids)
        return out


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """HEARTBEAT: a satellite's (``satellite``; with its self-report) or a client's (with ``rx``,
    how many results it received on this connection)."""

    command: ClassVar[bytes] = P.HEARTBEAT
    satellite: bool = False
    report: dict[str, float] | None = None
    rx: int | None = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Heartbeat:
        """Check a HEARTBEAT header; a self-report keeps finite numbers only (they go to carbon)."""
        report = hdr.get("m")
        kept = None
        if isinstance(report, dict):
            kept = {str(k)[:64]: float(v) for k, v in list(report.items())[:MAX_REPORT]
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        return cls("sid" in hdr, kept, number(hdr, "rx", 0, 2**62, None, integer=True))


@dataclass(frozen=True, slots=True)
class PeerError:
    """ERROR from a peer: logged (quoted and cut) and counted, never answered."""

    command: ClassVar[bytes] = P.ERROR
    code: str
    msg: str

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> PeerError:
        """Any ERROR header decodes: its fields are shown cut, never trusted."""
        return cls(str(hdr.get("code"))[:64], str(hdr.get("msg"))[:200])


# ------------------------------------------------------------- satellites -> orchestrator
@dataclass(frozen=True, slots=True)
class Register:
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

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Register:
        """Check a REGISTER header (every claimed task too, before any is taken back)."""
        progress = typed(hdr, "progress", dict, {})
        if len(progress) > MAX_KINDS or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                and not isinstance(v, bool) and 0 <= v <= MAX_SECONDS
                                                for k, v in progress.items()):
            raise ProtocolError(P.E_MALFORMED, "REGISTER progress must map kinds to stall timeouts in seconds")
        walltime = number(hdr, "walltime", 0, MAX_SECONDS, None)
        versions = hdr.get("versions")
        return cls(
            sid=text(hdr, "sid", limit=128), slots=number(hdr, "slots", 1, 2**31, integer=True),
            kinds=tuple(names(hdr, "kinds", limit=MAX_KINDS)), tags=tuple(names(hdr, "tags", [])),
            progress={k: float(v) for k, v in progress.items()},
            walltime=None if walltime is None else float(walltime),
            pid=number(hdr, "pid", 0, 2**31, 0, integer=True),
            workers=number(hdr, "workers", 0, 2**20, 0, integer=True),
            host=str(hdr.get("host", ""))[:256],
            versions={str(k)[:64]: str(v)[:64] for k, v in list(versions.items())[:64]}
            if isinstance(versions, dict) else {},
            running=_claims(hdr, "running"), recent=_claims(hdr, "recent"))


@dataclass(frozen=True, slots=True)
class Started:
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


@dataclass(frozen=True, slots=True)
class Done:
    """DONE: a task's outcome. The header frame is forwarded to the client as the result's."""

    command: ClassVar[bytes] = P.DONE
    id: str
    attempt: int
    ok: bool
    #: the error of a failed task as sent (``{"type", "msg", "tb"}``; its shape is checked by
    #: :attr:`error`, and one of the wrong shape is replaced, not refused)
    err: Any = None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Done:
        """Check a DONE header."""
        return cls(typed(hdr, "id", str), typed(hdr, "a", int), bool(hdr.get("ok")), hdr.get("err"))

    @property
    def error(self) -> dict[str, str] | None:
        """The error, if it has the shape clients read (a type of 1 to 256 characters, strings)."""
        err = self.err
        if (isinstance(err, dict) and isinstance(err.get("type"), str) and 0 < len(err["type"]) <= 256
                and isinstance(err.get("msg", ""), str) and isinstance(err.get("tb", ""), str)):
            return err
        return None


@dataclass(frozen=True, slots=True)
class Progress:
    """PROGRESS: a running task reports how far it is (the header is published as the event)."""

    command: ClassVar[bytes] = P.PROGRESS
    id: str
    attempt: int | None

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Progress:
        """Check a PROGRESS header (a report without a usable attempt is refused later, counted)."""
        a = hdr.get("a")
        return cls(typed(hdr, "id", str), a if isinstance(a, int) and not isinstance(a, bool) else None)


@dataclass(frozen=True, slots=True)
class Leave:
    """LEAVE: a satellite stops; its tasks are rerouted at once."""

    command: ClassVar[bytes] = P.LEAVE

    @classmethod
    def decode(cls, hdr: dict[str, Any]) -> Leave:
        """A LEAVE carries nothing the orchestrator reads."""
        return cls()


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
    msg: Message = cls.decode(unpack(header))
    return msg


# ------------------------------------------------------------- what the orchestrator sends
def welcome(epoch: str, heartbeat: float, liveness: int) -> list[bytes]:
    """WELCOME frames: the satellite is registered; beat every ``heartbeat`` s, lost after ``liveness`` misses."""
    return [P.SIGNATURE, P.WELCOME, pack({"e": epoch, "hb": heartbeat, "liveness": liveness})]


def beat(command: bytes, epoch: str) -> list[bytes]:
    """HEARTBEAT or RECONNECT frames: this orchestrator's run (``e``) and nothing else."""
    return [P.SIGNATURE, command, pack({"e": epoch})]


def ack(ids: list[str], epoch: str) -> list[bytes]:
    """ACK frames: these submitted tasks are accepted (journaled, when there is a journal)."""
    return [P.SIGNATURE, P.ACK, pack({"ids": ids, "e": epoch})]


def reply(rid: RequestId, body: dict[str, Any]) -> list[bytes]:
    """REPLY frames: the answer to a request, carrying its request id."""
    body["rid"] = rid
    return [P.SIGNATURE, P.REPLY, pack(body)]


def dispatch(task_id: str, attempt: int, consent: dict[str, Any]) -> list[bytes]:
    """DISPATCH frames (without the client's header and payload frames that follow them)."""
    return [P.SIGNATURE, P.DISPATCH, pack({"id": task_id, "a": attempt, **consent})]


def abort(task_id: str, attempt: int) -> list[bytes]:
    """ABORT frames: stop this attempt of the task (cancelled, timed out, rerouted)."""
    return [P.SIGNATURE, P.ABORT, pack({"id": task_id, "a": attempt})]
