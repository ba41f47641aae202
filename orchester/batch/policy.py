"""The autoscaler's decisions: when to ask the scheduler for satellite jobs and when to give them back.

Pure policy, as the orchestrator's core: :meth:`Autoscaler.step` takes what the bus says
(:class:`Bus`: the queue, the satellites), what the scheduler says (the state of each job the
autoscaler submitted) and the time, and returns decisions (:class:`Submit`, :class:`Drain`,
:class:`Cancel`) for an adapter to carry out; the adapter reports back what became of a submission
(:meth:`Autoscaler.submitted`, :meth:`Autoscaler.refused`). No socket, no process, no clock.

The rules:

* **Up.** Work waits when the cores the queued tasks ask for are more than the cores free on the
  satellites that take work (and whose allocation lasts the queued tasks' declared mean duration),
  plus those of the jobs still pending in the scheduler. When work waits
  and its oldest task has waited ``wait_bound`` seconds (at once when no satellite is there at all),
  enough jobs are submitted to cover it, never more than ``max_jobs`` pending or running. A job
  that ends (walltime, a node lost) is replaced by the same rule while work remains. At least
  ``min_jobs`` are kept.
* **Refusals.** A submission the scheduler refuses is retried after ``backoff`` seconds, doubled at
  each refusal in a row up to ``backoff_max``; so is one after a job that ended (or was cancelled)
  before any satellite of it joined: its script is broken, or its satellites cannot reach the
  bus. The doubling starts again once a job's satellite joins.
* **Our jobs.** Every job the scheduler lists under our name (this user's, named for our tag) is
  ours: after a restart, or a submission whose answer was lost, it is adopted, counted and given
  back like the others.
* **Down.** A running job whose satellites have all been without a task for ``idle_timeout``
  seconds, while more than ``min_jobs`` run, is drained first (its satellites get no new task);
  once its satellites are all drained and empty it is cancelled (work that comes meanwhile goes
  to the other jobs, or to new ones by the first rule). No task is killed for scaling down. While
  work waits the job is kept, unless that work has itself waited ``idle_timeout`` seconds: then it
  is work this job cannot run (too wide, or tags and kinds its satellites lack), the job is given
  back, and submissions back off (below) rather than bring more of the same.
* **Broken jobs.** A job that has run ``start_timeout`` seconds with none of its satellites
  registered (its script cannot reach the bus, or its satellites die at start) is cancelled, and
  replaced by the first rule while work waits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

#: What the scheduler says of a job, as the adapter reads it.
PENDING, RUNNING, ENDED = "pending", "running", "ended"


@dataclass(frozen=True)
class Limits:
    """The autoscaler's bounds (``orchester autoscale`` flags)."""

    max_jobs: int
    min_jobs: int = 0
    satellites_per_job: int = 1
    cores_per_satellite: int = 1
    wait_bound: float = 10.0  #: seconds work may wait before jobs are asked for
    idle_timeout: float = 300.0  #: seconds a job's satellites may be idle before it is given back
    backoff: float = 10.0  #: seconds after a refused submission before the next
    backoff_max: float = 600.0
    #: seconds a running job may go without any satellite of it registered before it is cancelled (its
    #: script cannot reach the bus, or dies at start): it is then replaced by the rule above
    start_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_jobs <= self.max_jobs or self.max_jobs < 1:
            raise ValueError("need 0 <= min_jobs <= max_jobs and max_jobs >= 1")
        if self.satellites_per_job < 1 or self.cores_per_satellite < 1:
            raise ValueError("need at least one satellite per job and one core per satellite")
        for name in ("wait_bound", "idle_timeout", "backoff", "backoff_max", "start_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")

    @property
    def cores_per_job(self) -> int:
        """Cores one job brings."""
        return self.satellites_per_job * self.cores_per_satellite


@dataclass(frozen=True)
class Satellite:
    """One satellite as the bus reports it; ``job``: the job it runs in (from its id), if one of ours."""

    sid: str
    job: str | None
    cores: int
    cores_used: int
    inflight: int
    accepts_work: bool = True
    draining: bool = False
    walltime_left: float | None = None  #: seconds until its allocation ends (None: no end known)
    slots_free: int | None = None  #: tasks it may still take (its credit less its tasks; None: not said)


@dataclass(frozen=True)
class Bus:
    """What the orchestrator says: the queued tasks (their number, the cores they ask for together, how
    long the oldest has waited, and the core-seconds of work they declare) and the satellites."""

    queued: int
    queued_cores: int
    oldest_wait: float
    satellites: tuple[Satellite, ...] = ()
    queued_work: float = 0.0  #: core-seconds the queued tasks declare (``duration`` times cores; 0: none)

    @property
    def mean_duration(self) -> float:
        """Seconds a queued core's work lasts on average, as the tasks declare it (0: they declare none)."""
        return self.queued_work / self.queued_cores if self.queued_cores and self.queued_work > 0 else 0.0


@dataclass(frozen=True)
class Submit:
    """Ask the scheduler for ``count`` more satellite jobs."""

    count: int


@dataclass(frozen=True)
class Drain:
    """Give satellite ``sid`` no new task (its job is about to be given back), and why."""

    sid: str
    reason: str = field(default="its job is idle", compare=False)


@dataclass(frozen=True)
class Cancel:
    """Give job ``job`` back to the scheduler (its satellites are drained and empty)."""

    job: str


Decision = Submit | Drain | Cancel


def backoff_delay(first: float, most: float, failures: int) -> float:
    """Seconds to wait after ``failures`` in a row: ``first``, doubled at each, at most ``most`` (the exponent
    is bounded: a thousand failures in a row is no overflow)."""
    return min(first * 2.0 ** min(failures - 1, 60), most)


@dataclass
class _Job:
    state: str
    since: float = 0.0  #: when it was submitted (or adopted)
    idle_since: float | None = None
    alone_since: float | None = None  #: running with no satellite of it registered, since
    draining: bool = False
    cancelled: bool = False
    seen: bool = False  #: a satellite of it registered once (the job works)


@dataclass
class Autoscaler:
    """The decisions of one autoscaler, from one :meth:`step` to the next (see the module docstring)."""

    limits: Limits
    jobs: dict[str, _Job] = field(default_factory=dict)
    #: submissions asked for and not yet answered (:meth:`submitted` or :meth:`refused`)
    asked: int = 0
    not_before: float = 0.0  #: no submission before this time (back-off after a refusal)
    refusals: int = 0  #: refusals in a row

    def step(self, bus: Bus, scheduler: Mapping[str, str], now: float) -> list[Decision]:
        """The decisions for now: ``scheduler`` maps each job the scheduler lists under our name to its state
        (``pending``, ``running``; a job it no longer lists has ended). A listed job we did not know (a
        restart, a submission whose answer was lost) is taken as ours."""
        self._follow(scheduler, now)
        out: list[Decision] = []
        by_job: dict[str, list[Satellite]] = {}
        for sat in bus.satellites:
            if sat.job is not None and sat.job in self.jobs:
                by_job.setdefault(sat.job, []).append(sat)
        for job in by_job:
            record = self.jobs[job]
            if not record.seen:  # a satellite of it joined: the job works, and so does the script
                record.seen = True
                self.refusals = 0
        waits = self._waiting_cores(bus)
        self._down(by_job, bus, waits, now, out)
        self._up(bus, by_job, waits, now, out)
        return out

    def submitted(self, job_ids: list[str], asked: int, now: float = 0.0) -> None:
        """The adapter submitted ``asked`` jobs, and the scheduler took ``job_ids``."""
        self.asked = max(0, self.asked - asked)
        for job in job_ids:
            self.jobs.setdefault(job, _Job(PENDING, now))

    def refused(self, asked: int, now: float) -> None:
        """The scheduler refused a submission of ``asked`` jobs: try again after the back-off."""
        self.asked = max(0, self.asked - asked)
        self._back_off(now)

    def _back_off(self, now: float) -> None:
        """No submission for a while: ``backoff`` seconds, doubled at each failure in a row (a refusal, a job
        that ended before any satellite of it joined, jobs idle while work waits), until a job works."""
        self.refusals += 1
        self.not_before = max(self.not_before, now + backoff_delay(self.limits.backoff, self.limits.backoff_max,
                                                                    self.refusals))

    def adopt(self, scheduler: Mapping[str, str], now: float = 0.0) -> None:
        """After a restart: take the jobs the scheduler lists under our tag as ours (no duplicate is submitted)."""
        for job, state in scheduler.items():
            self.jobs.setdefault(job, _Job(state, now))

    def report(self, now: float) -> list[tuple[str, str, float]]:
        """Our jobs as the bus shows them: ``[job, pending|running|ending, seconds since submitted]`` (ending:
        drained or cancelled, on its way out)."""
        return [(job, "ending" if j.draining or j.cancelled else j.state, max(0.0, now - j.since))
                for job, j in self.jobs.items()]

    def cancel_failed(self, job: str) -> None:
        """The scheduler did not take the cancellation of ``job``: it is asked for again at the next step."""
        record = self.jobs.get(job)
        if record is not None:
            record.cancelled = False

    @property
    def live(self) -> int:
        """Jobs the scheduler lists (a cancelled one too, until it is gone: ``max_jobs`` bounds what the
        scheduler shows), and submissions on their way."""
        return sum(1 for j in self.jobs.values() if j.state != ENDED) + self.asked

    # ----------------------------------------------------------------- rules
    def _follow(self, scheduler: Mapping[str, str], now: float) -> None:
        for job, record in list(self.jobs.items()):
            state = scheduler.get(job, ENDED)
            record.state = state
            if state == ENDED:
                del self.jobs[job]
                if not record.seen:  # it ended, or was cancelled, before any satellite of it joined: its
                    self._back_off(now)  # script is broken or cannot reach the bus; do not resubmit at once
        for job, state in scheduler.items():
            if job not in self.jobs:
                self.jobs[job] = _Job(state, now)

    def _waiting_cores(self, bus: Bus) -> int:
        """Cores the queue asks for beyond what the satellites have free now: a satellite's free cores, at most
        its free slots times the cores a queued task asks for on average (a satellite with many cores and
        few workers takes few tasks); a satellite whose allocation ends before the queued work's declared
        mean duration is no help (the orchestrator sends it no such task)."""
        lasts = bus.mean_duration
        per_task = math.ceil(bus.queued_cores / bus.queued) if bus.queued else 1
        free = 0
        for s in bus.satellites:
            if s.accepts_work and not s.draining and (s.walltime_left is None or s.walltime_left >= lasts):
                cores = max(0, s.cores - s.cores_used)
                free += cores if s.slots_free is None else min(cores, max(0, s.slots_free) * per_task)
        return max(0, bus.queued_cores - free)

    def _up(self, bus: Bus, by_job: dict[str, list[Satellite]], waits: int, now: float, out: list[Decision]) -> None:
        limits = self.limits
        # on their way: jobs pending in the scheduler, jobs running whose satellites have not joined yet, and
        # submissions not yet answered
        coming = sum(1 for job, j in self.jobs.items()
                     if j.state == PENDING or (j.state == RUNNING and not j.cancelled and not j.draining
                                               and job not in by_job)) + self.asked
        need = 0
        if waits > 0 and (bus.oldest_wait >= limits.wait_bound or not bus.satellites):
            need = math.ceil(waits / limits.cores_per_job) - coming
        need = max(need, limits.min_jobs - self.live)
        need = min(need, limits.max_jobs - self.live)
        if need > 0 and now >= self.not_before:
            self.asked += need
            out.append(Submit(need))

    def _down(self, by_job: dict[str, list[Satellite]], bus: Bus, waits: int, now: float,
              out: list[Decision]) -> None:
        limits = self.limits
        running = sum(1 for j in self.jobs.values() if j.state == RUNNING and not j.cancelled and not j.draining)
        stranded = False  # jobs idle while work waits: that work is not for them
        for job, record in self.jobs.items():
            if record.state != RUNNING or record.cancelled:
                continue
            sats = by_job.get(job, [])
            if record.draining:  # given back once its satellites are all drained and hold nothing
                undrained = [s for s in sats if not s.draining]
                if undrained:  # the drain did not take (the bus did not answer, or it was refused): again
                    out.extend(Drain(s.sid, "its job is being given back") for s in undrained)
                elif all(s.inflight == 0 for s in sats):
                    record.cancelled = True
                    out.append(Cancel(job))
                continue
            if not sats:  # running, and none of its satellites is there (yet, or any more)
                if record.alone_since is None:
                    record.alone_since = now
                elif now - record.alone_since >= limits.start_timeout:
                    record.cancelled = True
                    running -= 1
                    out.append(Cancel(job))
                continue
            record.alone_since = None
            idle = bool(sats) and all(s.inflight == 0 for s in sats)
            if not idle:
                record.idle_since = None
                continue
            if record.idle_since is None:
                record.idle_since = now
            if running <= limits.min_jobs or now - record.idle_since < limits.idle_timeout:
                continue
            if waits > 0 and bus.oldest_wait < limits.idle_timeout:
                continue  # work waits, and not for long: it may be on its way to these satellites
            reason = "its job is idle"
            if waits > 0:  # idle for the whole timeout while work waited as long: it cannot run here (too
                stranded = True  # wide, or tags, kinds our satellites lack)
                reason = "its job stayed idle while work waited that it cannot run"
            record.draining = True
            running -= 1
            out.extend(Drain(s.sid, reason) for s in sats)
        if stranded:  # asking for more of the same jobs would not run that work either: slowly, then
            self._back_off(now)
