"""Every counter the orchestrator keeps reaches carbon (issue 16: 14 of them never did)."""

from __future__ import annotations

import re
from pathlib import Path

from orchester.config import OrchestratorConfig
from orchester.metrics.collector import ALWAYS_EXPORTED, Collector
from orchester.server.core import Orchestrator

ROOT = Path(__file__).resolve().parent.parent / "orchester"


def test_every_counter_named_in_the_code_is_exported_from_the_first_interval() -> None:
    named = set()
    for path in ROOT.rglob("*.py"):
        named |= set(re.findall(r'counters\["([a-z_]+)"\]', path.read_text()))
    assert named and named <= ALWAYS_EXPORTED, sorted(named - ALWAYS_EXPORTED)


def test_a_counter_first_seen_later_is_exported_too() -> None:
    core = Orchestrator(OrchestratorConfig(), 0.0)
    collector = Collector("o")
    first = {name for name, _, _ in collector.collect(core, 0.0, 1000.0)}
    assert {f"o.counters.{n}" for n in ALWAYS_EXPORTED} <= first
    core.state.counters["errors.malformed"] += 2
    points = {name: value for name, _, value in collector.collect(core, 1.0, 1001.0)}
    assert points["o.counters.errors_malformed"] == 2 and points["o.counters.submitted"] == 0


def test_the_autoscalers_jobs_are_exported_in_all_and_per_tag() -> None:
    from orchester.server.fleet import SatelliteRecord
    from serializers.messages import JobsReport

    core = Orchestrator(OrchestratorConfig(), 0.0)
    collector = Collector("o")
    assert not any(".jobs." in name for name, _, _ in collector.collect(core, 0.0, 1000.0))  # no autoscaler: none
    core.state.job_reports["lab"] = (JobsReport("lab", "slurm", (("1", "running", 9.0), ("2", "pending", 1.0),
                                                                 ("3", "ending", 50.0))), 0.0)
    core.state.job_reports["gpu.x"] = (JobsReport("gpu.x", "pbs", (("7.pbs", "running", 3.0),)), 0.0)
    core.state.fleet.add(SatelliteRecord("s1", b"s1", None, 2, frozenset(), frozenset({"echo"}), 0.0, job="1"))
    points = {name: value for name, _, value in collector.collect(core, 1.0, 1001.0)}
    assert (points["o.jobs.pending"], points["o.jobs.running"], points["o.jobs.ending"]) == (1, 2, 1)
    assert points["o.jobs.lab.running"] == 1 and points["o.jobs.gpu_x.running"] == 1  # (a dot in a tag: one name)
    assert points["o.jobs.satellites"] == 1
