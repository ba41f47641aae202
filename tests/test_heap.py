"""The heap keeper: long-lived objects frozen out of the cyclic collector's way, and why that is safe
(the orchestrator's task tables make no reference cycles)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator

import msgpack
import pytest

from orchester.config import OrchestratorConfig
from orchester.server.core import Orchestrator
from orchester.server.heap import HeapKeeper
from serializers import encode, pack
from serializers import protocol as P


class FakeCollector:
    """What HeapKeeper asks of :mod:`gc`, recorded."""

    def __init__(self, frozen: int = 0, found: int = 0) -> None:
        self.frozen = frozen
        self.found = found
        self.calls: list[str] = []

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def collect(self) -> int:
        self.calls.append("collect")
        return self.found

    def get_freeze_count(self) -> int:
        return self.frozen


def test_objects_are_frozen_once_per_interval() -> None:
    fake = FakeCollector()
    keeper = HeapKeeper(0.0, collector=fake, freeze_every=0.1, full_every=600.0)
    for t in (0.01, 0.05, 0.09):
        keeper.tick(t)
    assert fake.calls == []
    keeper.tick(0.1)
    keeper.tick(0.15)
    assert fake.calls == ["freeze"] and keeper.counters["gc_freezes"] == 1
    keeper.tick(0.2)
    assert fake.calls == ["freeze", "freeze"]


def test_a_full_pass_runs_when_due_and_small_enough_and_waits_otherwise() -> None:
    counters: Counter[str] = Counter()
    fake = FakeCollector(frozen=5_000, found=3)
    keeper = HeapKeeper(0.0, counters, collector=fake, freeze_every=1.0, full_every=10.0, full_limit=10_000)
    keeper.tick(10.0)
    assert fake.calls == ["unfreeze", "collect", "freeze"]
    assert counters["gc_full_passes"] == 1 and counters["gc_cycles_found"] == 3
    fake.calls.clear()
    fake.frozen = 50_000  # a big table: the pass would be long, it waits for the next period
    keeper.tick(20.0)
    assert "collect" not in fake.calls and counters["gc_full_deferred"] == 1
    fake.frozen = 100
    keeper.tick(25.0)
    assert "collect" not in fake.calls  # not due yet
    keeper.tick(30.0)
    assert "collect" in fake.calls and counters["gc_full_passes"] == 2


def test_a_restored_table_is_frozen_at_once() -> None:
    fake = FakeCollector()
    keeper = HeapKeeper(0.0, collector=fake, freeze_every=1.0)
    keeper.settled(0.5)
    assert fake.calls == ["freeze"]
    keeper.tick(1.0)  # the next freeze counts from the settlement
    assert fake.calls == ["freeze"]
    keeper.tick(1.5)
    assert fake.calls == ["freeze", "freeze"]


@pytest.fixture
def collector_paused() -> Iterator[None]:
    """Python's collector off for the test (and everything given back to it after)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def test_the_task_tables_leave_no_cycle_behind(collector_paused: None) -> None:
    """What makes freezing safe: tasks submitted, dispatched, finished and dropped by the result
    retention are freed by reference counting alone; the collector finds nothing left of them."""
    core = Orchestrator(OrchestratorConfig(result_retention=50), 0.0)
    core.handle("s", [b"sat", P.SIGNATURE, P.REGISTER, pack({"sid": "s1", "slots": 100, "kinds": ["echo"]})], 0.0)
    _, body = encode([[1], {}])
    gc.collect()
    now, done = 0.0, 0
    for r in range(10):
        for i in range(200):
            core.handle("c", [b"cli", P.SIGNATURE, P.SUBMIT, pack({"id": f"t{r}-{i}", "k": "echo", "c": "msgpack"}),
                              *body], now)
        for _ in range(5):
            core.housekeeping(now)
            for _, frames, _ in core.outbox.take_messages():
                if frames[2] == P.DISPATCH:
                    order = msgpack.unpackb(frames[3])
                    core.handle("s", [b"sat", P.SIGNATURE, P.DONE, pack(
                        {"id": order["id"], "a": order["a"], "ok": True, "sat": "s1", "c": "msgpack"}), b"\x01"], now)
                    done += 1
            core.outbox.take_records()
            core.outbox.take_events()
            now += 0.01
    assert done == 2_000 and len(core.state.tasks) <= 50
    assert gc.collect() == 0


def test_the_keeper_freezes_for_real(collector_paused: None) -> None:
    keeper = HeapKeeper(0.0)
    table = {f"t{i}": [i, {"a": i}] for i in range(1_000)}
    keeper.settled(0.0)
    assert gc.get_freeze_count() >= len(table)
    keeper.release()
    assert gc.get_freeze_count() == 0
