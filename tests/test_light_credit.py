"""Light credit: a satellite's light kinds take credit of their own, beside its slots (``docs/protocol.rst``,
REGISTER ``inline`` and ``light``).

The orchestrator's core, driven with in-memory messages and a fake clock (:class:`test_core.Harness`). After
every step the fleet's running sums (free slots, free light credit) are checked against a count made from
scratch, so an update missed anywhere shows at once.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_core import C, Harness, S, dispatched_ids, of

from orchester.server.fleet import LIGHT_SCAN, SatelliteRecord
from serializers import ProtocolError, unpack
from serializers import messages as M
from serializers import protocol as P
from tracker import SatelliteEvent, SatelliteState, TaskState

KINDS = ["echo", "echo.inline"]


def register(h: Harness, sid: str = "s1", slots: int = 1, light: int = 3, inline: tuple[str, ...] = ("echo.inline",),
             tags: tuple[str, ...] = (), kinds: list[str] = KINDS) -> bytes:
    ident = f"id-{sid}".encode()
    hdr: dict[str, Any] = {"sid": sid, "slots": slots, "kinds": kinds, "tags": list(tags), "inline": list(inline)}
    if light:
        hdr["light"] = light
    h.send(S, ident, P.REGISTER, hdr)
    return ident


def check_sums(h: Harness) -> None:
    """The fleet's running sums are what a count from scratch gives."""
    fleet = h.core.state.fleet
    free_light = 0
    for sat in fleet.by_id.values():
        assert sat.light <= set(sat.inflight)
        assert sat.used == sum(t.cores for tid, t in sat.inflight.items() if tid not in sat.light)
        takes = (sat.light_credit > 0 and sat.credit > 0 and sat.state.accepts_work
                 and sat.state is not SatelliteState.PROBATION)
        if takes:
            free_light += max(0, sat.light_credit - len(sat.light))
    assert fleet.free_light == free_light
    assert fleet.free_slots == sum(s.free for s in fleet.by_id.values())


def rec(h: Harness, sid: str = "s1") -> SatelliteRecord:
    return h.core.state.fleet.by_id[sid]


def test_light_tasks_take_light_credit_beside_the_slots() -> None:
    h = Harness()
    sat = register(h, slots=1, light=3)
    h.tick()
    h.submit("heavy")  # takes the one slot
    for i in range(5):
        h.submit(f"l{i}", kind="echo.inline")
    out = h.tick()
    assert dispatched_ids(out) == ["heavy", "l0", "l1", "l2"]  # the slot, then three light credits
    r = rec(h)
    assert r.light == {"l0", "l1", "l2"} and r.heavy == 1 and r.used == 1 and r.free == 0
    check_sums(h)
    h.done(sat, "l1")
    out = h.tick()
    assert dispatched_ids(out) == ["l3"]  # its light credit back: the next light task, not a slot
    h.done(sat, "heavy")
    h.submit("heavy2")
    out = h.tick()
    # the slot back: a light task waiting first takes it (light credit full), then heavy2 waits for a slot
    assert dispatched_ids(out) == ["l4"] and rec(h).heavy == 1
    check_sums(h)
    for tid in ("l0", "l2", "l3"):
        h.done(sat, tid)
    out = h.tick()
    assert dispatched_ids(out) == []  # a heavy task never takes a light credit
    h.done(sat, "l4")
    out = h.tick()
    assert dispatched_ids(out) == ["heavy2"]
    assert h.core.state.tasks["l4"].state is TaskState.DONE
    check_sums(h)


def test_without_light_credit_light_kinds_take_slots_as_before() -> None:
    h = Harness()
    register(h, slots=2, light=0)
    h.tick()
    for i in range(4):
        h.submit(f"l{i}", kind="echo.inline")
    assert dispatched_ids(h.tick()) == ["l0", "l1"]
    assert rec(h).light == set() and h.core.state.fleet.free_light == 0
    check_sums(h)


@pytest.mark.parametrize("extra", [{"cr": 2}, {"mem": 1 << 20}, {"dur": 5.0}, {"kind": "echo"},
                                   {"tg": ["gpu"]}])
def test_a_task_that_is_not_light_here_takes_a_slot(extra: dict[str, Any]) -> None:
    h = Harness()
    register(h, slots=1, light=4, tags=())
    h.send(S, b"id-s1", P.HEARTBEAT, {"sid": "s1"})
    h.tick()
    kind = extra.pop("kind", "echo.inline")
    h.submit("blocker")  # the slot taken: only a light credit is free
    h.submit("t", kind=kind, **extra)
    out = h.tick()
    assert dispatched_ids(out) == ["blocker"]
    assert rec(h).light == set()
    check_sums(h)


def test_light_tasks_go_to_the_satellites_with_light_credit_in_turn() -> None:
    h = Harness()
    a, b = register(h, "a", slots=1, light=10), register(h, "b", slots=1, light=10)
    h.tick()
    for i in range(6):
        h.submit(f"l{i}", kind="echo.inline")
    out = h.tick()
    to = {f[0]: [] for f in of(out, P.DISPATCH)}
    for f in of(out, P.DISPATCH):
        to[f[0]].append(unpack(f[3])["id"])
    assert sorted(map(len, to.values())) == [3, 3] and set(to) == {a, b}
    check_sums(h)


def test_satellites_on_probation_silent_or_draining_get_no_light_task() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=3)
    register(h, slots=1, light=5)
    h.tick()
    r = rec(h)
    h.core.life.sat_to(r, SatelliteEvent.demote, h.now, "test")
    assert r.state is SatelliteState.PROBATION
    h.submit("l0", kind="echo.inline")
    out = h.tick()
    assert dispatched_ids(out) == ["l0"] and r.light == set()  # a slot, as any task on probation
    check_sums(h)
    h.core.life.sat_to(r, SatelliteEvent.promote, h.now, "test")
    h.submit("l1", kind="echo.inline")
    assert dispatched_ids(h.tick()) == ["l1"] and r.light == {"l1"}
    check_sums(h)
    h.send(C, b"ops", P.CONTROL, {"op": "drain", "sid": "s1", "rid": 1})
    h.submit("l2", kind="echo.inline")
    assert dispatched_ids(h.tick()) == [] and h.core.state.fleet.free_light == 0
    check_sums(h)


def test_a_silent_satellite_gets_no_light_task_and_a_lost_one_gives_its_light_tasks_back() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=3)
    register(h, "a", slots=1, light=5)
    h.tick()
    for i in range(3):
        h.submit(f"l{i}", kind="echo.inline")
    assert dispatched_ids(h.tick()) == ["l0", "l1", "l2"]
    h.tick(2.5)  # silent (two heartbeats)
    assert rec(h, "a").state is SatelliteState.SILENT and h.core.state.fleet.free_light == 0
    h.submit("l3", kind="echo.inline")
    assert dispatched_ids(h.tick()) == []
    check_sums(h)
    h.tick(1.0)  # lost: its three light tasks wait again
    assert "a" not in h.core.state.fleet.by_id and h.core.state.fleet.free_light == 0
    b = register(h, "b", slots=1, light=5)
    sent: list[list[Any]] = []
    for _ in range(40):  # (a task whose satellite was lost waits a moment before it runs again)
        sent += of(h.tick(0.25), P.DISPATCH)
        h.send(S, b, P.HEARTBEAT, {"sid": "b"})
    assert sorted(unpack(f[3])["id"] for f in sent) == ["l0", "l1", "l2", "l3"]
    assert all(f[0] == b for f in sent) and rec(h, "b").light == {"l0", "l1", "l2", "l3"}
    check_sums(h)


def test_a_satellite_registering_again_takes_its_light_tasks_back_as_light() -> None:
    h = Harness()
    register(h, slots=1, light=2)
    h.tick()
    h.submit("l0", kind="echo.inline")
    h.submit("h0")
    assert dispatched_ids(h.tick()) == ["l0", "h0"]
    # a new connection (a new routing id) claims both back: each goes where it was
    h.send(S, b"id-s1-new", P.REGISTER, {"sid": "s1", "slots": 1, "kinds": KINDS, "inline": ["echo.inline"],
                                         "light": 2, "running": [["l0", 1], ["h0", 1]]})
    h.tick()
    r = rec(h)
    assert set(r.inflight) == {"l0", "h0"} and r.light == {"l0"} and r.heavy == 1
    check_sums(h)


def test_a_large_fleet_keeps_routing_slots_by_rank_while_light_tasks_come_and_go() -> None:
    h = Harness()
    idents = [register(h, f"s{i:02d}", slots=2, light=3) for i in range(20)]
    h.tick()
    assert h.core.state.fleet.ranked  # (20 satellites: slots go by the strategy's heaps)
    rng = random.Random(7)
    running: dict[str, bytes] = {}
    n = 0
    for _ in range(200):
        for _ in range(rng.randrange(0, 6)):
            h.submit(f"t{n}", kind=rng.choice(KINDS))
            n += 1
        out = h.tick()
        for f in of(out, P.DISPATCH):
            running[unpack(f[3])["id"]] = f[0]
        for tid in rng.sample(sorted(running), k=min(len(running), rng.randrange(0, 8))):
            h.done(running.pop(tid), tid)
        check_sums(h)
    for _ in range(50):  # everything finishes: every task ran, once
        out = h.tick()
        for f in of(out, P.DISPATCH):
            running[unpack(f[3])["id"]] = f[0]
        for tid in sorted(running):
            h.done(running.pop(tid), tid)
    check_sums(h)
    states = {t.state for t in h.core.state.tasks.values()}
    assert states == {TaskState.DONE} and len(h.core.state.tasks) == n
    assert h.core.state.fleet.free_light == 20 * 3 and h.core.state.fleet.free_slots == 20 * 2
    assert len(idents) == 20


def test_a_light_task_with_tags_looks_at_a_bounded_number_of_satellites() -> None:
    h = Harness()
    for i in range(LIGHT_SCAN + 2):
        register(h, f"s{i:03d}", slots=1, light=1)
    register(h, "tagged", slots=1, light=1, tags=("gpu",))
    h.tick()
    for i in range(LIGHT_SCAN + 3):
        h.submit(f"b{i}")  # every slot taken
    h.tick()
    h.submit("g", kind="echo.inline", tg=["gpu"])
    out = h.tick()
    # past the first LIGHT_SCAN satellites with light credit: it waits for a slot (never a scan of the fleet)
    assert dispatched_ids(out) == []
    check_sums(h)


def test_status_says_each_satellites_light_credit_and_the_fleets() -> None:
    h = Harness()
    register(h, slots=1, light=3)
    h.tick()
    h.submit("l0", kind="echo.inline")
    h.tick()
    h.send(C, b"cli", P.STATUS, {"rid": 1})
    body = unpack(of(h.tick(), P.REPLY)[0][3], 2**24)
    sat = body["satellites"][0]
    assert sat["inline"] == ["echo.inline"] and sat["light"] == 3 and sat["light_inflight"] == 1
    assert body["fleet"]["light"] == 3 and body["fleet"]["light_free"] == 2 and body["fleet"]["light_inflight"] == 1


@pytest.mark.parametrize("hdr, why", [
    ({"inline": ["other"]}, "of kinds"),
    ({"inline": "echo.inline"}, "inline"),
    ({"inline": [""]}, "inline"),
    ({"light": -1}, "light"),
    ({"light": 1.5}, "light"),
    ({"light": True}, "light"),
    ({"light": M.MAX_LIGHT + 1}, "light"),
    ({"light": float("nan")}, "light"),
])
def test_a_register_with_bad_light_fields_is_refused_whole(hdr: dict[str, Any], why: str) -> None:
    base = {"sid": "s1", "slots": 1, "kinds": KINDS}
    with pytest.raises(ProtocolError) as e:
        M.Register.decode({**base, **hdr})
    assert e.value.code == P.E_MALFORMED and why in str(e.value)
    h = Harness()
    h.send(S, b"id-s1", P.REGISTER, {**base, **hdr})
    assert "s1" not in h.core.state.fleet.by_id and of(h.tick(), P.ERROR)


def test_register_light_fields_round_trip_and_stay_out_when_unused() -> None:
    reg = M.Register(sid="s", slots=2, kinds=("a", "b"), inline=("b",), light=64)
    assert M.Register.decode(reg.header()) == reg
    plain = M.Register(sid="s", slots=2, kinds=("a",)).header()
    assert "inline" not in plain and "light" not in plain


def test_light_credit_is_cut_to_max_slots() -> None:
    h = Harness(max_slots=4)
    register(h, slots=1, light=1000)
    h.tick()
    assert rec(h).light_credit == 4
    check_sums(h)



@pytest.mark.parametrize("light", [0, 5])
def test_a_lost_dispatch_is_found_while_light_tasks_run(light: int) -> None:
    """A heavy task whose DISPATCH never arrived is rerouted after ``--dispatch-timeout``, light tasks running
    beside it or not: they keep no worker busy (a start timer is put off only while every worker is busy)."""
    h = Harness(dispatch_timeout=5.0)
    sat = b"id-s1"
    h.send(S, sat, P.REGISTER, {"sid": "s1", "slots": 1, "workers": 1, "kinds": KINDS, "inline": ["echo.inline"],
                                "light": light})
    h.tick()
    h.submit("h0")  # its DISPATCH is lost: the satellite never starts it
    assert dispatched_ids(h.tick()) == ["h0"]
    n = 0
    for _ in range(30):  # 15 s of light traffic: a light task running at any time
        h.submit(f"l{n}", kind="echo.inline")
        n += 1
        for tid in dispatched_ids(h.tick(0.5)):
            if tid.startswith("l"):
                h.send(S, sat, P.STARTED, {"t": [[tid, 1]]})
        for tid in [t for t in rec(h).inflight if t.startswith("l")][:-1]:
            h.done(sat, tid)
        h.send(S, sat, P.HEARTBEAT, {"sid": "s1"})
        check_sums(h)
    assert h.core.state.tasks["h0"].attempt >= 2 and h.core.state.counters["stalled"] >= 1


def test_with_only_light_credit_free_the_keys_that_cannot_go_light_are_set_aside_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot taken, light credit free, hundreds of queues (tasks differing by memory) that cannot go light: a
    dispatch pass looks at each queue a bounded number of times, not once per other queue."""
    from orchester.server.tasks import TaskQueues

    h = Harness()
    register(h, slots=1, light=128)
    h.tick()
    h.submit("blocker")
    h.tick()
    for i in range(300):
        h.submit(f"m{i}", mem=(i + 1) * 1024)
    h.submit("l0", kind="echo.inline")
    calls = []
    best_key = TaskQueues.best_key

    def counted(self: TaskQueues, *args: Any, **kw: Any) -> Any:
        calls.append(1)
        return best_key(self, *args, **kw)

    monkeypatch.setattr(TaskQueues, "best_key", counted)
    assert dispatched_ids(h.tick()) == ["l0"]
    assert len(calls) <= 3
    check_sums(h)


def test_a_satellite_indexes_at_most_max_inline_light_kinds() -> None:
    from orchester.server.fleet import MAX_INLINE

    h = Harness()
    kinds = [f"k{i:04d}" for i in range(1000)]
    register(h, slots=1, light=1, inline=tuple(kinds), kinds=kinds)
    h.tick()
    assert rec(h).inline == frozenset(kinds[:MAX_INLINE])
    h.submit("first", kind="k0000")
    h.submit("past", kind="k0999")  # not indexed as light here: it takes the slot
    out = h.tick()
    assert dispatched_ids(out) == ["first", "past"] and rec(h).light == {"first"} and rec(h).heavy == 1
    check_sums(h)


def test_top_shows_light_tasks_beside_the_slots() -> None:
    from rich.console import Console

    from orchester.cli.top import fleet_table, load_cell

    assert load_cell({"inflight": 12, "light_inflight": 9, "credit": 4}) == "3/4 +9 light"
    assert load_cell({"inflight": 2, "credit": 4}) == "2/4"  # (an orchestrator of before: no light fields)
    assert load_cell({"inflight": "x", "light_inflight": -5, "slots": 4}) == "?/4"  # forged: nothing believed
    console = Console(width=100, record=True)
    console.print(fleet_table({"satellites": 2, "hosts": 1, "inflight": 130, "credit": 18, "light": 256,
                               "light_inflight": 128, "cores": 4, "cores_used": 2}))
    text = console.export_text()
    assert "2/18" in text and "128/256" in text and "light tasks" in text
