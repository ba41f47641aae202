"""The client's protocol core, shared by :class:`~orchester.Client` and :class:`~orchester.AsyncClient`.

It builds request frames, remembers what is pending, and turns incoming
messages into outcomes. It owns no socket and no thread; futures are whatever
the adapter gives it (``concurrent.futures.Future`` or ``asyncio.Future``)
through the :class:`Resolver` callbacks.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from orchester.errors import ClientClosed, RemoteError, TaskFailed
from serializers import ProtocolError, codecs, pack, unpack
from serializers import protocol as P
from serializers.header import MAX_HEADER

log = logging.getLogger("orchester.client.sync")

Resolve = Callable[[Any, Any], None]  # (future, value)
#: Largest REPLY header a client takes (a status of a large fleet, many history rows).
REPLY_LIMIT = 256 * 1024 * 1024
Reject = Callable[[Any, BaseException], None]  # (future, exception)


def resolve_future(fut: Any, value: Any) -> None:
    """Set a future's result unless it is already done (concurrent or asyncio futures alike)."""
    if not fut.done():
        fut.set_result(value)


def reject_future(fut: Any, exc: BaseException) -> None:
    """Set a future's exception unless it is already done."""
    if not fut.done():
        fut.set_exception(exc)


class Pending:
    """A request waiting for its answer: the future and the frames to resend."""

    __slots__ = ("future", "frames", "acked", "codec")

    def __init__(self, future: Any, frames: list[Any] | None, codec: str | None = None) -> None:
        self.future = future
        self.frames = frames
        self.acked = False
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


class ClientCore:
    """Request building, pending bookkeeping and reply handling (no I/O)."""

    def __init__(self, resolve: Resolve, reject: Reject, codec: str = codecs.DEFAULT_CODEC,
                 keep_for_resend: bool = True, accepted: Callable[[Any], None] | None = None) -> None:
        self.name = uuid.uuid4().hex[:12]
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
        return secrets.token_hex(16)

    def submit(self, future: Any, kind: str, args: Sequence[Any], kwargs: dict[str, Any], *,
               priority: int = 0, tags: Sequence[str] = (), timeout: float | None = None,
               codec: str | None = None, task_id: str | None = None, ttl: float | None = None,
               max_run: float | None = None, duration: float | None = None) -> tuple[str, list[Any]]:
        """Register ``future`` for a new task and return ``(task_id, frames)`` to send."""
        codec = codec or self.codec
        meta, body = codecs.encode([list(args), kwargs], codec)
        tid = task_id or self.task_id()
        hdr: dict[str, Any] = {"id": tid, "k": kind, "c": codec}
        if priority:
            hdr["p"] = int(priority)
        if tags:
            hdr["tg"] = list(tags)
        if timeout is not None:
            hdr["to"] = float(timeout)
        if ttl is not None:
            hdr["ttl"] = float(ttl)
        if max_run is not None:
            hdr["mr"] = float(max_run)
        if duration is not None:
            hdr["dur"] = float(duration)
        if meta:
            hdr["arr"] = meta
        frames = [P.SIGNATURE, P.SUBMIT, pack(hdr), *body]
        self.tasks[tid] = Pending(future, frames if self.keep_for_resend else None, codec)
        return tid, frames

    def fetch(self, future: Any, task_id: str) -> list[Any]:
        """Register ``future`` for the result of an existing task; return the FETCH frames."""
        rid = next(self._ids)
        frames = [P.SIGNATURE, P.FETCH, pack({"id": task_id, "rid": rid})]
        self.tasks[task_id] = Pending(future, None)
        return frames

    def request(self, future: Any, cmd: bytes, body: dict[str, Any]) -> list[Any]:
        """Register ``future`` for a STATUS/CANCEL/CONTROL reply; return the frames."""
        rid = next(self._ids)
        body = {**body, "rid": rid}
        frames = [P.SIGNATURE, cmd, pack(body)]
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
        return [P.SIGNATURE, P.HEARTBEAT, pack({"vote": True, "rx": self.rx} if vote else {"rx": self.rx})]

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
        out = [p.frames for p in self.tasks.values() if p.frames is not None]
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
        """Handle one message from the orchestrator. Returns True when its epoch changed
        (the orchestrator restarted or failed over: the caller should resend :meth:`pending_frames`).

        Anything wrong with a message raises :class:`ProtocolError` (the adapter logs it and goes
        on): fields come from satellites through the orchestrator, so no shape is trusted.
        """
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
        hdr = unpack(bytes(frames[2]), REPLY_LIMIT if cmd == P.REPLY else MAX_HEADER)
        if cmd == P.RESULT:
            self.rx += 1
            self._rx_bytes += sum(len(f) for f in frames)
            self._on_result(hdr, frames[3:])
        elif cmd == P.ACK:
            for tid in hdr.get("ids", ()):
                p = self.tasks.get(tid)
                if p is not None and not p.acked:
                    p.acked = True
                    if self._accepted is not None:
                        self._accepted(p.future)
        elif cmd == P.REPLY:
            rid = hdr.pop("rid", None)
            ha = hdr.get("ha")
            if self.alternatives and isinstance(ha, dict) and ha.get("state") != "active" and "uptime" in hdr:
                self.redirect = True  # a status from the passive server of a pair: ask the active one
                return False
            p = self.requests.pop(rid, None) if isinstance(rid, int) else None
            if p is not None:
                self._resolve(p.future, hdr)
        elif cmd == P.ERROR:
            self._on_error(hdr)
        elif cmd != P.HEARTBEAT:
            raise ProtocolError(P.E_UNKNOWN_COMMAND, f"unexpected command {P.command_name(cmd)}")
        epoch = hdr.get("e")
        if isinstance(epoch, str) and epoch != self.epoch:
            changed = self.epoch is not None
            self.epoch = epoch
            return changed
        return False

    def _on_result(self, hdr: dict[str, Any], payload: list[Any]) -> None:
        tid = hdr.get("id")
        p = self.tasks.pop(tid, None) if isinstance(tid, str) else None
        if p is None:
            return  # a duplicate (resent task) or a result we stopped waiting for
        codec = hdr.get("c", codecs.DEFAULT_CODEC)
        if hdr.get("ok") and codec == "pickle" and (p.codec or self.codec) != "pickle":
            # a result runs code when unpickled: only for a task this client submitted with pickle
            self._reject(p.future, RemoteError(P.E_CODEC, "the result is pickle-coded, but the task was not "
                                               "submitted with pickle: refused"))
            return
        if hdr.get("ok"):
            try:
                value = codecs.decode(codec, hdr.get("arr"), payload)
            except ProtocolError as exc:
                self._reject(p.future, RemoteError(exc.code, f"cannot decode result: {exc.detail}"))
                return
            self._resolve(p.future, value)
        else:
            err = hdr.get("err")
            if not isinstance(err, dict):
                err = {"type": "BadResult", "msg": "the task failed with an error of the wrong shape"}
            sat = hdr.get("sat")
            self._reject(p.future, TaskFailed(str(tid), str(err.get("type", "Error"))[:256],
                                              str(err.get("msg", ""))[:100_000], str(err.get("tb", ""))[:1_000_000],
                                              sat if isinstance(sat, str) else None))

    def _on_error(self, hdr: dict[str, Any]) -> None:
        if hdr.get("code") == P.E_NOT_ACTIVE and self.alternatives:
            self.redirect = True  # keep everything pending: it is resent to the other server
            return
        exc = RemoteError(str(hdr.get("code", "error")), str(hdr.get("msg", "")))
        tid, rid = hdr.get("id"), hdr.get("rid")
        p = None
        if isinstance(tid, str):
            p = self.tasks.pop(tid, None)
        if p is None and isinstance(rid, int):
            p = self.requests.pop(rid, None)
        if p is not None:
            self._reject(p.future, exc)
