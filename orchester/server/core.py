"""The orchestrator's policy core: every decision, no socket, no clock.

:class:`Orchestrator` takes messages as lists of frames (``[identity,
signature, command, header, payload...]``) together with the current
monotonic time, and appends what must be sent to :attr:`Orchestrator.out`
(``(socket_key, frames, task_id_or_None)``) and what must be published to
:attr:`Orchestrator.pub`. The socket adapter (:mod:`orchester.server.broker`) owns
the sockets and the loop; tests drive this class directly with a fake clock.

Payload frames are never decoded here: a task's header frame and payload
frames are forwarded to the satellite as received, and a satellite's result
frames are forwarded to the client as received.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from orchester.config import OrchestratorConfig
from orchester.logutil import log_limited, warn_limited
from orchester.server.fleet import Fleet, SatelliteRecord
from orchester.server.lifecycle import T_DEADLINE, _len
from orchester.server.peers import ConnectionKeys, RequestRate, Subscriptions, UnreadResults
from orchester.server.requests import Requests
from orchester.server.results import ResultStore
from orchester.server.routing import make_strategy
from orchester.server.tasks import SubmitHeader, Task, TaskQueues
from serializers import protocol as P
from serializers.codecs import check_submit_codec
from serializers.header import (
    MAX_SECONDS,
    ProtocolError,
    check_signature,
    error_frames,
    field,
    names,
    number,
    pack,
    text,
    unpack,
)
from tracker import SatelliteEvent, SatelliteState, TaskEvent, TaskState, TimerWheel

log = logging.getLogger("orchester")

Out = tuple[Any, list[Any], "str | None"]
#: ``ORCHESTER_STRICT=1``: an internal error in a handler is raised, not answered.
STRICT = os.environ.get("ORCHESTER_STRICT", "") not in ("", "0")
#: What the event stream publishes, by topic prefix.
EVENT_CATEGORIES = (b"task:", b"progress:", b"sat:", b"control:")
#: Satellite ids one key keeps bound (each new satellite process may pick a new one).
MAX_SIDS_PER_KEY = 4096
#: Requests that read or walk the tables: one key may make ``request_rate`` of them a second.
RATED = frozenset({P.STATUS, P.HISTORY})
TE, SE, TS, SS = TaskEvent, SatelliteEvent, TaskState, SatelliteState


class Orchestrator(Requests):
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
        self.state_counts = [0] * len(TaskState)
        self.pending_kinds: Counter[str] = Counter()
        self.queues = TaskQueues()
        self.fleet = Fleet()
        self.results = ResultStore(config.result_retention, config.result_retention_bytes)
        self.timers: TimerWheel[str] = TimerWheel()
        self.strategy = make_strategy(config.strategy, allowed=config.allowed_strategies)
        self.out: list[Out] = []
        self.pub: list[list[bytes]] = []
        self.counters: Counter[str] = Counter()
        self.journal_out = None
        self.queued_bytes = 0  #: payload bytes of queued tasks held in memory
        #: metrics (filled only when ``metrics_on``): transitions per (kind, state), latencies per kind
        self.metrics_on = False
        self.kind_counts: dict[str, list[int]] = {}  #: kind -> transitions into each TaskState
        self.latencies: list[tuple[str, float]] = []
        #: tasks whose payload should leave memory once their journal record is durable
        self.to_spill: dict[str, Task] = {}
        #: reads a spilled task's payload back (set by the socket adapter)
        self.load_spilled: Callable[[Task], list[Any]] | None = None
        #: history queries for the journal reader (socket key, identity, rid, filters)
        self.queries: list[tuple[Any, bytes, Any, dict[str, Any]]] = []
        #: restored tasks that were in flight, waiting for their satellite to re-announce them
        self.reclaim: dict[str, Task] = {}
        self.reclaim_until = 0.0  #: until when satellites may claim restored tasks (after a restart)
        #: per client (key name or routing identity): [unfinished tasks, their payload bytes]
        self.client_load: dict[str | bytes, list[int]] = {}
        self._user: str | None = None
        #: CurveZMQ on: the identity (name, roles) of a key name, ``None`` if not authorised
        self.identify: Callable[[str | None], Any] | None = None
        #: the binary-star adapter's view of the pair, for status replies and metrics (None: no pair)
        self.ha_status: Callable[[float], dict[str, Any]] | None = None
        #: a journal reader answers history queries (set by the socket adapter with a journal)
        self.history_reader = False
        #: the binary-star adapter's operations (``promote``; ``peer_link`` as a test fault hook)
        self.ha_control: Callable[[dict[str, Any], float], dict[str, Any]] | None = None
        self._init_lifecycle(config)
        self._acks: dict[tuple[Any, bytes], list[str]] = {}
        self._seq = 0
        self._dispatch_seq = 0
        self._hb_every = config.heartbeat_interval
        self._lost_after = config.lost_after
        self._next_hb = now + self._hb_every
        self.subs = self.subscriptions(keys=False)
        self._want = self.subs.want  #: per event category: whether anyone subscribed to it
        #: CurveZMQ on: which key owns each routing identity (results go only to their owner's)
        self.conns = ConnectionKeys(config.max_key_connections)
        self.unread = UnreadResults(config.max_unread_bytes)
        self.clock = now
        self.rate = RequestRate(config.request_rate)
        #: CurveZMQ on: the key each satellite id belongs to (the first that registered it; journaled)
        self.sat_keys: dict[str, str] = {}
        self._handlers: dict[bytes, Callable[[Any, bytes, list[Any], float], None]] = {
            P.SUBMIT: self._on_submit, P.DONE: self._on_done, P.HEARTBEAT: self._on_heartbeat,
            P.STARTED: self._on_started, P.PROGRESS: self._on_progress, P.REGISTER: self._on_register,
            P.LEAVE: self._on_leave, P.STATUS: self._on_status, P.FETCH: self._on_fetch,
            P.CANCEL: self._on_cancel, P.CONTROL: self._on_control, P.ERROR: self._on_peer_error,
            P.HISTORY: self._on_history,
        }

    # ------------------------------------------------------------------ input
    def handle(self, sock: Any, frames: list[Any], now: float, user: str | None = None) -> None:
        """Handle one message received on a ROUTER socket (``frames[0]`` is the identity).

        ``user``: the name of the key the sender authenticated with (CurveZMQ), if any.
        """
        ident = bytes(frames[0])
        self._user = user
        self.clock = now
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
            if self.identify is not None:
                self._authorise(cmd, user)
                if user is not None:
                    self.conns.bind(ident, user, now)  # refuses another key on this identity
            if cmd in RATED and not self.rate.take(user or ident, now):
                self.counters["rate_limited"] += 1
                raise ProtocolError(P.E_BUSY, f"too many requests: at most {self.cfg.request_rate:g} a second "
                                    "(--request-rate); retry later")
            sat = self.fleet.by_ident.get(ident)
            if sat is not None:
                sat.last_seen = now
                if sat.state is SS.SILENT:
                    self._heard(sat, now)
            try:
                handler(sock, ident, frames, now)
            except ProtocolError:
                raise
            except Exception as exc:  # our own failure on a message that decoded: never stop the loop for it
                self.counters["handler_errors"] += 1
                log.exception("a %s message from %r could not be handled", P.command_name(cmd), ident[:64])
                if STRICT:
                    raise
                raise ProtocolError(P.E_INTERNAL, f"the orchestrator failed on this message ({type(exc).__name__}); "
                                    "it is logged") from None
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
        sub = SubmitHeader.parse(hdr)  # every field checked before anything changes
        # pickle only with serve --allow-pickle, and with keys only from a key holding the pickle role (the
        # key is looked up for a pickle-coded task only: the roles are not needed for any other)
        roles: frozenset[str] | None = None
        if self.identify is not None and hdr.get("c") == "pickle":
            roles = getattr(self.identify(self._user), "roles", frozenset())
        check_submit_codec(hdr, allow_pickle=self.cfg.allow_pickle, roles=roles)
        tid, kind, timeout = sub.id, sub.kind, sub.timeout
        if len(frames) < 5:
            raise ProtocolError(P.E_MALFORMED, "SUBMIT needs a payload body frame")
        old = self.tasks.get(tid)
        if old is not None:  # a resend (after reconnect or failover): idempotent by id
            self._may_touch(old)
            self.counters["duplicate_submits"] += 1
            self._ack(sock, ident, tid)
            stored = self.results.get(tid)
            if not self._owner_asks(old):  # an admin resending another key's task: a copy, no rebinding
                if stored is not None:
                    self.out.append((sock, [ident, *stored.frames], None))
                return
            old.client, old.csock = ident, sock
            if stored is not None:
                self._send_result(old, stored.frames, stored.size, store=False)
            return
        if len(self.queues) >= self.cfg.max_queue:
            raise ProtocolError(P.E_BUSY, f"queue full ({self.cfg.max_queue} tasks)")
        owner = self._user or ident
        unfinished, held = self.client_load.get(owner, (0, 0))
        held += self.unread.waiting_bytes(owner)  # its results that wait for it to read
        payload = frames[4:]
        # what this task costs its client: payload, header and identity (a 64 KB header is not free)
        size = _len(payload) + len(frames[3]) + len(ident) + len(tid)
        if unfinished >= self.cfg.max_client_tasks or held + size > self.cfg.max_client_bytes:
            raise ProtocolError(P.E_LIMIT, f"this client has {unfinished} unfinished tasks holding {held} bytes; "
                                f"a task of {size} bytes more would pass --max-client-tasks "
                                f"{self.cfg.max_client_tasks} or --max-client-bytes {self.cfg.max_client_bytes}")
        if len(self.fleet) and not self.fleet.offers(kind):
            raise ProtocolError(P.E_UNKNOWN_KIND, f"no satellite offers task kind {kind!r}; "
                                f"offered: {sorted(self.fleet.kinds())}")
        self._seq += 1
        task = Task(tid, kind, sub.priority, sub.tags, ident, sock, frames[3], payload, now, self._seq, size)
        task.ttl, task.max_run, task.duration = sub.ttl, sub.max_run, sub.duration
        task.owner, task.counted = owner, True
        wall = self.wall()
        task.history.add(wall, TS.PENDING, 0)
        load = self.client_load.setdefault(owner, [0, 0])
        load[0] += 1
        load[1] += size
        self.tasks[tid] = task
        self.state_counts[TS.PENDING] += 1
        self.pending_kinds[kind] += 1
        self.queues.push(task)
        self.counters["submitted"] += 1
        if timeout is not None:
            task.deadline = self.timers.schedule(now + timeout, tid, T_DEADLINE)
        self.queued_bytes += task.size
        if self.journal_out is not None:
            self.journal_out.append(["S", tid, ident, bytes(frames[3]), [memoryview(f) for f in payload],
                                     wall, timeout, self._user])
            if self.cfg.spill_bytes and self.queued_bytes > self.cfg.spill_bytes:
                self.to_spill[tid] = task
        self._arm(task, now)
        self._ack(sock, ident, tid)
        if self._want[b"task:"]:
            self._publish_task(task, wall)

    def _ack(self, sock: Any, ident: bytes, tid: str) -> None:
        key = (sock, ident)
        ids = self._acks.get(key)
        if ids is None:
            self._acks[key] = [tid]
        else:
            ids.append(tid)

    def _on_heartbeat(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        report = hdr.get("m")
        if isinstance(report, dict):
            sat = self.fleet.by_ident.get(ident)
            if sat is not None:
                sat.reported = {str(k)[:64]: float(v) for k, v in list(report.items())[:64]
                                if isinstance(v, (int, float)) and math.isfinite(v)}  # these go to carbon
        if "sid" in hdr and ident not in self.fleet.by_ident:
            self.out.append((sock, [ident, P.SIGNATURE, P.RECONNECT, pack({"e": self.epoch})], None))
        elif "sid" not in hdr:  # a client's ping, with how many results it received on this connection
            self.out.append((sock, [ident, P.SIGNATURE, P.HEARTBEAT, pack({"e": self.epoch})], None))
            received = number(hdr, "rx", 0, 2**62, None, integer=True)
            if received is not None:
                for tid in self.unread.ack(ident, received, now):
                    task, stored = self.tasks.get(tid), self.results.get(tid)
                    if task is not None and stored is not None and task.client == ident:
                        self._send_result(task, stored.frames, stored.size, store=False)

    # -------------------------------------------------------------- satellites
    def _on_register(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        sid = text(hdr, "sid", limit=128)
        slots = number(hdr, "slots", 1, 2**31, integer=True)
        kinds = names(hdr, "kinds", limit=4096)
        tags = names(hdr, "tags", [])
        progress = field(hdr, "progress", dict, {})
        if len(progress) > 4096 or not all(isinstance(k, str) and isinstance(v, (int, float))
                                           and not isinstance(v, bool) and 0 <= v <= MAX_SECONDS
                                           for k, v in progress.items()):
            raise ProtocolError(P.E_MALFORMED, "REGISTER progress must map kinds to stall timeouts in seconds")
        walltime = number(hdr, "walltime", 0, MAX_SECONDS, None)
        pid = number(hdr, "pid", 0, 2**31, 0, integer=True)
        workers = number(hdr, "workers", 0, 2**20, 0, integer=True)
        if self.identify is not None:
            owner = self.sat_keys.get(sid)  # a satellite id belongs to the key that first registered it
            if owner is not None and owner != self._user:
                self.counters["sid_refused"] += 1
                raise ProtocolError(P.E_FORBIDDEN, f"satellite id {sid!r} belongs to another key")
            if owner is None and self._user is not None:
                self._bind_sid(sid, self._user)
            # a key may be limited to some task kinds (its file's ``kinds``)
            allowed = getattr(self.identify(self._user), "kinds", None)
            if allowed is not None:
                refused = sorted(set(kinds) - allowed)
                kinds = [k for k in kinds if k in allowed]
                if not kinds:
                    self.counters["kinds_refused"] += 1
                    raise ProtocolError(P.E_FORBIDDEN, f"key {self._user!r} may offer only the task kinds "
                                        f"{sorted(allowed)}")
                if refused:
                    log.warning("satellite %r: its key may not offer %s; it gets %s only", sid, refused[:20], kinds)
        if slots > self.cfg.max_slots:
            log.warning("satellite %r announced %d slots: cut to %d (--max-slots)", sid[:128], slots,
                        self.cfg.max_slots)
            slots = self.cfg.max_slots
        old = self.fleet.by_id.get(sid)
        if old is not None and old.ident == ident and old.user == self._user:
            # the same session registering again (a burst of our RECONNECTs after a restart, or a lost
            # WELCOME): idempotent, it keeps its tasks
            self.counters["registered_again"] += 1
            self._welcome(sock, ident)
            return
        if old is not None:  # re-registration (reconnect): what the old session held is rerouted
            self._lose(old, now, "re-registered", SE.lose, crash=False)
        prior = self.fleet.by_ident.get(ident)
        if prior is not None:  # this connection was another satellite id: that record goes, with its tasks
            self._lose(prior, now, "replaced on its connection", SE.lose, crash=False)
        sat = SatelliteRecord(sid, ident, sock, slots, frozenset(tags), frozenset(kinds), now,
                              host=str(hdr.get("host", ""))[:256], pid=pid, workers=workers)
        sat.stall_timeouts = {k: float(v) for k, v in progress.items()}
        sat.user = self._user
        if walltime is not None:
            sat.deadline = now + float(walltime)
        versions = hdr.get("versions")
        if isinstance(versions, dict):
            sat.versions = {str(k): str(v) for k, v in versions.items()}
        self.fleet.add(sat)
        self.counters["satellites_registered"] += 1
        log_limited(log, logging.INFO, "satellite %r registered: %d slots, kinds %s, tags %s", sid, slots,
                    kinds[:20], tags[:20])
        self._welcome(sock, ident)
        self._sat_to(sat, SE.welcome, now, "registered")
        running = hdr.get("running")
        if isinstance(running, list) and running:
            self.adopt(sat, running, now)
        recent = hdr.get("recent")
        if isinstance(recent, list) and recent:
            self.adopt(sat, recent, now, finished=True)

    def _welcome(self, sock: Any, ident: bytes) -> None:
        self.out.append((sock, [ident, P.SIGNATURE, P.WELCOME, pack(
            {"e": self.epoch, "hb": self._hb_every, "liveness": self.cfg.liveness})], None))

    def _bind_sid(self, sid: str, user: str) -> None:
        """``sid`` belongs to ``user``'s key from now on (journaled, so a restart keeps it)."""
        mine = [s for s, u in self.sat_keys.items() if u == user]
        if len(mine) >= MAX_SIDS_PER_KEY:  # forget the oldest ids of this key that are not registered now
            for old in mine[:len(mine) - MAX_SIDS_PER_KEY + 1]:
                if old not in self.fleet.by_id:
                    del self.sat_keys[old]
        self.sat_keys[sid] = user
        if self.journal_out is not None:
            self.journal_out.append(["K", sid, user, self.wall()])

    def adopt(self, sat: SatelliteRecord, running: list[Any], now: float, finished: bool = False) -> None:
        """Take back tasks a re-registering satellite runs or just ran (:func:`orchester.server.restore.adopt`)."""
        from orchester.server.restore import adopt

        adopt(self, sat, running, now, finished)

    def _on_started(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident)
        if sat is None:
            return
        hdr = unpack(bytes(frames[3]))
        for item in field(hdr, "t", list):
            if not (isinstance(item, list) and len(item) == 2):
                raise ProtocolError(P.E_MALFORMED, "STARTED entries are [task id, attempt]")
            task = sat.inflight.get(item[0]) if isinstance(item[0], str) else None
            if task is not None and task.attempt == item[1] and task.state is TS.DISPATCHED:
                self._task_to(task, TE.start, now)

    def _on_done(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident)
        if sat is None:
            return
        hdr = unpack(bytes(frames[3]))
        tid = field(hdr, "id", str)
        attempt = field(hdr, "a", int)
        task = sat.inflight.get(tid)
        if task is None or task.attempt != attempt:
            self.counters["stale_results"] += 1
            log_limited(log, logging.INFO, "discarded stale result of %r attempt %s from %s", tid[:256], attempt,
                        sat.sid)
            return
        if task.state is TS.DISPATCHED:  # its STARTED may ride in the same batch, or was lost
            self._task_to(task, TE.start, now)
        if hdr.get("ok"):
            self._release(task, now, abort=False)
            self._succeeded(task, sat, [P.SIGNATURE, P.RESULT, frames[3], *frames[4:]], now)
            return
        err = hdr.get("err")
        header = frames[3]
        if not (isinstance(err, dict) and isinstance(err.get("type"), str) and 0 < len(err["type"]) <= 256
                and isinstance(err.get("msg", ""), str) and isinstance(err.get("tb", ""), str)):
            # clients read this error: one of the wrong shape is replaced, never forwarded
            self.counters["bad_results"] += 1
            err = {"type": "BadResult", "msg": f"satellite {sat.sid!r} reported an error of the wrong shape",
                   "tb": ""}
            header = pack({"id": tid, "a": attempt, "ok": False, "sat": sat.sid, "err": err})
        etype = err["type"]
        if etype == P.ERR_WORKER_DIED:  # it killed its worker: a crash, rerouted or quarantined
            self._stall(task, now, str(err.get("msg", "worker died"))[:500], abort=False)
            return
        self._release(task, now, abort=False)  # a task's own exception is not its satellite's fault
        self.counters["failed"] += 1
        self._task_to(task, TE.fail, now, etype)
        self._complete(task, [P.SIGNATURE, P.RESULT, header, *frames[4:]])

    def _on_progress(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident)
        if sat is None:
            return
        self.counters["progress"] += 1
        hdr = unpack(bytes(frames[3]))
        tid = field(hdr, "id", str)
        task = sat.inflight.get(tid)
        if task is None or task.attempt != hdr.get("a") or isinstance(hdr.get("a"), bool):
            # only the satellite running the task, at the attempt it runs, may report its progress
            self.counters["progress_refused"] += 1
            return
        if task.state is TS.DISPATCHED:
            self._task_to(task, TE.start, now)
        task.progress_at = now  # the stall timer looks at it when it fires: no re-arming
        if self._want[b"progress:"]:
            self.pub.append([b"progress:" + tid.encode(), bytes(frames[3])])

    def _on_leave(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        sat = self.fleet.by_ident.get(ident)
        if sat is None:
            return
        log_limited(log, logging.INFO, "satellite %s left", sat.sid)
        self._lose(sat, now, "left", SE.leave, crash=False)

    def _on_peer_error(self, sock: Any, ident: bytes, frames: list[Any], now: float) -> None:
        hdr = unpack(bytes(frames[3]))
        self.counters["peer_errors"] += 1
        # rate-limited, and the peer's text quoted and cut: it can neither flood the log nor forge a line in it
        warn_limited(log, "peer %r reported error %r: %r", ident[:64], str(hdr.get("code"))[:64],
                     str(hdr.get("msg"))[:200])

    def _satellite(self, sock: Any, ident: bytes) -> SatelliteRecord | None:
        sat = self.fleet.by_ident.get(ident)
        if sat is None:  # e.g. we restarted: ask it to register again
            self.counters["unknown_satellite"] += 1
            self.out.append((sock, [ident, P.SIGNATURE, P.RECONNECT, pack({"e": self.epoch})], None))
        return sat

    # ---------------------------------------------------------- housekeeping
    def delivered(self, task_id: str) -> None:
        """The adapter handed a result to its client's socket: it may be evicted first."""
        self.results.mark(task_id, True)

    def undeliverable(self, task_id: str) -> None:
        """The adapter could not hand a result to its client: keep it for fetch."""
        self.counters["results_undeliverable"] += 1
        task = self.tasks.get(task_id)
        if task is not None:  # that connection is gone or not reading: stop counting what it was sent
            self.unread.forget(task.client)

    def housekeeping(self, now: float) -> None:
        """Run after every wake-up: retention, timeouts, satellites, heartbeats, acks, dispatch."""
        if len(self.results) > self.cfg.result_retention or self.results.bytes > self.results.max_bytes:
            for tid in self.results.trim(self.unread.pinned):
                old = self.tasks.get(tid)
                if old is not None and old.state.terminal:
                    del self.tasks[tid]
                    self.state_counts[old.state] -= 1
        if self.reclaim and now >= self.reclaim_until:
            for task in self.reclaim.values():  # nobody re-announced them: run them again
                task.satellite = None
                self.queues.push(task)
                self._arm(task, now)
            self.counters["reclaim_requeued"] += len(self.reclaim)
            self.reclaim.clear()
        self.clock = now
        self.unread.sweep(now)
        if self.identify is not None:
            self.conns.sweep(now)
        if len(self.timers):
            for timer in self.timers.pop_expired(now):
                try:
                    self._on_timer(timer.key, timer.code, now)
                except Exception:  # one bad timer (one bad task) never stops the loop, nor the others
                    self.counters["timer_errors"] += 1
                    log.exception("the timer of task %r (code %d) failed; it is skipped", timer.key, timer.code)
        self._watch_satellites(now)
        if now >= self._next_hb:
            self._next_hb = now + self._hb_every
            hb = pack({"e": self.epoch})
            for sat in self.fleet:
                self.out.append((sat.sock, [sat.ident, P.SIGNATURE, P.HEARTBEAT, hb], None))
        if self._acks:
            for (sock, ident), ids in self._acks.items():
                self.out.append((sock, [ident, P.SIGNATURE, P.ACK, pack({"ids": ids, "e": self.epoch})], None))
            self._acks.clear()
        self.schedule(now)

    def next_wakeup(self, now: float) -> float:
        """Seconds until housekeeping has something to do, at most one heartbeat interval."""
        deadline = self._next_hb
        t = self.timers.next_deadline()
        if t is not None and t < deadline:
            deadline = t
        if self.reclaim and self.reclaim_until < deadline:
            deadline = self.reclaim_until
        silent_after = self.cfg.silent_after
        for sat in self.fleet.by_id.values():
            expiry = sat.last_seen + (self._lost_after if sat.state is SS.SILENT else
                                      min(silent_after, self._lost_after))
            if expiry < deadline:
                deadline = expiry
        return max(0.0, deadline - now)

    def revoke(self, names: set[str], now: float) -> dict[str, int]:
        """Keys ``names`` were revoked: end their work and forget their connections.

        Their unfinished tasks are cancelled (error ``Revoked``), their satellites are lost (what
        they ran goes to others), and nothing more is delivered to their connections.
        """
        counts = {"tasks": 0, "satellites": 0, "connections": 0}
        if not names:
            return counts
        for task in [t for t in self.tasks.values() if t.owner in names and not t.state.terminal]:
            self.reclaim.pop(task.id, None)
            self._fail(task, P.ERR_REVOKED, f"the key {task.owner!r} that submitted it was revoked", now,
                       TE.cancel)
            counts["tasks"] += 1
        for sat in [s for s in self.fleet if s.user in names]:
            self._lose(sat, now, "revoked (its key was removed)", crash=False)
            counts["satellites"] += 1
        for name in names:
            counts["connections"] += self.conns.forget_key(name)
        self.counters["revoked_tasks"] += counts["tasks"]
        return counts

    def revoke_unknown(self, now: float) -> dict[str, int]:
        """After a restart or a takeover: the keys that own unfinished tasks but are no longer
        authorised (revoked while this server was down, or unknown to its key directory) are
        revoked as if by ``SIGHUP`` (:meth:`revoke`)."""
        if self.identify is None:
            return {}
        gone = {t.owner for t in self.tasks.values()
                if isinstance(t.owner, str) and not t.state.terminal and self.identify(t.owner) is None}
        if gone:
            log.warning("tasks of key(s) %s restored, but the key is no longer authorised: cancelled", sorted(gone))
        return self.revoke(gone, now)

    # ---------------------------------------------------------------- replay
    def restore(self, records: list[list[Any]], now: float, sock: Any, reclaim: float | None = None) -> dict[str, int]:
        """Rebuild the task table from journal records, before serving (see :mod:`orchester.server.restore`).

        Tasks that were in flight wait ``reclaim`` seconds (default: a satellite's liveness
        period) for their satellite to re-announce them before they are queued again.
        """
        from orchester.server.restore import restore

        return restore(self, records, now, sock, self._lost_after if reclaim is None else reclaim)

    # ---------------------------------------------------------------- events
    def subscriptions(self, keys: bool) -> Subscriptions:
        """A fresh subscription table (for a new event socket). With ``keys``, each key may hold
        ``max_subscriptions`` subscriptions and all of them together 16 times as many distinct
        topics; without, everyone together ``max_subscriptions`` distinct topics. Either way, all
        subscribers together hold at most 16 × ``max_subscriptions`` subscriptions, and
        ``max_subscriptions`` × ``max_topic`` bytes of topics (libzmq's trie costs per byte)."""
        cfg = self.cfg
        live = cfg.max_subscriptions * 16
        return Subscriptions(EVENT_CATEGORIES, live if keys else cfg.max_subscriptions, cfg.max_topic,
                             cfg.max_subscriptions if keys else None, max_live=live,
                             max_live_bytes=cfg.max_subscriptions * cfg.max_topic)

    def use_subscriptions(self, subs: Subscriptions) -> None:
        """Install ``subs`` (the event socket was opened again: its subscriptions start afresh)."""
        self.subs = subs
        self._want = subs.want

    def subscription(self, msg: bytes, user: str | None = None) -> None:
        """Track an XPUB (un)subscription message (sent by ``user``'s key, if known) so events are
        built only when wanted."""
        if not self.subs.update(msg, user):
            self.counters["subscriptions_refused"] += 1
            warn_limited(log, "refused an event subscription of %d bytes (at most %d topics of %d bytes)",
                         len(msg) - 1, self.subs.max_topics, self.subs.max_topic)

    # ---------------------------------------------------------------- status
