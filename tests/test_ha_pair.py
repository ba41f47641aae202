"""The pair as the adapter: one message in (the role and the table), the role switched at a takeover.

One :class:`~orchester.ha.pair.Pair` on ``inproc://`` sockets and a real core; the peer's
messages are handed to :meth:`~orchester.ha.pair.Pair.receive` as frames, and what the pair
sends is read from its PUB socket.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from orchester.config import OrchestratorConfig
from orchester.ha import link
from orchester.ha.follower import Follower
from orchester.ha.leader import Leader
from orchester.ha.pair import Pair
from orchester.ha.star import HAState
from orchester.server.core import Orchestrator
from orchester.server.ports import Ports
from serializers import pack

HB = 1.0
PEER = "feedfacefeedface"


@pytest.fixture
def pair() -> Iterator[tuple[Pair, zmq.Socket[Any]]]:
    """A backup's half of a pair, and a SUB socket that hears what it sends."""
    ctx: zmq.Context[Any] = zmq.Context()
    cfg = OrchestratorConfig(ha="backup", state_bind="inproc://mine", peer="inproc://peer", ha_heartbeat=HB)
    core = Orchestrator(cfg, 0.0, wall=lambda: 1000.0, ports=Ports(journal=True))
    half = Pair(cfg, ctx, core, "router", 0.0, None, lambda: 0)
    spy = ctx.socket(zmq.SUB)
    spy.linger = 0
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.connect("inproc://mine")
    try:
        yield half, spy
    finally:
        spy.close()
        half.close()
        ctx.term()


def heard(spy: zmq.Socket[Any]) -> list[link.Message]:
    """Every message the pair sent since the last call."""
    out = []
    while spy.poll(100):
        out.append(link.decode(spy.recv_multipart()))
    return out


def test_a_state_message_goes_to_the_role_then_the_table(pair: tuple[Pair, zmq.Socket[Any]]) -> None:
    half, _ = pair
    active = link.encode_state(HAState.ACTIVE, "primary", PEER, 0, False)
    change = half.receive(active, 1.0)
    assert change is not None and change.after is HAState.PASSIVE and half.state is HAState.PASSIVE
    assert isinstance(half.role, Follower) and half.follower is half.role and half.leader is None
    assert half.receive(active, 1.1) is None  # nothing changes: the role follows, the table stays


def test_malformed_messages_are_counted_and_dropped_and_our_failures_are_counted_apart(
        pair: tuple[Pair, zmq.Socket[Any]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    half, _ = pair
    half.receive(link.encode_state(HAState.ACTIVE, "primary", PEER, 0, False), 1.0)
    assert half.receive([link.STATE, pack({"s": 3})], 1.5) is None
    assert half.counters["ha_bad_messages"] == 1 and half.star.peer_expiry == 1.0 + 2 * HB  # not heard

    def broken(message: link.Message, now: float) -> None:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(half.role, "receive", broken)
    half.core.strict = False  # (the suite runs strict: this test is about the boundary itself)
    with caplog.at_level(logging.ERROR, "orchester.ha"):
        assert half.receive(link.encode_records(PEER, 1, [link.pack_record(["Z", "", 0.0])]), 2.0) is None
    assert half.counters["handler_errors"] == 1 and half.counters["ha_bad_messages"] == 1
    assert "a Records message on the peer link could not be handled" in caplog.text
    assert "RuntimeError: a bug of ours" in caplog.text  # with its traceback
    half.core.strict = True
    with pytest.raises(RuntimeError, match="a bug of ours"):
        half.receive(link.encode_records(PEER, 1, [link.pack_record(["Z", "", 0.0])]), 2.0)


def test_a_takeover_installs_the_fold_and_the_role_becomes_a_leader(pair: tuple[Pair, zmq.Socket[Any]]) -> None:
    half, spy = pair
    half.fold.add(["S", "t0", b"c", pack({"id": "t0", "k": "echo"}), [b"x"], 1.0, None])
    assert half.describe(0.0)["replication"] == "none"
    assert half.promote(False, 0.0) == {"state": "active", "changed": True}
    assert isinstance(half.role, Leader) and half.follower is None and half.leader is half.role
    assert "t0" in half.core.state.tasks
    with pytest.raises(RuntimeError, match="follows no one"):
        half.fold  # noqa: B018
    status = half.describe(0.0)
    assert list(status) == ["state", "role", "peer", "peer_alive", "replication", "seq", "stream", "applied", "acked",
                            "alarms"]
    assert status["state"] == "active" and status["replication"] == "local"
    assert half.gate(0.0) is None  # no one follows: replication does not gate

    half.tick(0.0)  # its heartbeat says it is active and streams to no one
    (state,) = heard(spy)
    assert state == link.State(HAState.ACTIVE, "backup", half.epoch, 0, False)
    half.receive(link.encode_sync(PEER), 0.5)  # the passive asks: a snapshot, then the stream
    snap = heard(spy)
    assert [type(m) for m in snap] == [link.SnapChunk] and snap[0].last  # type: ignore[union-attr]
    assert half.next_wakeup(0.5) == pytest.approx(0.5)  # the next heartbeat (the snapshot went in one slice)


def test_the_passive_heartbeat_repeats_its_acknowledgement(pair: tuple[Pair, zmq.Socket[Any]]) -> None:
    half, spy = pair
    half.receive(link.encode_state(HAState.ACTIVE, "primary", PEER, 0, False), 0.0)
    half.receive(link.encode_snap(PEER, 4, 0, True, [link.pack_record(["Z", "", 0.0])]), 0.0)
    half.tick(0.0)
    messages = heard(spy)
    assert link.State(HAState.PASSIVE, "backup", half.epoch, 0, False, stream=PEER, acked=0) in messages
    assert link.Ack(PEER, 4) in messages
    half.tick(HB)
    assert heard(spy) == [link.State(HAState.PASSIVE, "backup", half.epoch, 0, False, stream=PEER, acked=4)]


def test_a_large_takeover_installs_a_slice_per_wake_up_and_keeps_the_waiting_peers(
        pair: tuple[Pair, zmq.Socket[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The table goes in a slice at a time; the messages that come meanwhile wait, in order, and each sender
    hears a HEARTBEAT once an interval; when the table is in, they are handled and the role is a Leader."""
    from orchester.ha import pair as pair_module
    from orchester.server.restore import Installation
    from serializers import protocol as P
    from serializers.header import unpack

    half, _ = pair
    n = 5000
    for i in range(n):
        half.fold.add(["S", f"t{i:05d}", b"c", pack({"id": f"t{i:05d}", "k": "echo"}), [b"x"], 1.0, None])
    monkeypatch.setattr(Installation, "CHUNK", 100)
    monkeypatch.setattr(pair_module, "INSTALL_SLICE", -1.0)  # one chunk per slice, whatever the clock says
    monkeypatch.setattr(pair_module, "RETIRE_AT_ONCE", 1000)  # (and the fold let go of in slices)
    assert half.promote(False, 0.0)["state"] == "active"
    assert half.installing is not None and half.installing.installed == 100 and half.follower is not None
    assert half.next_wakeup(0.0) == 0.0  # the loop goes round at once
    status = [P.SIGNATURE, P.STATUS, pack({"rid": 7})]
    submit = [P.SIGNATURE, P.SUBMIT, pack({"id": "t00003", "k": "echo", "c": "msgpack"}), b"\x91\xc0"]
    half.defer("router", [b"client-1", *status], None, 0.0)
    half.defer("router", [b"client-1", *submit], None, 0.0)  # a resend of one it holds: handled as one it holds
    half.core.outbox.take_messages()
    slices, beats = 1, []
    now = 0.0
    while half.installing is not None:
        now += 0.3
        half.install_step(now)
        slices += 1
        sent = half.core.outbox.take_messages()
        assert all(m[2] == P.HEARTBEAT for _, m, _ in sent)
        beats += [m for _, m, _ in sent]
        assert slices <= n // 100 + 1
    assert slices == n // 100 + 1  # (the last slice finds nothing more, then ends it)
    assert all(b[0] == b"client-1" and unpack(b[3])["e"] == half.core.state.epoch for b in beats)
    assert 10 <= len(beats) <= 16  # once an interval (1 s), not once per slice (0.3 s)
    assert isinstance(half.role, Leader) and len(half.core.state.tasks) == n
    assert half.holding and len(half.deferred) == 2  # what was held is handled from the next wake-up on
    half.replay_step(now)
    assert not half.holding and not half.deferred and half.deferred_bytes == 0
    fold = half.retiring
    assert fold is not None and len(fold.tasks) == n and half.next_wakeup(now) == 0.0
    half.retire_step()  # 4,096 entries, then the clock (past its slice) stops it
    assert half.retiring is fold and len(fold.tasks) == n - 4096 and len(half.core.state.tasks) == n
    for _ in range(5):  # (the rest of the tasks, then its histories, 4,096 entries a slice)
        half.retire_step()
        if half.retiring is None:
            break
    assert half.retiring is None and not fold.tasks and not fold.history
    replies = half.core.outbox.take_messages()
    kinds = [m[2] for _, m, _ in replies]
    assert kinds[0] == P.REPLY and unpack(replies[0][1][3])["rid"] == 7  # in the order they came
    counters = half.core.state.counters
    assert counters["duplicate_submits"] == 1 and counters["submitted"] == 0  # the resend: one it holds
    assert counters["ha_deferred"] == 2


def test_what_a_takeover_held_is_handled_a_slice_at_a_time_rated_as_it_came(
        pair: tuple[Pair, zmq.Socket[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The held messages go in slices, in order, the peers still waiting kept alive between slices; a
    sender's request rate counts each held message when it came, not when the held ones are handled."""
    from orchester.ha import pair as pair_module
    from serializers import protocol as P
    from serializers.header import unpack

    half, _ = pair
    half.fold.add(["S", "t0", b"c", pack({"id": "t0", "k": "echo"}), [b"x"], 1.0, None])
    monkeypatch.setattr(pair_module, "INSTALL_SLICE", -1.0)  # 64 messages per slice, whatever the clock says
    assert half.promote(False, 0.0)["state"] == "active" and half.installing is None  # small: at once
    rate = half.core.cfg.request_rate
    n = int(rate * 4)  # four seconds of statuses at the highest rate a client is allowed, held back
    for i in range(n):
        half.defer("router", [b"client-1", P.SIGNATURE, P.STATUS, pack({"rid": i})], None, i / rate)
    assert half.holding and half.deferred_bytes > 0
    half.core.outbox.take_messages()
    rids, beats, now = [], 0, 4.0
    for _ in range(n):
        half.replay_step(now)
        for _, m, _ in half.core.outbox.take_messages():
            if m[2] == P.REPLY:
                rids.append(unpack(m[3])["rid"])
            elif m[2] == P.HEARTBEAT:
                beats += 1
        if not half.holding:
            break
        now += 0.5
    assert rids == list(range(n)) and half.core.state.counters["rate_limited"] == 0
    assert beats >= 1 and half.deferred_bytes == 0


def test_a_vote_on_silence_reads_what_the_peer_said_first(pair: tuple[Pair, zmq.Socket[Any]]) -> None:
    """A busy passive that has not read its peer's messages yet does not take over from a peer that is alive,
    nor read the last words of a peer it already replaced (which made it step down: a dual active)."""
    from serializers import protocol as P

    half, spy = pair
    with active_peer(half, spy) as (_, active):  # passive; the peer counts as silent after 3.0
        assert half.sub.poll(0)  # the peer's words wait unread
        vote = [b"client", P.SIGNATURE, P.SUBMIT, pack({"id": "t1", "vote": True})]
        assert half.gatekeep("router", vote, 10.0) is False  # read first: the peer is alive, no takeover
        assert half.state is HAState.PASSIVE and half.star.peer_alive(10.0)
        assert not half.sub.poll(0)
        # nothing unread and the peer silent for real: the vote takes over
        assert half.gatekeep("router", vote, 20.0) is True and half.state is HAState.ACTIVE
        # then the primary speaks as active after all: the backup steps down at once, and exits; what comes
        # after it in the same wake-up is refused (it goes to the primary), not accepted by a server that exits
        change = half.receive(active, 21.0)
        assert change is not None
        half.apply([change], 21.0)
        assert half.exit_code == 3 and half.state is HAState.PASSIVE
        plain = [b"client", P.SIGNATURE, P.SUBMIT, pack({"id": "t2"})]
        assert half.gatekeep("router", plain, 21.0) is False and half.gatekeep("router", vote, 21.0) is False


def test_a_slice_that_leaves_the_peers_messages_unread_keeps_the_peer_alive(
        pair: tuple[Pair, zmq.Socket[Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    half, spy = pair
    with active_peer(half, spy) as (peer, active):
        for _ in range(5):
            peer.send_multipart(active)
        monkeypatch.setattr("orchester.ha.pair.DRAIN_SLICE", -1.0)  # one message a slice: the rest waits
        half.drain(50.0)
        assert half.sub.poll(0) and half.counters["ha_peer_backlog"] == 1
        assert half.star.peer_alive(51.0)  # (silence counts from when everything it sent was read)


@contextlib.contextmanager
def active_peer(half: Pair, spy: zmq.Socket[Any]) -> Iterator[tuple[zmq.Socket[Any], list[bytes]]]:
    """The peer's PUB, bound where ``half`` listens, that said once it is active (``half`` heard it at 1.0, and
    one such state message waits unread in ``half``'s socket); yields it and that message; closed after."""
    peer = spy.context.socket(zmq.PUB)
    peer.linger = 0
    peer.bind("inproc://peer")
    try:
        active = link.encode_state(HAState.ACTIVE, "primary", PEER, 0, False)
        half.receive(active, 1.0)
        for _ in range(200):  # (PUB/SUB: until the subscription reached the peer's socket)
            peer.send_multipart(active)
            if half.sub.poll(20):
                break
        yield peer, active
    finally:
        peer.close()
