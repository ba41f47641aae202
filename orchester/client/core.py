"""The client's protocol core, shared by :class:`~orchester.Client` and :class:`~orchester.AsyncClient`.

It builds request frames, remembers what is pending, and turns incoming
messages into outcomes. It owns no socket and no thread; futures are whatever
the adapter gives it (``concurrent.futures.Future`` or ``asyncio.Future``)
through the :class:`Resolver` callbacks. Headers are built and read with the
typed messages of :mod:`serializers.messages`, the one place that spells their keys.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from orchester.errors import ClientClosed, RemoteError, TaskFailed
from serializers import ProtocolError, codecs, pack, unpack
from serializers import messages as M
from serializers import protocol as P

log = logging.getLogger("orchester.client")

Resolve = Callable[[Any, Any], None]  # (future, value)
#: Largest REPLY header a client takes (a status of a large fleet, many history rows).
REPLY_LIMIT = M.MAX_REPLY
Reject = Callable[[Any, BaseException], None]  # (future, exception)
#: The requests answered with a REPLY (a FETCH is answered with the task's RESULT: :meth:`ClientCore.fetch`).
Request = M.Status | M.Cancel | M.Control | M.History


#: What setting a future that became done meanwhile raises (a caller's ``cancel()`` in another thread).
_SETTLED = (cf.InvalidStateError, asyncio.InvalidStateError)


def resolve_future(fut: Any, value: Any) -> None:
    """Set a future's result unless it is already done (concurrent or asyncio futures alike; one cancelled
    by another thread between the check and the setting is left as it is)."""
    if not fut.done():
        with contextlib.suppress(*_SETTLED):
            fut.set_result(value)


def reject_future(fut: Any, exc: BaseException) -> None:
    """Set a future's exception unless it is already done (or cancelled meanwhile)."""
    if not fut.done():
        with contextlib.suppress(*_SETTLED):
            fut.set_exception(exc)


class Pending:
    """A request waiting for its answer: the future and the frames to resend."""

    __slots__ = ("future", "frames", "acked", "codec", "asked")

    def __init__(self, future: Any, frames: list[Any] | None, codec: str | None = None) -> None:
        self.future = future
        self.frames = frames
        self.acked = False
        #: its result was asked for (a task passed by reference keeps it otherwise): asked again after a resend
        self.asked = False
        self.codec = codec  #: the codec the task was submitted with (None: fetched, not submitted here)


#: Result bytes received after which a client says so at once, not at its next heartbeat (a
#: quarter of the orchestrator's default ``--max-unread-bytes``, so large results keep flowing).
ACK_BYTES = 16 << 20


def stopped(what: str, exc: BaseException) -> ClientClosed:
    """The error every pending request of a client fails with when its ``what`` (the I/O thread,
    the reading task) stopped on ``exc``; logged (with the traceback unless it is a socket's or the
    system's: one with an errno)."""
    log.error("the client's %s stopped: %s: %s", what, type(exc).__name__, exc,
              exc_info=getattr(exc, "errno", None) is None)
    failure = ClientClosed(f"the client's {what} stopped: {type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure


def task_of_row(row: dict[str, Any]) -> dict[str, Any]:
    """What :meth:`~orchester.Client.show` gives for a task the orchestrator no longer holds, made of
    its history row (``Client.history(ids=[...], timeline=True)``): ``source`` is ``"history"``."""
    return {"id": row.get("id"), "kind": row.get("kind"), "state": row.get("state"), "attempt": row.get("attempts"),
            "satellite": row.get("satellite"), "owner": row.get("owner"), "tags": row.get("tags", []),
            "submitted": row.get("submitted"), "finished": row.get("finished"), "error_type": row.get("error"),
            "history": row.get("history", []), "result_retained": False, "source": "history"}


def task_options(after: Any = (), on_failure: str = "fail", cores: int = 1,
                 memory: int | None = None) -> dict[str, Any]:
    """Check a task's dependencies and resources where it is submitted (a :class:`ValueError` or
    :class:`TypeError` at the call, not a failed future): ``after`` is one task or a list of them
    (futures, :func:`orchester.ref` references or task ids); ``on_failure`` ``"fail"`` (fail with a
    ``DependencyFailed`` error when a dependency does not succeed) or ``"run"`` (run anyway);
    ``cores`` at least 1; ``memory`` in bytes. Returns the options :meth:`ClientCore.submit` takes."""
    if after is None:
        after = ()
    items = [after] if isinstance(after, str) or codecs.ref_id(after) is not None else list(after)
    ids: dict[str, None] = {}
    for item in items:
        tid = item if isinstance(item, str) else codecs.ref_id(item)
        if not tid or not tid.isprintable() or len(tid) > 1024:
            raise TypeError(f"after= takes futures, orchester.ref() references or task ids, not {item!r}")
        ids[tid] = None
    if len(ids) > M.MAX_AFTER:
        raise ValueError(f"a task may wait for at most {M.MAX_AFTER:,} tasks, not {len(ids):,}")
    if on_failure not in M.ON_FAILURE:
        raise ValueError(f"on_failure must be one of {list(M.ON_FAILURE)}, not {on_failure!r}")
    if isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= M.MAX_CORES:
        raise ValueError(f"cores must be a whole number from 1 to {M.MAX_CORES}, not {cores!r}")
    memory = 0 if memory is None else memory
    if isinstance(memory, bool) or not isinstance(memory, int) or not 0 <= memory <= M.MAX_MEMORY:
        raise ValueError(f"memory must be a whole number of bytes from 0 to {M.MAX_MEMORY}, not {memory!r}")
    return {"after": tuple(ids), "run_on_failure": on_failure == "run", "cores": cores, "memory": memory}


class _RandomIds:
    """128-bit task ids cut from a buffer of the operating system's random bytes (``os.urandom``,
    as :func:`secrets.token_hex` uses): one system call per 256 ids instead of one per id, and
    no release of the GIL per task on a client's hot path. Thread-safe; a forked child starts
    with an empty buffer, so parent and child never hand out the same id."""

    BUFFER = 16 * 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0

    def __call__(self) -> str:
        with self._lock:
            at = self._at
            if at >= len(self._buffer):
                self._buffer = os.urandom(self.BUFFER)
                at = 0
            self._at = at + 16
            return self._buffer[at:at + 16].hex()


#: A new task id (32 hex digits of 128 random bits).
new_task_id = _RandomIds()


class ClientCore:
    """Request building, pending bookkeeping and reply handling (no I/O)."""

    def __init__(self, resolve: Resolve, reject: Reject, codec: str = codecs.DEFAULT_CODEC,
                 keep_for_resend: bool = True, accepted: Callable[[Any], None] | None = None,
                 on_demand: Callable[[Any], None] | None = None) -> None:
        self.name = uuid.uuid4().hex[:12]
        #: called with the future of a task passed by reference (its result comes when asked for)
        self._on_demand = on_demand
        self.codec = codec
        self.keep_for_resend = keep_for_resend
        self._resolve = resolve
        self._reject = reject
        self._accepted = accepted
        self._ids = itertools.count(1)
        self.tasks: dict[str, Pending] = {}
        self.requests: dict[int, Pending] = {}
        self.epoch: str | None = None
        #: whether there is another orchestrator to turn to (a binary-star pair): set by the adapter
        self.alternatives = False
        #: a passive server refused us: the adapter should switch to the other endpoint
        self.redirect = False
        #: results received on the current connection (reported in heartbeats)
        self.rx = 0
        self._rx_bytes = 0  #: result bytes received since the last heartbeat

    # ------------------------------------------------------------ requests
    def task_id(self) -> str:
        """A new task id: 128 random bits, so nobody can guess (and squat) the next one."""
        return new_task_id()

    def submit(self, future: Any, kind: str, args: Sequence[Any], kwargs: dict[str, Any], *,
               priority: int = 0, tags: Sequence[str] = (), timeout: float | None = None,
               codec: str | None = None, task_id: str | None = None, ttl: float | None = None,
               max_run: float | None = None, duration: float | None = None, after: Sequence[str] = (),
               run_on_failure: bool = False, cores: int = 1, memory: int = 0) -> tuple[str, list[Any]]:
        """Register ``future`` for a new task and return ``(task_id, frames)`` to send.

        ``after``: task ids it waits for (checked by :func:`task_options`); every reference among the
        arguments (a future, :func:`orchester.ref`) is one more, whose result the task takes.
        """
        codec = codec or self.codec
        refs = codecs.Refs()
        meta, body = codecs.encode([list(args), kwargs], codec, refs)
        tid = task_id or self.task_id()
        deps: list[str] = list(after)
        rf: tuple[int, ...] = ()
        if refs.ids:  # each reference is a dependency whose result it takes (and its client need not get)
            index = {dep: i for i, dep in enumerate(deps)}
            for ref in refs.ids:
                if ref not in index:
                    index[ref] = len(deps)
                    deps.append(ref)
            rf = tuple(sorted(index[ref] for ref in refs.ids))
            for ref in refs.ids:
                self._quiet(ref)
        # the values as given (the orchestrator checks them): a timeout of 0 or -1 is sent, and means none
        # (positional, and the common empty options without a call: this runs for every task)
        frames: list[Any] = M.submit(tid, kind, codec, int(priority), tags, None if timeout is None else float(timeout),
                                     0.0 if ttl is None else float(ttl), 0.0 if max_run is None else float(max_run),
                                     0.0 if duration is None else float(duration), M.arrays_of(meta) if meta else (),
                                     deps, rf, run_on_failure, cores, memory)
        frames += body
        self.tasks[tid] = Pending(future, frames if self.keep_for_resend else None, codec)
        return tid, frames

    def _quiet(self, task_id: str) -> None:
        """A task of this client is passed by reference: the orchestrator keeps its result for the task that
        takes it, and sends it here only when asked; its future asks when someone waits for it."""
        p = self.tasks.get(task_id)
        if p is not None and self._on_demand is not None:
            self._on_demand(p.future)

    def fetch(self, future: Any, task_id: str) -> list[Any]:
        """Register ``future`` for the result of an existing task; return the FETCH frames. (A task this
        client submitted keeps its entry, with its frames to send again after a failover.)"""
        frames: list[Any] = M.Fetch(task_id, next(self._ids)).frames()
        p = self.tasks.get(task_id)
        if p is None or p.future is not future:
            self.tasks[task_id] = Pending(future, None)
        else:
            p.asked = True
        return frames

    def ask(self, future: Any, message: Request) -> list[Any]:
        """Register ``future`` for the REPLY to ``message`` (its request id is set here); return the frames."""
        rid = next(self._ids)
        frames: list[Any] = dataclasses.replace(message, rid=rid).frames()
        self.requests[rid] = Pending(future, frames)
        return frames

    def request(self, future: Any, cmd: bytes, body: dict[str, Any]) -> list[Any]:
        """Register ``future`` for the REPLY to command ``cmd`` with header ``body`` as given, plus a
        request id; return the frames. For a request :mod:`serializers.messages` has no field for
        (a test's fault hook); the client's own requests go through :meth:`ask`."""
        rid = next(self._ids)
        frames = [P.SIGNATURE, cmd, pack({**body, "rid": rid})]
        self.requests[rid] = Pending(future, frames)
        return frames

    def ping(self, vote: bool = False) -> list[Any]:
        """A client heartbeat; the orchestrator answers with its epoch.

        It carries ``rx``, the results received on this connection so far, so that the
        orchestrator sends more (it holds back what a connection has not read:
        ``--max-unread-bytes``). ``vote``: this client failed over because the other server
        went silent; a passive server of a binary-star pair takes over on such a vote (see
        :mod:`orchester.ha.star`).
        """
        self._rx_bytes = 0
        frames: list[Any] = M.Heartbeat(rx=self.rx, vote=vote).frames()
        return frames

    def connected(self) -> None:
        """A new connection (a new routing id): its count of received results starts at zero."""
        self.rx = 0
        self._rx_bytes = 0

    @property
    def ack_due(self) -> bool:
        """Enough result bytes came since the last heartbeat to say so at once (not wait for the next)."""
        return self._rx_bytes >= ACK_BYTES

    def pending_frames(self) -> list[list[Any]]:
        """Every request to resend after a reconnect or an orchestrator restart."""
        out: list[list[Any]] = []
        for tid, p in self.tasks.items():
            if p.frames is not None:
                out.append(p.frames)
                if p.asked:  # a server that restarted (or the other one) keeps it for a dependent again: ask again
                    out.append(M.Fetch(tid, next(self._ids)).frames())
        out += [p.frames for p in self.requests.values() if p.frames is not None]
        return out

    def forget(self, future: Any) -> None:
        """Drop a pending entry whose future the caller gave up on."""
        for tid, p in list(self.tasks.items()):
            if p.future is future:
                del self.tasks[tid]
        for rid, p in list(self.requests.items()):
            if p.future is future:
                del self.requests[rid]

    def fail_all(self, exc: BaseException) -> None:
        """Reject every pending future (on close)."""
        for table in (self.tasks, self.requests):
            for p in table.values():
                self._reject(p.future, exc)
            table.clear()

    # ------------------------------------------------------------- replies
    def handle(self, frames: list[Any]) -> bool:
        """Handle one message from the orchestrator (a ``BATCH``: each it carries). Returns True when its epoch changed
        (the orchestrator restarted or failed over: the caller should resend :meth:`pending_frames`).

        Every header is decoded by :func:`serializers.messages.decode_for_client`. Anything wrong
        with a message raises :class:`ProtocolError` (the adapter logs it and goes on), after a
        RESULT that does not decode failed the future of the task it names: fields come from
        satellites through the orchestrator, so no shape is trusted.
        """
        if len(frames) > 2 and bytes(frames[1]) == P.BATCH:  # several in one: each as if it came alone
            restarted, first = False, None
            for message in M.unbatch(frames, 1):
                try:
                    restarted = self._one(message) or restarted
                except ProtocolError as exc:  # the others are handled still; the first error is told
                    first = first or exc
            if first is not None:
                if not restarted:
                    raise first
                log.warning("bad message from orchestrator: %s", first)  # (the restart is what the caller needs)
            return restarted
        return self._one(frames)

    def _one(self, frames: list[Any]) -> bool:
        try:
            return self._handle(frames)
        except ProtocolError:
            raise
        except Exception as exc:  # a field of a shape nothing foresaw: this message only is dropped
            raise ProtocolError(P.E_MALFORMED, f"cannot handle a message: {type(exc).__name__}") from None

    def _handle(self, frames: list[Any]) -> bool:
        if len(frames) < 3:
            raise ProtocolError(P.E_MALFORMED, f"expected at least 3 frames, got {len(frames)}")
        if bytes(frames[0]) != P.SIGNATURE:
            raise ProtocolError(P.E_VERSION, f"unexpected signature {bytes(frames[0])[:16]!r}")
        cmd = bytes(frames[1])
        if cmd == P.RESULT:  # counted even when malformed: the orchestrator counts what it sent
            self.rx += 1
            self._rx_bytes += sum(map(len, frames))
        try:
            msg = M.decode_for_client(cmd, bytes(frames[2]))
        except ProtocolError as exc:
            if cmd == P.RESULT:
                self._bad_result(bytes(frames[2]), exc)
            raise
        if isinstance(msg, M.Result):
            self._on_result(msg, frames[3:])
        elif isinstance(msg, M.Ack):
            for tid in msg.ids:
                p = self.tasks.get(tid)
                if p is not None and not p.acked:
                    p.acked = True
                    if self._accepted is not None:
                        self._accepted(p.future)
        elif isinstance(msg, M.Reply):
            ha = msg.body.get("ha")
            if self.alternatives and isinstance(ha, dict) and ha.get("state") != "active" and "uptime" in msg.body:
                self.redirect = True  # a status from the passive server of a pair: ask the active one
                return False
            p = self.requests.pop(msg.rid, None) if isinstance(msg.rid, int) else None
            if p is not None:
                self._resolve(p.future, msg.body)
        elif isinstance(msg, M.Error):
            self._on_error(msg)
        if isinstance(msg, (M.Ack, M.Beat)) and msg.epoch != self.epoch:
            changed = self.epoch is not None
            self.epoch = msg.epoch
            return changed
        return False

    def _bad_result(self, raw: bytes, exc: ProtocolError) -> None:
        """A RESULT that does not decode fails the one future it names, if it names one we wait for."""
        try:
            tid = unpack(raw).get("id")
        except ProtocolError:
            return
        p = self.tasks.pop(tid, None) if isinstance(tid, str) else None
        if p is not None:
            self._reject(p.future, RemoteError(exc.code, f"bad result from the orchestrator: {exc.detail}"))

    def _on_result(self, res: M.Result, payload: list[Any]) -> None:
        p = self.tasks.pop(res.id, None)
        if p is None:
            return  # a duplicate (resent task) or a result we stopped waiting for
        codec = res.codec or codecs.DEFAULT_CODEC
        if res.ok and codec == "pickle" and (p.codec or self.codec) != "pickle":
            # a result runs code when unpickled: only for a task this client submitted with pickle
            self._reject(p.future, RemoteError(P.E_CODEC, "the result is pickle-coded, but the task was not "
                                               "submitted with pickle: refused"))
            return
        if res.ok:
            try:
                value = codecs.decode(codec, list(res.arrays), payload)
            except ProtocolError as exc:
                self._reject(p.future, RemoteError(exc.code, f"cannot decode result: {exc.detail}"))
                return
            self._resolve(p.future, value)
        else:
            err = res.error or {"type": "BadResult", "msg": "the task failed with an error of the wrong shape"}
            self._reject(p.future, TaskFailed(res.id, str(err.get("type", "Error"))[:256],
                                              str(err.get("msg", ""))[:100_000], str(err.get("tb", ""))[:1_000_000],
                                              res.sat))

    def _on_error(self, err: M.Error) -> None:
        if err.code == P.E_NOT_ACTIVE and self.alternatives:
            self.redirect = True  # keep everything pending: it is resent to the other server
            return
        exc = RemoteError(err.code, err.msg)
        p = None
        if isinstance(err.id, str):
            p = self.tasks.pop(err.id, None)
        if p is None and isinstance(err.rid, int):
            p = self.requests.pop(err.rid, None)
        if p is not None:
            self._reject(p.future, exc)
