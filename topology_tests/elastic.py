"""Elastic satellites in a topology run: ``orchester autoscale``'s policy and loop, with jobs on this machine.

:class:`LocalJobs` is a scheduler adapter (:class:`orchester.batch.scheduler.Scheduler`) whose jobs are
satellite processes of the run's cluster: a submitted job waits ``queue_delay`` seconds (a scheduler's
queue), then its satellites start, each announcing the job (``--job``); a cancelled job's satellites
are stopped. :class:`ElasticFleet` runs :class:`orchester.batch.autoscaler.Autoscale` on it in a
thread, and keeps when each job ran (the allocation's core-seconds).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from orchester.batch.autoscaler import Autoscale
from orchester.batch.policy import PENDING, RUNNING
from orchester.config import AutoscaleConfig

from .schema import Elastic


class LocalJobs:
    """Jobs that are satellite processes of ``cluster`` (see the module docstring)."""

    name = "local"

    def __init__(self, cluster: Any, elastic: Elastic, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.elastic = elastic
        self.env = env or {}
        self.n = 0
        self.submitted: dict[str, float] = {}  #: job -> when it was submitted
        self.started: dict[str, float] = {}  #: job -> when its satellites started
        self.ended: dict[str, float] = {}  #: job -> when it was cancelled
        self.procs: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def submit(self, script: str, tag: str) -> str:
        """A job id; its satellites start after the queue delay (at a later :meth:`jobs`)."""
        with self._lock:
            self.n += 1
            job = f"local{self.n}"
            self.submitted[job] = time.monotonic()
            return job

    def jobs(self, tag: str) -> dict[str, str]:
        """The jobs not cancelled: pending while in the queue, running once their satellites started."""
        now = time.monotonic()
        out = {}
        with self._lock:
            for job, at in self.submitted.items():
                if job in self.ended:
                    continue
                if job not in self.started and now - at >= self.elastic.queue_delay:
                    self._start(job, now)
                out[job] = RUNNING if job in self.started else PENDING
        return out

    def _start(self, job: str, now: float) -> None:
        self.started[job] = now
        self.procs[job] = [self.cluster.add_satellite(f"{job}-{k}", workers=self.elastic.workers,
                                                      extra=["--job", job], env=self.env)
                           for k in range(self.elastic.satellites_per_job)]

    def cancel(self, job: str) -> None:
        """Stop the job's satellites (the autoscaler drained them first)."""
        with self._lock:
            self.ended.setdefault(job, time.monotonic())
            for p in self.procs.get(job, []):
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()

    def core_seconds(self, until: float) -> float:
        """Worker-seconds the jobs held, from their satellites' start to their cancellation (or ``until``)."""
        per_job = self.elastic.satellites_per_job * self.elastic.workers
        return sum((self.ended.get(job, until) - t) * per_job for job, t in self.started.items())


class ElasticFleet:
    """The autoscaler of a topology run, in a thread, on :class:`LocalJobs`."""

    def __init__(self, cluster: Any, elastic: Elastic, client: Any, env: dict[str, str] | None = None) -> None:
        self.client = client  #: its own (closed by :meth:`stop`)
        self.jobs = LocalJobs(cluster, elastic, env)
        cfg = AutoscaleConfig(connect=[cluster.endpoint], max_jobs=elastic.max_jobs, min_jobs=elastic.min_jobs,
                              satellites_per_job=elastic.satellites_per_job, workers=elastic.workers,
                              idle_timeout=elastic.idle_timeout, wait_bound=elastic.wait_bound,
                              interval=elastic.interval, start_timeout=max(60.0, 10 * elastic.queue_delay),
                              tag="topology").validate()
        self.scaler = Autoscale(cfg, client, self.jobs, [cluster.endpoint])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.scaler.run, args=(self._stop,), daemon=True,
                                        name="orchester-topology-autoscaler")

    def start(self) -> ElasticFleet:
        """Start looking at the bus."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop looking, and close its client (the cluster stops the satellites)."""
        self._stop.set()
        self._thread.join(10)
        self.client.close()
