"""The autoscaler's policy alone, with a fake clock: when it asks the scheduler for jobs and gives them back."""

from __future__ import annotations

import random

import pytest

from orchester.batch.policy import (
    ENDED,
    PENDING,
    RUNNING,
    Autoscaler,
    Bus,
    Cancel,
    Drain,
    Limits,
    Satellite,
    Submit,
)


def sat(sid: str, job: str | None, cores: int = 4, used: int = 0, inflight: int = 0,
        draining: bool = False) -> Satellite:
    return Satellite(sid, job, cores, used, inflight, accepts_work=not draining, draining=draining)


def test_a_burst_with_no_satellite_asks_for_jobs_at_once_within_max_jobs() -> None:
    a = Autoscaler(Limits(max_jobs=3, cores_per_satellite=4, satellites_per_job=2))
    assert a.step(Bus(0, 0, 0.0), {}, 0.0) == []  # nothing waits: nothing asked
    out = a.step(Bus(queued=100, queued_cores=100, oldest_wait=0.0), {}, 1.0)
    assert out == [Submit(3)]  # 100 cores wanted, 8 per job: capped at three jobs
    assert a.step(Bus(100, 100, 0.5), {}, 2.0) == []  # asked already: nothing more until answered
    a.submitted(["j1", "j2", "j3"], 3)
    assert a.step(Bus(100, 100, 5.0), {"j1": PENDING, "j2": PENDING, "j3": PENDING}, 3.0) == []


def test_work_that_fits_or_waits_briefly_asks_for_nothing() -> None:
    a = Autoscaler(Limits(max_jobs=4, wait_bound=10.0, cores_per_satellite=4))
    a.adopt({"j1": RUNNING})
    running = (sat("s1", "j1", cores=4, used=1, inflight=1),)
    assert a.step(Bus(3, 3, 60.0, running), {"j1": RUNNING}, 0.0) == []  # three free cores hold it
    busy = (sat("s1", "j1", cores=4, used=4, inflight=4),)
    assert a.step(Bus(8, 8, 2.0, busy), {"j1": RUNNING}, 1.0) == []  # waits, but not for long yet
    assert a.step(Bus(8, 8, 12.0, busy), {"j1": RUNNING}, 2.0) == [Submit(2)]  # waited past the bound


def test_pending_jobs_count_as_capacity_on_its_way() -> None:
    a = Autoscaler(Limits(max_jobs=10, cores_per_satellite=4, wait_bound=0.0))
    a.adopt({"j1": PENDING})
    assert a.step(Bus(6, 6, 1.0), {"j1": PENDING}, 0.0) == [Submit(1)]  # 6 cores: one job coming, one more


def test_a_refused_submission_backs_off_doubling() -> None:
    a = Autoscaler(Limits(max_jobs=2, backoff=10.0, backoff_max=25.0))
    bus = Bus(5, 5, 0.0)
    assert a.step(bus, {}, 0.0) == [Submit(2)]
    a.refused(2, 0.0)
    assert a.step(bus, {}, 9.0) == []
    assert a.step(bus, {}, 10.0) == [Submit(2)]
    a.refused(2, 10.0)
    assert a.step(bus, {}, 29.0) == []
    assert a.step(bus, {}, 30.0) == [Submit(2)]
    a.refused(2, 30.0)  # a third time: the back-off stops growing at backoff_max
    assert a.step(bus, {}, 54.0) == [] and a.step(bus, {}, 55.0) == [Submit(2)]
    a.submitted(["j1"], 2)  # the scheduler took one of two
    assert a.live == 1 and a.refusals == 3  # (taken is not yet working: its script may be broken)
    a.step(Bus(5, 5, 0.0, (sat("s1", "j1"),)), {"j1": RUNNING}, 56.0)
    assert a.refusals == 0  # its satellite joined: the next refusal starts again from backoff


def test_a_job_that_ends_before_its_satellites_join_backs_off_and_the_back_off_grows() -> None:
    a = Autoscaler(Limits(max_jobs=1, backoff=10.0, backoff_max=100.0, wait_bound=0.0))
    waiting = Bus(4, 4, 5.0)
    t, submissions = 0.0, []
    for i in range(4):  # the job script is broken: each job runs a moment and ends, no satellite ever joins
        while not (out := a.step(waiting, {}, t)):
            t += 1.0
        assert out == [Submit(1)]
        submissions.append(t)
        a.submitted([f"j{i}"], 1, t)
        a.step(waiting, {f"j{i}": RUNNING}, t + 1.0)
        t += 2.0
    gaps = [b - a for a, b in zip(submissions, submissions[1:], strict=False)]
    assert gaps == [12.0, 22.0, 42.0]  # not once an interval: 10, 20, 40 s after each end is seen (2 s on)


def test_an_idle_job_is_drained_then_cancelled_and_no_task_is_killed() -> None:
    a = Autoscaler(Limits(max_jobs=2, idle_timeout=60.0))
    a.adopt({"j1": RUNNING, "j2": RUNNING})
    jobs = {"j1": RUNNING, "j2": RUNNING}
    work = (sat("a", "j1", used=1, inflight=1), sat("b", "j2", used=1, inflight=1))
    assert a.step(Bus(0, 0, 0.0, work), jobs, 0.0) == []
    idle = (sat("a", "j1"), sat("b", "j2", used=1, inflight=1))
    assert a.step(Bus(0, 0, 0.0, idle), jobs, 10.0) == []  # j1 idle from now
    assert a.step(Bus(0, 0, 0.0, idle), jobs, 69.0) == []
    assert a.step(Bus(0, 0, 0.0, idle), jobs, 70.0) == [Drain("a")]
    # a task reached it just before the drain: no cancel until it is done
    late = (sat("a", "j1", used=1, inflight=1, draining=True), sat("b", "j2", used=1, inflight=1))
    assert a.step(Bus(0, 0, 0.0, late), jobs, 71.0) == []
    done = (sat("a", "j1", draining=True), sat("b", "j2", used=1, inflight=1))
    assert a.step(Bus(0, 0, 0.0, done), jobs, 72.0) == [Cancel("j1")]
    assert a.step(Bus(0, 0, 0.0, done), jobs, 73.0) == []  # asked once
    assert a.step(Bus(0, 0, 0.0, done[1:]), {"j2": RUNNING}, 74.0) == []  # gone from the scheduler: forgotten
    assert set(a.jobs) == {"j2"}


def test_min_jobs_stay_and_an_idle_job_waits_while_work_waits() -> None:
    a = Autoscaler(Limits(max_jobs=3, min_jobs=1, idle_timeout=1.0, wait_bound=100.0, cores_per_satellite=4))
    assert a.step(Bus(0, 0, 0.0), {}, 0.0) == [Submit(1)]  # the minimum, with nothing to do
    a.submitted(["j1"], 1)
    idle = (sat("s1", "j1"),)
    for t in range(1, 10):
        assert a.step(Bus(0, 0, 0.0, idle), {"j1": RUNNING}, float(t)) == []  # never below min_jobs


def test_a_job_that_ends_while_work_remains_is_replaced() -> None:
    a = Autoscaler(Limits(max_jobs=1, wait_bound=5.0, cores_per_satellite=4))
    a.adopt({"j1": RUNNING})
    busy = (sat("s1", "j1", used=4, inflight=4),)
    assert a.step(Bus(4, 4, 1.0, busy), {"j1": RUNNING}, 0.0) == []  # at max_jobs
    assert a.step(Bus(8, 8, 1.0), {}, 1.0) == [Submit(1)]  # the job ended (walltime, a node lost): replaced


def test_after_a_restart_the_jobs_of_its_tag_are_adopted_and_none_submitted_twice() -> None:
    a = Autoscaler(Limits(max_jobs=2, cores_per_satellite=4))
    a.adopt({"j1": RUNNING, "j2": PENDING})
    assert a.step(Bus(50, 50, 100.0, (sat("s1", "j1", used=4, inflight=4),)), {"j1": RUNNING, "j2": PENDING},
                  0.0) == []  # two live jobs: max_jobs


@pytest.mark.parametrize("seed", range(20))
def test_max_jobs_is_never_passed(seed: int) -> None:
    rng = random.Random(seed)
    limits = Limits(max_jobs=rng.randint(1, 5), min_jobs=0, satellites_per_job=rng.randint(1, 3),
                    cores_per_satellite=rng.randint(1, 8), wait_bound=rng.choice([0.0, 5.0]),
                    idle_timeout=rng.choice([1.0, 30.0]))
    a = Autoscaler(limits)
    scheduler: dict[str, str] = {}
    sats: list[Satellite] = []
    n = 0
    for step in range(300):
        now = float(step)
        queued = rng.choice([0, 0, 5, 50, 500])
        for d in a.step(Bus(queued, queued, rng.uniform(0, 20), tuple(sats)), dict(scheduler), now):
            if isinstance(d, Submit):
                if rng.random() < 0.2:
                    a.refused(d.count, now)
                    continue
                ids = []
                for _ in range(d.count):
                    n += 1
                    ids.append(f"j{n}")
                    scheduler[f"j{n}"] = PENDING
                a.submitted(ids, d.count)
            elif isinstance(d, Cancel):
                scheduler.pop(d.job, None)
                sats = [s for s in sats if s.job != d.job]
        for job, state in list(scheduler.items()):  # the scheduler starts jobs, and ends some
            if state == PENDING and rng.random() < 0.5:
                scheduler[job] = RUNNING
                sats += [sat(f"{job}-{i}", job, cores=limits.cores_per_satellite)
                         for i in range(limits.satellites_per_job)]
            elif state == RUNNING and rng.random() < 0.02:
                del scheduler[job]
                sats = [s for s in sats if s.job != job]
        assert len(scheduler) <= limits.max_jobs, (step, scheduler)
    assert ENDED not in scheduler.values()


def test_limits_are_checked() -> None:
    for bad in ({"max_jobs": 0}, {"max_jobs": 2, "min_jobs": 3}, {"max_jobs": 1, "satellites_per_job": 0},
                {"max_jobs": 1, "wait_bound": float("nan")}, {"max_jobs": 1, "idle_timeout": -1.0}):
        with pytest.raises(ValueError):
            Limits(**bad)  # type: ignore[arg-type]


def test_a_job_none_of_whose_satellites_joins_is_cancelled_after_the_start_timeout() -> None:
    a = Autoscaler(Limits(max_jobs=1, start_timeout=60.0, wait_bound=0.0))
    a.submitted(["j1"], 1, 0.0)
    waiting = Bus(4, 4, 30.0)
    assert a.step(waiting, {"j1": RUNNING}, 10.0) == []  # running, no satellite yet: it may still be starting
    assert a.step(waiting, {"j1": RUNNING}, 69.0) == []
    assert a.step(waiting, {"j1": RUNNING}, 70.0) == [Cancel("j1")]  # its script cannot reach the bus
    assert a.step(waiting, {}, 71.0) == []  # gone: replaced while work waits, after the back-off (10 s)
    assert a.step(waiting, {}, 81.0) == [Submit(1)]
    a.submitted(["j2"], 1, 81.0)
    assert a.step(Bus(4, 4, 30.0, (sat("s2", "j2"),)), {"j2": RUNNING}, 82.0) == []
    assert a.step(waiting, {"j2": RUNNING}, 200.0) == []  # (its satellite went: the clock starts again)


def test_a_failed_cancellation_is_asked_for_again() -> None:
    a = Autoscaler(Limits(max_jobs=2, idle_timeout=5.0))
    a.adopt({"j1": RUNNING, "j2": RUNNING}, 0.0)
    idle = Bus(0, 0, 0.0, (sat("s1", "j1"), sat("s2", "j2")))
    a.step(idle, {"j1": RUNNING, "j2": RUNNING}, 0.0)
    out = a.step(idle, {"j1": RUNNING, "j2": RUNNING}, 6.0)
    assert sorted(map(str, out)) == sorted(map(str, [Drain("s1"), Drain("s2")]))
    drained = Bus(0, 0, 0.0, (sat("s1", "j1", draining=True), sat("s2", "j2", draining=True)))
    assert a.step(drained, {"j1": RUNNING, "j2": RUNNING}, 7.0) == [Cancel("j1"), Cancel("j2")]
    a.cancel_failed("j2")  # scancel failed for j2
    assert a.step(drained, {"j1": RUNNING, "j2": RUNNING}, 8.0) == [Cancel("j2")]
    assert a.live == 2  # cancelled jobs count until the scheduler drops them: max_jobs bounds what it lists
    assert [(j, s) for j, s, _ in a.report(9.0)] == [("j1", "ending"), ("j2", "ending")]


def test_a_satellite_whose_allocation_ends_before_the_declared_work_is_no_capacity() -> None:
    a = Autoscaler(Limits(max_jobs=4, cores_per_satellite=4, wait_bound=0.0))
    a.adopt({"j1": RUNNING})
    ending = (Satellite("s1", "j1", 4, 0, 0, walltime_left=120.0),)
    short = Bus(4, 4, 1.0, ending, queued_work=4 * 60.0)  # one minute each: the satellite's 2 minutes do
    assert short.mean_duration == 60.0
    assert a.step(short, {"j1": RUNNING}, 0.0) == []
    long = Bus(4, 4, 1.0, ending, queued_work=4 * 600.0)  # ten minutes each: they cannot run there
    assert a.step(long, {"j1": RUNNING}, 1.0) == [Submit(1)]
    assert Bus(4, 4, 1.0).mean_duration == 0.0  # no declared duration: every satellite counts


def test_the_report_says_each_job_and_how_long_ago_it_was_submitted() -> None:
    a = Autoscaler(Limits(max_jobs=3))
    a.submitted(["j1"], 1, 10.0)
    a.adopt({"j2": RUNNING}, 12.0)
    assert a.report(15.0) == [("j1", PENDING, 5.0), ("j2", RUNNING, 3.0)]
    a.step(Bus(0, 0, 0.0), {"j2": RUNNING}, 16.0)  # j1 no longer listed: ended
    assert a.report(17.0) == [("j2", RUNNING, 5.0)] and ENDED not in {s for _, s, _ in a.report(17.0)}


def test_a_job_listed_under_our_name_that_we_did_not_know_is_ours() -> None:
    """sbatch timed out after Slurm queued the job: the job is listed, and counted against max_jobs."""
    a = Autoscaler(Limits(max_jobs=2, wait_bound=0.0))
    waiting = Bus(20, 20, 5.0)
    assert a.step(waiting, {}, 0.0) == [Submit(2)]
    a.submitted(["j1"], 1, 0.0)
    a.refused(1, 0.0)  # the second sbatch's answer was lost, but the job was queued
    assert a.step(waiting, {"j1": PENDING, "j2": PENDING}, 20.0) == []  # j2 adopted: two, the most
    assert a.live == 2 and {j for j, _, _ in a.report(21.0)} == {"j1", "j2"}


def test_a_satellite_with_many_cores_and_few_free_slots_is_little_capacity() -> None:
    a = Autoscaler(Limits(max_jobs=4, cores_per_satellite=2, wait_bound=0.0))
    login = (Satellite("login", None, 64, 2, 2, slots_free=0),)  # 64 cores, two workers, both busy
    assert a.step(Bus(40, 40, 60.0, login), {}, 0.0) == [Submit(4)]  # its 62 idle cores take no task
    b = Autoscaler(Limits(max_jobs=4, cores_per_satellite=2, wait_bound=0.0))
    one_slot = (Satellite("login", None, 64, 2, 2, slots_free=1),)
    assert b.step(Bus(3, 6, 60.0, one_slot), {}, 0.0) == [Submit(2)]  # one slot: one task of two cores


def test_running_jobs_whose_satellites_have_not_joined_yet_are_capacity_on_its_way() -> None:
    a = Autoscaler(Limits(max_jobs=8, cores_per_satellite=2, wait_bound=0.0))
    waiting = Bus(8, 8, 5.0)
    assert a.step(waiting, {}, 0.0) == [Submit(4)]
    a.submitted(["j1", "j2", "j3", "j4"], 4, 0.0)
    running = {"j1": RUNNING, "j2": RUNNING, "j3": RUNNING, "j4": RUNNING}
    for t in (1.0, 2.0, 3.0):  # starting: no satellite yet, and no more jobs asked for meanwhile
        assert a.step(waiting, running, t) == []


def test_jobs_idle_while_work_waits_that_they_cannot_run_are_given_back_and_submissions_back_off() -> None:
    a = Autoscaler(Limits(max_jobs=2, cores_per_satellite=8, idle_timeout=60.0, backoff=100.0, wait_bound=0.0))
    a.adopt({"j1": RUNNING, "j2": RUNNING}, 0.0)
    idle = (sat("s1", "j1", cores=8), sat("s2", "j2", cores=8))
    wide = Bus(1, 64, 10.0, idle)  # one task of 64 cores: no job of ours can run it
    jobs = {"j1": RUNNING, "j2": RUNNING}
    assert a.step(wide, jobs, 0.0) == []
    assert a.step(Bus(1, 64, 50.0, idle), jobs, 59.0) == []  # idle, but the work has not waited long yet
    out = a.step(Bus(1, 64, 70.0, idle), jobs, 60.0)
    assert sorted(d.sid for d in out if isinstance(d, Drain)) == ["s1", "s2"]
    assert all("cannot run" in d.reason for d in out if isinstance(d, Drain))
    assert a.not_before == 160.0  # and no new job of the same kind for a while


def test_a_drain_that_did_not_take_is_sent_again_and_nothing_is_cancelled_meanwhile() -> None:
    a = Autoscaler(Limits(max_jobs=1, idle_timeout=5.0))
    a.adopt({"j1": RUNNING}, 0.0)
    idle = Bus(0, 0, 0.0, (sat("s1", "j1"),))
    a.step(idle, {"j1": RUNNING}, 0.0)
    assert a.step(idle, {"j1": RUNNING}, 6.0) == [Drain("s1")]
    # the drain was lost: the satellite still takes work; cancelling now could kill a task sent meanwhile
    assert a.step(idle, {"j1": RUNNING}, 7.0) == [Drain("s1")]
    drained = Bus(0, 0, 0.0, (sat("s1", "j1", draining=True),))
    assert a.step(drained, {"j1": RUNNING}, 8.0) == [Cancel("j1")]


def test_thousands_of_refusals_in_a_row_stay_at_the_longest_back_off() -> None:
    """2 ** 1024 is no float: the doubling stops at backoff_max without overflowing (it used to raise)."""
    from orchester.batch.policy import backoff_delay

    a = Autoscaler(Limits(max_jobs=1, backoff=0.1, backoff_max=0.1))
    for i in range(3000):
        a.refused(0, float(i))
    assert a.not_before == pytest.approx(2999.1)
    assert backoff_delay(10.0, 600.0, 1) == 10.0 and backoff_delay(10.0, 600.0, 10_000) == 600.0
