"""Task and satellite lifecycles: every state change, its timers, its events (pure policy).

:class:`Lifecycle` is the half of the orchestrator's core that moves tasks and
satellites through the machines of :mod:`tracker.machines`: dispatching under
a lease, starting, finishing, stalling and rerouting, retrying with back-off,
quarantining, expiring; satellites joining, going silent, lost, on probation,
draining. Every change goes through :meth:`Lifecycle._task_to` or
:meth:`Lifecycle._sat_to`, which check the compiled table, arm the state's
timeout on the one timer wheel, record the history and publish the event.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from orchester.config import OrchestratorConfig
from orchester.logutil import log_limited
from orchester.server.fleet import Fleet, SatelliteRecord
from orchester.server.peers import ConnectionKeys, UnreadResults
from orchester.server.results import ResultStore
from orchester.server.tasks import QueueKey, Task, TaskQueues
from serializers import protocol as P
from serializers.codecs import dispatch_consent
from serializers.header import pack
from tracker import (
    SATELLITE_MACHINE,
    TASK_MACHINE,
    ProbationPolicy,
    RetryPolicy,
    SatelliteEvent,
    SatelliteState,
    TaskEvent,
    TaskState,
    TimerWheel,
)

log = logging.getLogger("orchester")

# timer codes: what a task's timer guards
T_EXPIRE, T_START, T_STALL, T_MAX_RUN, T_REQUEUE, T_DEADLINE, T_RESULT = range(7)

TE, SE, TS, SS = TaskEvent, SatelliteEvent, TaskState, SatelliteState


def _len(frames: list[Any]) -> int:
    return sum(len(f) for f in frames)


class Lifecycle:
    """State changes of tasks and satellites; the message handlers live in :mod:`orchester.server.core`."""

    cfg: OrchestratorConfig
    tasks: dict[str, Task]
    queues: TaskQueues
    fleet: Fleet
    results: ResultStore
    timers: TimerWheel[str]
    out: list[tuple[Any, list[Any], str | None]]
    pub: list[list[bytes]]
    counters: Counter[str]
    wall: Callable[[], float]
    strategy: Any
    _want: dict[bytes, bool]
    _dispatch_seq: int
    queued_bytes: int
    client_load: dict[str | bytes, list[int]]
    metrics_on: bool
    kind_counts: dict[str, list[int]]
    latencies: list[tuple[str, float]]
    load_spilled: Callable[[Task], list[Any]] | None
    #: records for the journal (``None``: no journal), handed to it by the socket adapter
    journal_out: list[list[Any]] | None
    identify: Callable[[str | None], Any] | None
    conns: ConnectionKeys
    unread: UnreadResults
    #: the monotonic time of the current wake-up (set on every message and housekeeping)
    clock: float
    #: tasks in the table per state (indexed by :class:`~tracker.TaskState`): status costs nothing
    state_counts: list[int]
    #: pending tasks per kind (the queue depths of status replies and metrics)
    pending_kinds: Counter[str]

    def _pending_left(self, kind: str) -> None:
        n = self.pending_kinds[kind] - 1
        if n > 0:
            self.pending_kinds[kind] = n
        else:
            del self.pending_kinds[kind]

    def _init_lifecycle(self, config: OrchestratorConfig) -> None:
        self._consent = dispatch_consent(config.allow_pickle)  #: what each DISPATCH says this server accepts
        self.retry = RetryPolicy(config.retries, config.retry_backoff)
        self.probation = ProbationPolicy(config.probation_after, config.drain_after)

    # ------------------------------------------------------------ task moves
    def _task_to(self, task: Task, event: TaskEvent, now: float, reason: str | None = None) -> None:
        """Fire ``event`` on ``task``: new state, its timer, history and event."""
        state = TASK_MACHINE.next(task.state, event)
        self.state_counts[task.state] -= 1
        self.state_counts[state] += 1
        if task.state is TS.PENDING:
            self._pending_left(task.kind)
        elif state is TS.PENDING:
            self.pending_kinds[task.kind] += 1
        task.state = state
        wall = self.wall()  # one reading for the history, the journal and the event
        task.history.add(wall, state, task.attempt, task.satellite, reason)
        if self.journal_out is not None:
            self.journal_out.append(["T", task.id, int(state), task.attempt, task.satellite, reason, wall])
        if self.metrics_on:
            per_state = self.kind_counts.get(task.kind)
            if per_state is None:
                per_state = self.kind_counts[task.kind] = [0] * len(TaskState)
            per_state[state] += 1
            if state.terminal:
                self.latencies.append((task.kind, now - task.submitted))
        self._arm(task, now)
        if self._want[b"task:"]:
            self._publish_task(task, wall, reason)

    def _publish_task(self, task: Task, wall: float, reason: str | None = None) -> None:
        """The ``task:<id>`` event of the task's current state."""
        body: dict[str, Any] = {"id": task.id, "kind": task.kind, "state": task.state.name.lower(),
                                "attempt": task.attempt, "sat": task.satellite, "t": wall}
        if reason:
            body["reason"] = reason
        if isinstance(task.owner, str):
            body["by"] = task.owner  # the submitter's key name (CurveZMQ)
            sat = self.fleet.by_id.get(task.satellite) if task.satellite else None
            if sat is not None and sat.user:
                body["ran_by"] = sat.user  # the satellite's key name
        self.pub.append([b"task:" + task.id.encode(), pack(body)])

    def _arm(self, task: Task, now: float) -> None:
        """Cancel the previous state's timer and start the one of the current state, if any."""
        timers, cfg, state = self.timers, self.cfg, task.state
        timers.cancel(task.timer)
        task.timer = None
        if state is TS.PENDING:
            ttl = task.ttl or cfg.queue_ttl
            if ttl > 0:
                task.timer = timers.schedule(now + ttl, task.id, T_EXPIRE)
        elif state is TS.DISPATCHED:
            if cfg.dispatch_timeout > 0:
                task.timer = timers.schedule(now + cfg.dispatch_timeout, task.id, T_START)
        elif state is TS.RUNNING:
            task.progress_at = now
            stall = self._stall_timeout(task)
            if stall > 0:
                task.timer = timers.schedule(now + stall, task.id, T_STALL)
            max_run = task.max_run or cfg.max_run_time
            if max_run > 0:
                task.run_timer = timers.schedule(now + max_run, task.id, T_MAX_RUN)
        elif state is TS.RETRY:
            task.timer = timers.schedule(now + self.retry.delay(task.crashes), task.id, T_REQUEUE)
        if state is not TS.RUNNING and task.run_timer is not None:
            timers.cancel(task.run_timer)
            task.run_timer = None
        if state.terminal and task.deadline is not None:
            timers.cancel(task.deadline)
            task.deadline = None

    def _stall_timeout(self, task: Task) -> float:
        """Seconds without progress before ``task`` stalls (0: not watched)."""
        sat = self.fleet.by_id.get(task.satellite or "")
        declared = sat.stall_timeouts.get(task.kind) if sat is not None else None
        if declared is None:
            return 0.0  # the kind does not report progress: only satellite liveness is watched
        return self.cfg.stall_timeout or declared

    def _enqueue(self, task: Task, now: float, event: TaskEvent, reason: str | None = None) -> None:
        task.satellite = None
        self.queued_bytes += task.size
        self._task_to(task, event, now, reason)
        self.queues.push(task)

    # -------------------------------------------------------------- dispatch
    def schedule(self, now: float) -> None:
        """Dispatch queued tasks while some eligible satellite has credit."""
        fleet, queues = self.fleet, self.queues
        blocked: set[QueueKey] = set()
        deferred: list[Task] = []  # heads too long for every allocation with credit: let others pass
        try:
            self._schedule(now, fleet, queues, blocked, deferred)
        finally:
            for task in deferred:
                queues.push(task)

    def _schedule(self, now: float, fleet: Fleet, queues: TaskQueues, blocked: set[QueueKey],
                  deferred: list[Task]) -> None:
        while fleet.free_slots > 0 and len(queues):
            if blocked:
                allowed = [k for k in queues.keys() if k not in blocked]
                key = queues.best_key(allowed) if allowed else None
            else:
                key = queues.best_key(None)
            if key is None:
                return
            cands = [s for s in fleet.eligible(key) if len(s.inflight) < s.credit]
            head = queues.head(key) if cands else None
            if head is not None and head.duration:  # only where it can finish before the allocation ends
                cands = [s for s in cands if s.deadline - now >= head.duration]
                if not cands:
                    deferred.append(queues.pop(key))
                    continue
            if not cands:
                blocked.add(key)
                continue
            task = queues.pop(key)
            self._dispatch(task, self.strategy.choose(task, cands) if len(cands) > 1 else cands[0], now)

    def _dispatch(self, task: Task, sat: SatelliteRecord, now: float) -> None:
        if task.spilled is not None:  # its payload waits on disk: read it back
            assert self.load_spilled is not None
            task.payload = self.load_spilled(task)
            task.spilled = None
            self.counters["unspilled"] += 1
        else:
            self.queued_bytes -= task.size
        task.attempt += 1
        task.satellite = sat.sid
        sat.inflight[task.id] = task
        if sat.state is SS.IDLE:
            self._sat_to(sat, SE.load, now)
        self.fleet.free_slots -= 1
        self._dispatch_seq += 1
        sat.last_dispatch = self._dispatch_seq
        self.counters["dispatched"] += 1
        self.out.append((sat.sock, [sat.ident, P.SIGNATURE, P.DISPATCH,
                                    pack({"id": task.id, "a": task.attempt, **self._consent}), task.header,
                                    *task.payload], None))
        self._task_to(task, TE.dispatch, now)

    def _release(self, task: Task, now: float, abort: bool) -> SatelliteRecord | None:
        """Take ``task`` off its satellite's credit (telling the satellite to drop it if ``abort``)."""
        sat = self.fleet.by_id.get(task.satellite or "")
        if sat is None or sat.inflight.pop(task.id, None) is None:
            return None
        self.fleet.free_slots += 1
        if abort:
            self.out.append((sat.sock, [sat.ident, P.SIGNATURE, P.ABORT,
                                        pack({"id": task.id, "a": task.attempt})], None))
        if not sat.inflight and sat.state is SS.BUSY:
            self._sat_to(sat, SE.unload, now)
        return sat

    # ------------------------------------------------------------ outcomes
    def _succeeded(self, task: Task, sat: SatelliteRecord, result: list[Any], now: float) -> None:
        sat.done += 1
        sat.fail_streak = 0
        sat.ok_streak += 1
        if sat.state is SS.PROBATION and self.probation.promote(sat.ok_streak):
            self._sat_to(sat, SE.promote, now, "tasks succeed again")
        self.counters["done"] += 1
        self._task_to(task, TE.finish, now)
        self._complete(task, result)

    def _failed_on(self, sat: SatelliteRecord, now: float) -> None:
        """Count a crash against ``sat`` (its worker died, or a task stalled or never started there):
        probation, then draining for ``probation_cooldown`` seconds, then probation again.

        A task raising an exception is the task's fault, not the satellite's: it never counts here.
        """
        sat.failed += 1
        sat.ok_streak = 0
        sat.fail_streak += 1
        if sat.state in (SS.IDLE, SS.BUSY) and self.probation.demote(sat.fail_streak):
            self._sat_to(sat, SE.demote, now, f"{sat.fail_streak} failed tasks in a row")
        elif sat.state is SS.PROBATION and self.probation.drain(sat.fail_streak):
            sat.recover_at = now + self.cfg.probation_cooldown
            self._sat_to(sat, SE.drain, now, f"{sat.fail_streak} failed tasks in a row; "
                         f"on probation again in {self.cfg.probation_cooldown:g}s")

    def _fail(self, task: Task, etype: str, msg: str, now: float, event: TaskEvent = TE.fail,
              abort: bool = True) -> None:
        """End ``task`` with an error the orchestrator decided (cancel, timeouts, quarantine, expiry)."""
        if task.state in (TS.DISPATCHED, TS.RUNNING):
            self._release(task, now, abort)
        elif task.state is TS.PENDING and task.spilled is None:
            self.queued_bytes -= task.size  # it leaves the queue without being dispatched
        self.counters[{TE.cancel: "cancelled", TE.quarantine: "quarantined",
                       TE.expire: "expired"}.get(event, "failed")] += 1
        self._task_to(task, event, now, msg)
        err: dict[str, Any] = {"type": etype, "msg": msg, "tb": ""}
        if event is TE.quarantine:
            err["attempts"] = self.attempts(task)
        hdr = pack({"id": task.id, "a": task.attempt, "ok": False, "err": err, "sat": task.satellite})
        self._complete(task, [P.SIGNATURE, P.RESULT, hdr])

    def _stall(self, task: Task, now: float, reason: str, crash: bool = True, abort: bool = True,
               blame: bool = True) -> None:
        """The task's attempt is lost: reroute it (after a back-off) or quarantine it.

        ``crash``: counts against the task's retry budget; ``blame``: against its satellite.
        """
        sat = self._release(task, now, abort)
        if blame and sat is not None:
            self._failed_on(sat, now)
        self._task_to(task, TE.stall, now, reason)
        self.counters["stalled"] += 1
        if crash:
            task.crashes += 1
            if self.retry.quarantine(task.crashes):
                self._fail(task, P.ERR_QUARANTINED, f"quarantined after {task.crashes} crashes; last: {reason}",
                           now, TE.quarantine)
                log.warning("task %s quarantined after %d crashes (%s)", task.id, task.crashes, reason)
                return
            if self.retry.delay(task.crashes) > 0:
                self.counters["retries"] += 1
                self._task_to(task, TE.retry, now, f"retry in {self.retry.delay(task.crashes):g}s")
                return
        self.counters["requeued"] += 1
        self._enqueue(task, now, TE.requeue, reason)

    def spilled(self, task: Task, where: Any) -> None:
        """The adapter wrote ``task``'s payload to disk (at ``where``): drop it from memory."""
        if task.state is TS.PENDING and task.payload and task.spilled is None:
            task.payload = []
            task.spilled = where
            self.queued_bytes -= task.size
            self.counters["spilled"] += 1

    def _complete(self, task: Task, result: list[Any]) -> None:
        if task.counted:  # it no longer counts against its client's limits
            task.counted = False
            load = self.client_load.get(task.owner)  # type: ignore[arg-type]
            if load is not None:
                load[0] -= 1
                load[1] -= task.size
                if load[0] <= 0:
                    del self.client_load[task.owner]  # type: ignore[arg-type]
        if self.journal_out is not None:
            self.journal_out.append(["R", task.id, [memoryview(f) for f in result[2:]], self.wall()])
        task.payload = []  # the input is no longer needed
        self._send_result(task, result, _len(result), store=True)

    def _send_result(self, task: Task, frames: list[Any], size: int, store: bool) -> None:
        if not self._deliverable(task):  # kept for fetch: only a connection of the owner's key gets it
            self.counters["results_withheld"] += 1
        elif self.unread.admit(task.client, task.owner if task.owner is not None else task.client, size,
                               self.clock):
            self.out.append((task.csock, [task.client, *frames], task.id))
        elif self.unread.hold(task.client, task.id, size):  # its key has not read what it was sent: this
            self.counters["results_waiting"] += 1  # one waits in the store (where it is not evicted)
        if store:
            self.results.put(task.id, frames, size)
        else:
            self.results.mark(task.id, False)

    def _deliverable(self, task: Task) -> bool:
        """Whether ``task``'s result may go to the connection recorded for it (CurveZMQ on: only to
        a connection of its owner's key, and only while that key is authorised)."""
        if self.identify is None or not isinstance(task.owner, str):
            return True
        return self.conns.owns(task.client, task.owner) and self.identify(task.owner) is not None

    def attempts(self, task: Task) -> list[dict[str, Any]]:
        """The task's transitions, oldest first, as msgpack-friendly maps."""
        return task.history.entries()

    # -------------------------------------------------------------- timers
    def _on_timer(self, tid: str, code: int, now: float) -> None:
        task = self.tasks.get(tid)
        if task is None or task.state.terminal:
            return
        if code == T_DEADLINE:
            task.deadline = None
            self.counters["timeouts"] += 1
            self._fail(task, P.ERR_TIMEOUT, "task exceeded its timeout", now)
            return
        if code == T_MAX_RUN:
            task.run_timer = None
        else:
            task.timer = None
        if code == T_EXPIRE and task.state is TS.PENDING:
            self._fail(task, P.ERR_EXPIRED, self._why_unrouted(task), now, TE.expire)
        elif code == T_START and task.state is TS.DISPATCHED:
            sat = self.fleet.by_id.get(task.satellite or "")
            if sat is not None and self._workers_busy(sat):  # prefetched behind running tasks: it waits its turn
                task.timer = self.timers.schedule(now + self.cfg.dispatch_timeout, task.id, T_START)
            else:  # a free worker and it was not started: the satellite's fault, not the task's
                self._stall(task, now, f"not started within {self.cfg.dispatch_timeout:g}s on {task.satellite}",
                            crash=False)
        elif code == T_STALL and task.state is TS.RUNNING:
            stall = self._stall_timeout(task)
            if now - task.progress_at < stall:  # progress came meanwhile: look again later
                task.timer = self.timers.schedule(task.progress_at + stall, task.id, T_STALL)
            else:  # a task that stops reporting progress is the task's fault, not its heartbeating satellite's
                self._stall(task, now, f"no progress for {stall:g}s on {task.satellite}", blame=False)
        elif code == T_MAX_RUN and task.state is TS.RUNNING:
            self._fail(task, P.ERR_MAX_RUN, f"ran longer than {task.max_run or self.cfg.max_run_time:g}s", now)
        elif code == T_RESULT and task.state is TS.RUNNING:  # adopted as finished: its result never came
            self._stall(task, now, f"its result did not come back from {task.satellite} after a restart")
        elif code == T_REQUEUE and task.state is TS.RETRY:
            self._enqueue(task, now, TE.requeue, "back-off over")

    @staticmethod
    def _workers_busy(sat: SatelliteRecord) -> bool:
        """Whether every worker of ``sat`` runs a task (a dispatched task then waits in its prefetch)."""
        running = sum(1 for t in sat.inflight.values() if t.state is TS.RUNNING)
        return running >= (sat.workers or sat.slots)

    def _why_unrouted(self, task: Task) -> str:
        ttl = task.ttl or self.cfg.queue_ttl
        if not self.fleet.eligible(task.queue_key):
            return (f"expired after {ttl:g}s in the queue: no satellite offers kind {task.kind!r}"
                    + (f" with tags {sorted(task.tags)}" if task.tags else ""))
        return f"expired after {ttl:g}s in the queue: every eligible satellite stayed busy"

    # ---------------------------------------------------------- satellites
    def _sat_to(self, sat: SatelliteRecord, event: SatelliteEvent, now: float, reason: str | None = None) -> None:
        """Fire ``event`` on ``sat``: new state, credit, eligibility and event."""
        old = sat.state
        sat.state = SATELLITE_MACHINE.next(old, event)
        if sat.state is SS.PROBATION:
            sat.credit = self.probation.credits(sat.slots)
        elif sat.state in (SS.DRAINING, SS.SILENT, SS.LOST, SS.LEFT):
            sat.credit = 0
        else:
            sat.credit = sat.slots
        if sat.state.accepts_work != old.accepts_work or sat.state in (SS.PROBATION, SS.DRAINING) \
                or old is SS.PROBATION:
            self.fleet.changed()
        if event not in (SE.load, SE.unload):  # limited: a peer registering in a loop could flood the log
            log_limited(log, logging.INFO, "satellite %r: %s -> %s%s", sat.sid, old.name, sat.state.name,
                        f" ({reason})" if reason else "")
        if self._want[b"sat:"]:
            body: dict[str, Any] = {"sat": sat.sid, "state": sat.state.name.lower(), "event": event.name,
                                    "t": self.wall()}
            if reason:
                body["reason"] = reason
            self.pub.append([b"sat:" + sat.sid.encode(), pack(body)])

    def _heard(self, sat: SatelliteRecord, now: float) -> None:
        """Traffic from a silent satellite: it may have work again."""
        self._sat_to(sat, SE.hear, now, "heard again")
        if sat.inflight:
            self._sat_to(sat, SE.load, now)
        if self.probation.demote(sat.fail_streak):
            self._sat_to(sat, SE.demote, now, "still failing")

    def _lose(self, sat: SatelliteRecord, now: float, reason: str, event: SatelliteEvent = SE.lose,
              crash: bool = True) -> None:
        """Stall every task in flight on ``sat`` and take it out of the fleet."""
        tasks = [t for t in sat.inflight.values() if not t.state.terminal]
        for task in tasks:
            self._stall(task, now, f"satellite {sat.sid} {reason}", crash=crash, abort=False, blame=False)
        sat.inflight.clear()
        self._sat_to(sat, event, now, reason)
        self.fleet.remove(sat)
        if tasks:
            log.warning("satellite %s %s: %d task(s) rerouted", sat.sid, reason, len(tasks))

    def _watch_satellites(self, now: float) -> None:
        """Silent satellites get no new work; lost ones have their tasks rerouted."""
        silent_after, lost_after = self.cfg.silent_after, self.cfg.lost_after
        for sat in list(self.fleet.by_id.values()):
            quiet = now - sat.last_seen
            if quiet > lost_after:
                self.counters["satellites_lost"] += 1
                log.warning("satellite %s silent for %.1fs: lost", sat.sid, quiet)
                self._lose(sat, now, "lost (heartbeat timeout)")
            elif quiet > silent_after and SATELLITE_MACHINE.allows(sat.state, SE.miss):
                self._sat_to(sat, SE.miss, now, f"silent for {quiet:.1f}s")
            elif sat.state is SS.DRAINING and now >= sat.recover_at:  # a drain for failing is not for good
                sat.recover_at = float("inf")
                sat.fail_streak = self.probation.demote_after
                self._sat_to(sat, SE.recover, now, "cool-down over")
