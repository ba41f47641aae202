"""Client requests beyond submitting: status, show, fetch, cancel, control, history; who may ask.

A collaborator of :class:`~orchester.server.core.Orchestrator` (pure policy, like the rest of the core):
the handlers answer through the outbox, check the sender's key against :data:`ROLE_OF` when
CurveZMQ is on, and never touch a socket.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import Counter
from dataclasses import asdict
from typing import Any

from orchester.journal.history import Row
from orchester.security.roles import allowed
from orchester.server.fleet import SatelliteRecord
from orchester.server.lifecycle import Lifecycle
from orchester.server.ports import Outbox, Ports
from orchester.server.routing import make_strategy
from orchester.server.state import LATENCY_WINDOW, ServerState
from orchester.server.tasks import Task
from serializers import protocol as P
from serializers.header import ProtocolError, pack, unpack
from serializers.messages import (
    SATELLITES_SHOWN,
    Cancel,
    Control,
    Fetch,
    History,
    JobsReport,
    RequestId,
    Status,
    reply,
)
from tracker import SATELLITE_MACHINE, SatelliteEvent, SatelliteState, TaskEvent, TaskState

log = logging.getLogger("orchester")

TE, SE, TS, SS = TaskEvent, SatelliteEvent, TaskState, SatelliteState
TASK_STATE_VALUES = frozenset(s.name.lower() for s in TaskState)
#: Most autoscalers whose job reports are kept (``CONTROL jobs``), and seconds a report is shown without a newer.
MAX_AUTOSCALERS = 16
JOBS_REPORT_TTL = 120.0
#: Satellites a status lists under one job (``status --json``'s satellites show each one's job).
SATELLITES_PER_JOB_SHOWN = 64
#: Hosts a status names with their satellite counts (the ones with most), kinds it counts the satellites of (the
#: ones most offer), versions of a kind it lists (of at most as many kinds).
HOSTS_SHOWN = 16
KINDS_SHOWN = 64
VERSIONS_SHOWN = 16
#: A fleet larger than this is summed up again at most once a SUMMARY_TTL seconds (a smaller one at every status).
SUMMARY_FRESH = 1000
SUMMARY_TTL = 1.0
#: Task ids of a satellite's running tasks a status shows (to an admin, or without keys).
RUNNING_SHOWN = 8
#: Dependencies and dependents whose kind and state ``show`` gives (the web page draws them).
NEIGHBOURS = 50
#: Rows of an in-memory history reply when the request names no limit, and at most.
HISTORY_PAGE = 1000
HISTORY_MAX = 10_000
#: Tasks one in-memory history request looks at, newest first (a journal answers beyond that).
HISTORY_SCAN = 20_000
#: The role an authenticated key needs for each command (CurveZMQ on); absent: any authorised key.
ROLE_OF: dict[bytes, str] = {
    P.SUBMIT: "submit", P.FETCH: "submit", P.CANCEL: "submit", P.HISTORY: "submit", P.CONTROL: "admin",
    P.REGISTER: "satellite", P.DONE: "satellite", P.PROGRESS: "satellite", P.STARTED: "satellite",
    P.LEAVE: "satellite",
}


def states_of(counts: Any) -> dict[str, int]:
    """Tasks per state (lower-case names), the states with none left out."""
    return {TaskState(i).name.lower(): n for i, n in enumerate(counts) if n}


def _unknown(tid: Any) -> ProtocolError:
    return ProtocolError(P.E_UNKNOWN_TASK, f"task {tid!r} is unknown (never submitted, "
                         "or its result has left the retention window)")


class Requests:
    """Status, show, fetch, cancel, control and history requests, and who may make them.

    Works on the shared :class:`~orchester.server.state.ServerState`; moves tasks and satellites
    through the :class:`~orchester.server.lifecycle.Lifecycle`; answers through the outbox.
    """

    def __init__(self, state: ServerState, life: Lifecycle, outbox: Outbox, ports: Ports) -> None:
        self.state = state
        self.life = life
        self.outbox = outbox
        self.ports = ports
        self._sorted: tuple[int, list[str]] = (-1, [])  #: (the fleet's ``members`` then, its ids sorted)
        self._summary: tuple[float, dict[str, Any] | None] = (float("-inf"), None)  #: (when, the fleet summed up)

    def authorise(self, cmd: bytes, user: str | None) -> None:
        """Refuse a command the sender's key may not give (CurveZMQ on)."""
        assert self.ports.identify is not None
        who = self.ports.identify(user)
        if who is None:
            self.state.counters["forbidden"] += 1
            raise ProtocolError(P.E_FORBIDDEN, f"key {user!r} is not (or no longer) authorised")
        role = ROLE_OF.get(cmd)
        if role is not None and not allowed(who, role, secure=True):
            self.state.counters["forbidden"] += 1
            raise ProtocolError(P.E_FORBIDDEN, f"key {user!r} does not hold the {role!r} role "
                                f"{P.command_name(cmd)} needs (it holds: {', '.join(sorted(who.roles)) or 'none'})")

    def may_touch(self, task: Task) -> None:
        """Only its owner, or an admin, may fetch or cancel another key's task (CurveZMQ on)."""
        if self.owner_asks(task):
            return
        if not self.is_admin():
            self.state.counters["forbidden"] += 1
            raise ProtocolError(P.E_FORBIDDEN, f"task {task.id!r} belongs to another key: only its owner or "
                                "an admin may fetch or cancel it")

    def owner_asks(self, task: Task) -> bool:
        """Whether the sender is ``task``'s owner (always, without keys): only then does a FETCH or a
        resent SUBMIT move the task's delivery to this connection."""
        if self.ports.identify is None:
            return True
        # with keys, a task restored without an owner (journaled before keys were on) is nobody's: admins only
        return task.owner is not None and task.owner == self.state.user

    def is_admin(self) -> bool:
        """Whether the sender's key holds the admin role (CurveZMQ on)."""
        who = self.ports.identify(self.state.user) if self.ports.identify is not None else None
        return who is not None and "admin" in who.roles

    def on_status(self, sock: Any, ident: bytes, msg: Status, frames: list[Any], now: float) -> None:
        """STATUS: the summary, or one task."""
        if msg.task is None:
            self.reply(sock, ident, msg.rid, self.status(
                now, SATELLITES_SHOWN if msg.sats is None else msg.sats, msg.after))
            return
        task = self.state.tasks.get(msg.task)
        if task is None:
            raise _unknown(msg.task)
        self.reply(sock, ident, msg.rid, {"task": self.describe_task(task)})

    def on_fetch(self, sock: Any, ident: bytes, msg: Fetch, frames: list[Any], now: float) -> None:
        """FETCH: a result again (or the task's state, and its result to this connection later)."""
        tid = msg.id
        stored = self.state.results.get(tid)
        task = self.state.tasks.get(tid)
        if task is not None:
            self.may_touch(task)
        if stored is not None and task is not None and not self.owner_asks(task):  # an admin: a copy for it
            self.outbox.send(sock, [ident, *stored.frames])
        elif stored is not None and task is not None:
            task.client, task.csock, task.quiet = ident, sock, False
            self.life.send_result(task, stored.frames, stored.size, store=False)
        elif task is not None and task.state.terminal:  # finished, result dropped by retention
            raise ProtocolError(P.E_UNKNOWN_TASK, f"task {tid!r} finished ({task.state.name.lower()}) but its "
                                "result is no longer kept (journal retention)")
        elif task is not None:  # not finished: the result will go to this client (if it is the owner's)
            if self.owner_asks(task):
                task.client, task.csock, task.quiet = ident, sock, False
            self.reply(sock, ident, msg.rid, {"id": tid, "state": task.state.name.lower()})
        else:
            raise _unknown(tid)

    def on_cancel(self, sock: Any, ident: bytes, msg: Cancel, frames: list[Any], now: float) -> None:
        """CANCEL: end an unfinished task (its owner's, or anyone's for an admin)."""
        tid = msg.id
        task = self.state.tasks.get(tid)
        if task is None:
            raise ProtocolError(P.E_UNKNOWN_TASK, f"task {tid!r} is unknown")
        self.may_touch(task)
        was = task.state
        if not was.terminal:
            self.life.fail(task, P.ERR_CANCELLED, "cancelled by a client", now, TE.cancel, abort=True)
        self.reply(sock, ident, msg.rid, {"id": tid, "cancelled": not was.terminal,
                                                  "state": task.state.name.lower()})

    def on_control(self, sock: Any, ident: bytes, msg: Control, frames: list[Any], now: float) -> None:
        """CONTROL: switch the routing strategy, drain a satellite, or an operation of the pair."""
        op = msg.op
        if op in ("promote", "peer_link"):
            if self.ports.ha_control is None:
                raise ProtocolError(P.E_BAD_REQUEST, "this orchestrator is not part of a binary-star pair")
            self.reply(sock, ident, msg.rid, self.ports.ha_control(msg.fields, now))
            return
        if op == "drain":
            assert msg.sid is not None  # (decoded with the op)
            self._drain(sock, ident, msg.sid, msg.rid, now)
            return
        if op == "jobs":
            assert msg.report is not None  # (decoded with the op)
            self._jobs(sock, ident, msg.report, msg.rid, now)
            return
        if op != "strategy":
            raise ProtocolError(P.E_BAD_REQUEST, f"unknown control operation {op!r}; "
                                "known: ['strategy', 'drain', 'promote', 'jobs']")
        name = msg.name
        assert name is not None  # (decoded with the op)
        try:
            strategy = make_strategy(name, allowed=self.state.cfg.allowed_strategies)
        except ValueError as exc:
            raise ProtocolError(P.E_BAD_REQUEST, str(exc)) from None
        old, self.state.strategy = self.state.strategy.name, strategy
        self.state.counters["strategy_switches"] += 1
        log.info("routing strategy switched from %s to %s", old, strategy.name)
        if self.state.want[b"control:"]:
            self.outbox.publish([b"control:strategy", pack(
                {"op": "strategy", "old": old, "new": strategy.name, "t": self.state.wall()})])
        self.reply(sock, ident, msg.rid, {"strategy": strategy.name, "previous": old})

    def _drain(self, sock: Any, ident: bytes, sid: str, rid: RequestId, now: float) -> None:
        """An operator drains a satellite: no new tasks; what it runs finishes; then stop it."""
        sat = self.state.fleet.by_id.get(sid)
        if sat is None:
            raise ProtocolError(P.E_BAD_REQUEST, f"no satellite {sid!r}; known: {sorted(self.state.fleet.by_id)}")
        sat.recover_at = float("inf")  # drained by hand: until an operator says otherwise
        if sat.state is not SS.DRAINING:
            if not SATELLITE_MACHINE.allows(sat.state, SE.drain):
                raise ProtocolError(P.E_BAD_REQUEST, f"satellite {sid} is {sat.state.name.lower()}: it cannot drain")
            self.life.sat_to(sat, SE.drain, now, "drained by an operator")
            self.state.counters["drains"] += 1
        self.reply(sock, ident, rid, {"sid": sid, "state": sat.state.name.lower(),
                                                  "inflight": len(sat.inflight)})

    def _jobs(self, sock: Any, ident: bytes, report: JobsReport, rid: RequestId, now: float) -> None:
        """An autoscaler reports its batch jobs: kept (the last report of each tag, at most
        :data:`MAX_AUTOSCALERS` tags: a new tag pushes out the one silent longest) for the status."""
        reports = self.state.job_reports
        reports.pop(report.tag, None)
        while len(reports) >= MAX_AUTOSCALERS:
            del reports[min(reports, key=lambda tag: reports[tag][1])]
        reports[report.tag] = (report, now)
        self.state.counters["job_reports"] += 1
        self.reply(sock, ident, rid, {"tag": report.tag, "jobs": len(report.jobs)})

    def jobs(self, now: float) -> list[dict[str, Any]]:
        """The autoscalers' last reports, each job with the satellites that run in it (``status``'s ``jobs``);
        a report older than :data:`JOBS_REPORT_TTL` seconds is dropped (its autoscaler is gone)."""
        reports = self.state.job_reports
        for tag in [t for t, (_, seen) in reports.items() if now - seen > JOBS_REPORT_TTL]:
            del reports[tag]
        if not reports:
            return []
        by_job: dict[str, list[str]] = {}
        for sat in self.state.fleet:
            if sat.job:
                sids = by_job.setdefault(sat.job, [])
                if len(sids) < SATELLITES_PER_JOB_SHOWN:  # (satellites may claim any job: a status stays small)
                    sids.append(sat.sid)
        return [{"tag": tag, "scheduler": r.scheduler, "age": round(now - seen, 1), "max": r.max_jobs,
                 "min": r.min_jobs, "error": r.error or None,
                 "counts": dict(Counter(state for _, state, _ in r.jobs)),
                 "jobs": [{"id": job, "state": state, "age": age, "satellites": by_job.get(job, [])}
                          for job, state, age in r.jobs]}
                for tag, (r, seen) in sorted(reports.items())]

    def on_history(self, sock: Any, ident: bytes, msg: History, frames: list[Any], now: float) -> None:
        """HISTORY: rows from the journal's reader when there is a journal, else from the table."""
        filters = msg.filters()
        if "state" in filters and filters["state"] not in TASK_STATE_VALUES:
            raise ProtocolError(P.E_BAD_REQUEST, f"unknown state {filters['state']!r}; "
                                f"known: {sorted(TASK_STATE_VALUES)}")
        if msg.rollup is not None and not self.ports.history_reader:
            raise ProtocolError(P.E_BAD_REQUEST, "roll-ups come from the journal: this orchestrator keeps none "
                                "(orchester serve --journal DIR)")
        if self.ports.history_reader:  # the journal has everything: its reader answers
            # error messages: of the asker's own tasks only (all of them without keys, or to an admin)
            viewer = None if self.ports.identify is None or self.is_admin() else (self.state.user or "")
            self.outbox.queries.append((sock, ident, msg.rid, {**filters, "viewer": viewer}))
            return
        rows = self._memory_history(**filters)
        self.reply(sock, ident, msg.rid, {"rows": rows, "count": len(rows), "source": "memory"})

    def _memory_history(self, state: str | None = None, kind: str | None = None, since: float | None = None,
                        until: float | None = None, limit: int | None = None,
                        ids: list[Any] | None = None, owner: str | None = None,
                        tag: str | None = None, timeline: bool = False) -> list[dict[str, Any]]:
        """History rows from the task table, newest submissions first found, oldest first returned.

        One request costs at most one pass over the table and builds at most ``limit`` rows
        (:data:`HISTORY_PAGE` by default, :data:`HISTORY_MAX` at most).
        """
        limit = HISTORY_PAGE if limit is None or limit < 0 else min(limit, HISTORY_MAX)
        if ids is not None:
            if len(ids) > HISTORY_MAX:
                raise ProtocolError(P.E_BAD_REQUEST, f"at most {HISTORY_MAX} ids per history request")
            found = (self.state.tasks.get(i) if isinstance(i, str) else None for i in ids)
            candidates: Any = sorted((t for t in found if t is not None), key=lambda t: t.seq, reverse=True)
        else:
            candidates = reversed(self.state.tasks.values())
        out: list[tuple[int, dict[str, Any]]] = []
        everyone = self.ports.identify is None or self.is_admin()  # error messages: of one's own tasks only
        wanted = TaskState[state.upper()] if state is not None else None  # checked against the names before
        for scanned, task in enumerate(candidates):
            if len(out) >= limit or scanned >= HISTORY_SCAN:
                break
            if (wanted is not None and task.state is not wanted) or (kind is not None and task.kind != kind):
                continue
            if (owner is not None and (task.owner or "") != owner) or (tag is not None and tag not in task.tags):
                continue
            rows = task.history.rows()
            submitted = rows[0][0] if rows else 0.0
            if (since is not None and submitted < since) or (until is not None and submitted >= until):
                continue
            mine = everyone or task.owner == self.state.user
            row = self._history_row(task, rows, mine)
            if timeline:
                row["history"] = self._entries(task, mine)
            out.append((task.seq, row))
        out.sort(key=lambda r: r[0])  # oldest submission first
        return [row for _, row in out]

    def _history_row(self, task: Task, rows: list[tuple[float, int, int, str | None, str | None]],
                     message: bool = True) -> dict[str, Any]:
        """One task as a history row (:data:`orchester.journal.history.COLUMNS`): its error's type, and its
        message when ``message`` (the asker's own task, or an admin asking)."""
        sat = next((r[3] for r in reversed(rows) if r[3]), "") or ""
        error = ""
        if task.state.terminal and task.state is not TS.DONE:
            stored = self.state.results.get(task.id)
            err = None
            if stored is not None:
                try:
                    err = unpack(bytes(stored.frames[2])).get("err")
                except ProtocolError:
                    err = None
            if isinstance(err, dict):
                etype, emsg = str(err.get("type", ""))[:256], str(err.get("msg", ""))[:2000]
                error = ": ".join(part for part in (etype, emsg if message else "") if part)
            elif rows and rows[-1][4]:
                error = str(rows[-1][4]) if message else task.state.name.lower()
        return asdict(Row(task.id, task.kind, task.state.name.lower(), task.attempt, sat,
                          rows[0][0] if rows else 0.0, rows[-1][0] if rows and task.state.terminal else 0.0, error,
                          task.owner if isinstance(task.owner, str) else "", sorted(task.tags), list(task.after)))

    def reply(self, sock: Any, ident: bytes, rid: RequestId, body: dict[str, Any]) -> None:
        """Answer a request (``rid``: its request id)."""
        self.outbox.send(sock, [ident, *reply(rid, body)])

    def _entries(self, task: Task, mine: bool) -> list[dict[str, Any]]:
        """The task's transitions; their reasons only when ``mine`` (the asker's own task, an admin, or
        no keys): a failure's reason is its message (a timeout's, a quarantine's with the worker's last
        words), which only its owner may read."""
        entries = self.life.attempts(task)
        if not mine:
            for entry in entries:
                entry["reason"] = None
        return entries

    def describe_task(self, task: Task) -> dict[str, Any]:
        """One task's state, attempts and history, for ``orchester show``; a failed task's error
        (type, message, traceback) and the reasons of its transitions to its owner or an admin (to
        anyone without keys)."""
        mine = self.ports.identify is None or self.is_admin() or task.owner == self.state.user
        dependents = self.state.graph.of(task.id)
        out = {"id": task.id, "kind": task.kind, "state": task.state.name.lower(), "attempt": task.attempt,
               "crashes": task.crashes, "satellite": task.satellite, "priority": task.priority,
               "tags": sorted(task.tags), "history": self._entries(task, mine),
               "owner": task.owner if isinstance(task.owner, str) else None,
               "result_retained": task.id in self.state.results,
               "after": list(task.after), "dependents": dependents, "cores": task.cores}
        if task.after or dependents:  # the first ones of each side, with kind and state (the web draws them)
            near: dict[str, list[str]] = {}
            for tid in [*task.after[:NEIGHBOURS], *dependents[:NEIGHBOURS]]:
                other = self.state.tasks.get(tid)
                near[tid] = [other.kind, other.state.name.lower()] if other is not None else ["", "forgotten"]
            out["neighbours"] = near
        if task.after:
            out["on_failure"] = "run" if task.run_on_failure else "fail"
            out["referenced"] = list(task.refs)
            if task.state is TS.WAITING:
                out["waiting_for"] = [d for d in task.after if (t := self.state.tasks.get(d)) is not None
                                      and not t.state.terminal]
        if task.memory:
            out["memory"] = task.memory
        stored = self.state.results.get(task.id) if task.state is TS.FAILED else None
        if stored is not None and (self.ports.identify is None or self.is_admin() or task.owner == self.state.user):
            try:
                err = unpack(bytes(stored.frames[2])).get("err")
            except ProtocolError:
                err = None
            if isinstance(err, dict):
                out["error"] = {k: str(err.get(k, ""))[:limit] for k, limit in (("type", 256), ("msg", 2000),
                                                                                 ("tb", 20_000))}
        return out

    def latency(self, now: float) -> dict[str, Any]:
        """Seconds from submission to end of the tasks that ended in the last :data:`LATENCY_WINDOW`
        seconds (at most the last :data:`RECENT_LATENCIES`): ``{window, count, p50, p95, max}``."""
        recent = sorted(s for t, s in self.state.recent_latency if now - t <= LATENCY_WINDOW)
        out: dict[str, Any] = {"window": LATENCY_WINDOW, "count": len(recent)}
        if recent:
            out.update(p50=round(recent[len(recent) // 2], 6), p95=round(recent[min(len(recent) - 1,
                                                                                     int(len(recent) * 0.95))], 6),
                       max=round(recent[-1], 6))
        return out

    def queue(self, now: float) -> dict[str, Any]:
        """The queue as an autoscaler sizes it: tasks pending, the cores they ask for together, the core-seconds
        of work they declare (``duration`` times cores; tasks declaring none count 0), the seconds the one
        queued longest has waited (0 when none), and the tasks waiting for others."""
        queues, oldest = self.state.queues, None
        for key in queues.keys():  # (the head of each queue: the oldest of its priority, enough for a bound)
            head = queues.head(key)
            if head is not None and (oldest is None or head.queued_at < oldest):
                oldest = head.queued_at
        counts = self.state.state_counts
        return {"tasks": counts[TS.PENDING], "cores": self.state.pending_cores,
                "work": round(self.state.pending_work, 3),
                "oldest_wait": round(max(0.0, now - oldest), 3) if oldest is not None else 0.0,
                "waiting": counts[TS.WAITING]}

    def status(self, now: float, sats: int = SATELLITES_SHOWN, after: str | None = None) -> dict[str, Any]:
        """A summary of tasks, queues and satellites for ``STATUS`` replies.

        ``fleet`` sums up every satellite, whatever their number; ``satellites`` lists at most ``sats`` of
        them in full, those whose id sorts after ``after``, and ``satellites_next`` is the ``after`` of the
        next page (``None``: this was the last)."""
        page, more = self.satellites_page(sats, after)
        described = [s.describe(now) for s in page]
        if self.ports.identify is None or self.is_admin():  # the tasks running now (ids: of anyone's tasks)
            for d, s in zip(described, page, strict=True):
                d["running"] = list(itertools.islice(s.inflight, RUNNING_SHOWN))
        summary = self.fleet_summary(now)
        return {
            "epoch": self.state.epoch, "uptime": round(now - self.state.started, 3), "pub": self.ports.pub_endpoints(),
            "strategy": self.state.strategy.name, "tasks": states_of(self.state.state_counts),
            "queued": dict(self.state.pending_kinds),
            "queue": self.queue(now),
            "fleet": summary,
            "satellites": described,
            "satellites_next": page[-1].sid if more and page else None,
            "satellite_states": summary["states"],
            "results_retained": len(self.state.results),
            "latency": self.latency(now),
            "counters": dict(self.state.counters),
            "jobs": self.jobs(now),
            **({"ha": self.ports.ha_status(now)} if self.ports.ha_status is not None else {}),
        }

    def satellites_page(self, sats: int, after: str | None) -> tuple[list[SatelliteRecord], bool]:
        """At most ``sats`` satellites whose id sorts after ``after``, in id order, and whether more follow (the
        ids sorted once for as long as no satellite comes or goes: a page costs its own length)."""
        fleet = self.state.fleet
        if self._sorted[0] != fleet.members:
            self._sorted = (fleet.members, sorted(fleet.by_id))
        ids = self._sorted[1]
        start = 0 if after is None else bisect.bisect_right(ids, after)
        by_id = fleet.by_id
        return [by_id[sid] for sid in ids[start:start + sats]], len(ids) > start + sats

    def fleet_summary(self, now: float) -> dict[str, Any]:
        """:meth:`sum_fleet`, computed again at most once a :data:`SUMMARY_TTL` for a fleet of more than
        :data:`SUMMARY_FRESH` satellites (a status of 100,000 walks them all: not at every request)."""
        cached_at, summary = self._summary
        fleet = self.state.fleet
        if summary is not None and len(fleet) > SUMMARY_FRESH and now - cached_at < SUMMARY_TTL:
            return summary
        summary = self.sum_fleet()
        self._summary = (now, summary)
        return summary

    def sum_fleet(self) -> dict[str, Any]:
        """Every satellite summed up: how many, per state, on how many hosts (the busiest named) and in how many
        jobs; their slots, workers, cores and memory, announced and used; the satellites offering each kind and
        the versions they run of it (of the :data:`KINDS_SHOWN` kinds most offer; ``kinds_offered`` counts them
        all). A lost satellite has left the fleet: it is not counted."""
        kinds = self.state.fleet.kind_counts(KINDS_SHOWN)
        states: Counter[str] = Counter()
        hosts: Counter[str] = Counter()
        jobs: Counter[str] = Counter()
        versions: dict[str, set[str]] = {}
        slots = inflight = credit = cores = cores_used = memory = memory_used = workers = light = light_inflight = 0
        for sat in self.state.fleet.by_id.values():
            states[sat.state.name.lower()] += 1
            hosts[sat.host] += 1
            if sat.job:
                jobs[sat.job] += 1
            slots += sat.slots
            workers += sat.workers
            credit += sat.credit
            inflight += len(sat.inflight)
            light += sat.light_credit
            light_inflight += len(sat.light)
            cores += sat.cores
            cores_used += sat.used
            memory += sat.memory
            memory_used += sat.mem_used
            for kind, version in sat.versions.items():
                if kind in kinds:
                    seen = versions.setdefault(kind, set())
                    if len(seen) < VERSIONS_SHOWN:
                        seen.add(version)
        return {
            "satellites": len(self.state.fleet), "states": dict(states), "hosts": len(hosts),
            "busiest_hosts": dict(hosts.most_common(HOSTS_SHOWN)), "jobs": len(jobs),
            "slots": slots, "workers": workers, "credit": credit, "free": self.state.fleet.free_slots,
            "inflight": inflight, "light": light, "light_free": self.state.fleet.free_light,
            "light_inflight": light_inflight,
            "cores": cores, "cores_used": cores_used, "memory": memory, "memory_used": memory_used,
            "kinds": kinds, "kinds_offered": self.state.fleet.kinds_offered,
            "versions": {kind: sorted(v) for kind, v in sorted(versions.items())},
        }
