"""Run a topology as real processes on this machine and measure what a routing strategy does.

One run: a local orchestrator (or a binary-star pair) with the chosen strategy, the declared
satellite groups (each satellite a process with its workers, tags and speed), the clients'
workloads (closed loop: ``concurrency`` tasks in flight until ``tasks`` are done; open loop:
``rate`` submissions a second), and the faults at their times (``kill`` = SIGKILL, ``stop`` =
SIGSTOP, ``cont`` = SIGCONT of satellite N; ``kill_orchestrator`` = SIGKILL of the active
orchestrator, ``restart_orchestrator`` = start the last one killed again). Every task event is
recorded from the event streams of every orchestrator; :class:`RunResult` holds the figures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchester import LocalCluster, OrchesterError
from orchester.client.events import EventRecorder
from orchester.local.pair import LocalPair

from .elastic import ElasticFleet
from .linkproxy import LinkProxy
from .schema import Topology
from .tasks import SPEED_VARIABLE


@dataclass
class RunResult:
    """The figures of one run of one strategy."""

    strategy: str
    tasks: int
    makespan: float
    throughput: float
    latency_p50: float
    latency_p99: float
    utilisation: dict[str, float] = field(default_factory=dict)
    done_per_satellite: dict[str, int] = field(default_factory=dict)
    fairness: float = 1.0
    rerouted: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)  #: seconds since start, one per task
    latencies: list[float] = field(default_factory=list)  #: seconds from submission to result, sorted
    faults: list[float] = field(default_factory=list)  #: seconds since start
    jobs: int = 0  #: elastic jobs that ran (``[elastic]``)
    #: worker-seconds the satellites held: the fixed ones over the makespan, the elastic ones while their job ran
    allocation: float = 0.0
    busy: float = 0.0  #: worker-seconds spent running tasks
    job_spans: list[tuple[float, float]] = field(default_factory=list)  #: each elastic job's run, seconds since start

    @property
    def allocation_used(self) -> float:
        """The share of the allocation spent running tasks."""
        return self.busy / self.allocation if self.allocation > 0 else 0.0

    def row(self) -> dict[str, Any]:
        """A flat row for tables and CSV."""
        return {"strategy": self.strategy, "tasks": self.tasks, "makespan_s": round(self.makespan, 3),
                "throughput_per_s": round(self.throughput, 1), "latency_p50_ms": round(self.latency_p50 * 1e3, 1),
                "latency_p99_ms": round(self.latency_p99 * 1e3, 1), "fairness": round(self.fairness, 3),
                "rerouted": self.rerouted, "lost": self.lost, "duplicated": self.duplicated,
                "recovery_s": ";".join(f"{r:.2f}" for r in self.recovery),
                "utilisation": ";".join(f"{k}={v:.2f}" for k, v in sorted(self.utilisation.items())),
                "jobs": self.jobs, "allocation_worker_s": round(self.allocation, 1),
                "allocation_used": round(self.allocation_used, 3)}


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one has everything."""
    if not values or not any(values):
        return 1.0
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def recovery_time(completions: list[float], fault: float, window: float = 0.5) -> float:
    """Seconds after ``fault`` until the completion rate over ``window`` is back to 80 % of the rate
    in the window before it (0 if nothing was completing before; NaN if it never comes back)."""
    before = sum(1 for c in completions if fault - window < c <= fault)
    if before == 0:
        return 0.0
    t, end = fault, max(completions, default=fault)
    while t <= end:
        if sum(1 for c in completions if t < c <= t + window) >= 0.8 * before:
            return round(t - fault, 3)
        t += 0.05
    return float("nan")


def _cluster(topo: Topology, strategy: str, journal_dir: str) -> LocalCluster:
    common: dict[str, Any] = {"satellites": 0, "tasks": ["topology_tests.tasks"], "strategy": strategy,
                              "heartbeat_interval": topo.heartbeat_interval, "liveness": topo.liveness,
                              "log_level": "ERROR"}
    if topo.orchestrators == 2:
        return LocalPair(ha_heartbeat=topo.heartbeat_interval, journal=topo.journal, **common)
    return LocalCluster(serve_args=["--journal", journal_dir] if topo.journal else [], **common)


def run(topo: Topology, strategy: str, timeout: float = 600.0) -> RunResult:
    """Run ``topo`` once with ``strategy``; return its figures."""
    topo.validate()
    journal_dir = tempfile.mkdtemp(prefix="orchester-topo-journal-")
    try:
        with _cluster(topo, strategy, journal_dir) as cluster:
            return _run(topo, strategy, cluster, timeout)
    finally:
        shutil.rmtree(journal_dir, ignore_errors=True)


def _run(topo: Topology, strategy: str, cluster: LocalCluster, timeout: float) -> RunResult:
    pair = cluster if isinstance(cluster, LocalPair) else None
    procs: list[Any] = []
    workers: dict[str, int] = {}
    proxies: dict[int, list[LinkProxy]] = {}  # satellite index -> its relays (one per orchestrator)
    delayed = {f.satellite for f in topo.faults if f.action == "delay"}
    upstreams = list(pair.endpoints.values()) if pair else [cluster.endpoint]
    for gi, group in enumerate(topo.satellites):
        for k in range(group.count):
            sid = f"g{gi}-{k}"
            connect = None
            if group.delay_ms > 0 or len(procs) in delayed:
                proxies[len(procs)] = [LinkProxy(up, group.delay_ms / 1000).start() for up in upstreams]
                connect = [p.endpoint for p in proxies[len(procs)]]
            procs.append(cluster.add_satellite(sid, workers=group.workers, tags=group.tags,
                                               extra=["--prefetch", str(group.prefetch)],
                                               env={SPEED_VARIABLE: str(group.speed)}, connect=connect))
            workers[sid] = group.workers
    try:
        return _drive(topo, strategy, cluster, pair, procs, workers, proxies, timeout)
    finally:
        for relays in proxies.values():
            for proxy in relays:
                proxy.close()


def _drive(topo: Topology, strategy: str, cluster: LocalCluster, pair: LocalPair | None, procs: list[Any],
           workers: dict[str, int], proxies: dict[int, list[LinkProxy]], timeout: float) -> RunResult:
    cluster.wait_for_satellites(len(procs))
    client = cluster.client(heartbeat_interval=topo.heartbeat_interval, liveness=topo.liveness)
    fleet = None
    if topo.elastic is not None:  # the autoscaler, with its own client
        fleet = ElasticFleet(cluster, topo.elastic, cluster.client(heartbeat_interval=topo.heartbeat_interval,
                                                                    liveness=topo.liveness)).start()
    recorder = EventRecorder(list(pair.pub_endpoints.values()) if pair else [cluster.pub_endpoint], ["task:"])
    time.sleep(0.3)  # let the subscriptions reach the orchestrators
    start = time.time()
    fault_times: list[float] = []
    stop = threading.Event()
    killed: list[str] = []

    def orchestrator_fault(action: str) -> None:
        if action == "kill_orchestrator":
            if pair is not None:
                role = pair.active_role()
                if role is not None:
                    pair.kill(role)
                    killed.append(role)
            elif cluster.orchestrator is not None:
                cluster.orchestrator.kill()
                cluster.orchestrator.wait(10)
                killed.append("single")
        elif killed:
            role = killed.pop()
            if pair is not None:
                pair.start_server(role)
            else:
                cluster.start_orchestrator(bind=cluster.endpoint, pub=cluster.pub_endpoint)

    def inject() -> None:
        for f in sorted(topo.faults, key=lambda f: f.at):
            if stop.wait(max(0.0, start + f.at - time.time())):
                return
            if f.action in ("kill_orchestrator", "restart_orchestrator"):
                orchestrator_fault(f.action)
                fault_times.append(time.time() - start)
                continue
            if f.action == "delay":
                for proxy in proxies[f.satellite]:
                    proxy.delay = f.ms / 1000
                fault_times.append(time.time() - start)
                continue
            sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}[f.action]
            with contextlib.suppress(ProcessLookupError):  # already gone: no fault to time
                os.kill(procs[f.satellite].pid, sig)
                fault_times.append(time.time() - start)

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    submitted: dict[str, float] = {}
    finished: dict[str, float] = {}
    failed = 0
    outstanding: list[tuple[Any, int]] = []
    sent = [0] * len(topo.clients)
    in_flight = [0] * len(topo.clients)
    deadline = time.monotonic() + timeout
    while any(n < load.tasks for n, load in zip(sent, topo.clients, strict=True)) or outstanding:
        now = time.time()
        for i, load in enumerate(topo.clients):
            while sent[i] < load.tasks:
                if now < start + load.start:  # not yet: a later burst
                    break
                if load.rate > 0:  # open loop: on schedule, whatever is outstanding
                    if now < start + load.start + sent[i] / load.rate:
                        break
                elif in_flight[i] >= load.concurrency:
                    break
                fut = client.submit("topo.work", load.duration, b"x" * load.payload_bytes, tags=load.tags)
                submitted[fut.task_id] = time.time()
                outstanding.append((fut, i))
                sent[i] += 1
                in_flight[i] += 1
        still = []
        for fut, i in outstanding:
            if fut.done():
                in_flight[i] -= 1
                try:
                    fut.result()
                    finished[fut.task_id] = time.time()
                except OrchesterError:
                    failed += 1
            else:
                still.append((fut, i))
        outstanding = still
        if time.monotonic() > deadline:
            break
        time.sleep(0.002)
    end, end_mono = time.time(), time.monotonic()
    time.sleep(0.3)  # the last events
    stop.set()
    injector.join(5)
    recorder.close()
    fixed = sum(workers.values())
    jobs, allocation = 0, 0.0
    if fleet is not None:
        fleet.stop()
        held = fleet.jobs
        jobs, allocation = len(held.started), held.core_seconds(end_mono)
        offset = end - end_mono  # (monotonic to seconds since start)
        spans = [(t + offset - start, min(held.ended.get(j, end_mono), end_mono) + offset - start)
                 for j, t in held.started.items()]
        for job in held.started:
            for k in range(topo.elastic.satellites_per_job if topo.elastic else 0):
                workers[f"{job}-{k}"] = topo.elastic.workers if topo.elastic else 1
    for p in procs:  # thaw frozen satellites so the cluster can stop them
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
    result = _figures(strategy, topo, start, end, submitted, finished, failed,
                      [(e.topic, e.data) for e in recorder.received], workers, fault_times)
    result.jobs = jobs
    result.allocation = allocation + fixed * (end - start)
    if fleet is not None:
        result.job_spans = spans
    return result


def _figures(strategy: str, topo: Topology, start: float, end: float, submitted: dict[str, float],
             finished: dict[str, float], failed: int, events: list[tuple[str, dict[str, Any]]],
             workers: dict[str, int], fault_times: list[float]) -> RunResult:
    latencies = sorted(finished[t] - submitted[t] for t in finished)
    makespan = (max(finished.values()) - start) if finished else end - start
    done_attempts: defaultdict[str, set[int]] = defaultdict(set)
    done_by_sat: Counter[str] = Counter()
    running: dict[tuple[str, int], tuple[str, float]] = {}
    busy: defaultdict[str, float] = defaultdict(float)
    rerouted = 0
    for _, data in events:
        tid, state, sat, t = data.get("id"), data.get("state"), data.get("sat"), float(data.get("t", 0))
        if not isinstance(tid, str) or tid not in submitted:
            continue
        key = (tid, int(data.get("attempt", 0)))
        if state == "running" and sat:
            running[key] = (sat, t)
        elif state in ("done", "failed", "stalled"):
            began = running.pop(key, None)
            if began is not None:
                busy[began[0]] += t - began[1]
            if state == "done":
                done_attempts[tid].add(key[1])
                if sat:
                    done_by_sat[sat] += 1
            if state == "stalled":
                rerouted += 1
    utilisation = {sat: busy.get(sat, 0.0) / (makespan * n) if makespan > 0 else 0.0 for sat, n in workers.items()}
    completions = sorted(t - start for t in finished.values())
    recovery = [recovery_time(completions, ft) for ft in fault_times]
    total = sum(load.tasks for load in topo.clients)
    return RunResult(
        strategy=strategy, tasks=len(finished), makespan=makespan,
        throughput=len(finished) / makespan if makespan > 0 else 0.0,
        latency_p50=statistics.median(latencies) if latencies else 0.0,
        latency_p99=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0,
        utilisation=utilisation, done_per_satellite=dict(done_by_sat),
        fairness=jain(list(utilisation.values())), rerouted=rerouted,
        lost=total - len(finished), duplicated=sum(1 for a in done_attempts.values() if len(a) > 1),
        recovery=recovery, completions=completions, faults=fault_times, latencies=latencies,
        busy=sum(busy.values()))
