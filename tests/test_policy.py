"""Routing strategies, the timer heap, result retention and configuration (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchester.config import ConfigError, OrchestratorConfig, from_mapping, load_toml
from orchester.server.fleet import SatelliteRecord
from orchester.server.results import ResultStore
from orchester.server.routing import LeastLoaded, RoundRobin, TagAffinity, make_strategy
from orchester.server.tasks import Task, TaskQueues
from tracker import TaskState, TimerWheel


def sat(sid: str, slots: int = 4, inflight: int = 0, tags: tuple[str, ...] = (), last: int = 0) -> SatelliteRecord:
    s = SatelliteRecord(sid, sid.encode(), None, slots, frozenset(tags), frozenset({"k"}), 0.0)
    for i in range(inflight):
        s.inflight[f"{sid}-{i}"] = None  # type: ignore[assignment]
    s.last_dispatch = last
    return s


def task(tags: tuple[str, ...] = (), priority: int = 0, seq: int = 0) -> Task:
    return Task(f"t{seq}", "k", priority, frozenset(tags), b"c", None, b"", [], 0.0, seq, 0)


class StrategyContract:
    """Every strategy returns one of the candidates, whatever they are."""

    strategy: object

    @pytest.mark.parametrize("n", [1, 2, 5])
    def test_returns_a_candidate(self, n: int) -> None:
        cands = [sat(f"s{i}", inflight=i % 3, last=i) for i in range(n)]
        assert self.strategy.choose(task(), cands) in cands  # type: ignore[attr-defined]


class TestLeastLoaded(StrategyContract):
    strategy = LeastLoaded()

    def test_picks_lowest_ratio_then_least_recent(self) -> None:
        a, b, c = sat("a", 4, 2, last=1), sat("b", 8, 2, last=5), sat("c", 8, 2, last=3)
        assert self.strategy.choose(task(), [a, b, c]) is c


class TestRoundRobin(StrategyContract):
    strategy = RoundRobin()

    def test_cycles_by_last_dispatch(self) -> None:
        sats = [sat("a", last=3), sat("b", last=1), sat("c", last=2)]
        order = []
        for seq in range(4, 10):
            s = self.strategy.choose(task(), sats)
            s.last_dispatch = seq
            order.append(s.sid)
        assert order == ["b", "c", "a", "b", "c", "a"]


class TestTagAffinity(StrategyContract):
    strategy = TagAffinity()

    def test_prefers_fewest_unrequested_tags(self) -> None:
        general = sat("general", tags=("genx", "gpu", "big"))
        special = sat("special", tags=("genx",), inflight=3)
        assert self.strategy.choose(task(("genx",)), [general, special]) is special


def test_make_strategy_by_name_and_import_path() -> None:
    assert make_strategy("round_robin").name == "round_robin"
    assert make_strategy("orchester.server.routing:TagAffinity").name == "tags"
    for bad in ("nope", "no.such.module:X", "orchester.server.routing:Nope", "builtins:object"):
        with pytest.raises(ValueError):
            make_strategy(bad)


def test_queues_order_and_lazy_removal() -> None:
    q = TaskQueues()
    tasks = [task(priority=p, seq=i) for i, p in enumerate([0, 2, 0, 2, 1])]
    for t in tasks:
        q.push(t)
    tasks[1].state = TaskState.CANCELLED
    key = ("k", frozenset(), 1, 0)
    order = []
    while q.head(key) is not None:
        order.append(q.pop(key).seq)
    assert order == [3, 4, 0, 2]
    assert len(q) == 0 and q.best_key() is None


def test_timer_heap_fires_in_order_and_cancels() -> None:
    h: TimerWheel[str] = TimerWheel()
    timers = {k: h.schedule(d, k) for k, d in (("c", 3.0), ("a", 1.0), ("b", 2.0), ("x", 1.5))}
    h.cancel(timers["x"])
    h.cancel(timers["x"])
    assert len(h) == 3 and h.next_deadline() == 1.0
    assert h.pop_expired(0.5) == []
    assert [t.key for t in h.pop_expired(2.0)] == ["a", "b"]
    assert [t.key for t in h.pop_expired(10.0, limit=5)] == ["c"]
    assert len(h) == 0 and h.next_deadline() is None


def test_timer_heap_expires_many_at_once() -> None:
    h: TimerWheel[int] = TimerWheel()
    for i in range(10_000):
        h.schedule(float(i % 100), i)
    assert len(h.pop_expired(1e9)) == 10_000


def test_result_store_bounds_by_count_and_bytes() -> None:
    r = ResultStore(max_results=3, max_bytes=100)
    for i in range(3):
        r.put(f"t{i}", [b"x"], 10, delivered=True)
    assert r.trim() == []
    r.put("t3", [b"x"], 10)  # not yet handed over: kept before delivered ones
    assert r.trim() == ["t0"]
    r.mark("t3", True)
    r.mark("t1", False)
    r.put("big", [b"x"], 80, delivered=True)
    assert r.trim() == ["t2"]  # count bound
    assert set(r.undelivered()) == {"t1"} and r.bytes == 100
    r.put("big2", [b"x"], 95)
    assert r.trim() == ["t3", "big", "t1"]  # delivered ones go first
    assert r.dropped_undelivered == 1 and r.get("big2") is not None
    assert r.pop("big2") is not None and len(r) == 0 and r.bytes == 0


def test_config_validation_and_toml(tmp_path: Path) -> None:
    assert OrchestratorConfig().validate().strategy == "least_loaded"
    for bad in ({"liveness": 0}, {"heartbeat_interval": -1}, {"bind": []}, {"bind": ["nowhere"]},
                {"max_queue": True}):
        with pytest.raises(ConfigError):
            OrchestratorConfig(**bad).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        from_mapping(OrchestratorConfig, {"colour": "red"})
    good = tmp_path / "c.toml"
    good.write_text('[serve]\nliveness = 5\nbind = ["tcp://127.0.0.1:7000"]\n')
    cfg = from_mapping(OrchestratorConfig, load_toml(good)["serve"])
    assert cfg.liveness == 5 and cfg.bind == ["tcp://127.0.0.1:7000"]
    garbage = tmp_path / "g.toml"
    garbage.write_bytes(b"\x00[[[ not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(garbage)
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(tmp_path / "missing.toml")
