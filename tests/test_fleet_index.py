"""The fleet's indexes, kept up to date on each change instead of rebuilt by a scan: the free credit of all
satellites together, the satellites eligible for each queue key, the kinds offered. A random walk of
registrations, tasks, results, silences, losses, drains, departures and crashes through the real core
checks after every step that each index equals what a scan of the fleet gives."""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_core import C, Harness, of
from test_workflows_core import register_cores

from orchester.server.fleet import Fleet, SatelliteRecord
from serializers import encode, pack, unpack
from serializers import protocol as P
from tracker import SatelliteState

KINDS = ("echo", "a", "b")
TAGS = ("x", "y")


def check(h: Harness) -> None:
    fleet = h.core.state.fleet
    sats = list(fleet.by_id.values())
    assert fleet.free_slots == sum(s.free for s in sats)
    for key in list(fleet._eligible):
        assert set(fleet.eligible(key)) == {s for s in sats if s.can_run(key) and s.state.accepts_work}, key
    assert fleet.kinds() == frozenset(k for s in sats for k in s.kinds)
    assert set(fleet.by_ident.values()) == set(sats)
    order = list(fleet.by_silence)
    assert set(order) == set(sats) and len(order) == len(sats)
    assert [s.last_seen for s in order] == sorted(s.last_seen for s in order)  # heard from longest ago first
    assert set(fleet.draining) == {s for s in sats if s.state is SatelliteState.DRAINING}
    rank = fleet.rank
    for key, heap in list(fleet._heaps.items()):  # every ready eligible satellite has an entry of its rank now
        assert rank is not None
        ready = {s for s in fleet.eligible(key) if len(s.inflight) < s.credit}
        assert {sat for r, _, sat in heap if sat in ready and rank(sat, key) == r} == ready, key
        cands = [s for s in fleet.eligible(key) if len(s.inflight) < s.credit and s.used < s.capacity
                 and s.reserved is None]
        best = fleet.best(key, lambda s: s.used < s.capacity and s.reserved is None)
        if not cands:
            assert best is None
        else:  # what the strategy would choose of the same candidates (of equal rank, at a tie)
            assert best is not None and rank(best, key) == min(rank(s, key) for s in cands)


def walk(seed: int, steps: int = 250, strategy: str = "least_loaded") -> None:
    rng = random.Random(seed)
    h = Harness(probation_after=2, drain_after=4, dispatch_timeout=5.0, strategy=strategy)
    h.core.state.fleet.heap_from = 0 if seed % 2 == 0 else 6  # heaps from the first satellite, or from a few
    sids: list[str] = []
    n = 0
    for _ in range(steps):
        action = rng.random()
        if action < 0.12 or not sids:  # a satellite registers (or registers again)
            sid = rng.choice(sids) if sids and rng.random() < 0.3 else f"s{len(sids)}"
            if sid not in sids:
                sids.append(sid)
            kinds = rng.sample(KINDS, rng.randint(1, 3))
            tags = rng.sample(TAGS, rng.randint(0, 2))
            h.send("sat", f"id-{sid}".encode(), P.REGISTER, {"sid": sid, "slots": rng.randint(1, 3),
                                                             "kinds": kinds, "tags": tags,
                                                             "cores": rng.randint(1, 4)})
        elif action < 0.45:  # a task
            n += 1
            _, body = encode([[n], {}])
            hdr: dict[str, Any] = {"id": f"t{n}", "k": rng.choice(KINDS), "c": "msgpack"}
            if rng.random() < 0.3:
                hdr["tg"] = rng.sample(TAGS, 1)
            if rng.random() < 0.2:
                hdr["cr"] = rng.randint(1, 3)
            h.send(C, b"cli", P.SUBMIT, hdr, *body)
        elif action < 0.75:  # a satellite ends one of its tasks, well or badly
            busy = [s for s in h.core.state.fleet.by_id.values() if s.inflight]
            if busy:
                sat = rng.choice(busy)
                task = rng.choice(list(sat.inflight.values()))
                ok = rng.random() < 0.8
                hdr = {"id": task.id, "a": task.attempt, "ok": ok, "c": "msgpack"}
                if not ok:
                    hdr["err"] = {"type": "WorkerDied" if rng.random() < 0.5 else "ValueError", "msg": "x", "tb": ""}
                h.send("sat", sat.ident, P.DONE, hdr, pack(None))
        elif action < 0.85:  # a heartbeat
            sid = rng.choice(sids)
            h.send("sat", f"id-{sid}".encode(), P.HEARTBEAT, {"sid": sid})
        elif action < 0.9:  # a satellite leaves
            sid = rng.choice(sids)
            h.send("sat", f"id-{sid}".encode(), P.LEAVE, {"sid": sid})
        elif action < 0.93:  # an operator drains one
            sid = rng.choice(sids)
            h.send(C, b"ops", P.CONTROL, {"op": "drain", "sid": sid, "rid": 1})
        h.tick(rng.choice((0.0, 0.0, 0.5, 1.5, 4.0)))  # time: silences, losses, timeouts
        check(h)
    assert h.core.state.counters["handler_errors"] == 0 and h.core.state.counters["timer_errors"] == 0


@pytest.mark.parametrize("strategy", ["least_loaded", "round_robin", "tags"])
@pytest.mark.parametrize("seed", range(20))
def test_the_fleet_indexes_equal_a_scan_after_every_step(seed: int, strategy: str) -> None:
    walk(seed, strategy=strategy)


def test_a_registration_changes_no_other_satellites_entry() -> None:
    """What a registration costs does not grow with the fleet: the index gains one entry per key asked for."""
    h = Harness()
    for i in range(200):
        register_cores(h, f"s{i}", 1)
    h.tick()
    fleet = h.core.state.fleet
    key = ("echo", frozenset(), 1, 0)
    assert len(fleet.eligible(key)) == 200 and fleet.free_slots == 200
    register_cores(h, "late", 2)
    assert len(fleet.eligible(key)) == 201 and fleet.free_slots == 202
    h.send("sat", b"id-late", P.LEAVE, {"sid": "late"})
    h.tick()
    assert len(fleet.eligible(key)) == 200 and fleet.free_slots == 200
    check(h)


def test_a_fleet_asked_for_ever_new_keys_starts_its_index_again() -> None:
    fleet = Fleet()
    sat = SatelliteRecord("s", b"s", None, 1, frozenset(), frozenset({"echo"}), 0.0)
    sat.state = SatelliteState.IDLE
    fleet.add(sat)
    for i in range(Fleet.MAX_KEYS + 5):
        fleet.eligible(("echo", frozenset({f"t{i}"}), 1, 0))
    assert len(fleet._eligible) <= Fleet.MAX_KEYS
    assert list(fleet.eligible(("echo", frozenset(), 1, 0))) == [sat]


def test_unknown_kinds_are_refused_by_the_index_of_kinds() -> None:
    h = Harness()
    h.register("s1", kinds=("echo",))
    h.tick()
    _, body = encode([[1], {}])
    h.send(C, b"cli", P.SUBMIT, {"id": "t", "k": "nope", "c": "msgpack"}, *body)
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert errors and errors[0]["code"] == P.E_UNKNOWN_KIND


class FewestDone:
    """A strategy of one's own with a rank (as docs/routing.rst shows): served from the index."""

    name = "fewest_done"

    def choose(self, task: Any, candidates: Any) -> Any:
        return min(candidates, key=lambda s: self.rank(s, task.queue_key))

    @staticmethod
    def rank(sat: Any, key: Any) -> tuple[Any, ...]:
        return (sat.done, sat.last_dispatch)


class NoRank:
    name = "no_rank"

    def __init__(self) -> None:
        self.asked = 0

    def choose(self, task: Any, candidates: Any) -> Any:
        self.asked += 1
        return candidates[-1]


def test_a_strategy_of_ones_own_is_served_from_the_index_with_a_rank_and_asked_without() -> None:
    h = Harness()
    for sid in ("a", "b", "c"):
        register_cores(h, sid, 4)
    h.tick()
    h.core.state.strategy = FewestDone()
    fleet = h.core.state.fleet
    fleet.heap_from = 0
    assert fleet.rank is not None
    fleet.by_id["a"].done, fleet.by_id["b"].done, fleet.by_id["c"].done = 5, 0, 3
    h.submit("t1")
    assert [unpack(f[3], 2**20)["id"] for f in of(h.tick(), P.DISPATCH)] == ["t1"]
    assert fleet.by_id["b"].inflight and not fleet.by_id["a"].inflight  # the fewest done
    h.core.state.strategy = strategy = NoRank()
    assert fleet.rank is None and not fleet._heaps
    h.submit("t2")
    h.tick()
    assert strategy.asked == 1  # no rank: choose() gets the candidates
    check(h)


def test_silence_is_counted_up_to_the_last_time_the_server_read_everything() -> None:
    """A satellite is never lost because the orchestrator was busy, or had its messages still unread."""
    h = Harness()  # heartbeat 1 s, liveness 3: lost after 3 s of silence
    h.register("s1")
    h.tick()
    state = h.core.state
    state.read_until = h.now  # everything read until now; then a backlog: nothing read for 10 s
    h.tick(10.0)
    assert "s1" in state.fleet.by_id and state.fleet.by_id["s1"].state is SatelliteState.IDLE
    state.read_until = h.now  # read everything at last, and nothing came from s1: now it is silent for 10 s
    h.tick(0.01)
    assert "s1" not in state.fleet.by_id and state.counters["satellites_lost"] == 1


def test_only_the_satellites_heard_from_longest_ago_are_looked_at() -> None:
    h = Harness()
    for i in range(50):
        h.register(f"s{i}")
    h.tick()
    h.tick(1.0)
    for i in range(1, 50):  # all but s0 speak
        h.send("sat", f"id-s{i}".encode(), P.HEARTBEAT, {"sid": f"s{i}"})
    fleet = h.core.state.fleet
    assert next(iter(fleet.by_silence)).sid == "s0"
    h.tick(1.5)  # 2.5 s for s0: silent (after 2 s); the others 1.5 s
    assert fleet.by_id["s0"].state is SatelliteState.SILENT
    assert all(fleet.by_id[f"s{i}"].state is SatelliteState.IDLE for i in range(1, 50))
    check(h)


def test_a_keys_satellite_ids_are_bounded_oldest_unregistered_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from test_hardening_core import _keyed

    import orchester.server.core as core_module

    monkeypatch.setattr(core_module, "MAX_SIDS_PER_KEY", 5)
    h = Harness()
    _keyed(h)
    state = h.core.state
    for i in range(8):  # eight satellite ids of one key, each leaving before the next comes
        h.core.handle("sat", [f"id-{i}".encode(), P.SIGNATURE, P.REGISTER,
                              pack({"sid": f"s{i}", "slots": 1, "kinds": ["echo"]})], h.now, "node")
        h.core.handle("sat", [f"id-{i}".encode(), P.SIGNATURE, P.LEAVE, pack({"sid": f"s{i}"})], h.now, "node")
        h.tick()
    assert list(state.key_sids["node"]) == ["s3", "s4", "s5", "s6", "s7"]  # the newest kept, the oldest forgotten
    assert set(state.key_sids["node"]) == set(state.sat_keys)
