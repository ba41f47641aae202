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
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from orchester.journal import records
from orchester.logutil import log_limited
from orchester.server.fleet import Fleet, SatelliteRecord
from orchester.server.ports import Outbox, Ports
from orchester.server.state import ServerState
from orchester.server.tasks import LinkedTask, QueueKey, Task, TaskQueues
from serializers import messages as M
from serializers import protocol as P
from serializers.codecs import dispatch_consent
from serializers.header import pack, unpack
from serializers.zmqframes import frames_size
from tracker import (
    SATELLITE_MACHINE,
    TASK_MACHINE,
    ProbationPolicy,
    RetryPolicy,
    SatelliteEvent,
    SatelliteState,
    TaskEvent,
    TaskState,
)

log = logging.getLogger("orchester")

#: Attempts after which a task is quarantined however it lost them (crashes have their own, smaller budget:
#: ``--retries``; a satellite that re-registers or leaves in a loop reroutes without a crash).
MAX_ATTEMPTS = 1000

# timer codes: what a task's timer guards
T_EXPIRE, T_START, T_STALL, T_MAX_RUN, T_REQUEUE, T_DEADLINE, T_RESULT = range(7)

TE, SE, TS, SS = TaskEvent, SatelliteEvent, TaskState, SatelliteState


class Lifecycle:
    """State changes of tasks and satellites, on the shared :class:`~orchester.server.state.ServerState`.

    The message handlers live in :mod:`orchester.server.core`, the requests in
    :mod:`orchester.server.requests`; both call the public methods here. Everything it sends,
    publishes or journals goes into the :class:`~orchester.server.ports.Outbox`.
    """

    def __init__(self, state: ServerState, outbox: Outbox, ports: Ports) -> None:
        self.state = state
        self.outbox = outbox
        self.ports = ports
        config = state.cfg
        self._consent = dispatch_consent(config.allow_pickle)  #: what each DISPATCH says this server accepts
        self.retry = RetryPolicy(config.retries, config.retry_backoff)
        self._settling: deque[Task] = deque()  #: tasks that ended, whose dependents are to be settled
        self._busy = False  #: settling now (a task that ends meanwhile joins :attr:`_settling`)
        self.probation = ProbationPolicy(config.probation_after, config.drain_after)

    # ------------------------------------------------------- restore, adopt

    def install(self, task: Task, result: list[Any] | None, now: float, reclaim: bool) -> str:
        """Put a task rebuilt from journal records into the table (restore, takeover); returns
        what became of it: ``finished``, ``reclaimable`` or ``requeued``.

        A finished task keeps its result (``result``: its frames after the command) for fetch; an
        unfinished one is queued again, unless it was in flight and ``reclaim``: then it keeps its
        satellite and attempt and waits for that satellite to claim it back (:meth:`adopt`).
        """
        state = self.state
        if task.state.terminal:
            state.tasks[task.id] = task
            state.state_counts[task.state] += 1
            if result is not None and (len(result) > 1 or not unpack(bytes(result[0])).get("ok")):
                state.results.put(task.id, [P.SIGNATURE, P.RESULT, *result], frames_size(result), delivered=True)
            task.payload = []
            if task.after:
                state.graph.link(task.id, task.after, ended=True)
            return "finished"
        in_flight = task.state in (TS.DISPATCHED, TS.RUNNING)
        # with dependencies it enters waiting, as at submit (attach() releases it when they have ended), unless
        # it waits for its satellite to claim it back (it ran: they had ended)
        task.state = TS.WAITING if task.after and not (reclaim and in_flight) else TS.PENDING
        state.add_pending(task)
        if reclaim and in_flight:  # keeps its satellite and attempt: only that one may claim it
            state.graph.link(task.id, task.after)
            state.reclaim[task.id] = task
            return "reclaimable"
        task.satellite = None
        if isinstance(task, LinkedTask):  # its dependencies were installed before it (submitted before it)
            self.attach(task, [state.tasks.get(dep) for dep in task.after], now)
            self.arm(task, now)
            return "waiting" if task.state is TS.WAITING else "requeued" if task.state is TS.PENDING else "failed"
        state.queues.push(task)
        self.arm(task, now)
        return "requeued"

    # ---------------------------------------------------------- dependencies
    def attach(self, task: LinkedTask, deps: Sequence[Task | None], now: float) -> None:
        """A task that entered the table WAITING gets its dependencies ``deps`` (those of
        :attr:`Task.after`, in order; ``None`` for one the table does not hold: only after a restart
        whose journal lost it). It waits while some have not ended, fails at once when one did not
        succeed (unless it runs on failure), and is released (queued) when none is left to wait for."""
        graph = self.state.graph
        graph.link(task.id, task.after)
        blockers, failed, missing = 0, None, None
        for dep_id, dep in zip(task.after, deps, strict=True):
            if dep is None:
                missing = missing or dep_id
            elif not dep.state.terminal:
                blockers += 1
            elif dep.state is not TS.DONE and failed is None and not task.run_on_failure:
                failed = dep
        if task.refs:  # what a connection passes by reference reaches the task, not that connection (unless asked)
            for ref in task.refs:
                dep = self.state.tasks.get(ref)
                if dep is not None and not dep.state.terminal and dep.client == task.client:
                    dep.quiet = True
        task.blockers = blockers
        if missing is not None:
            self.fail(task, P.ERR_DEPENDENCY, f"its dependency {missing} is not known here (the journal lost it)",
                      now, dependency=missing)
        elif failed is not None:
            task.cause = failed.cause or failed.id
            self.fail(task, P.ERR_DEPENDENCY, self._dependency_message(failed), now, dependency=failed.id)
        elif not blockers:
            self.task_to(task, TE.release, now, "its dependencies had ended")
            self.state.queues.push(task)

    def records_of(self, task: Task, payload: Sequence[Any] = (), count: int | None = None,
                   stored: Any = ...) -> list[list[Any]]:
        """The journal records of ``task``: its submission (with ``payload``), its transitions (the first
        ``count``, all by default) and its result (``stored``, by default the one kept now). A snapshot is
        made of them (:func:`orchester.server.restore.task_records`), and an ended task's are journaled
        again before a task that waits for it, so that the passive server of a pair (whose table keeps
        only the newest finished tasks) holds it as long as the active does."""
        rows = task.history.rows(count)
        out = [records.submitted(task.id, task.client, task.header, list(payload),
                                 rows[0][0] if rows else self.state.wall(), None,
                                 task.owner if isinstance(task.owner, str) else None)]
        out.extend(records.transition(task.id, state, attempt, sat, reason, when)
                   for when, state, attempt, sat, reason in rows[1:])
        if stored is ...:
            stored = self.state.results.get(task.id)
        if stored is not None:
            out.append(records.result(task.id, stored.frames[2:], self.state.wall()))
        return out

    @staticmethod
    def _dependency_message(dep: Task) -> str:
        how = {TS.FAILED: "failed", TS.CANCELLED: "was cancelled", TS.EXPIRED: "expired",
               TS.QUARANTINED: "was quarantined"}.get(dep.state, dep.state.name.lower())
        cause = f" (it waited for {dep.cause}, which did not succeed)" if dep.cause and dep.cause != dep.id else ""
        return f"its dependency {dep.id} {how}{cause}"

    def settle(self, ended: Task, now: float) -> None:
        """``ended`` reached a final state: it needs its dependencies' results no longer, and the
        tasks waiting for it go on (queued once nothing else holds them) or fail with it (unless they
        run on failure), transitively. Iterative: a chain of any length fails without recursion."""
        work = self._settling
        if self._busy:  # settling already: the loop below takes it (a dependent failed with it)
            work.append(ended)
            return
        self._busy = True
        try:
            task: Task | None = ended
            while task is not None:
                self._settle_one(task, now)
                task = work.popleft() if work else None
        finally:
            self._busy = False
            work.clear()

    def _settle_one(self, task: Task, now: float) -> None:
        if task.after:
            self.state.graph.unlink(task.after)
        known = self.state.graph.dependents.get(task.id)
        if known is None:
            return
        tasks = self.state.tasks
        for did in (known,) if type(known) is str else list(known):
            dependent = tasks.get(did)
            if dependent is None or dependent.state is not TS.WAITING:
                continue
            assert isinstance(dependent, LinkedTask)  # (a dependent was submitted with its dependencies)
            if task.state is TS.DONE or dependent.run_on_failure:
                dependent.blockers -= 1
                if dependent.blockers <= 0:
                    self.task_to(dependent, TE.release, now, "its dependencies ended")
                    self.state.queues.push(dependent)
            else:  # complete() hands it back to settle(), which queues it in the work list
                self.state.counters["dependency_failed"] += 1
                dependent.cause = task.cause or task.id
                self.fail(dependent, P.ERR_DEPENDENCY, self._dependency_message(task), now, dependency=task.id)

    def adopt(self, sat: SatelliteRecord, running: Sequence[tuple[str, int]], now: float,
              finished: bool = False) -> None:
        """Take back tasks a (re-)registering satellite says it is still running.

        After a restart or a failover the task table comes from the journal, where these
        tasks were in flight: they are given back to the satellite running them under the
        attempt it runs, instead of being dispatched a second time. A satellite also lists
        the tasks it finished lately and sends their results again right after: those are
        taken back the same way (``finished``) and must finish within a liveness period.

        Only what the journal says this satellite had, under the attempt it had, is given
        back: a task in flight on it when the journal ended. Shortly after a restart (one
        liveness period), without CurveZMQ, a queued task may also be claimed under the attempt
        after the journaled one (its dispatch record did not reach the disk before the crash);
        with keys, dispatches wait for their record, so that guess is never needed (nor allowed:
        any satellite key could claim any task by it). Anything else is refused and left to
        finish; its result is discarded. A task is given back only to a satellite that offers its
        kind and has its tags.
        """
        for tid, attempt in running:  # (checked when the REGISTER decoded: serializers.messages)
            task = self.state.reclaim.get(tid)
            if task is not None:
                ok = task.satellite == sat.sid and attempt == task.attempt
            else:
                task = self.state.tasks.get(tid)
                # without keys only: with them, dispatches wait for their journal record (the broker's
                # gate), so the journal names every satellite that may hold a task, and no guess is needed
                ok = task is not None and task.state is TS.PENDING and now < self.state.reclaim_until \
                    and attempt == task.attempt + 1 and self.ports.identify is None
            if not ok or task is None or task.state is not TS.PENDING or task.kind not in sat.kinds \
                    or not task.tags <= sat.tags:
                self.state.counters["adopt_refused"] += 1
                continue
            self.state.reclaim.pop(tid, None)
            self.state.unqueued(task)
            task.attempt = attempt
            task.satellite = sat.sid
            if sat.takes_light(task) and len(sat.light) < sat.light_credit:  # (as it was dispatched, most likely)
                sat.take(task, light=True)
                self.state.fleet.light_moved(sat)
            else:
                free = sat.free
                sat.take(task)
                self.state.fleet.credit_changed(sat, free)
            if sat.state is SS.IDLE:
                self.sat_to(sat, SE.load, now)
            self.task_to(task, TE.dispatch, now, "adopted")
            self.task_to(task, TE.start, now, "adopted")
            self.state.counters["adopted"] += 1
            if finished:  # its result was sent again right after the registration
                task.timer = self.state.timers.schedule(now + self.state.cfg.lost_after, tid, T_RESULT)

    # ------------------------------------------------------------ task moves
    def task_to(self, task: Task, event: TaskEvent, now: float, reason: str | None = None,
                ago: float | None = None) -> None:
        """Fire ``event`` on ``task``: new state, its timer, history and event. ``ago``: the move happened that
        many seconds before now (never before the task's previous move), for the history, journal and event."""
        st = self.state  # (the hottest path of the core: one lookup of each collaborator)
        state = TASK_MACHINE.next(task.state, event)
        counts = st.state_counts
        counts[task.state] -= 1
        counts[state] += 1
        if task.state is TS.PENDING:
            st.pending_left(task)
        elif state is TS.PENDING:
            st.pending_entered(task)
            task.queued_at = now
        task.state = state
        wall = st.wall()  # one reading for the history, the journal and the event
        if ago:  # (never before the previous move: a satellite's long dt cannot date it earlier)
            last = task.history.last
            wall = wall - ago if last is None else max(wall - ago, last)
        task.history.add(wall, state, task.attempt, task.satellite, reason)
        written = self.outbox.records
        if written is not None:
            written.append(records.transition(task.id, state, task.attempt, task.satellite, reason, wall))
        if state.terminal:
            st.recent_latency.append((now, now - task.submitted))
        if self.ports.metrics:
            per_state = st.kind_counts.get(task.kind)
            if per_state is None:
                per_state = st.kind_counts[task.kind] = [0] * len(TaskState)
            per_state[state] += 1
            if state.terminal:
                st.latencies.append((task.kind, now - task.submitted))
        self.arm(task, now)
        if st.subs.want[b"task:"]:
            self.publish_task(task, wall, reason)

    def publish_task(self, task: Task, wall: float, reason: str | None = None) -> None:
        """The ``task:<id>`` event of the task's current state."""
        body: dict[str, Any] = {"id": task.id, "kind": task.kind, "state": task.state.name.lower(),
                                "attempt": task.attempt, "sat": task.satellite, "t": wall}
        if reason:
            body["reason"] = reason
        if isinstance(task.owner, str):
            body["by"] = task.owner  # the submitter's key name (CurveZMQ)
            sat = self.state.fleet.by_id.get(task.satellite) if task.satellite else None
            if sat is not None and sat.user:
                body["ran_by"] = sat.user  # the satellite's key name
        self.outbox.publish([b"task:" + task.id.encode(), pack(body)])

    def arm(self, task: Task, now: float) -> None:
        """Cancel the previous state's timer and start the one of the current state, if any."""
        timers, cfg, state = self.state.timers, self.state.cfg, task.state
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
            stall = self.stall_timeout(task)
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

    def stall_timeout(self, task: Task) -> float:
        """Seconds without progress before ``task`` stalls (0: not watched)."""
        sat = self.state.fleet.by_id.get(task.satellite or "")
        declared = sat.stall_timeouts.get(task.kind) if sat is not None else None
        if declared is None:
            return 0.0  # the kind does not report progress: only satellite liveness is watched
        return self.state.cfg.stall_timeout or declared

    def enqueue(self, task: Task, now: float, event: TaskEvent, reason: str | None = None) -> None:
        task.satellite = None
        self.state.queued(task)
        self.task_to(task, event, now, reason)
        self.state.queues.push(task)

    # -------------------------------------------------------------- dispatch
    def schedule(self, now: float) -> None:
        """Dispatch queued tasks while some eligible satellite has credit."""
        fleet, queues = self.state.fleet, self.state.queues
        blocked: set[QueueKey] = set()
        deferred: list[Task] = []  # heads too long for every allocation with credit: let others pass
        try:
            self._schedule(now, fleet, queues, blocked, deferred)
        finally:
            for task in deferred:
                queues.push(task)

    def _schedule(self, now: float, fleet: Fleet, queues: TaskQueues, blocked: set[QueueKey],
                  deferred: list[Task]) -> None:
        light_only = False  # (only light credit left: the keys that cannot go light were blocked at once)
        while (fleet.free_slots > 0 or fleet.free_light > 0) and len(queues):
            if fleet.free_slots <= 0 and not light_only:
                light_only = True
                blocked.update(k for k in queues.keys()
                               if k[2] != 1 or k[3] or not fleet.offers_light(k[0]))
            key = queues.best_key(skip=blocked)
            if key is None:
                return
            head = queues.head(key)
            if head is None:
                continue
            simple = key[2] == 1 and not key[3] and not head.duration  # (one core, no memory, no duration said)
            if simple and fleet.free_light > 0:
                # a light kind on some satellite: one with light credit free takes it, in turn (no slot taken)
                light = fleet.light_for(key)
                if light is not None:
                    self._dispatch(queues.pop(key), light, now, light=True)
                    continue
            if fleet.free_slots <= 0:  # (only light credit is free: this key waits)
                blocked.add(key)
                continue
            if simple and fleet.ranked:
                # the common case with a built-in strategy: the ready satellite of least rank, from the index
                best = fleet.best(key, self._takes_one)
                if best is None:
                    blocked.add(key)
                    continue
                self._dispatch(queues.pop(key), best, now)
                continue
            if key[2] == 1 and not key[3]:  # one core, no memory said: checked inline
                cands = [s for s in fleet.eligible(key) if s.heavy < s.credit and s.used < s.capacity
                         and (s.reserved is None or self._unreserve(s))]
            else:
                cands = [s for s in fleet.eligible(key) if s.fits(head)
                         and (s.reserved is None or s.reserved is head or self._unreserve(s))]
            if cands and head.duration:  # only where it can finish before the allocation ends
                cands = [s for s in cands if s.deadline - now >= head.duration]
                if not cands:
                    self._drop_reservation(head)  # (kept on a satellite whose allocation ends too soon)
                    deferred.append(queues.pop(key))
                    continue
            if not cands:
                if (head.cores > 1 or head.memory) and head.reserved_on is None \
                        and now - head.queued_at >= self.state.cfg.reserve_after:
                    self._reserve(head, fleet.eligible(key), now)
                blocked.add(key)
                continue
            task = queues.pop(key)
            self._dispatch(task, self.state.strategy.choose(task, cands) if len(cands) > 1 else cands[0], now)

    @classmethod
    def _takes_one(cls, sat: SatelliteRecord) -> bool:
        """Whether ``sat`` (with free credit) takes a one-core task now: a core free, kept for no other task."""
        return sat.used < sat.capacity and (sat.reserved is None or cls._unreserve(sat))

    @staticmethod
    def _unreserve(sat: SatelliteRecord) -> bool:
        """Whether ``sat``'s reservation is over (its task left the queue): then it is dropped."""
        task = sat.reserved
        if task is not None and task.state is TS.PENDING and task.reserved_on is sat:
            return False
        sat.reserved = None
        return True

    @staticmethod
    def _drop_reservation(task: Task) -> None:
        """``task`` no longer keeps a satellite (it was dispatched, or that satellite will not do)."""
        if task.reserved_on is not None:
            task.reserved_on.reserved = None
            task.reserved_on = None

    def _reserve(self, task: Task, eligible: Iterable[SatelliteRecord], now: float) -> None:
        """Keep a satellite for ``task``, a wide task that let narrower ones pass for ``reserve_after``
        seconds: of the satellites that could ever run it (and, with a duration, whose allocation lasts
        long enough) and are not kept for another, the one with the most cores free (then the fewest
        tasks). It takes no other task until ``task`` fits there."""
        best: SatelliteRecord | None = None
        for sat in eligible:
            if not sat.could_fit(task) or (task.duration and sat.deadline - now < task.duration) \
                    or (sat.reserved is not None and not self._unreserve(sat)):
                continue
            if best is None or (sat.capacity - sat.used, -sat.heavy) > (best.capacity - best.used, -best.heavy):
                best = sat
        if best is not None:
            best.reserved, task.reserved_on = task, best
            self.state.counters["reservations"] += 1

    def _dispatch(self, task: Task, sat: SatelliteRecord, now: float, light: bool = False) -> None:
        """Send ``task`` to ``sat``, on one of its light credits if ``light`` (else a slot, its cores, its memory)."""
        results: list[tuple[str, int]] = []
        inputs: list[Any] = []
        for ref in task.refs:  # the results it takes by reference follow its payload, as they were received
            stored = self.state.results.get(ref)
            if stored is None:  # (pinned while it waits: only a journal that lost it gets here)
                self.state.counters["dependency_results_lost"] += 1
                self.fail(task, P.ERR_DEPENDENCY, f"the result of its dependency {ref} is no longer kept", now,
                          dependency=ref)
                return
            results.append((ref, len(stored.frames) - 2))  # (tuples: no list per result for the collector)
            inputs.extend(stored.frames[2:])
        self._drop_reservation(task)
        if task.spilled is not None:  # its payload waits on disk: read it back
            assert self.ports.load_spilled is not None
            try:
                task.payload = self.ports.load_spilled(task)
            except Exception as exc:  # the journal no longer has it: this task fails, the others go on
                self.state.counters["spill_lost"] += 1
                log.error("the payload of task %s cannot be read back from the journal (%s: %s): it fails",
                          task.id[:64], type(exc).__name__, str(exc)[:200])
                self.fail(task, P.ERR_PAYLOAD_LOST, "its payload, kept in the journal while it waited, cannot be "
                          "read back", now)
                return
            task.spilled = None
            self.state.counters["unspilled"] += 1
        else:
            self.state.unqueued(task)
        task.attempt += 1
        task.satellite = sat.sid
        if light:  # (its last dispatch, part of the slots' rank, is a slot's: light tasks go in their own turn)
            sat.take(task, light=True)
            self.state.fleet.light_taken(sat, task.kind)
        else:
            self.state.dispatch_seq += 1
            sat.last_dispatch = self.state.dispatch_seq  # (before the fleet hears of it: part of the rank)
            free = sat.free
            sat.take(task)
            self.state.fleet.credit_changed(sat, free)
        if sat.state is SS.IDLE:
            self.sat_to(sat, SE.load, now)
        self.state.counters["dispatched"] += 1
        self.outbox.send(sat.sock, [sat.ident, *M.dispatch(task.id, task.attempt, self._consent, results, task.cores),
                                    task.header, *task.payload, *inputs])
        self.task_to(task, TE.dispatch, now)

    def release(self, task: Task, now: float, abort: bool) -> SatelliteRecord | None:
        """Take ``task`` off its satellite's credit (telling the satellite to drop it if ``abort``)."""
        sat = self.state.fleet.by_id.get(task.satellite or "")
        if sat is None:
            return None
        free = sat.free
        light = task.id in sat.light
        if not sat.give_back(task):
            return None
        if light:
            self.state.fleet.light_moved(sat)
        else:
            self.state.fleet.credit_changed(sat, free)
        if abort:
            self.outbox.send(sat.sock, [sat.ident, *M.abort(task.id, task.attempt)])
        if not sat.inflight and sat.state is SS.BUSY:
            self.sat_to(sat, SE.unload, now)
        return sat

    # ------------------------------------------------------------ outcomes
    def succeeded(self, task: Task, sat: SatelliteRecord, result: list[Any], now: float) -> None:
        sat.done += 1
        sat.fail_streak = 0
        sat.ok_streak += 1
        if sat.state is SS.PROBATION and self.probation.promote(sat.ok_streak):
            self.sat_to(sat, SE.promote, now, "tasks succeed again")
        self.state.counters["done"] += 1
        self.task_to(task, TE.finish, now)
        self.complete(task, result)

    def failed_on(self, sat: SatelliteRecord, now: float) -> None:
        """Count a crash against ``sat`` (its worker died, or a task stalled or never started there):
        probation, then draining for ``probation_cooldown`` seconds, then probation again.

        A task raising an exception is the task's fault, not the satellite's: it never counts here.
        """
        sat.failed += 1
        sat.ok_streak = 0
        sat.fail_streak += 1
        if sat.state in (SS.IDLE, SS.BUSY) and self.probation.demote(sat.fail_streak):
            self.sat_to(sat, SE.demote, now, f"{sat.fail_streak} failed tasks in a row")
        elif sat.state is SS.PROBATION and self.probation.drain(sat.fail_streak):
            sat.recover_at = now + self.state.cfg.probation_cooldown
            self.sat_to(sat, SE.drain, now, f"{sat.fail_streak} failed tasks in a row; "
                         f"on probation again in {self.state.cfg.probation_cooldown:g}s")

    def fail(self, task: Task, etype: str, msg: str, now: float, event: TaskEvent = TE.fail,
              abort: bool = True, dependency: str | None = None) -> None:
        """End ``task`` with an error the orchestrator decided (cancel, timeouts, quarantine, expiry, a
        dependency that did not succeed: ``dependency`` names it)."""
        if task.state in (TS.DISPATCHED, TS.RUNNING):
            self.release(task, now, abort)
        elif task.state is TS.PENDING or task.state is TS.WAITING:
            self.state.unqueued(task)  # it leaves the queue (or its wait) without being dispatched
        self.state.counters[{TE.cancel: "cancelled", TE.quarantine: "quarantined",
                       TE.expire: "expired"}.get(event, "failed")] += 1
        self.task_to(task, event, now, msg)
        err: dict[str, Any] = {"type": etype, "msg": msg, "tb": ""}
        if event is TE.quarantine:
            err["attempts"] = self.attempts(task)
        if dependency is not None:
            err["dependency"] = dependency
            assert isinstance(task, LinkedTask)  # (only a task with dependencies fails for one)
            err["cause"] = task.cause = task.cause or dependency
        hdr = M.Result(task.id, task.attempt, False, err=err, sat=task.satellite).encode()
        self.complete(task, [P.SIGNATURE, P.RESULT, hdr])

    def stall(self, task: Task, now: float, reason: str, crash: bool = True, abort: bool = True,
               blame: bool = True) -> None:
        """The task's attempt is lost: reroute it (after a back-off) or quarantine it.

        ``crash``: counts against the task's retry budget; ``blame``: against its satellite.
        """
        sat = self.release(task, now, abort)
        if blame and sat is not None:
            self.failed_on(sat, now)
        self.task_to(task, TE.stall, now, reason)
        self.state.counters["stalled"] += 1
        if task.attempt >= MAX_ATTEMPTS:  # rerouted without a crash this often (a satellite re-registering in a
            # loop): its history and journal would grow without end, and no task needs that many tries
            self.fail(task, P.ERR_QUARANTINED, f"quarantined after {task.attempt} attempts; last: {reason}", now,
                      TE.quarantine)
            log_limited(log, logging.WARNING, "task %s quarantined after %d attempts (%s)", task.id, task.attempt,
                        reason)
            return
        if crash:
            task.crashes += 1
            if self.retry.quarantine(task.crashes):
                self.fail(task, P.ERR_QUARANTINED, f"quarantined after {task.crashes} crashes; last: {reason}",
                           now, TE.quarantine)
                log.warning("task %s quarantined after %d crashes (%s)", task.id, task.crashes, reason)
                return
            if self.retry.delay(task.crashes) > 0:
                self.state.counters["retries"] += 1
                self.task_to(task, TE.retry, now, f"retry in {self.retry.delay(task.crashes):g}s")
                return
        self.state.counters["requeued"] += 1
        self.enqueue(task, now, TE.requeue, reason)

    def spilled(self, task: Task, where: Any) -> None:
        """The adapter wrote ``task``'s payload to disk (at ``where``): drop it from memory."""
        if (task.state is TS.PENDING or task.state is TS.WAITING) and task.payload and task.spilled is None:
            self.state.unqueued(task)
            task.payload = []
            task.spilled = where
            self.state.counters["spilled"] += 1

    def complete(self, task: Task, result: list[Any]) -> None:
        if task.counted:  # it no longer counts against its client's limits
            task.counted = False
            load = self.state.client_load.get(task.owner)  # type: ignore[arg-type]
            if load is not None:
                load[0] -= 1
                load[1] -= task.size
                if load[0] <= 0:
                    del self.state.client_load[task.owner]  # type: ignore[arg-type]
        if self.outbox.journaling:
            self.outbox.record(records.result(task.id, result[2:], self.state.wall()))
        task.payload = []  # the input is no longer needed
        if task.after and len(task.header) > M.MAX_HEADER:  # a wide fan-in's: its ids stay in task.after, not twice
            hdr = unpack(bytes(task.header), M.MAX_TASK_HEADER)
            task.header = pack({k: v for k, v in hdr.items() if k not in ("af", "rf")})
        if task.quiet:  # a task of its owner takes it by reference: its client gets it when it asks (FETCH)
            self.state.counters["results_kept"] += 1
            self.state.results.put(task.id, result, frames_size(result))
        else:
            self.send_result(task, result, frames_size(result), store=True)
        if task.after or task.id in self.state.graph.dependents:
            self.settle(task, self.state.clock)

    def send_result(self, task: Task, frames: list[Any], size: int, store: bool) -> None:
        if not self.deliverable(task):  # kept for fetch: only a connection of the owner's key gets it
            self.state.counters["results_withheld"] += 1
        elif self.state.unread.admit(task.client, task.owner if task.owner is not None else task.client, size,
                               self.state.clock):
            self.outbox.send(task.csock, [task.client, *frames], task.id)
        elif self.state.unread.hold(task.client, task.id, size):  # its key has not read what it was sent: this
            self.state.counters["results_waiting"] += 1  # one waits in the store (where it is not evicted)
        if store:
            self.state.results.put(task.id, frames, size)
        else:
            self.state.results.mark(task.id, False)

    def deliverable(self, task: Task) -> bool:
        """Whether ``task``'s result may go to the connection recorded for it (CurveZMQ on: only to
        a connection of its owner's key, and only while that key is authorised)."""
        if self.ports.identify is None or not isinstance(task.owner, str):
            return True
        return self.state.conns.owns(task.client, task.owner) and self.ports.identify(task.owner) is not None

    def attempts(self, task: Task) -> list[dict[str, Any]]:
        """The task's transitions, oldest first, as msgpack-friendly maps."""
        return task.history.entries()

    # -------------------------------------------------------------- timers
    def on_timer(self, tid: str, code: int, now: float) -> None:
        task = self.state.tasks.get(tid)
        if task is None or task.state.terminal:
            return
        if code == T_DEADLINE:
            task.deadline = None
            self.state.counters["timeouts"] += 1
            self.fail(task, P.ERR_TIMEOUT, "task exceeded its timeout", now)
            return
        if code == T_MAX_RUN:
            task.run_timer = None
        else:
            task.timer = None
        if code == T_EXPIRE and task.state is TS.PENDING:
            self.fail(task, P.ERR_EXPIRED, self.why_unrouted(task), now, TE.expire)
        elif code == T_START and task.state is TS.DISPATCHED:
            sat = self.state.fleet.by_id.get(task.satellite or "")
            if sat is not None and self._workers_busy(sat, task):  # prefetched behind running tasks: it waits
                task.timer = self.state.timers.schedule(now + self.state.cfg.dispatch_timeout, task.id, T_START)
            else:  # a free worker and it was not started: the satellite's fault, not the task's
                self.stall(task, now, f"not started within {self.state.cfg.dispatch_timeout:g}s on {task.satellite}",
                            crash=False)
        elif code == T_STALL and task.state is TS.RUNNING:
            stall = self.stall_timeout(task)
            if now - task.progress_at < stall:  # progress came meanwhile: look again later
                task.timer = self.state.timers.schedule(task.progress_at + stall, task.id, T_STALL)
            else:  # a task that stops reporting progress is the task's fault, not its heartbeating satellite's
                self.stall(task, now, f"no progress for {stall:g}s on {task.satellite}", blame=False)
        elif code == T_MAX_RUN and task.state is TS.RUNNING:
            self.fail(task, P.ERR_MAX_RUN, f"ran longer than {task.max_run or self.state.cfg.max_run_time:g}s", now)
        elif code == T_RESULT and task.state is TS.RUNNING:  # adopted as finished: its result never came
            self.stall(task, now, f"its result did not come back from {task.satellite} after a restart")
        elif code == T_REQUEUE and task.state is TS.RETRY:
            self.enqueue(task, now, TE.requeue, "back-off over")

    @staticmethod
    def _workers_busy(sat: SatelliteRecord, task: Task | None = None) -> bool:
        """Whether every worker of ``sat`` runs a task, or too few of its cores are free for ``task`` (a
        dispatched task then waits in its prefetch). Light tasks wait for no worker, and keep none busy."""
        if task is not None and task.id in sat.light:
            return False
        light = sat.light
        running = [t for t in sat.inflight.values() if t.state is TS.RUNNING and (not light or t.id not in light)]
        if len(running) >= (sat.workers or sat.slots):
            return True
        return task is not None and sum(t.cores for t in running) + task.cores > sat.cores

    def why_unrouted(self, task: Task) -> str:
        """Why ``task`` expired in the queue, in words."""
        ttl = task.ttl or self.state.cfg.queue_ttl
        eligible = self.state.fleet.eligible(task.queue_key)
        if not eligible:
            return (f"expired after {ttl:g}s in the queue: no satellite offers kind {task.kind!r}"
                    + (f" with tags {sorted(task.tags)}" if task.tags else ""))
        if not any(s.could_fit(task) for s in eligible):
            most = max(s.cores for s in eligible)
            if task.cores > most:
                return (f"expired after {ttl:g}s in the queue: it needs {task.cores} cores and no satellite "
                        f"offering kind {task.kind!r} has more than {most}")
            memory = max(s.memory for s in eligible)
            return (f"expired after {ttl:g}s in the queue: it needs {task.memory} bytes of memory and no "
                    f"satellite offering kind {task.kind!r} has more than {memory}")
        return f"expired after {ttl:g}s in the queue: every eligible satellite stayed busy"

    # ---------------------------------------------------------- satellites
    def sat_to(self, sat: SatelliteRecord, event: SatelliteEvent, now: float, reason: str | None = None) -> None:
        """Fire ``event`` on ``sat``: new state, credit, eligibility and event."""
        old = sat.state
        sat.state = SATELLITE_MACHINE.next(old, event)
        free = sat.free
        if sat.state is SS.PROBATION:
            sat.credit = self.probation.credits(sat.slots)
        elif sat.state in (SS.DRAINING, SS.SILENT, SS.LOST, SS.LEFT):
            sat.credit = 0
        else:
            sat.credit = sat.slots
        self.state.fleet.credit_changed(sat, free)
        if sat.state.accepts_work != old.accepts_work:
            self.state.fleet.changed(sat)
        else:
            self.state.fleet.light_changed(sat)  # (probation: no light tasks; its credit back: light ones again)
        if event not in (SE.load, SE.unload):  # limited: a peer registering in a loop could flood the log
            log_limited(log, logging.INFO, "satellite %r: %s -> %s%s", sat.sid, old.name, sat.state.name,
                        f" ({reason})" if reason else "")
        if self.state.want[b"sat:"]:
            body: dict[str, Any] = {"sat": sat.sid, "state": sat.state.name.lower(), "event": event.name,
                                    "t": self.state.wall()}
            if reason:
                body["reason"] = reason
            self.outbox.publish([b"sat:" + sat.sid.encode(), pack(body)])

    def heard(self, sat: SatelliteRecord, now: float) -> None:
        """Traffic from a silent satellite: it may have work again."""
        self.sat_to(sat, SE.hear, now, "heard again")
        if sat.inflight:
            self.sat_to(sat, SE.load, now)
        if self.probation.demote(sat.fail_streak):
            self.sat_to(sat, SE.demote, now, "still failing")

    def lose(self, sat: SatelliteRecord, now: float, reason: str, event: SatelliteEvent = SE.lose,
              crash: bool = True) -> None:
        """Stall every task in flight on ``sat`` and take it out of the fleet."""
        tasks = [t for t in sat.inflight.values() if not t.state.terminal]
        for task in tasks:
            self.stall(task, now, f"satellite {sat.sid} {reason}", crash=crash, abort=False, blame=False)
        free = sat.free
        sat.drop_all()
        self.state.fleet.credit_changed(sat, free)
        self.state.fleet.light_changed(sat)
        if sat.reserved is not None and sat.reserved.reserved_on is sat:
            self._drop_reservation(sat.reserved)
        sat.reserved = None
        self.sat_to(sat, event, now, reason)
        self.state.fleet.remove(sat)
        if tasks:
            log.warning("satellite %s %s: %d task(s) rerouted", sat.sid, reason, len(tasks))

    def watch_satellites(self, now: float) -> None:
        """Silent satellites get no new work; lost ones have their tasks rerouted."""
        silent_after, lost_after = self.state.cfg.silent_after, self.state.cfg.lost_after
        fleet = self.state.fleet
        # silence is counted up to the last time the orchestrator read everything that had come: a satellite
        # is never lost because the orchestrator itself was busy, or had messages still unread
        heard_until = now if self.state.read_until is None else min(now, self.state.read_until)
        first_miss = min(silent_after, lost_after)
        quiet_ones = []
        for sat in fleet.by_silence:  # heard from longest ago first: stop at the first one heard lately
            if heard_until - sat.last_seen <= first_miss:
                break
            quiet_ones.append(sat)
        for sat in quiet_ones:
            quiet = heard_until - sat.last_seen
            if quiet > lost_after:
                self.state.counters["satellites_lost"] += 1
                log.warning("satellite %s silent for %.1fs: lost", sat.sid, quiet)
                self.lose(sat, now, "lost (heartbeat timeout)")
            elif quiet > silent_after and SATELLITE_MACHINE.allows(sat.state, SE.miss):
                self.sat_to(sat, SE.miss, now, f"silent for {quiet:.1f}s")
        for sat in [s for s in fleet.draining if s.state is SS.DRAINING and now >= s.recover_at]:
            sat.recover_at = float("inf")  # a drain for failing is not for good
            sat.fail_streak = self.probation.demote_after
            self.sat_to(sat, SE.recover, now, "cool-down over")
