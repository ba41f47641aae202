"""A passive catching up with a large table: the snapshot goes out over several wake-ups.

Two :class:`~orchester.ha.pair.Pair` halves on real ``ipc://`` sockets, each driven the way the
broker drives it (drain, tick, stream); the cores are real, only the client sockets are absent.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from orchester.config import OrchestratorConfig
from orchester.ha import pair as pair_module
from orchester.ha import resync
from orchester.ha.pair import Pair
from orchester.ha.star import HAState
from orchester.journal.records import BARRIER
from orchester.server.core import Orchestrator
from orchester.server.ports import Ports
from serializers import pack
from serializers import protocol as P

N = 3000


class Server:
    """One server of the pair, without its client sockets."""

    def __init__(self, ctx: zmq.Context[Any], primary: bool, mine: str, peer: str) -> None:
        cfg = OrchestratorConfig(ha="primary" if primary else "backup", state_bind=mine, peer=peer,
                                 ha_heartbeat=0.5)
        self.core = Orchestrator(cfg, time.monotonic(), ports=Ports(journal=True))
        self.seq = 0
        self.pair = Pair(cfg, ctx, self.core, "router", time.monotonic(), None, lambda: self.seq)

    def fill(self, n: int) -> None:
        """Submit ``t0`` ... ``t{n-1}``."""
        for i in range(n):
            self.submit(f"t{i}")

    def submit(self, tid: str) -> None:
        self.core.handle("c", [b"client", P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": "echo"}), b"x" * 100],
                         time.monotonic())

    def wake(self) -> None:
        now = time.monotonic()
        self.pair.apply(self.pair.drain(now), now)
        self.pair.tick(now)
        for record in self.core.outbox.records:
            self.seq += 1
            self.pair.replicate(self.seq, record)
        self.core.outbox.records.clear()
        self.pair.flush()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    ctx: zmq.Context[Any] = zmq.Context()
    a_ep, b_ep = f"ipc://{tmp_path}/a.state", f"ipc://{tmp_path}/b.state"
    a = Server(ctx, True, a_ep, b_ep)
    b = Server(ctx, False, b_ep, a_ep)
    try:
        yield a, b
    finally:
        a.pair.close()
        b.pair.close()
        ctx.term()


def run_until(a: Server, b: Server, done: Any, seconds: float = 30.0, each: Any = None) -> int:
    """Wake both servers until ``done()``; returns the number of rounds (bounded in count and time)."""
    deadline = time.monotonic() + seconds
    for rounds in range(1, 200_000):
        a.wake()
        b.wake()
        if each is not None:
            each()
        if done():
            return rounds
        assert time.monotonic() < deadline, "the pair did not get there in time"
        time.sleep(0.001)
    raise AssertionError("too many rounds")


def in_sync(a: Server, b: Server) -> bool:
    leader, follower = a.pair.leader, b.pair.follower
    return leader is not None and leader.synced and follower is not None and follower.stream == a.core.state.epoch \
        and follower.applied == a.seq


def outgoing(a: Server) -> resync.OutgoingSnapshot | None:
    """The snapshot ``a`` is sending, if any."""
    leader = a.pair.leader
    return leader.outgoing if leader is not None else None


def test_a_large_snapshot_is_sent_over_several_wake_ups_and_the_stream_follows_it(
        servers: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resync, "SLICE", 0.0)  # one chunk per wake-up
    a, b = servers
    a.fill(N)
    during: list[int] = []

    def submit_during_the_snapshot() -> None:
        out = outgoing(a)
        if out is not None:
            during.append(out.index)
            if len(during) == 2:  # records journaled while the snapshot is on its way
                for j in range(10):
                    a.submit(f"late{j}")

    run_until(a, b, lambda: in_sync(a, b), each=submit_during_the_snapshot)
    assert a.pair.state is HAState.ACTIVE and b.pair.state is HAState.PASSIVE
    chunks = -(-(N + 1) // resync.SNAP_CHUNK)  # the tasks' submissions and a barrier
    # one chunk per wake-up (two in the first: the answer to SYNC, then the wake-up's slice)
    assert len(during) >= chunks - 2
    assert sorted(during) == during
    assert set(b.pair.fold.tasks) == {f"t{i}" for i in range(N)} | {f"late{j}" for j in range(10)}
    assert a.core.state.counters["ha_snapshots_sent"] == 1
    assert b.core.state.counters["ha_snapshots_received"] == 1
    assert b.core.state.counters["ha_stream_gaps"] == 0
    assert a.pair.replication_mode(time.monotonic()) == "sync"

    a.submit("after")  # and the stream goes on
    run_until(a, b, lambda: "after" in b.pair.fold.tasks and in_sync(a, b))


def test_a_chunk_lost_on_the_way_makes_the_passive_ask_again(
        servers: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resync, "SLICE", 0.0)
    monkeypatch.setattr(pair_module, "DRAIN_SLICE", 0.0)  # and the passive takes one message per wake-up
    a, b = servers
    a.fill(N)
    cut: list[int] = []

    def drop_the_third_chunk() -> None:
        out = outgoing(a)
        if out is not None and out.index == 2 and not cut:
            cut.append(1)
            a.pair.link_up = False  # the next wake-up's chunk is lost
        elif cut == [1]:
            cut.append(2)
            a.pair.link_up = True

    run_until(a, b, lambda: in_sync(a, b), each=drop_the_third_chunk)
    assert cut == [1, 2]
    assert b.core.state.counters["ha_stream_gaps"] >= 1
    assert a.core.state.counters["ha_snapshots_sent"] >= 2  # the broken one, then a whole one
    assert b.core.state.counters["ha_snapshots_received"] == 1
    assert len(b.pair.fold.tasks) == N


def test_records_of_the_wake_up_that_brings_sync_are_covered_once(servers: tuple[Server, Server]) -> None:
    a, b = servers
    a.fill(N)
    cancelled: list[str] = []

    def cancel_before_the_peer_link() -> None:
        # the broker reads clients before the peer link: a cancel handled in the wake-up that
        # drains SYNC changes the table before its record is numbered, at the end of the wake-up
        leader = a.pair.leader
        if leader is not None and not leader.streaming and len(cancelled) < N:
            tid = f"t{len(cancelled)}"
            a.core.handle("c", [b"client", P.SIGNATURE, P.CANCEL, pack({"id": tid})], time.monotonic())
            cancelled.append(tid)

    original = a.wake

    def wake() -> None:
        cancel_before_the_peer_link()
        original()

    a.wake = wake  # type: ignore[method-assign]
    run_until(a, b, lambda: in_sync(a, b))
    assert cancelled
    for tid, history in b.pair.fold.history.items():
        assert [r[1] for r in history.rows()] == [r[1] for r in a.core.state.tasks[tid].history.rows()], tid


def test_a_takeover_in_the_middle_of_a_snapshot_drops_it(
        servers: tuple[Server, Server], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resync, "SLICE", 0.0)
    monkeypatch.setattr(pair_module, "DRAIN_SLICE", 0.0)  # one message per wake-up: chunk 2 is seen
    a, b = servers
    a.fill(N)
    follower = b.pair.follower
    assert follower is not None
    run_until(a, b, lambda: follower.incoming is not None and follower.incoming.next >= 2)
    assert b.pair.promote(True, time.monotonic())["changed"]
    assert b.pair.follower is None and b.pair.leader is not None and b.pair.state is HAState.ACTIVE


def test_the_snapshot_describes_the_table_as_it_was_when_captured(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    a.submit("one")
    a.submit("two")
    out = resync.OutgoingSnapshot(a.core, 7)
    assert out.q == 7 and not out.done
    a.core.handle("c", [b"client", P.SIGNATURE, P.CANCEL, pack({"id": "two"})], time.monotonic())
    assert a.core.state.tasks["two"].state.terminal  # changed after the capture ...
    a.submit("three")  # ... and a task the capture does not know
    records = out.chunk()
    assert out.done
    assert records[0][0] == BARRIER
    assert [(r[0], r[1]) for r in records[1:]] == [("S", "one"), ("S", "two")]  # two as it was: pending
    payload = records[1][4]
    assert all(isinstance(f, memoryview) for f in payload) and bytes(payload[0]) == b"x" * 100
    fresh = resync.OutgoingSnapshot(a.core, 8)
    messages = list(fresh.messages("epoch", time.perf_counter))
    assert fresh.done and len(messages) == 1 and messages[0][0] == b"SNAP"
    kinds = [(r[0], r[1]) for r in (msgpack.unpackb(f, raw=False) for f in messages[0][2:])]
    assert kinds == [(BARRIER, ""), ("S", "one"), ("S", "two"), ("T", "two"), ("R", "two"), ("S", "three")]
