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

import itertools
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from orchester.config import OrchestratorConfig
from orchester.journal import records
from orchester.logutil import log_limited, warn_limited
from orchester.server.fleet import SatelliteRecord
from orchester.server.lifecycle import T_DEADLINE, Lifecycle
from orchester.server.peers import Subscriptions
from orchester.server.ports import Outbox, Ports
from orchester.server.requests import Requests
from orchester.server.state import ServerState
from orchester.server.tasks import LinkedTask, Task, new_task
from serializers import protocol as P
from serializers.codecs import check_codec_consent
from serializers.header import (
    MAX_NAME,
    ProtocolError,
    check_signature,
    error_frames,
    unpack,
)
from serializers.messages import (
    MAX_TASK_HEADER,
    Done,
    Heartbeat,
    Leave,
    PeerError,
    Progress,
    Register,
    Result,
    Started,
    Submit,
    acks,
    beat,
    decode,
    unbatch,
    welcome,
)
from serializers.zmqframes import frames_size
from tracker import SatelliteEvent, SatelliteState, TaskEvent, TaskState

log = logging.getLogger("orchester")

#: ``ORCHESTER_STRICT=1`` (the test suite sets it): an internal error in a handler or a timer is raised, not
#: answered or skipped, so that no bug of ours hides behind the error boundary.
STRICT = os.environ.get("ORCHESTER_STRICT", "") not in ("", "0")
#: Satellite ids one key keeps bound (each new satellite process may pick a new one).
MAX_SIDS_PER_KEY = 4096
#: Most routing ids, kinds and codecs the core keeps one object of (:meth:`Orchestrator._on_submit`).
MAX_INTERNED = 100_000
#: Requests that read or walk the tables: one key may make ``request_rate`` of them a second.
RATED = frozenset({P.STATUS, P.HISTORY})
TE, SE, TS, SS = TaskEvent, SatelliteEvent, TaskState, SatelliteState


class Orchestrator:
    """Task table, queues, fleet and routing of one orchestrator (pure policy).

    ``ports``: what it may ask of the world (:class:`~orchester.server.ports.Ports`, all optional);
    everything it produces goes into :attr:`outbox`. Its tables are :attr:`state`, shared with
    :attr:`life` (state changes) and :attr:`requests` (status, fetch, cancel, control, history).
    """

    def __init__(self, config: OrchestratorConfig, now: float, *, ports: Ports | None = None,
                 epoch: str | None = None, wall: Callable[[], float] = time.time, strict: bool = STRICT) -> None:
        self.cfg = config
        #: raise our own failures instead of answering ``internal`` (default: ``ORCHESTER_STRICT``)
        self.strict = strict
        self.ports = ports = ports if ports is not None else Ports()
        self.state = ServerState(config, now, epoch or uuid.uuid4().hex[:16], wall, keys=ports.identify is not None)
        self.outbox = Outbox(records=ports.journal)
        self.life = Lifecycle(self.state, self.outbox, ports)
        self.requests = Requests(self.state, self.life, self.outbox, ports)
        self._acks: dict[tuple[Any, bytes], list[str]] = {}
        #: the routing ids, kinds and codecs of submitted tasks, each kept once (a queued task holds its
        #: client's, its kind's and its codec's: a million tasks of one client share one object of each);
        #: cleared past :data:`MAX_INTERNED`
        self._interned: dict[Any, Any] = {}
        self._hb_every = config.heartbeat_interval
        self._lost_after = config.lost_after
        self._next_hb = now + self._hb_every
        self._handlers: dict[bytes, Callable[[Any, bytes, Any, list[Any], float], None]] = {
            P.SUBMIT: self._on_submit, P.DONE: self._on_done, P.HEARTBEAT: self._on_heartbeat,
            P.STARTED: self._on_started, P.PROGRESS: self._on_progress, P.REGISTER: self._on_register,
            P.LEAVE: self._on_leave, P.STATUS: self.requests.on_status, P.FETCH: self.requests.on_fetch,
            P.CANCEL: self.requests.on_cancel, P.CONTROL: self.requests.on_control, P.ERROR: self._on_peer_error,
            P.HISTORY: self.requests.on_history,
        }

    # ------------------------------------------------------------------ input
    def handle(self, sock: Any, frames: list[Any], now: float, user: str | None = None,
               arrived: float | None = None) -> None:
        """Handle one message received on a ROUTER socket (``frames[0]`` is the identity); a ``BATCH``, each
        of the messages it carries.

        ``user``: the name of the key the sender authenticated with (CurveZMQ), if any. ``arrived``: when a
        message held back (a takeover installing its table) came; its sender's request rate is counted at
        that time, not at the instant the held messages are handled together.
        """
        ident = bytes(frames[0])
        st = self.state
        st.user = user
        st.clock = now
        try:
            if len(frames) < 4:
                raise ProtocolError(P.E_MALFORMED, f"expected at least 4 frames, got {len(frames)}")
            check_signature(bytes(frames[1]))
            cmd = bytes(frames[2])
            if cmd == P.BATCH:  # several messages in one: each handled (and answered) as if it came alone
                messages = unbatch(frames, 2)
                st.counters["batches_in"] += 1
                for message in messages:
                    self.handle(sock, message, now, user, arrived)
                return
            handler = self._handlers.get(cmd)
            if handler is None:
                raise ProtocolError(P.E_UNKNOWN_COMMAND, f"unknown command {P.command_name(cmd)}")
            if self.cfg.max_message and len(frames) > 4 and frames_size(frames) > self.cfg.max_message:
                raise ProtocolError(P.E_TOO_LARGE, f"message exceeds {self.cfg.max_message} bytes")
            if self.ports.identify is not None:
                self.requests.authorise(cmd, user)
                if user is not None:
                    st.conns.bind(ident, user, now)  # refuses another key on this identity
            if cmd in RATED and not st.rate.take(user or ident, now if arrived is None else arrived):
                st.counters["rate_limited"] += 1
                raise ProtocolError(P.E_BUSY, f"too many requests: at most {self.cfg.request_rate:g} a second "
                                    "(--request-rate); retry later")
            msg = decode(cmd, frames[3])  # every field checked: past this line, any failure is ours
            sat = st.fleet.by_ident.get(ident)
            if sat is not None:
                st.fleet.heard(sat, now)
                if sat.state is SS.SILENT:
                    self.life.heard(sat, now)
            try:
                handler(sock, ident, msg, frames, now)
            except ProtocolError:
                raise
            except Exception as exc:  # our own failure on a message that decoded: never stop the loop for it
                self.state.counters["handler_errors"] += 1
                log.exception("a %s message from %r could not be handled", P.command_name(cmd), ident[:64])
                if self.strict:
                    raise
                raise ProtocolError(P.E_INTERNAL, f"the orchestrator failed on this message ({type(exc).__name__}); "
                                    "it is logged") from None
        except ProtocolError as exc:
            self.state.counters["bad_messages"] += 1
            self.state.counters[f"errors.{exc.code}"] += 1
            warn_limited(log, "refused message from %r: %s", ident, exc)
            if len(frames) > 2 and bytes(frames[2]) == P.ERROR:
                return  # never answer an error with an error (no ping-pong)
            extra = {}
            if exc.code != P.E_MALFORMED or len(frames) >= 4:
                extra = self._request_ids(frames)
            self.outbox.send(sock, [ident, *error_frames(exc.code, exc.detail, **extra)])

    def _request_ids(self, frames: list[Any]) -> dict[str, Any]:
        """Best effort: the ``id``/``rid`` of the refused request, so the sender can match the error."""
        try:  # (a SUBMIT that waits for thousands of tasks has a header past 64 KiB: its id must come back too)
            hdr = unpack(bytes(frames[3]), MAX_TASK_HEADER)
        except (ProtocolError, IndexError):
            return {}
        # (only what could be a valid id: an error must stay a small header, whatever the request held)
        return {k: v for k in ("id", "rid") if isinstance(v := hdr.get(k), int)
                or (isinstance(v, str) and len(v) <= MAX_NAME)}

    # ----------------------------------------------------------------- clients
    def _on_submit(self, sock: Any, ident: bytes, sub: Submit, frames: list[Any], now: float) -> None:
        # pickle only with serve --allow-pickle, and with keys only from a key holding the pickle role (the
        # key is looked up for a pickle-coded task only: the roles are not needed for any other)
        roles: frozenset[str] | None = None
        if self.ports.identify is not None and sub.codec == "pickle":
            roles = getattr(self.ports.identify(self.state.user), "roles", frozenset())
        check_codec_consent(sub.codec, allow_pickle=self.cfg.allow_pickle, roles=roles)
        tid, kind, timeout = sub.id, sub.kind, sub.timeout
        if len(frames) < 5:
            raise ProtocolError(P.E_MALFORMED, "SUBMIT needs a payload body frame")
        old = self.state.tasks.get(tid)
        if old is not None:  # a resend (after reconnect or failover): idempotent by id
            self.requests.may_touch(old)
            self.state.counters["duplicate_submits"] += 1
            self._ack(sock, ident, tid)
            stored = self.state.results.get(tid)
            if not self.requests.owner_asks(old):  # an admin resending another key's task: a copy, no rebinding
                if stored is not None:
                    self.outbox.send(sock, [ident, *stored.frames])
                return
            old.client, old.csock = ident, sock
            if stored is not None and not old.quiet:  # (a result kept for a dependent goes out when asked for)
                self.life.send_result(old, stored.frames, stored.size, store=False)
            return
        counts = self.state.state_counts
        if counts[TS.PENDING] + counts[TS.WAITING] >= self.cfg.max_queue:  # (not cancelled entries the queue skips)
            raise ProtocolError(P.E_BUSY, f"queue full ({self.cfg.max_queue} tasks waiting or queued)")
        interned = self._interned
        if len(interned) > MAX_INTERNED:
            interned.clear()
        ident = interned.setdefault(ident, ident)
        owner = self.state.user or ident
        unfinished, held = self.state.client_load.get(owner, (0, 0))
        held += self.state.unread.waiting_bytes(owner)  # its results that wait for it to read
        if self.state.results.pinned_bytes:  # and those kept for its tasks that take them by reference
            held += self.state.results.held_by(owner)
        payload = frames[4:]
        # what this task costs its client: payload, header and identity (a 64 KB header is not free)
        size = frames_size(payload) + len(frames[3]) + len(ident) + len(tid)
        if unfinished >= self.cfg.max_client_tasks or held + size > self.cfg.max_client_bytes:
            raise ProtocolError(P.E_LIMIT, f"this client has {unfinished} unfinished tasks holding {held} bytes; "
                                f"a task of {size} bytes more would pass --max-client-tasks "
                                f"{self.cfg.max_client_tasks} or --max-client-bytes {self.cfg.max_client_bytes}")
        if len(self.state.fleet) and not self.state.fleet.offers(kind):
            offered = self.state.fleet.kinds()  # (named in part: a refusal costs the same whatever the fleet)
            shown = sorted(offered)[:20] if len(offered) <= 1000 else []
            raise ProtocolError(P.E_UNKNOWN_KIND, f"no satellite offers task kind {kind!r}; {len(offered)} kind(s) "
                                f"offered{': ' if shown else ''}{', '.join(shown)}"
                                f"{' ...' if len(offered) > len(shown) else ''}")
        deps, refs = self._dependencies(sub) if sub.after else (None, ())
        kind, codec = interned.setdefault(kind, kind), interned.setdefault(sub.codec, sub.codec)
        task = new_task(tid, kind, sub.priority, sub.tags, ident, sock, frames[3], payload, now,
                        self.state.next_seq(), size, sub.after, refs, sub.run_on_failure)
        task.ttl, task.max_run, task.duration = sub.ttl, sub.max_run, sub.duration
        task.cores, task.memory, task.codec = sub.cores, sub.memory, codec
        task.owner, task.counted = owner, True
        if deps is not None:  # it enters waiting for them (attach() below releases it if none is left to wait for)
            task.state = TS.WAITING
        wall = self.state.wall()
        task.history.add(wall, task.state, 0)
        load = self.state.client_load.setdefault(owner, [0, 0])
        load[0] += 1
        load[1] += size
        self.state.add_pending(task)
        self.state.counters["submitted"] += 1
        if timeout is not None:
            task.deadline = self.state.timers.schedule(now + timeout, tid, T_DEADLINE)
        if self.outbox.journaling:
            for dep in deps or ():
                if dep is not None and dep.state.terminal:  # (a passive peer may have let it go: it holds it again)
                    for rec in self.life.records_of(dep):
                        self.outbox.record(rec)
            self.outbox.record(records.submitted(tid, ident, bytes(frames[3]), payload, wall, timeout,
                                                 self.state.user))
            if self.cfg.spill_bytes and self.state.queued_bytes > self.cfg.spill_bytes:
                self.state.to_spill[tid] = task
        self._ack(sock, ident, tid)
        if self.state.want[b"task:"]:
            self.life.publish_task(task, wall)
        if deps is None:
            self.state.queues.push(task)
        else:
            assert isinstance(task, LinkedTask)
            self.state.counters["submitted_after"] += 1
            self.life.attach(task, deps, now)
        self.life.arm(task, now)

    def _dependencies(self, sub: Submit) -> tuple[list[Task | None], tuple[str, ...]]:
        """The tasks ``sub`` waits for, each checked before anything changes: known here, and (CurveZMQ
        on) its submitter's own, or the submitter is an admin; a result it takes by reference still
        kept (or still to come). Returns them, and the ids of those it takes by reference."""
        tasks = self.state.tasks
        deps: list[Task | None] = []
        for dep_id in sub.after:
            dep = tasks.get(dep_id)
            if dep is None:
                self.state.counters["unknown_dependency"] += 1
                raise ProtocolError(P.E_UNKNOWN_TASK, f"dependency {dep_id!r} is unknown (never submitted here, or "
                                    "it ended and its result has left the retention window)")
            if self.ports.identify is not None and dep.owner != (self.state.user or None) \
                    and not self.requests.is_admin():
                self.state.counters["forbidden"] += 1
                raise ProtocolError(P.E_FORBIDDEN, f"dependency {dep_id!r} belongs to another key: a task may wait "
                                    "only for tasks of its own key (or of any key, for an admin)")
            deps.append(dep)
        refs = tuple(sub.after[i] for i in sub.refs)
        for ref in refs:
            dep = tasks[ref]
            if dep.state.terminal and ref not in self.state.results and (dep.state is TS.DONE
                                                                           or sub.run_on_failure):
                raise ProtocolError(P.E_UNKNOWN_TASK, f"dependency {ref!r} ended, but its result is no longer kept: "
                                    "it cannot be passed by reference")
        return deps, refs

    def _ack(self, sock: Any, ident: bytes, tid: str) -> None:
        key = (sock, ident)
        ids = self._acks.get(key)
        if ids is None:
            self._acks[key] = [tid]
        else:
            ids.append(tid)

    def _on_heartbeat(self, sock: Any, ident: bytes, hb: Heartbeat, frames: list[Any], now: float) -> None:
        if hb.report is not None:
            sat = self.state.fleet.by_ident.get(ident)
            if sat is not None:
                sat.reported = hb.report  # (finite, at most 64: these go to carbon)
        if hb.satellite and ident not in self.state.fleet.by_ident:
            self.outbox.send(sock, [ident, *beat(P.RECONNECT, self.state.epoch)])
        elif not hb.satellite:  # a client's ping, with how many results it received on this connection
            self.outbox.send(sock, [ident, *beat(P.HEARTBEAT, self.state.epoch)])
            if hb.rx is not None:
                for tid in self.state.unread.ack(ident, hb.rx, now):
                    task, stored = self.state.tasks.get(tid), self.state.results.get(tid)
                    if task is not None and stored is not None and task.client == ident:
                        self.life.send_result(task, stored.frames, stored.size, store=False)

    # -------------------------------------------------------------- satellites
    def _on_register(self, sock: Any, ident: bytes, reg: Register, frames: list[Any], now: float) -> None:
        sid, slots, kinds, tags = reg.sid, reg.slots, list(reg.kinds), reg.tags
        if self.ports.identify is not None:
            owner = self.state.sat_keys.get(sid)  # a satellite id belongs to the key that first registered it
            if owner is not None and owner != self.state.user:
                self.state.counters["sid_refused"] += 1
                raise ProtocolError(P.E_FORBIDDEN, f"satellite id {sid!r} belongs to another key")
            # a key may be limited to some task kinds (its file's ``kinds``)
            allowed = getattr(self.ports.identify(self.state.user), "kinds", None)
            if allowed is not None:
                refused = sorted(set(kinds) - allowed)
                kinds = [k for k in kinds if k in allowed]
                if not kinds:
                    self.state.counters["kinds_refused"] += 1
                    raise ProtocolError(P.E_FORBIDDEN, f"key {self.state.user!r} may offer only the task kinds "
                                        f"{sorted(allowed)[:20]}")
                if refused:
                    log.warning("satellite %r: its key may not offer %s; it gets %s only", sid, refused[:20],
                                kinds[:20])
            if owner is None and self.state.user is not None:  # (only a registration that is accepted)
                self._bind_sid(sid, self.state.user)
        if slots > self.cfg.max_slots:
            log.warning("satellite %r announced %d slots: cut to %d (--max-slots)", sid[:128], slots,
                        self.cfg.max_slots)
            slots = self.cfg.max_slots
        old = self.state.fleet.by_id.get(sid)
        if old is not None and old.ident == ident and old.user == self.state.user:
            # the same session registering again (a burst of our RECONNECTs after a restart, or a lost
            # WELCOME): idempotent, it keeps its tasks
            self.state.counters["registered_again"] += 1
            self._welcome(sock, ident)
            return
        if old is not None:  # re-registration (reconnect): what the old session held is rerouted
            self.life.lose(old, now, "re-registered", SE.lose, crash=False)
        prior = self.state.fleet.by_ident.get(ident)
        if prior is not None:  # this connection was another satellite id: that record goes, with its tasks
            self.life.lose(prior, now, "replaced on its connection", SE.lose, crash=False)
        sat = SatelliteRecord(sid, ident, sock, slots, frozenset(tags), frozenset(kinds), now,
                              host=reg.host, pid=reg.pid, workers=reg.workers, cores=reg.cores, memory=reg.memory,
                              job=reg.job, inline=frozenset(reg.inline), light=min(reg.light, self.cfg.max_slots))
        sat.stall_timeouts = dict(reg.progress)
        sat.user = self.state.user
        if reg.walltime is not None:
            sat.deadline = now + reg.walltime
        sat.versions = dict(reg.versions)
        self.state.fleet.add(sat)
        self.state.counters["satellites_registered"] += 1
        log_limited(log, logging.INFO, "satellite %r registered: %d slots, kinds %s, tags %s", sid, slots,
                    kinds[:20], tags[:20])
        self._welcome(sock, ident)
        self.life.sat_to(sat, SE.welcome, now, "registered")
        if reg.running:
            self.life.adopt(sat, reg.running, now)
        if reg.recent:
            self.life.adopt(sat, reg.recent, now, finished=True)

    def _welcome(self, sock: Any, ident: bytes) -> None:
        self.outbox.send(sock, [ident, *welcome(self.state.epoch, self._hb_every, self.cfg.liveness)])

    def _bind_sid(self, sid: str, user: str) -> None:
        """``sid`` belongs to ``user``'s key from now on (journaled, so a restart keeps it)."""
        mine = self.state.key_sids.get(user, {})
        if len(mine) >= MAX_SIDS_PER_KEY:  # forget the oldest ids of this key that are not registered now
            for old in list(itertools.islice(mine, len(mine) - MAX_SIDS_PER_KEY + 1)):
                if old not in self.state.fleet.by_id:
                    self.state.unbind_sid(old)
        self.state.bind_sid(sid, user)
        self.outbox.record(records.satellite_key(sid, user, self.state.wall()))

    def _on_started(self, sock: Any, ident: bytes, msg: Started, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident)
        if sat is None:
            return
        for tid, attempt in msg.tasks:
            task = sat.inflight.get(tid) if isinstance(tid, str) else None
            if task is not None and task.attempt == attempt and task.state is TS.DISPATCHED:
                self.life.task_to(task, TE.start, now)

    def _on_done(self, sock: Any, ident: bytes, done: Done, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident)
        if sat is None:
            return
        tid, attempt = done.id, done.attempt
        task = sat.inflight.get(tid)
        if task is None or task.attempt != attempt:
            self.state.counters["stale_results"] += 1
            log_limited(log, logging.INFO, "discarded stale result of %r attempt %s from %s", tid[:256], attempt,
                        sat.sid)
            return
        if task.state is TS.DISPATCHED:  # its STARTED may ride in the same batch, was lost, or was not sent (a task
            # that ended within the satellite's STARTED_DELAY): it began when it ran for, as far as its history says
            self.life.task_to(task, TE.start, now, ago=done.duration)
        if done.ok and (done.codec or "msgpack") != task.codec:
            # a result is decoded as the task was (pickle only for a pickle task: its consent); another codec is
            # a satellite's lie (a pickle result for a msgpack task would run code where it is decoded)
            self.state.counters["bad_results"] += 1
            warn_limited(log, "satellite %r answered task %s with codec %r, not %r: refused", sat.sid, tid[:64],
                         str(done.codec)[:64], task.codec)
            lie = {"type": "BadResult", "msg": f"satellite {sat.sid!r} encoded the result with another codec than "
                   "the task's", "tb": ""}
            self.life.release(task, now, abort=False)
            self.state.counters["failed"] += 1
            self.life.task_to(task, TE.fail, now, "BadResult")
            refused = Result(tid, attempt, False, err=lie, sat=sat.sid).encode()
            self.life.complete(task, [P.SIGNATURE, P.RESULT, refused])
            return
        if done.ok:
            self.life.release(task, now, abort=False)
            self.life.succeeded(task, sat, [P.SIGNATURE, P.RESULT, frames[3], *frames[4:]], now)
            return
        err = done.error
        header = frames[3]
        if err is None:
            # clients read this error: one of the wrong shape is replaced, never forwarded
            self.state.counters["bad_results"] += 1
            err = {"type": "BadResult", "msg": f"satellite {sat.sid!r} reported an error of the wrong shape",
                   "tb": ""}
            header = Result(tid, attempt, False, err=err, sat=sat.sid).encode()
        etype = err["type"]
        if etype == P.ERR_WORKER_DIED:  # it killed its worker: a crash, rerouted or quarantined
            self.life.stall(task, now, str(err.get("msg", "worker died"))[:500], abort=False)
            return
        self.life.release(task, now, abort=False)  # a task's own exception is not its satellite's fault
        self.state.counters["failed"] += 1
        self.life.task_to(task, TE.fail, now, etype)
        self.life.complete(task, [P.SIGNATURE, P.RESULT, header, *frames[4:]])

    def _on_progress(self, sock: Any, ident: bytes, msg: Progress, frames: list[Any], now: float) -> None:
        sat = self._satellite(sock, ident)
        if sat is None:
            return
        self.state.counters["progress"] += 1
        tid = msg.id
        task = sat.inflight.get(tid)
        if task is None or msg.attempt is None or task.attempt != msg.attempt:
            # only the satellite running the task, at the attempt it runs, may report its progress
            self.state.counters["progress_refused"] += 1
            return
        if task.state is TS.DISPATCHED:
            self.life.task_to(task, TE.start, now)
        task.progress_at = now  # the stall timer looks at it when it fires: no re-arming
        if self.state.want[b"progress:"]:
            self.outbox.publish([b"progress:" + tid.encode(), bytes(frames[3])])

    def _on_leave(self, sock: Any, ident: bytes, msg: Leave, frames: list[Any], now: float) -> None:
        sat = self.state.fleet.by_ident.get(ident)
        if sat is None:
            return
        log_limited(log, logging.INFO, "satellite %s left", sat.sid)
        self.life.lose(sat, now, "left", SE.leave, crash=False)

    def _on_peer_error(self, sock: Any, ident: bytes, msg: PeerError, frames: list[Any], now: float) -> None:
        self.state.counters["peer_errors"] += 1
        # rate-limited, and the peer's text quoted and cut: it can neither flood the log nor forge a line in it
        warn_limited(log, "peer %r reported error %r: %r", ident[:64], msg.code, msg.msg)

    def _satellite(self, sock: Any, ident: bytes) -> SatelliteRecord | None:
        sat = self.state.fleet.by_ident.get(ident)
        if sat is None:  # e.g. we restarted: ask it to register again
            self.state.counters["unknown_satellite"] += 1
            self.outbox.send(sock, [ident, *beat(P.RECONNECT, self.state.epoch)])
        return sat

    # ---------------------------------------------------------- housekeeping
    def delivered(self, task_id: str) -> None:
        """The adapter handed a result to its client's socket: it may be evicted first."""
        self.state.results.mark(task_id, True)

    def undeliverable(self, task_id: str) -> None:
        """The adapter could not hand a result to its client: keep it for fetch."""
        self.state.counters["results_undeliverable"] += 1
        task = self.state.tasks.get(task_id)
        if task is not None:  # that connection is gone or not reading: stop counting what it was sent
            self.state.unread.forget(task.client)

    def housekeeping(self, now: float) -> None:
        """Run after every wake-up: retention, timeouts, satellites, heartbeats, acks, dispatch."""
        results = self.state.results
        if results.over():
            for tid in self.state.results.trim(self.state.unread.pinned):
                old = self.state.tasks.get(tid)
                if old is not None and old.state.terminal:
                    del self.state.tasks[tid]
                    self.state.state_counts[old.state] -= 1
                    if old.after or tid in self.state.graph.dependents:
                        self.state.graph.forget(tid, old.after)
        queues, pending = self.state.queues, self.state.state_counts[TS.PENDING]
        if len(queues) - pending > max(1024, pending):  # cancelled or expired while queued: memory, not work
            queues.drop_stale()
        if self.state.reclaim and now >= self.state.reclaim_until:
            for task in self.state.reclaim.values():  # nobody re-announced them: run them again
                task.satellite = None
                self.state.queues.push(task)
                self.life.arm(task, now)
            self.state.counters["reclaim_requeued"] += len(self.state.reclaim)
            self.state.reclaim.clear()
        self.state.clock = now
        self.state.unread.sweep(now)
        if self.ports.identify is not None:
            self.state.conns.sweep(now)
        if len(self.state.timers):
            for timer in self.state.timers.pop_expired(now):
                try:
                    self.life.on_timer(timer.key, timer.code, now)
                except Exception:  # one bad timer (one bad task) never stops the loop, nor the others
                    self.state.counters["timer_errors"] += 1
                    log.exception("the timer of task %r (code %d) failed; it is skipped", timer.key, timer.code)
                    if self.strict:
                        raise
        self.life.watch_satellites(now)
        if now >= self._next_hb:
            self._next_hb = now + self._hb_every
            hb = beat(P.HEARTBEAT, self.state.epoch)
            for sat in self.state.fleet:
                self.outbox.send(sat.sock, [sat.ident, *hb])
        if self._acks:  # (before any dispatch: a task that fails as it is dispatched has its RESULT after its ACK)
            for (sock, ident), ids in self._acks.items():
                for frames in acks(ids, self.state.epoch):
                    self.outbox.send(sock, [ident, *frames])
            self._acks.clear()
        self.life.schedule(now)

    def next_wakeup(self, now: float) -> float:
        """Seconds until housekeeping has something to do, at most one heartbeat interval."""
        deadline = self._next_hb
        t = self.state.timers.next_deadline()
        if t is not None and t < deadline:
            deadline = t
        if self.state.reclaim and self.state.reclaim_until < deadline:
            deadline = self.state.reclaim_until
        silent_after = min(self.cfg.silent_after, self._lost_after)
        for sat in self.state.fleet.by_silence:  # (heard from longest ago first: the silent ones, then one more)
            silent = sat.state is SS.SILENT
            expiry = sat.last_seen + (self._lost_after if silent else silent_after)
            if expiry < deadline:
                deadline = expiry
            if not silent:
                break
        return max(0.0, deadline - now)

    def revoke(self, names: set[str], now: float) -> dict[str, int]:
        """Keys ``names`` were revoked: end their work and forget their connections.

        Their unfinished tasks are cancelled (error ``Revoked``), their satellites are lost (what
        they ran goes to others), and nothing more is delivered to their connections.
        """
        counts = {"tasks": 0, "satellites": 0, "connections": 0}
        if not names:
            return counts
        for task in [t for t in self.state.tasks.values() if t.owner in names and not t.state.terminal]:
            if task.state.terminal:  # failed meanwhile: it waited for one of them (DependencyFailed)
                continue
            self.state.reclaim.pop(task.id, None)
            self.life.fail(task, P.ERR_REVOKED, f"the key {task.owner!r} that submitted it was revoked", now,
                       TE.cancel)
            counts["tasks"] += 1
        for sat in [s for s in self.state.fleet if s.user in names]:
            self.life.lose(sat, now, "revoked (its key was removed)", crash=False)
            counts["satellites"] += 1
        for name in names:
            counts["connections"] += self.state.conns.forget_key(name)
        self.state.counters["revoked_tasks"] += counts["tasks"]
        return counts

    def revoke_unknown(self, now: float) -> dict[str, int]:
        """After a restart or a takeover: the keys that own unfinished tasks but are no longer
        authorised (revoked while this server was down, or unknown to its key directory) are
        revoked as if by ``SIGHUP`` (:meth:`revoke`)."""
        if self.ports.identify is None:
            return {}
        gone = {t.owner for t in self.state.tasks.values()
                if isinstance(t.owner, str) and not t.state.terminal and self.ports.identify(t.owner) is None}
        if gone:
            log.warning("tasks of key(s) %s restored, but the key is no longer authorised: cancelled", sorted(gone))
        return self.revoke(gone, now)

    # ---------------------------------------------------------------- events
    def use_subscriptions(self, subs: Subscriptions) -> None:
        """Install ``subs`` (the event socket was opened again: its subscriptions start afresh)."""
        self.state.subs = subs

    def subscription(self, msg: bytes, user: str | None = None) -> None:
        """Track an XPUB (un)subscription message (sent by ``user``'s key, if known) so events are
        built only when wanted."""
        if not self.state.subs.update(msg, user):
            self.state.counters["subscriptions_refused"] += 1
            warn_limited(log, "refused an event subscription of %d bytes (at most %d topics of %d bytes)",
                         len(msg) - 1, self.state.subs.max_topics, self.state.subs.max_topic)

