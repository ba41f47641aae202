"""The orchestrator's policy core: every decision, no socket, no clock.

:class:`Orchestrator` takes messages as lists of frames (``[identity,
signature, command, header, payload...]``) together with the current
monotonic time, and appends what must be sent to :attr:`Orchestrator.out`
(``(socket_key, frames, task_id_or_None)``) and what must be published to
:attr:`Orchestrator.pub`. The socket adapter (:mod:`orchester.broker`) owns
the sockets and the loop; tests drive this class directly with a fake clock.

Payload frames are never decoded here: a task's header frame and payload
frames are forwarded to the satellite as received, and a satellite's result
frames are forwarded to the client as received.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from serializers import protocol as P
from serializers.header import ProtocolError, check_signature, error_frames, field, pack, unpack
from tracker import SatelliteState, TaskState, TimerHeap

from .config import OrchestratorConfig
from .fleet import Fleet, SatelliteRecord
from .logutil import warn_limited
from .results import ResultStore
from .routing import make_strategy
from .tasks import QueueKey, Task, TaskQueues

log = logging.getLogger("orchester")

Out = tuple[Any, list[Any], "str | None"]


def _len(frames: list[Any]) -> int:
    return sum(len(f) for f in frames)


class Orchestrator:
    """Task table, queues, fleet and routing of one orchestrator (pure policy)."""

    def __init__(self, config: OrchestratorConfig, now: float, *, epoch: str | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.cfg = config
        self.epoch = epoch or uuid.uuid4().hex[:16]
        self.wall = wall
        self.started = now
        #: Event endpoints, told to clients in status replies (set by the socket adapter).
        self.pub_endpoints: list[str] = []
        self.tasks: dict[str, Task] = {}
        self.queues = TaskQueues()
        self.fleet = Fleet()
        self.results = ResultStore(config.result_retention, config.result_retention_bytes)
        self.timers: TimerHeap[str] = TimerHeap()
        self.strategy = make_strategy(config.strategy)
        self.out: list[Out] = []
        self.pub: list[list[bytes]] = []
        self.counters: Counter[str] = Counter()
        self._acks: dict[tuple[Any, bytes], list[str]] = {}
        self._seq = 0
        self._dispatch_seq = 0
        self._hb_every = config.heartbeat_interval
        self._lost_after = config.heartbeat_interval * config.liveness
        self._next_hb = now + self._hb_every
        self._subs: Counter[bytes] = Counter()
        self._want: dict[bytes, bool] = dict.fromkeys((b"task:", b"progress:", b"sat:", b"control:"), False)
        self._handlers: dict[bytes, Callable[[Any, bytes, list[Any], float], None]] = {
            P.SUBMIT: self._on_submit, P.DONE: self._on_done, P.HEARTBEAT: self._on_heartbeat,
            P.PROGRESS: self._on_progress, P.REGISTER: self._on_register, P.LEAVE: self._on_leave,
            P.STATUS: self._on_status, P.FETCH: self._on_fetch, P.CANCEL: self._on_cancel,
            P.CONTROL: self._on_control, P.ERROR: self._on_peer_error,
        }

    # ------------------------------------------------------------------ input
    def handle(self, sock: Any, frames: list[Any], now: float) -> None:
        """Handle one message received on a ROUTER socket (``frames[0]`` is the identity)."""
        ident = bytes(frames[0])
        try:
            if len(frames) < 4:
                raise ProtocolError(P.E_MALFORMED, f"expected at least 4 frames, got {len(frames)}")
            check_signature(bytes(frames[1]))
            cmd = bytes(frames[2])
            handler = self._handlers.get(cmd)
            if handler is None:
                raise ProtocolError(P.E_UNKNOWN_COMMAND, f"unknown command {P.command_name(cmd)}")
            if self.cfg.max_message and len(frames) > 4 and _len(frames) > self.cfg.max_message:
                raise ProtocolError(P.E_TOO_LARGE, f"message exceeds {self.cfg.max_message} bytes")
            sat = self.fleet.by_ident.get(ident)
            if sat is not None:
                sat.last_seen = now
            handler(sock, ident, frames, now)
        except ProtocolError as exc:
            self.counters["bad_messages"] += 1
            self.counters[f"errors.{exc.code}"] += 1
            warn_limited(log, "refused message from %r: %s", ident, exc)
            if len(frames) > 2 and bytes(frames[2]) == P.ERROR:
                return  # never answer an error with an error (no ping-pong)
            extra = {}
            if exc.code != P.E_MALFORMED or len(frames) >= 4:
                extra = self._request_ids(frames)
            self.out.append((sock, [ident, *error_frames(exc.code, exc.detail, **extra)], None))

    def _request_ids(self, frames: list[Any]) -> dict[str, Any]:
        """Best effort: the ``id``/``rid`` of the refused request, so the sender can match the error."""
        try:
            hdr = unpack(bytes(frames[3]))
        except (ProtocolError, IndexError):
            return {}
        return {k: hdr[k] for k in ("id", "rid") if isinstance(hdr.get(k), (str, int))}

    # ----------------------------------------------------------------- clients
    def _on_submit(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        tid = field(hdr, "id", str)
        kind = field(hdr, "k", str)
        priority = field(hdr, "p", int, 0)
        tags = field(hdr, "tg", list, [])
        timeout = field(hdr, "to", (int, float), None)
        if len(frames) < 5:
            raise ProtocolError(P.E_MALFORMED, "SUBMIT needs a payload body frame")
        old = self.tasks.get(tid)
        if old is not None:  # a resend (after reconnect or failover): idempotent by id
            self.counters["duplicate_submits"] += 1
            old.client, old.csock = ident, sock
            self._ack(sock, ident, tid)
            stored = self.results.get(tid)
            if stored is not None:
                self._send_result(old, stored.frames, stored.size, store=False)
            return
        if len(self.queues) >= self.cfg.max_queue:
            raise ProtocolError(P.E_BUSY, f"queue full ({self.cfg.max_queue} tasks)")
        if len(self.fleet) and not self.fleet.offers(kind):
            raise ProtocolError(P.E_UNKNOWN_KIND, f"no satellite offers task kind {kind!r}; "
                                f"offered: {sorted(self.fleet.kinds())}")
        if not all(isinstance(t, str) for t in tags):
            raise ProtocolError(P.E_MALFORMED, "tags must be strings")
        self._seq += 1
        payload = frames[4:]
        task = Task(tid, kind, priority, frozenset(tags), ident, sock, frames[3], payload,
                    now, self._seq, _len(payload))
        self.tasks[tid] = task
        self.queues.push(task)
        self.counters["submitted"] += 1
        if timeout is not None and timeout > 0:
            task.timer = self.timers.schedule(now + timeout, tid)
        self._ack(sock, ident, tid)
        if self._want[b"task:"]:
            self._task_event(task, "pending")

    def _ack(self, sock: Any, ident: bytes, tid: str) -> None:
        key = (sock, ident)
        ids = self._acks.get(key)
        if ids is None:
            self._acks[key] = [tid]
        else:
            ids.append(tid)

    def _on_heartbeat(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        if "sid" in hdr and ident not in self.fleet.by_ident:
            self.out.append((sock, [ident, P.SIGNATURE, P.RECONNECT, pack({"e": self.epoch})], None))
        elif "sid" not in hdr:  # a client's ping
            self.out.append((sock, [ident, P.SIGNATURE, P.HEARTBEAT, pack({"e": self.epoch})], None))

    def _on_status(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        self._reply(sock, ident, hdr.get("rid"), self.status(now))

    def _on_fetch(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        tid = field(hdr, "id", str)
        stored = self.results.get(tid)
        task = self.tasks.get(tid)
        if stored is not None and task is not None:
            task.client, task.csock = ident, sock
            self._send_result(task, stored.frames, stored.size, store=False)
        elif task is not None:  # not finished: the result will go to this client
            task.client, task.csock = ident, sock
            self._reply(sock, ident, hdr.get("rid"), {"id": tid, "state": task.state.name.lower()})
        else:
            raise ProtocolError(P.E_UNKNOWN_TASK, f"task {tid!r} is unknown (never submitted, "
                                "or its result has left the retention window)")

    def _on_cancel(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        tid = field(hdr, "id", str)
        task = self.tasks.get(tid)
        if task is None:
            raise ProtocolError(P.E_UNKNOWN_TASK, f"task {tid!r} is unknown")
        was = task.state
        if not was.terminal:
            self._finish_error(task, TaskState.CANCELLED, P.ERR_CANCELLED, "cancelled by a client", now)
        self._reply(sock, ident, hdr.get("rid"), {"id": tid, "cancelled": not was.terminal,
                                                  "state": task.state.name.lower()})

    def _on_control(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        op = field(hdr, "op", str)
        if op != "strategy":
            raise ProtocolError(P.E_BAD_REQUEST, f"unknown control operation {op!r}; known: ['strategy']")
        name = field(hdr, "name", str)
        try:
            strategy = make_strategy(name)
        except ValueError as exc:
            raise ProtocolError(P.E_BAD_REQUEST, str(exc)) from None
        old, self.strategy = self.strategy.name, strategy
        self.counters["strategy_switches"] += 1
        log.info("routing strategy switched from %s to %s", old, strategy.name)
        self._event(b"control:strategy", {"op": "strategy", "old": old, "new": strategy.name})
        self._reply(sock, ident, hdr.get("rid"), {"strategy": strategy.name, "previous": old})

    def _reply(self, sock: Any, ident: bytes, rid: Any, body: dict[str, Any]) -> None:
        body["rid"] = rid
        self.out.append((sock, [ident, P.SIGNATURE, P.REPLY, pack(body)], None))

    # -------------------------------------------------------------- satellites
    def _on_register(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        sid = field(hdr, "sid", str)
        slots = field(hdr, "slots", int)
        kinds = field(hdr, "kinds", list)
        tags = field(hdr, "tags", list, [])
        if slots < 1 or not all(isinstance(k, str) for k in kinds + tags):
            raise ProtocolError(P.E_MALFORMED, "REGISTER needs slots >= 1 and string kinds and tags")
        old = self.fleet.by_id.get(sid)
        if old is not None:  # re-registration (reconnect): requeue what the old session held
            self._lose(old, now, "re-registered")
            self.fleet.remove(old)
        sat = SatelliteRecord(sid, ident, sock, slots, frozenset(tags), frozenset(kinds), now,
                              host=str(hdr.get("host", "")), pid=int(hdr.get("pid", 0) or 0),
                              workers=int(hdr.get("workers", 0) or 0))
        self.fleet.add(sat)
        self.counters["satellites_registered"] += 1
        log.info("satellite %s registered: %d slots, kinds %s, tags %s", sid, slots, kinds, tags)
        self.out.append((sock, [ident, P.SIGNATURE, P.WELCOME, pack(
            {"e": self.epoch, "hb": self._hb_every, "liveness": self.cfg.liveness})], None))
        self._event(b"sat:" + sid.encode(), {"sat": sid, "state": "idle", "event": "joined",
                                             "slots": slots, "tags": tags, "kinds": kinds})

    def _on_done(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident, frames)
        if sat is None:
            return
        hdr = unpack(bytes(frames[3]))
        tid = field(hdr, "id", str)
        attempt = field(hdr, "a", int)
        task = sat.inflight.get(tid)
        if task is None or task.attempt != attempt:
            self.counters["stale_results"] += 1
            log.info("discarded stale result of %s attempt %s from %s", tid, attempt, sat.sid)
            return
        del sat.inflight[tid]
        self.fleet.free_slots += 1
        if not sat.inflight:
            sat.state = SatelliteState.IDLE
        if task.state.terminal:  # cancelled or timed out while running: the client already knows
            return
        ok = bool(hdr.get("ok"))
        if ok:
            sat.done += 1
        else:
            sat.failed += 1
        task.state = TaskState.DONE if ok else TaskState.FAILED
        self.counters["done" if ok else "failed"] += 1
        result = [P.SIGNATURE, P.RESULT, frames[3], *frames[4:]]
        self._complete(task, result, now)

    def _on_progress(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        if self._satellite(sock, ident, frames) is None:
            return
        self.counters["progress"] += 1
        if self._want[b"progress:"]:
            hdr = unpack(bytes(frames[3]))
            tid = field(hdr, "id", str)
            self.pub.append([b"progress:" + tid.encode(), bytes(frames[3])])

    def _on_leave(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        sat = self.fleet.by_ident.get(ident)
        if sat is None:
            return
        log.info("satellite %s left", sat.sid)
        self._lose(sat, now, "left", state=SatelliteState.LEFT)
        self.fleet.remove(sat)

    def _on_peer_error(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        self.counters["peer_errors"] += 1
        log.warning("peer %r reported error %s: %s", ident, hdr.get("code"), hdr.get("msg"))

    def _satellite(self, sock: Any, ident: bytes, frames: list[Any]) -> SatelliteRecord | None:
        sat = self.fleet.by_ident.get(ident)
        if sat is None:  # e.g. we restarted: ask it to register again
            self.counters["unknown_satellite"] += 1
            self.out.append((sock, [ident, P.SIGNATURE, P.RECONNECT, pack({"e": self.epoch})], None))
        return sat

    def _lose(self, sat: SatelliteRecord, now: float, reason: str,
              state: SatelliteState = SatelliteState.LOST) -> None:
        """Requeue every task in flight on ``sat`` (a new attempt each) and mark it lost."""
        sat.state = state
        tasks = list(sat.inflight.values())
        sat.inflight.clear()
        for task in tasks:
            if task.state.terminal:
                continue
            if task.attempt >= self.cfg.max_attempts:
                self._finish_error(task, TaskState.FAILED, P.ERR_RETRIES,
                                   f"{task.attempt} attempts failed; last: satellite {sat.sid} {reason}", now)
                continue
            task.state = TaskState.PENDING
            task.satellite = None
            self.queues.push(task)
            self.counters["requeued"] += 1
            if self._want[b"task:"]:
                self._task_event(task, "pending", reason=f"satellite {sat.sid} {reason}")
        if tasks:
            log.warning("satellite %s %s: requeued %d task(s)", sat.sid, reason, len(tasks))
        self.fleet.changed()
        self._event(b"sat:" + sat.sid.encode(), {"sat": sat.sid, "state": state.name.lower(),
                                                 "event": reason, "requeued": len(tasks)})

    # ------------------------------------------------------------ scheduling
    def schedule(self) -> None:
        """Dispatch queued tasks while some eligible satellite has credit."""
        fleet, queues = self.fleet, self.queues
        blocked: set[QueueKey] = set()
        while fleet.free_slots > 0 and len(queues):
            key = queues.best_key(None) if not blocked else self._best_unblocked(blocked)
            if key is None:
                return
            cands = [s for s in fleet.eligible(key) if len(s.inflight) < s.slots]
            if not cands:
                blocked.add(key)
                continue
            task = queues.pop(key)
            self._dispatch(task, self.strategy.choose(task, cands) if len(cands) > 1 else cands[0])

    def _best_unblocked(self, blocked: set[QueueKey]) -> QueueKey | None:
        allowed = [k for k in self.queues.keys() if k not in blocked]
        return self.queues.best_key(allowed) if allowed else None

    def _dispatch(self, task: Task, sat: SatelliteRecord) -> None:
        task.attempt += 1
        task.state = TaskState.DISPATCHED
        task.satellite = sat.sid
        sat.inflight[task.id] = task
        sat.state = SatelliteState.BUSY
        self.fleet.free_slots -= 1
        self._dispatch_seq += 1
        sat.last_dispatch = self._dispatch_seq
        self.counters["dispatched"] += 1
        self.out.append((sat.sock, [sat.ident, P.SIGNATURE, P.DISPATCH,
                                    pack({"id": task.id, "a": task.attempt}), task.header,
                                    *task.payload], None))
        if self._want[b"task:"]:
            self._task_event(task, "dispatched")

    # ------------------------------------------------------------- completion
    def _finish_error(self, task: Task, state: TaskState, etype: str, msg: str, now: float) -> None:
        """End ``task`` with an error the orchestrator decided (cancel, timeout, retries)."""
        if task.state is TaskState.DISPATCHED and task.satellite is not None:
            sat = self.fleet.by_id.get(task.satellite)
            if sat is not None and task.id in sat.inflight:  # credit returns when its DONE arrives
                self.out.append((sat.sock, [sat.ident, P.SIGNATURE, P.ABORT,
                                            pack({"id": task.id, "a": task.attempt})], None))
        task.state = state
        task.error = etype
        self.counters["cancelled" if state is TaskState.CANCELLED else "failed"] += 1
        hdr = pack({"id": task.id, "a": task.attempt, "ok": False,
                    "err": {"type": etype, "msg": msg, "tb": ""}, "sat": task.satellite})
        self._complete(task, [P.SIGNATURE, P.RESULT, hdr], now, reason=msg)

    def _complete(self, task: Task, result: list[Any], now: float, reason: str | None = None) -> None:
        self.timers.cancel(task.timer)
        task.timer = None
        task.payload = []  # the input is no longer needed
        size = _len(result)
        self._send_result(task, result, size, store=True)
        if self._want[b"task:"]:
            self._task_event(task, task.state.name.lower(), reason=reason)

    def _send_result(self, task: Task, frames: list[Any], size: int, store: bool) -> None:
        self.out.append((task.csock, [task.client, *frames], task.id))
        if store:
            self.results.put(task.id, frames, size)
        else:
            self.results.mark(task.id, False)

    def delivered(self, task_id: str) -> None:
        """The adapter handed a result to its client's socket: it may be evicted first."""
        self.results.mark(task_id, True)

    def undeliverable(self, task_id: str) -> None:
        """The adapter could not hand a result to its client: keep it for fetch."""
        self.counters["results_undeliverable"] += 1

    # ---------------------------------------------------------- housekeeping
    def housekeeping(self, now: float) -> None:
        """Run after every wake-up: retention, timeouts, lost satellites, heartbeats, acks, dispatch."""
        if len(self.results) > self.cfg.result_retention or self.results.bytes > self.results.max_bytes:
            for tid in self.results.trim():
                old = self.tasks.get(tid)
                if old is not None and old.state.terminal:
                    del self.tasks[tid]
        if len(self.timers):
            for tid in self.timers.pop_expired(now):
                task = self.tasks.get(tid)
                if task is not None and not task.state.terminal:
                    task.timer = None
                    self.counters["timeouts"] += 1
                    self._finish_error(task, TaskState.FAILED, P.ERR_TIMEOUT,
                                       "task exceeded its timeout", now)
        for sat in self.fleet.expired(now, self._lost_after):
            log.warning("satellite %s silent for %.1fs: lost", sat.sid, now - sat.last_seen)
            self.counters["satellites_lost"] += 1
            self._lose(sat, now, "lost (heartbeat timeout)")
            self.fleet.remove(sat)
        if now >= self._next_hb:
            self._next_hb = now + self._hb_every
            hb = pack({"e": self.epoch})
            for sat in self.fleet:
                self.out.append((sat.sock, [sat.ident, P.SIGNATURE, P.HEARTBEAT, hb], None))
        if self._acks:
            for (sock, ident), ids in self._acks.items():
                self.out.append((sock, [ident, P.SIGNATURE, P.ACK, pack({"ids": ids, "e": self.epoch})], None))
            self._acks.clear()
        self.schedule()

    def next_wakeup(self, now: float) -> float:
        """Seconds until housekeeping has something to do, at most one heartbeat interval."""
        deadline = self._next_hb
        t = self.timers.next_deadline()
        if t is not None and t < deadline:
            deadline = t
        for sat in self.fleet.by_id.values():
            expiry = sat.last_seen + self._lost_after
            if expiry < deadline:
                deadline = expiry
        return max(0.0, deadline - now)

    # ---------------------------------------------------------------- events
    def subscription(self, msg: bytes) -> None:
        """Track an XPUB (un)subscription message so events are built only when wanted."""
        if not msg:
            return
        topic = msg[1:]
        if msg[0] == 1:
            self._subs[topic] += 1
        elif self._subs[topic] > 1:
            self._subs[topic] -= 1
        else:
            self._subs.pop(topic, None)
        for cat in self._want:
            self._want[cat] = any(p.startswith(cat) or cat.startswith(p) for p in self._subs)

    def _event(self, topic: bytes, body: dict[str, Any]) -> None:
        for cat, wanted in self._want.items():
            if topic.startswith(cat):
                if wanted:
                    body["t"] = self.wall()
                    self.pub.append([topic, pack(body)])
                return

    def _task_event(self, task: Task, state: str, reason: str | None = None) -> None:
        body = {"id": task.id, "kind": task.kind, "state": state, "attempt": task.attempt,
                "sat": task.satellite, "t": self.wall()}
        if reason:
            body["reason"] = reason
        self.pub.append([b"task:" + task.id.encode(), pack(body)])

    # ---------------------------------------------------------------- status
    def status(self, now: float) -> dict[str, Any]:
        """A summary of tasks, queues and satellites for ``STATUS`` replies."""
        states: Counter[str] = Counter(t.state.name.lower() for t in self.tasks.values())
        return {
            "epoch": self.epoch, "uptime": round(now - self.started, 3), "pub": self.pub_endpoints,
            "strategy": self.strategy.name, "tasks": dict(states),
            "queued": self.queues.depth(),
            "satellites": [s.describe(now) for s in self.fleet],
            "results_retained": len(self.results),
            "counters": dict(self.counters),
        }
