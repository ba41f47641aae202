"""The autoscaler on a real one-node Slurm: jobs submitted when work waits, given back when idle.

Every test runs an orchestrator (in-process, loopback TCP, no satellite of its own) and ``orchester
autoscale`` as a real process; the satellites start inside real Slurm jobs (``sbatch``) and join
the orchestrator. ``squeue`` is watched all along, from outside, to check ``--max-jobs``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV, broker_config

from orchester import Client
from orchester.server.broker import BrokerThread

pytestmark = pytest.mark.integration


class QueueWatch:
    """``squeue`` read every 0.2 s from a thread: every job id seen, and the most listed at once."""

    def __init__(self, slurm: Any, name: str) -> None:
        self.slurm, self.name = slurm, name
        self.seen: set[str] = set()
        self.most = 0
        self.now: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                jobs = self.slurm.jobs(self.name)
            except RuntimeError:
                jobs = {}
            self.now = jobs
            self.seen |= set(jobs)
            self.most = max(self.most, len(jobs))
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Autoscaler:
    """``orchester autoscale`` as a process (its log in a file), stopped by the test's fixture."""

    def __init__(self, slurm: Any, endpoint: str, workdir: Path, tag: str, *flags: str) -> None:
        self.tag = tag
        self.log = workdir / f"autoscale-{tag}-{time.monotonic_ns()}.log"
        env = {**slurm.env, **TEST_ENV}
        argv = [sys.executable, "-m", "orchester", "--log-level", "INFO", "autoscale", "--connect", endpoint,
                "--tag", tag, "--workdir", str(workdir), "--interval", "0.3", "--wait-bound", "0",
                "--walltime", "00:10:00", "--satellite-option=--heartbeat-interval=0.5", *flags]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture
def bus() -> Iterator[Any]:
    """An orchestrator on loopback TCP with no satellite (the jobs bring them)."""
    with BrokerThread(broker_config(heartbeat_interval=0.5, liveness=4)) as broker:
        yield broker


@pytest.fixture
def scalers(slurm: Any) -> Iterator[list[Autoscaler]]:
    """The autoscalers a test starts: stopped, and their jobs cancelled, at its end."""
    made: list[Autoscaler] = []
    yield made
    for a in made:
        a.stop()
    for tag in {a.tag for a in made}:
        slurm.run("scancel", f"--name=orchester-{tag}", check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and slurm.run("squeue", "--noheader", check=False).strip():
        time.sleep(0.3)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def test_a_burst_brings_jobs_and_idle_jobs_are_given_back(slurm: Any, bus: Any, scalers: list[Autoscaler],
                                                          tmp_path: Path) -> None:
    endpoint = bus.endpoints["bind"][0]
    watch = QueueWatch(slurm, "orchester-burst")
    try:
        scalers.append(Autoscaler(slurm, endpoint, tmp_path, "burst", "--max-jobs", "2", "--workers", "2",
                                  "--idle-timeout", "3"))
        with Client(endpoint) as client:
            assert client.status()["satellites"] == []  # 0 jobs, 0 satellites at start
            futures = [client.submit("sleep", 0.3) for _ in range(24)]
            assert [f.result(timeout=180) for f in futures] == [0.3] * 24
            status = client.status()
            sats = [s for s in status["satellites"] if s["state"] not in ("lost", "left")]
            assert sats and all(s["job"] in watch.seen for s in sats)  # each satellite names its job
            report = {r["tag"]: r for r in status["jobs"]}["burst"]
            assert report["scheduler"] == "slurm" and report["max"] == 2
            assert {j["id"] for j in report["jobs"]} <= watch.seen
            ran_on = {s["job"] for s in sats if s["done"]}
            assert ran_on  # the tasks ran inside the jobs
        # idle for 3 s: drained, then cancelled: squeue ends empty, with the autoscaler still running
        wait_until(lambda: not slurm.jobs("orchester-burst"), 90, "the idle jobs given back")
        assert scalers[0].proc.poll() is None
    finally:
        watch.stop()
    assert 1 <= len(watch.seen) and watch.most <= 2, (watch.seen, watch.most)
    log = scalers[0].text()
    assert "submitted" in log and "given back" in log and "drained" in log, log[-3000:]


def test_a_job_ended_from_outside_is_replaced_while_work_remains(slurm: Any, bus: Any, scalers: list[Autoscaler],
                                                                 tmp_path: Path) -> None:
    endpoint = bus.endpoints["bind"][0]
    watch = QueueWatch(slurm, "orchester-replace")
    try:
        scalers.append(Autoscaler(slurm, endpoint, tmp_path, "replace", "--max-jobs", "1", "--workers", "2",
                                  "--idle-timeout", "30"))
        with Client(endpoint) as client:
            futures = [client.submit("sleep", 1.0) for _ in range(12)]
            wait_until(lambda: any(f.done() for f in futures), 120, "a first result from the first job")
            first = sorted(watch.seen)
            assert len(first) == 1
            slurm.run("scancel", first[0])  # the scheduler ends the job: its satellites go, mid-task
            assert [f.result(timeout=180) for f in futures] == [1.0] * 12  # rerouted to the replacement
        replacement = watch.seen - set(first)
        assert replacement, watch.seen  # a second job, submitted while work remained
    finally:
        watch.stop()
    assert watch.most <= 1, watch.most
    assert f"job {first[0]} ended" in scalers[0].text()


def test_a_restarted_autoscaler_adopts_its_jobs_and_submits_no_duplicate(slurm: Any, bus: Any,
                                                                          scalers: list[Autoscaler],
                                                                          tmp_path: Path) -> None:
    endpoint = bus.endpoints["bind"][0]
    watch = QueueWatch(slurm, "orchester-adopt")
    other = slurm.run("sbatch", "--parsable", "--job-name=someone-else", f"--chdir={tmp_path}",
                      "--wrap=sleep 120").strip()  # not ours: never touched
    try:
        scalers.append(Autoscaler(slurm, endpoint, tmp_path, "adopt", "--max-jobs", "2", "--workers", "1",
                                  "--cores", "1", "--idle-timeout", "3"))
        with Client(endpoint) as client:
            futures = [client.submit("sleep", 0.5) for _ in range(30)]
            wait_until(lambda: sum(f.done() for f in futures) >= 2 and len(watch.now) == 2, 120,
                       "two jobs, and results from them")
            before = set(watch.now)
            scalers[0].stop(signal.SIGKILL)  # the autoscaler dies; its jobs go on
            scalers.append(Autoscaler(slurm, endpoint, tmp_path, "adopt", "--max-jobs", "2", "--workers", "1",
                                      "--cores", "1", "--idle-timeout", "3"))
            wait_until(lambda: "adopted 2 job(s)" in scalers[1].text(), 60, "the jobs adopted")
            assert [f.result(timeout=180) for f in futures] == [0.5] * 30
        wait_until(lambda: not slurm.jobs("orchester-adopt"), 90, "the idle jobs given back")
    finally:
        watch.stop()
    assert watch.seen == before, (watch.seen, before)  # no job submitted after the restart: no duplicate
    assert watch.most <= 2
    assert other in slurm.jobs()  # another user's job, of another name, untouched
    slurm.run("scancel", other)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                out.append(int(entry.name))
    return out


def test_serve_runs_the_autoscaler_of_its_table_and_stops_it(slurm: Any, tmp_path: Path) -> None:
    """``orchester serve --autoscale FILE``: the autoscaler is a child of the orchestrator, told its endpoint."""
    conf = tmp_path / "orchester.toml"
    conf.write_text("\n".join([
        "[autoscale]", 'tag = "served"', "max_jobs = 1", "workers = 2", "wait_bound = 0", "idle_timeout = 2",
        "interval = 0.3", 'walltime = "00:10:00"', f'workdir = "{tmp_path}"',
        'satellite_options = ["--heartbeat-interval=0.5"]', ""]))
    endpoints = tmp_path / "endpoints.json"
    serve = subprocess.Popen([sys.executable, "-m", "orchester", "serve", "--bind", "tcp://127.0.0.1:0",
                              "--pub", "tcp://127.0.0.1:0", "--endpoint-file", str(endpoints),
                              "--autoscale", str(conf)], env={**slurm.env, **TEST_ENV})
    try:
        wait_until(endpoints.exists, 60, "the orchestrator's endpoint file")
        with Client(f"@{endpoints}") as client:
            futures = [client.submit("sleep", 0.2) for _ in range(6)]
            assert [f.result(timeout=180) for f in futures] == [0.2] * 6
            jobs = {r["tag"]: r for r in client.status()["jobs"]}["served"]["jobs"]
            assert jobs and all(j["state"] in ("running", "ending") for j in jobs)
        wait_until(lambda: not slurm.jobs("orchester-served"), 90, "the idle job given back")
        children = _children(serve.pid)
        assert children, "the autoscaler runs as the orchestrator's child"
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
        slurm.run("scancel", "--name=orchester-served", check=False)
    wait_until(lambda: not any(Path(f"/proc/{c}").exists() for c in children), 20, "the autoscaler stopped with it")
