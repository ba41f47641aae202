"""Batch jobs in the orchestrator's core: a satellite's REGISTER names its job, an autoscaler's CONTROL
``jobs`` report is kept per tag (bounded, admin only with keys, dropped when stale) and shown by STATUS."""

from __future__ import annotations

from typing import Any

import pytest
from test_core import C, Harness, S, of
from test_hardening_core import _keyed

from orchester.server.requests import JOBS_REPORT_TTL, MAX_AUTOSCALERS, SATELLITES_PER_JOB_SHOWN
from serializers import pack, unpack
from serializers import protocol as P
from serializers.messages import JobsReport


def report(h: Harness, tag: str = "lab", jobs: Any = (("41", "running", 60.0),), who: str | None = None,
           **extra: Any) -> dict[str, Any]:
    """Send a jobs report; the answer (REPLY or ERROR) as a header."""
    hdr = {"op": "jobs", "rid": 7, **JobsReport(tag, "slurm", tuple(jobs), 4).header(), **extra}
    h.core.handle(C, [b"ops", P.SIGNATURE, P.CONTROL, pack(hdr)], h.now, who)
    out = [f for _, f, _ in h.tick() if f[2] in (P.REPLY, P.ERROR)]
    return {"cmd": out[-1][2], **unpack(out[-1][3])}


def status(h: Harness) -> dict[str, Any]:
    h.send(C, b"ops", P.STATUS, {"rid": 1})
    return unpack(of(h.tick(), P.REPLY)[-1][3])


def test_a_satellite_names_its_job_and_the_status_lists_each_jobs_satellites() -> None:
    h = Harness()
    h.send(S, b"id-a", P.REGISTER, {"sid": "a", "slots": 1, "kinds": ["echo"], "job": "41"})
    h.send(S, b"id-b", P.REGISTER, {"sid": "b", "slots": 1, "kinds": ["echo"]})
    h.tick()
    assert report(h)["jobs"] == 1
    st = status(h)
    assert {s["id"]: s["job"] for s in st["satellites"]} == {"a": "41", "b": None}
    [lab] = st["jobs"]
    assert lab["tag"] == "lab" and lab["scheduler"] == "slurm" and lab["max"] == 4 and lab["error"] is None
    assert lab["jobs"] == [{"id": "41", "state": "running", "age": 60.0, "satellites": ["a"]}]
    assert lab["counts"] == {"running": 1}


@pytest.mark.parametrize("job", ["x" * 129, "line\nbreak", 42])
def test_a_bad_job_in_a_registration_is_refused(job: Any) -> None:
    h = Harness()
    h.send(S, b"id-a", P.REGISTER, {"sid": "a", "slots": 1, "kinds": ["echo"], "job": job})
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [e["code"] for e in errors] == [P.E_MALFORMED] and not h.core.state.fleet.by_id


@pytest.mark.parametrize("jobs", [
    [["41", "exploded", 1.0]], [["41", "running", float("nan")]], [["41", "running", -1]], [[41, "running", 1]],
    [["41", "running", 1.0], ["41", "pending", 2.0]], [["41", "running"]], [["x" * 129, "running", 1]],
    [["41", "running", True]], "41", [[f"{i}", "pending", 0] for i in range(4097)],
])
def test_a_bad_report_is_answered_and_changes_nothing(jobs: Any) -> None:
    h = Harness()
    hdr = {"op": "jobs", "rid": 7, "tag": "lab", "scheduler": "slurm", "jobs": jobs, "max": 4, "min": 0}
    h.send(C, b"ops", P.CONTROL, hdr)
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [e["code"] for e in errors] == [P.E_MALFORMED] and h.core.state.job_reports == {}
    assert h.core.state.counters["handler_errors"] == 0


def test_reports_are_kept_per_tag_bounded_and_dropped_when_stale() -> None:
    h = Harness()
    report(h, "lab", [("1", "pending", 0.0)])
    report(h, "lab", [("1", "running", 5.0), ("2", "pending", 0.0)])  # the last report of a tag replaces it
    assert [len(r["jobs"]) for r in status(h)["jobs"]] == [2]
    for i in range(MAX_AUTOSCALERS + 3):  # more tags than kept: those silent longest go
        h.now += 1.0
        report(h, f"t{i:02d}")
    tags = [r["tag"] for r in status(h)["jobs"]]
    assert len(tags) == MAX_AUTOSCALERS and "lab" not in tags and f"t{MAX_AUTOSCALERS + 2:02d}" in tags
    h.now += JOBS_REPORT_TTL + 1  # every autoscaler silent for two minutes: gone
    assert status(h)["jobs"] == [] and h.core.state.job_reports == {}


def test_only_an_admin_key_may_report_jobs() -> None:
    h = Harness()
    _keyed(h)
    refused = report(h, who="alice")
    assert refused["cmd"] == P.ERROR and refused["code"] == P.E_FORBIDDEN
    assert h.core.state.job_reports == {}
    assert report(h, who="ops")["jobs"] == 1


def test_satellites_claiming_one_job_are_listed_up_to_a_bound() -> None:
    h = Harness()
    for i in range(SATELLITES_PER_JOB_SHOWN + 10):
        h.send(S, f"id-{i}".encode(), P.REGISTER, {"sid": f"s{i}", "slots": 1, "kinds": ["echo"], "job": "41"})
    h.tick()
    report(h)
    [job] = status(h)["jobs"][0]["jobs"]
    assert len(job["satellites"]) == SATELLITES_PER_JOB_SHOWN


def test_an_empty_job_is_no_job() -> None:
    h = Harness()
    h.send(S, b"id-a", P.REGISTER, {"sid": "a", "slots": 1, "kinds": ["echo"], "job": ""})
    h.tick()
    assert h.core.state.fleet.by_id["a"].job == ""


@pytest.mark.parametrize("sid", ["x" * 129, "é" * 101, "tab\there"])
def test_a_satellite_refuses_an_id_the_orchestrator_or_zeromq_would_refuse(sid: str) -> None:
    """Checked before anything is sent (a satellite whose REGISTER is refused would loop), one line, exit 2."""
    import subprocess
    import sys

    from satellites.satellite import Satellite

    with pytest.raises(ValueError, match="satellite id"):
        Satellite("tcp://127.0.0.1:1", sid=sid)
    done = subprocess.run([sys.executable, "-m", "satellites", "run", "--connect", "tcp://127.0.0.1:1", "--id", sid],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "satellite id" in done.stderr and "Traceback" not in done.stderr


def test_a_registrations_host_and_progress_kinds_are_checked() -> None:
    h = Harness()
    h.send(S, b"id-a", P.REGISTER, {"sid": "a", "slots": 1, "kinds": ["echo"], "host": "node\x1b[2J7\n"})
    h.send(S, b"id-b", P.REGISTER, {"sid": "b", "slots": 1, "kinds": ["echo"], "host": None})
    h.send(S, b"id-c", P.REGISTER, {"sid": "c", "slots": 1, "kinds": ["echo"], "progress": {"x" * 300: 5}})
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    fleet = h.core.state.fleet
    assert fleet.by_id["a"].host == "node[2J7" and fleet.by_id["b"].host == ""  # (control characters dropped)
    assert "c" not in fleet.by_id and [e["code"] for e in errors] == [P.E_MALFORMED]
