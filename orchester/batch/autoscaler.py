"""The autoscaler's loop: the bus's status and the scheduler's jobs in, the policy's decisions carried out.

Every ``interval`` seconds :meth:`Autoscale.step` asks the orchestrator for its status (a client's
``STATUS``) and the scheduler for the jobs named for the tag (``squeue``/``qstat``), hands both to
the pure :class:`~orchester.batch.policy.Autoscaler`, and carries out what it decides: jobs
submitted with the satellite script (:func:`~orchester.batch.scripts.satellite_job`), satellites
drained (a client's ``drain``), jobs cancelled. Then it tells the orchestrator its jobs
(``CONTROL jobs``), which ``status``, ``top``, the web page and carbon show.

Nothing is decided without both answers: with the bus unreachable or the scheduler failing, the
step does nothing but say why (and the scheduler is asked again after a back-off that doubles).
The bus never depends on the autoscaler: stopped, its jobs keep running; started again with the
same tag, it adopts them (no duplicate is submitted).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

from orchester.batch.policy import (
    Autoscaler,
    Bus,
    Cancel,
    Decision,
    Drain,
    Limits,
    Satellite,
    Submit,
    backoff_delay,
)
from orchester.batch.scheduler import Scheduler, SchedulerError
from orchester.batch.scripts import satellite_job
from orchester.config import AutoscaleConfig
from orchester.errors import OrchesterError
from orchester.logutil import log_limited
from serializers.messages import JobsReport

log = logging.getLogger("orchester.autoscale")

#: The satellite states in which a satellite takes new tasks.
WORKING = ("idle", "busy", "probation")
#: The satellite states in which it is gone (it no longer counts for its job).
GONE = ("lost", "left")


class BusClient(Protocol):
    """What the autoscaler asks of the orchestrator (an :class:`orchester.Client` does all of it)."""

    def status(self, timeout: float | None = ...) -> dict[str, Any]:
        """The orchestrator's status."""

    def satellites(self, *, timeout: float | None = ...) -> Iterator[dict[str, Any]]:
        """Every satellite, a page at a time."""

    def drain(self, satellite: str, timeout: float | None = ...) -> dict[str, Any]:
        """Give ``satellite`` no new task."""

    def report_jobs(self, report: JobsReport, timeout: float | None = ...) -> dict[str, Any]:
        """Tell the orchestrator the autoscaler's jobs."""


def limits(cfg: AutoscaleConfig) -> Limits:
    """The policy's bounds from an autoscaler's settings."""
    return Limits(max_jobs=cfg.max_jobs, min_jobs=cfg.min_jobs, satellites_per_job=cfg.satellites_per_job,
                  cores_per_satellite=cfg.cores or cfg.workers, wait_bound=cfg.wait_bound,
                  idle_timeout=cfg.idle_timeout, backoff=cfg.backoff, backoff_max=cfg.backoff_max,
                  start_timeout=cfg.start_timeout)


def bus_of(status: dict[str, Any]) -> Bus:
    """What the policy needs of an orchestrator's status: the queue, and the satellites still there."""
    queue = status.get("queue") or {}
    sats = []
    for d in status.get("satellites") or []:
        state = d.get("state")
        if state in GONE:
            continue
        inflight = int(d.get("inflight") or 0)
        credit = d.get("credit")
        sats.append(Satellite(sid=str(d["id"]), job=d.get("job") or None, cores=int(d.get("cores") or 1),
                              cores_used=int(d.get("cores_used") or 0), inflight=inflight,
                              accepts_work=state in WORKING, draining=state == "draining",
                              walltime_left=d.get("walltime_left"),
                              slots_free=None if credit is None else max(0, int(credit) - inflight)))
    return Bus(queued=int(queue.get("tasks", 0)), queued_cores=int(queue.get("cores", 0)),
               oldest_wait=float(queue.get("oldest_wait", 0.0)), satellites=tuple(sats),
               queued_work=float(queue.get("work", 0.0)))


class Autoscale:
    """One autoscaler at work: a bus client and a scheduler adapter, given; the policy, kept (see the module)."""

    def __init__(self, cfg: AutoscaleConfig, client: BusClient, scheduler: Scheduler, endpoints: list[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = replace(cfg, workdir=os.path.abspath(cfg.workdir or "."))
        self.client = client
        self.scheduler = scheduler
        self.clock = clock
        self.policy = Autoscaler(limits(cfg))
        #: the job script (the bus's endpoints resolved: the nodes need not see an endpoint file)
        self.script = satellite_job(self.cfg, endpoints)
        self.adopted = False  #: the scheduler answered once (the jobs it listed then were adopted)
        self.error = ""  #: the scheduler's last error, while it lasts
        self.failures = 0  #: scheduler queries failed in a row
        self.ask_after = 0.0  #: no query of the scheduler before this time (back-off)
        self._failed = False  #: a scheduler command failed in this step
        self.counts: Counter[str] = Counter()  #: what it did (submitted, cancelled, failed to ask)

    # ---------------------------------------------------------------- the loop
    def run(self, stop: threading.Event) -> None:
        """Step every ``interval`` seconds until ``stop`` is set."""
        log.info("autoscaling for %s with %s (tag %s, %d to %d jobs of %d satellite(s))", self.cfg.connect,
                 self.scheduler.name, self.cfg.tag, self.cfg.min_jobs, self.cfg.max_jobs,
                 self.cfg.satellites_per_job)
        while not stop.is_set():
            self.step(self.clock())
            stop.wait(self.cfg.interval)

    def step(self, now: float) -> list[Decision]:
        """One look at the bus and the scheduler; the decisions carried out (none when either did not answer)."""
        if now < self.ask_after:
            return []
        try:
            status = self.client.status(self.cfg.timeout)
            if status.get("satellites_next"):  # more than a page: the policy weighs every satellite
                status["satellites"] = list(self.client.satellites(timeout=self.cfg.timeout))
        except OrchesterError as exc:
            self.counts["bus_unreachable"] += 1
            log_limited(log, logging.WARNING, "the bus did not answer (%s): no decision this time", exc)
            return []
        self._failed = False
        try:
            jobs = self.scheduler.jobs(self.cfg.tag)
        except SchedulerError as exc:
            self._scheduler_failed(exc, now)
            self._report(now)
            return []
        try:
            bus = bus_of(status)
        except (KeyError, TypeError, ValueError) as exc:  # (an orchestrator of another version)
            log_limited(log, logging.WARNING, "the bus's status could not be read (%r): no decision", exc)
            return []
        before = set(self.policy.jobs)
        strangers = sorted(set(jobs) - before)  # the policy takes every job listed under our name as ours
        decisions = self.policy.step(bus, jobs, now)
        if strangers and not self.adopted:  # (a restart: the jobs it left running)
            log.info("adopted %d job(s) named orchester-%s: %s", len(strangers), self.cfg.tag, strangers)
        for job in strangers if self.adopted else ():  # (a submission whose answer was lost)
            log.warning("job %s is listed under our name but was not known: taken as ours", job)
        self.adopted = True
        for job in sorted(before - set(self.policy.jobs)):
            self.counts["jobs_ended"] += 1
            log.info("job %s ended", job)
        for decision in decisions:
            self._carry_out(decision, now)
        if not self._failed:  # every scheduler command of this step worked: the back-off starts again
            self.failures, self.error = 0, ""
        self._report(now)
        return decisions

    # ---------------------------------------------------------------- decisions
    def _carry_out(self, decision: Decision, now: float) -> None:
        if isinstance(decision, Submit):
            self._submit(decision.count, now)
        elif isinstance(decision, Drain):
            try:
                self.client.drain(decision.sid, self.cfg.timeout)
                self.counts["satellites_drained"] += 1
                log.info("satellite %s drained (%s)", decision.sid, decision.reason)
            except OrchesterError as exc:  # gone meanwhile, or the bus did not answer: asked again at the
                log_limited(log, logging.WARNING, "could not drain satellite %s: %s", decision.sid, exc)  # next step
        elif isinstance(decision, Cancel):
            try:
                self.scheduler.cancel(decision.job)
                self.counts["jobs_cancelled"] += 1
                log.info("job %s given back", decision.job)
            except SchedulerError as exc:
                self.policy.cancel_failed(decision.job)
                self._scheduler_failed(exc, now)

    def _submit(self, count: int, now: float) -> None:
        for done in range(count):
            try:
                job = self.scheduler.submit(self.script, self.cfg.tag)
            except SchedulerError as exc:
                self.policy.refused(count - done, now)
                self.counts["submissions_refused"] += 1
                self._failed = True
                self.error = str(exc)
                log.warning("%s; next try in %.0f s", exc, self.policy.not_before - now)
                return
            self.policy.submitted([job], 1, now)
            self.counts["jobs_submitted"] += 1
            log.info("job %s submitted (%d of %d)", job, done + 1, count)

    def _scheduler_failed(self, exc: SchedulerError, now: float) -> None:
        self._failed = True
        self.failures += 1
        self.error = str(exc)
        self.counts["scheduler_errors"] += 1
        delay = backoff_delay(self.cfg.backoff, self.cfg.backoff_max, self.failures)
        self.ask_after = now + delay
        log.warning("%s; asking again in %.0f s", exc, delay)

    def _report(self, now: float) -> None:
        report = JobsReport(self.cfg.tag, self.scheduler.name, tuple(self.policy.report(now)), self.cfg.max_jobs,
                            self.cfg.min_jobs, self.error)
        try:
            self.client.report_jobs(report, self.cfg.timeout)
        except OrchesterError as exc:  # an older orchestrator, a key without admin, or gone: the jobs go on
            log_limited(log, logging.WARNING, "could not tell the bus our jobs: %s", exc)
