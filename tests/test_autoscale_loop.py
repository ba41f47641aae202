"""The autoscaler's loop with a fake bus and a fake scheduler (pure logic: the real ones are in
tests/integration/test_autoscale_slurm.py): nothing decided without both answers, back-off after
failures, refusals and failed cancellations carried back to the policy, the jobs reported."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from orchester.batch.autoscaler import Autoscale, bus_of
from orchester.batch.scheduler import SchedulerError
from orchester.config import AutoscaleConfig, ConfigError
from orchester.errors import Unreachable
from serializers.messages import JobsReport


class FakeBus:
    def __init__(self) -> None:
        self.queue = {"tasks": 0, "cores": 0, "work": 0.0, "oldest_wait": 0.0, "waiting": 0}
        self.satellites: list[dict[str, Any]] = []
        self.up = True
        self.drained: list[str] = []
        self.reports: list[JobsReport] = []

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        if not self.up:
            raise Unreachable("no orchestrator answered")
        return {"queue": dict(self.queue), "satellites": list(self.satellites)}

    def drain(self, satellite: str, timeout: float | None = None) -> dict[str, Any]:
        self.drained.append(satellite)
        return {"sid": satellite}

    def report_jobs(self, report: JobsReport, timeout: float | None = None) -> dict[str, Any]:
        self.reports.append(report)
        return {"tag": report.tag}


class FakeScheduler:
    name = "slurm"

    def __init__(self) -> None:
        self.listed: dict[str, str] = {}
        self.next_id = 100
        self.fail_jobs: str | None = None
        self.refuse_after: int | None = None  #: submissions taken before the next one is refused
        self.fail_cancel = False
        self.calls: list[str] = []

    def submit(self, script: str, tag: str) -> str:
        self.calls.append("submit")
        if self.refuse_after is not None:
            if self.refuse_after == 0:
                raise SchedulerError("sbatch failed (exit 1): QOSMaxSubmitJobPerUserLimit")
            self.refuse_after -= 1
        self.next_id += 1
        self.listed[str(self.next_id)] = "pending"
        return str(self.next_id)

    def jobs(self, tag: str) -> dict[str, str]:
        self.calls.append("jobs")
        if self.fail_jobs:
            raise SchedulerError(self.fail_jobs)
        return dict(self.listed)

    def cancel(self, job: str) -> None:
        self.calls.append("cancel")
        if self.fail_cancel:
            raise SchedulerError("scancel failed (exit 1): Invalid job id")
        self.listed.pop(job, None)


def make(**settings: Any) -> tuple[Autoscale, FakeBus, FakeScheduler]:
    cfg = AutoscaleConfig(**{"max_jobs": 3, "wait_bound": 0.0, "idle_timeout": 5.0, "backoff": 10.0,
                             "backoff_max": 40.0, **settings}).validate()
    bus, sched = FakeBus(), FakeScheduler()
    return Autoscale(cfg, bus, sched, ["tcp://head:5555"]), bus, sched


def test_nothing_is_decided_while_the_bus_does_not_answer() -> None:
    a, bus, sched = make()
    bus.up = False
    bus.queue.update(tasks=10, cores=10)
    assert a.step(0.0) == [] and sched.calls == []  # not even the scheduler is asked
    bus.up = True
    assert [type(d).__name__ for d in a.step(1.0)] == ["Submit"] and len(sched.listed) == 3


def test_a_failing_scheduler_is_asked_again_after_a_doubling_back_off_and_the_bus_is_told() -> None:
    a, bus, sched = make()
    bus.queue.update(tasks=10, cores=10)
    sched.fail_jobs = "squeue not found: is the scheduler's client installed, and on PATH?"
    assert a.step(0.0) == []
    assert bus.reports[-1].error.startswith("squeue not found")  # status shows why nothing happens
    assert a.step(9.9) == [] and sched.calls == ["jobs"]  # backing off: not asked again yet
    a.step(10.0)
    assert sched.calls == ["jobs", "jobs"] and a.ask_after == 30.0  # second failure: 20 s
    sched.fail_jobs = None
    a.step(30.0)
    assert len(sched.listed) == 3 and bus.reports[-1].error == "" and a.failures == 0


def test_a_refusal_mid_batch_keeps_what_was_taken_and_backs_off() -> None:
    a, bus, sched = make()
    bus.queue.update(tasks=10, cores=10)
    sched.refuse_after = 1
    a.step(0.0)
    assert len(sched.listed) == 1 and a.policy.asked == 0 and a.policy.not_before == 10.0
    assert "QOSMaxSubmitJobPerUserLimit" in bus.reports[-1].error
    sched.refuse_after = None
    assert a.step(5.0) == []  # within the back-off
    a.step(10.0)
    assert len(sched.listed) == 3  # never more than max_jobs, the taken one counted


def test_the_first_answer_adopts_the_jobs_of_the_tag_and_the_report_lists_them() -> None:
    a, bus, sched = make()
    sched.listed = {"7": "running", "8": "pending"}
    bus.queue.update(tasks=40, cores=40)
    a.step(0.0)
    assert set(sched.listed) == {"7", "8", "101"}  # one more: three at most
    report = bus.reports[-1]
    assert report.tag == "default" and report.scheduler == "slurm" and report.max_jobs == 3
    assert sorted((j, s) for j, s, _ in report.jobs) == [("101", "pending"), ("7", "running"), ("8", "pending")]


def test_idle_jobs_are_drained_then_cancelled_and_a_failed_cancel_is_retried() -> None:
    a, bus, sched = make()
    sched.listed = {"7": "running"}
    bus.satellites = [{"id": "s7", "job": "7", "state": "idle", "cores": 1, "cores_used": 0, "inflight": 0}]
    a.step(0.0)
    a.step(6.0)
    assert bus.drained == ["s7"]
    bus.satellites[0]["state"] = "draining"
    sched.fail_cancel = True
    a.step(7.0)
    assert "7" in sched.listed and a.ask_after == 17.0  # scancel failed: backing off, asked again after
    a.step(17.0)
    assert a.ask_after == 37.0  # failed again (though squeue worked): the back-off doubles
    sched.fail_cancel = False
    a.step(37.0)
    assert sched.listed == {} and a.failures == 0 and bus.reports[-1].error == ""


def test_bus_of_reads_the_status_the_orchestrator_sends() -> None:
    bus = bus_of({"queue": {"tasks": 3, "cores": 5, "work": 50.0, "oldest_wait": 2.5, "waiting": 1},
                  "satellites": [{"id": "a", "job": "12", "state": "busy", "cores": 4, "cores_used": 4, "inflight": 2,
                                  "walltime_left": 300.0},
                                 {"id": "b", "job": None, "state": "draining", "cores": 2, "cores_used": 0,
                                  "inflight": 0, "walltime_left": None},
                                 {"id": "c", "job": "12", "state": "lost", "cores": 2}]})
    assert (bus.queued, bus.queued_cores, bus.queued_work, bus.oldest_wait) == (3, 5, 50.0, 2.5)
    assert [(s.sid, s.job, s.accepts_work, s.draining, s.walltime_left) for s in bus.satellites] == [
        ("a", "12", True, False, 300.0), ("b", None, False, True, None)]  # a lost one no longer counts


def test_the_job_script_names_the_resolved_bus_and_the_job() -> None:
    a, _, _ = make(tag="lab", workers=2, tasks=["mylab.tasks"], partition="short")
    assert "--connect tcp://head:5555" in a.script and '--job "$SLURM_JOB_ID"' in a.script
    assert "#SBATCH --partition=short" in a.script and "--tasks mylab.tasks" in a.script
    assert f"{sys.executable} -m satellites run" in a.script  # the autoscaler's own Python by default


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_jobs": 0}, "max_jobs"),
    ({"min_jobs": 3, "max_jobs": 2}, "more than max_jobs"),
    ({"tag": "a b"}, "tag"),
    ({"walltime": "1 hour"}, "walltime"),
    ({"idle_timeout": float("nan")}, "idle_timeout"),
    ({"directives": ["--mem=8G"]}, "#SBATCH"),
    ({"partition": "p; rm -rf /"}, "partition"),
    ({"satellite_options": ["tags=gpu"]}, "satellite option"),
    ({"satellite_secret": "s.key_secret"}, "both"),
    ({"connect": ["head:5555"]}, "not a ZeroMQ endpoint"),
    ({"scheduler": "lsf"}, "scheduler"),
])
def test_bad_settings_are_refused_with_the_reason(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AutoscaleConfig(**settings).validate()


def test_the_command_refuses_bad_flags_in_one_line_and_a_bad_table_too(tmp_path: Any) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchester", *argv], capture_output=True, text=True, timeout=60)

    bad = run("autoscale", "--max-jobs", "0")
    assert bad.returncode == 2 and "max_jobs" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    conf = tmp_path / "o.toml"
    conf.write_text('[autoscale]\nmax_jobs = 2\nwalltime = "soon"\n')
    bad = run("--config", str(conf), "autoscale")
    assert bad.returncode == 2 and "walltime" in bad.stderr and "Traceback" not in bad.stderr
    conf.write_text('[autoscale]\nmax_jbos = 2\n')
    bad = run("--config", str(conf), "autoscale")
    assert bad.returncode == 2 and "max_jbos" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_refuses_a_bad_autoscale_table_before_it_binds_anything(tmp_path: Any) -> None:
    conf = tmp_path / "o.toml"
    for text, said in (("[serve]\n", "no [autoscale] table"), ("[autoscale]\nmax_jobs = -1\n", "max_jobs"),
                       ("[autoscale\n", "not valid TOML")):
        conf.write_text(text)
        bad = subprocess.run([sys.executable, "-m", "orchester", "serve", "--bind", "tcp://127.0.0.1:0",
                              "--pub", "tcp://127.0.0.1:0", "--autoscale", str(conf)],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and said in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
