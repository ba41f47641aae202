"""The tracker: machines as data, every cell of their tables, and every timeout with a fake clock."""

from __future__ import annotations

import itertools

import pytest
from test_core import C, Harness, dispatched_ids, of
from transitions import Machine, MachineError

from serializers import encode, pack, unpack
from serializers import protocol as P
from tracker import (
    SATELLITE_MACHINE,
    TASK_MACHINE,
    InvalidTransition,
    ProbationPolicy,
    RetryPolicy,
    SatelliteState,
    TaskState,
)


class Model:
    state: str


@pytest.mark.parametrize("compiled", [TASK_MACHINE, SATELLITE_MACHINE], ids=["task", "satellite"])
def test_every_cell_of_the_compiled_table_matches_the_transitions_declaration(compiled) -> None:  # type: ignore[no-untyped-def]
    for state, event in itertools.product(compiled.states, compiled.events):
        model = Model()
        Machine(model=model, states=[s.name for s in compiled.states], initial=state.name, auto_transitions=False,
                transitions=[{"trigger": e.name, "source": [s.name for s in src], "dest": d.name}
                             for e, src, d in compiled.transitions])
        try:
            getattr(model, event.name)()
            expected = compiled.states[model.state]
        except MachineError:
            expected = None
        if expected is None:
            assert not compiled.allows(state, event)
            with pytest.raises(InvalidTransition):
                compiled.next(state, event)
        else:
            assert compiled.next(state, event) is expected, (state, event)


def test_terminal_states_have_no_way_out() -> None:
    for state in TaskState:
        if state.terminal:
            assert not any(TASK_MACHINE.allows(state, e) for e in TASK_MACHINE.events)
    assert SatelliteState.LEFT not in [s for _, src, _ in SATELLITE_MACHINE.transitions for s in src]


def test_every_state_is_reachable_and_documented() -> None:
    for compiled in (TASK_MACHINE, SATELLITE_MACHINE):
        reachable = {compiled.initial, *compiled.entries} | {d for _, _, d in compiled.transitions}
        assert reachable == set(compiled.states)
        rst = compiled.rst_table()
        assert all(f"``{e.name}``" in rst for e in compiled.events)


def test_docs_hold_the_current_tables() -> None:
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "tracker.rst")
    with open(path) as f:
        text = f.read()
    assert TASK_MACHINE.rst_table() in text and SATELLITE_MACHINE.rst_table() in text, \
        "docs/tracker.rst is out of date: run python -m tracker.doc"


def test_policies() -> None:
    r = RetryPolicy(budget=3, backoff=0.5, max_backoff=1.5)
    assert [r.delay(n) for n in range(5)] == [0.0, 0.5, 1.0, 1.5, 1.5]
    assert not r.quarantine(2) and r.quarantine(3)
    p = ProbationPolicy(demote_after=2, drain_after=4, promote_after=1)
    assert not p.demote(1) and p.demote(2) and p.drain(4) and p.promote(1)
    assert ProbationPolicy.credits(5) == 2 and ProbationPolicy.credits(1) == 1


def register_progress(h: Harness, sid: str = "s1", slots: int = 2, stall: float = 5.0) -> bytes:
    ident = f"id-{sid}".encode()
    h.send("sat", ident, P.REGISTER, {"sid": sid, "slots": slots, "kinds": ["echo", "scan"],
                                      "progress": {"scan": stall}})
    return ident


def started(h: Harness, ident: bytes, *pairs: tuple[str, int]) -> None:
    h.send("sat", ident, P.STARTED, {"t": [list(p) for p in pairs]})


def test_started_moves_dispatched_to_running() -> None:
    h = Harness()
    sat = h.register()
    h.submit("t")
    h.tick()
    assert h.core.state.tasks["t"].state is TaskState.DISPATCHED
    started(h, sat, ("t", 2), ("nope", 1))  # wrong attempt and unknown ids are ignored
    assert h.core.state.tasks["t"].state is TaskState.DISPATCHED
    started(h, sat, ("t", 1))
    assert h.core.state.tasks["t"].state is TaskState.RUNNING
    h.send("sat", sat, P.STARTED, {"t": ["bad"]})
    assert unpack(of(h.tick(), P.ERROR)[0][3])["code"] == P.E_MALFORMED


def test_dispatch_timeout_stalls_and_reroutes() -> None:
    h = Harness(dispatch_timeout=10.0, retry_backoff=0)
    a = h.register("a", slots=1)
    h.submit("t")
    h.tick()
    b = h.register("b", slots=1)
    for _ in range(10):
        h.send("sat", a, P.HEARTBEAT, {"sid": "a"})
        h.send("sat", b, P.HEARTBEAT, {"sid": "b"})
        out = h.tick(1.01)
    assert of(out, P.ABORT)[0][0] == a  # the satellite is told to drop it
    d = of(out, P.DISPATCH)
    assert d[0][0] == b and unpack(d[0][3]) == {"id": "t", "a": 2}
    # not started with a free worker: the satellite's fault (blamed), not a crash of the task
    assert h.core.state.tasks["t"].crashes == 0 and h.core.state.counters["stalled"] == 1
    assert h.core.state.fleet.by_id["a"].fail_streak == 1


def test_a_prefetched_task_waits_for_a_busy_worker_without_stalling() -> None:
    """With every worker busy, a dispatched task waits its turn however long (it is not a crash)."""
    h = Harness(dispatch_timeout=1.0, heartbeat_interval=100.0)
    h.send("sat", b"id-a", P.REGISTER, {"sid": "a", "slots": 2, "workers": 1, "kinds": ["echo"]})
    h.submit("long")
    h.submit("next")
    h.tick()
    h.send("sat", b"id-a", P.STARTED, {"t": [["long", 1]]})
    for _ in range(10):
        h.tick(1.0)
    assert h.core.state.tasks["next"].state is TaskState.DISPATCHED and h.core.state.counters["stalled"] == 0


def test_progress_stall_timeout_only_for_kinds_that_report_progress() -> None:
    h = Harness(retry_backoff=0, heartbeat_interval=5.0, liveness=10)
    sat = register_progress(h, stall=5.0)
    h.submit("quiet", kind="echo")
    h.submit("scanning", kind="scan")
    h.tick()
    started(h, sat, ("quiet", 1), ("scanning", 1))
    for _ in range(3):  # progress keeps it alive
        h.tick(4.0)
        h.send("sat", sat, P.PROGRESS, {"id": "scanning", "a": 1, "done": 1})
        h.send("sat", sat, P.HEARTBEAT, {"sid": "s1"})
    assert h.core.state.tasks["scanning"].state is TaskState.RUNNING
    h.tick(5.1)
    assert h.core.state.tasks["scanning"].crashes == 1  # stalled, rerouted (here: to the same satellite)
    assert h.core.state.tasks["scanning"].attempt == 2
    assert h.core.state.tasks["quiet"].state is TaskState.RUNNING  # no progress expected from it
    assert any(a["state"] == "stalled" and "no progress for 5s" in a["reason"]
               for a in h.core.life.attempts(h.core.state.tasks["scanning"]))


def test_configured_stall_timeout_overrides_the_kinds() -> None:
    h = Harness(stall_timeout=2.0, retry_backoff=0)
    sat = register_progress(h, stall=50.0)
    h.submit("s", kind="scan")
    h.tick()
    started(h, sat, ("s", 1))
    h.tick(1.0)
    h.send("sat", sat, P.HEARTBEAT, {"sid": "s1"})
    h.tick(1.1)
    assert h.core.state.tasks["s"].crashes == 1


def test_max_run_time_fails_and_kills() -> None:
    h = Harness()
    sat = h.register()
    _, body = encode([[1], {}])
    h.send("cli", b"c", P.SUBMIT, {"id": "long", "k": "echo", "mr": 3.0}, *body)
    h.tick()
    started(h, sat, ("long", 1))
    h.tick(2.0)
    h.send("sat", sat, P.HEARTBEAT, {"sid": "s1"})
    out = h.tick(1.1)
    assert of(out, P.ABORT)[0][0] == sat
    assert unpack(of(out, P.RESULT)[0][3])["err"]["type"] == P.ERR_MAX_RUN
    assert h.core.state.tasks["long"].state is TaskState.FAILED


def test_queue_ttl_expires_a_task_nobody_can_run() -> None:
    h = Harness(queue_ttl=30.0)
    h.register(slots=4)
    _, body = encode([[1], {}])
    h.send("cli", b"c", P.SUBMIT, {"id": "gpu", "k": "echo", "tg": ["gpu"], "ttl": 5.0}, *body)
    h.submit("default-ttl", tg=["gpu"])
    h.submit("fine")
    out = h.tick()
    assert dispatched_ids(out) == ["fine"]
    h.send("sat", b"id-s1", P.HEARTBEAT, {"sid": "s1"})
    out = h.tick(5.1)
    err = unpack(of(out, P.RESULT)[0][3])["err"]
    assert err["type"] == P.ERR_EXPIRED and "no satellite offers kind 'echo' with tags ['gpu']" in err["msg"]
    assert h.core.state.tasks["gpu"].state is TaskState.EXPIRED
    assert h.core.state.tasks["default-ttl"].state is TaskState.PENDING
    for _ in range(5):
        h.send("sat", b"id-s1", P.HEARTBEAT, {"sid": "s1"})
        h.tick(5.0)
    assert h.core.state.tasks["default-ttl"].state is TaskState.EXPIRED and h.core.state.counters["expired"] == 2


def test_retry_backoff_doubles() -> None:
    h = Harness(retry_backoff=1.0, retries=5, heartbeat_interval=100.0)
    sat = h.register("a", slots=1)
    h.submit("t")
    times = []
    for _ in range(4):
        for _ in range(200):
            out = h.tick(0.05)
            if dispatched_ids(out):
                times.append(round(h.now, 2))
                h.done(sat, "t", attempt=len(times), ok=False, etype=P.ERR_WORKER_DIED)  # a crash
                break
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # each gap: the back-off (1 s, then 2 s, then 4 s), to a tick (0.05 s)
    assert gaps == [pytest.approx(1.0, abs=0.15), pytest.approx(2.0, abs=0.15), pytest.approx(4.0, abs=0.15)]


def test_silent_satellite_gets_no_work_until_heard() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=5)
    sat = h.register("a", slots=2)
    h.tick()
    h.tick(2.5)
    assert h.core.state.fleet.by_id["a"].state is SatelliteState.SILENT
    h.submit("t")
    assert not dispatched_ids(h.tick())
    h.send("sat", sat, P.HEARTBEAT, {"sid": "a"})
    out = h.tick()
    assert h.core.state.fleet.by_id["a"].state is SatelliteState.BUSY and dispatched_ids(out) == ["t"]


def test_probation_halves_credit_then_drains_then_promotes() -> None:
    died = {"ok": False, "etype": P.ERR_WORKER_DIED}  # a worker crash is the satellite's fault
    h = Harness(probation_after=2, drain_after=4, retries=1, probation_cooldown=30.0, heartbeat_interval=100.0)
    sat = h.register("a", slots=4)
    h.tick()
    rec = h.core.state.fleet.by_id["a"]
    for i in range(2):
        h.submit(f"f{i}")
        h.tick()
        h.done(sat, f"f{i}", **died)
    assert rec.state is SatelliteState.PROBATION and rec.credit == 2
    for i in range(4):
        h.submit(f"w{i}")
    assert len(dispatched_ids(h.tick())) == 2  # half credit
    for i in range(2):
        h.done(sat, f"w{i}", **died)
    h.tick()
    assert rec.state is SatelliteState.DRAINING and rec.credit == 0
    assert not dispatched_ids(h.tick())
    h.tick(29.0)
    assert rec.state is SatelliteState.DRAINING
    out = h.tick(1.5)  # the cool-down is over: on probation again, and it gets work
    assert rec.state in (SatelliteState.PROBATION,) and rec.credit == 2
    assert dispatched_ids(out) == ["w2", "w3"]
    h2 = Harness(probation_after=1, retries=1)
    s2 = h2.register("b", slots=2)
    h2.submit("x")
    h2.tick()
    h2.done(s2, "x", **died)
    assert h2.core.state.fleet.by_id["b"].state is SatelliteState.PROBATION
    for i in range(3):
        h2.submit(f"ok{i}")
        h2.tick()
        h2.done(s2, f"ok{i}")
    assert h2.core.state.fleet.by_id["b"].state is SatelliteState.IDLE and h2.core.state.fleet.by_id["b"].credit == 2


def test_task_exceptions_never_put_a_satellite_on_probation() -> None:
    """A submit key sending tasks that raise cannot drain the fleet (issue 14, finding 8)."""
    h = Harness(probation_after=2, drain_after=4)
    sat = h.register("a", slots=4)
    h.tick()
    for i in range(20):
        h.submit(f"fail{i}")
        h.tick()
        h.done(sat, f"fail{i}", ok=False, etype="RuntimeError")
    rec = h.core.state.fleet.by_id["a"]
    assert rec.state is SatelliteState.IDLE and rec.credit == 4
    assert h.core.state.counters["failed"] == 20


def test_an_operator_drain_is_for_good() -> None:
    h = Harness(probation_cooldown=1.0, heartbeat_interval=10.0)
    h.register("a")
    h.tick()
    h.send(C, b"ops", P.CONTROL, {"op": "drain", "sid": "a", "rid": 1})
    h.tick(5.0)
    assert h.core.state.fleet.by_id["a"].state is SatelliteState.DRAINING


def test_satellite_events_are_published() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=3)
    h.core.subscription(b"\x01sat:")
    h.register("a")
    h.tick(2.5)
    h.tick(1.0)
    states = [unpack(f[1])["state"] for f in h.core.outbox.events if f[0] == b"sat:a"]
    assert states == ["idle", "silent", "lost"]


def test_show_reports_history(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    sat = h.register()
    h.submit("t")
    h.tick()
    started(h, sat, ("t", 1))
    h.done(sat, "t")
    h.send("cli", b"c", P.STATUS, {"rid": 1, "task": "t"})
    task = unpack(of(h.tick(), P.REPLY)[0][3])["task"]
    assert task["state"] == "done" and [a["state"] for a in task["history"]] == \
        ["pending", "dispatched", "running", "done"]
    assert task["history"][1]["sat"] == "s1" and task["history"][0]["t"] == 1234.5
    h.send("cli", b"c", P.STATUS, {"rid": 2, "task": "nope"})
    assert unpack(of(h.tick(), P.ERROR)[0][3])["code"] == P.E_UNKNOWN_TASK


def test_late_result_after_a_reroute_is_discarded() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=2, retry_backoff=0)
    a = h.register("a", slots=1)
    h.submit("t")
    h.tick()
    b = h.register("b", slots=1)
    for _ in range(3):
        h.send("sat", b, P.HEARTBEAT, {"sid": "b"})
        h.tick(1.0)
    assert "a" not in h.core.state.fleet.by_id
    h.done(b, "t", attempt=2)
    assert len(of(h.tick(), P.RESULT)) == 1
    h.send("sat", a, P.REGISTER, {"sid": "a", "slots": 1, "kinds": ["echo"]})  # wakes up (SIGCONT)
    h.done(a, "t", attempt=1)
    assert not of(h.tick(), P.RESULT) and h.core.state.counters["stale_results"] == 1
    _ = pack


def test_tasks_with_a_duration_go_only_where_the_allocation_lasts() -> None:
    h = Harness()
    h.send("sat", b"id-short", P.REGISTER, {"sid": "short", "slots": 4, "kinds": ["echo"], "walltime": 100.0})
    h.send("sat", b"id-long", P.REGISTER, {"sid": "long", "slots": 1, "kinds": ["echo"], "walltime": 3600.0})
    _, body = encode([[1], {}])
    h.send("cli", b"c", P.SUBMIT, {"id": "big", "k": "echo", "dur": 1000.0}, *body)
    h.send("cli", b"c", P.SUBMIT, {"id": "huge", "k": "echo", "dur": 7200.0}, *body)
    h.submit("quick")
    out = h.tick()
    where = {unpack(f[3])["id"]: f[0] for f in of(out, P.DISPATCH)}
    assert where["big"] == b"id-long" and where["quick"] == b"id-short" and "huge" not in where
    st = h.core.requests.status(h.now)
    assert {s["id"]: s["walltime_left"] for s in st["satellites"]} == {"short": 100.0, "long": 3600.0}
