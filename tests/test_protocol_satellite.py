"""What a satellite does with what the orchestrator sends, read through :mod:`serializers.messages`:
each command acts; a malformed message is counted, logged and answered with an ERROR (never an
ERROR with an ERROR), and the I/O loop goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import satellites.satellite as satellite_module
from satellites.satellite import Satellite
from serializers import ProtocolError, encode, pack, unpack
from serializers import messages as M
from serializers import protocol as P
from serializers.header import MAX_HEADER

E = "0f3c2a9b1d4e5f60"

#: Messages a satellite cannot read (after the routing envelope), and the error code each gets.
GARBAGE: list[tuple[list[bytes], str]] = [
    ([b"junk"], P.E_MALFORMED),
    ([b"ORCH/9", P.WELCOME, M.Welcome(E, 1.0, 3).encode()], P.E_VERSION),
    ([b"junk", P.WELCOME, M.Welcome(E, 1.0, 3).encode()], P.E_MALFORMED),
    ([P.SIGNATURE, P.WELCOME, pack({"e": E, "hb": float("nan"), "liveness": 3})], P.E_MALFORMED),
    ([P.SIGNATURE, P.WELCOME, pack({"e": E, "hb": 1.0, "liveness": 0})], P.E_MALFORMED),
    ([P.SIGNATURE, P.DISPATCH, pack({"id": "t9", "a": 1}), pack({"id": "t9", "k": "echo"})], P.E_MALFORMED),
    ([P.SIGNATURE, P.DISPATCH, pack({"id": "t9", "a": -1}), pack({"id": "t9", "k": "echo"}), b"x"], P.E_MALFORMED),
    ([P.SIGNATURE, P.DISPATCH, pack({"id": 9, "a": 1}), pack({"id": "t9", "k": "echo"}), b"x"], P.E_MALFORMED),
    ([P.SIGNATURE, P.ABORT, pack({"id": "t9", "a": 1.5})], P.E_MALFORMED),
    ([P.SIGNATURE, P.RECONNECT, pack({})], P.E_MALFORMED),
    ([P.SIGNATURE, P.HEARTBEAT, b"\xc1"], P.E_MALFORMED),
    ([P.SIGNATURE, P.RESULT, pack({"id": "t9", "a": 1, "ok": True})], P.E_UNKNOWN_COMMAND),
    ([P.SIGNATURE, P.ERROR, pack({"code": ["x"], "msg": 1})], P.E_MALFORMED),  # counted, never answered
]


@pytest.fixture
def sat() -> Iterator[Satellite]:
    """A satellite (of a pair) with nothing connected: what it sends is kept in ``sat.sent``."""
    s = Satellite(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], sid="sat-1", workers=1, heartbeat_interval=0.5)
    s.sent = []  # type: ignore[attr-defined]
    s._send = lambda frames, now: s.sent.append(frames)  # type: ignore[method-assign, attr-defined]
    yield s


def test_each_command_acts(sat: Satellite) -> None:
    now = 100.0
    sat._handle(M.welcome(E, 0.5, 3), now)
    assert sat.registered
    task = [pack({"id": "t1", "k": "echo"}), b"body"]
    sat._handle([*M.dispatch("t1", 2, {"pk": True}), *task], now)
    assert [(tid, a, cores, light is not None) for tid, a, _, cores, light in sat._queue] == [("t1", 2, 1, False)]
    assert sat._queue[0][2][1:] == task
    assert unpack(sat._queue[0][2][0]) == {"id": "t1", "a": 2, "pk": True}  # the worker reads it as sent
    sat._handle(M.beat(P.HEARTBEAT, E), now)
    sat._handle(M.abort("t1", 2), now)
    assert not sat._queue and sat.sent[-1] == [P.DONE, M.Done("t1", 2, False, sat="sat-1", err={
        "type": "Cancelled", "msg": "cancelled", "tb": ""}).encode()]
    sat._handle(M.beat(P.RECONNECT, E), now)  # register again ...
    assert sat.sent[-1][0] == P.REGISTER and M.Register.decode(unpack(sat.sent[-1][1])).sid == "sat-1"
    sent = len(sat.sent)
    sat._handle(M.beat(P.RECONNECT, E), now + 0.1)  # ... once per epoch while the first registration is fresh
    assert len(sat.sent) == sent and sat.counters["reconnects_ignored"] == 1
    sat._handle(M.beat(P.RECONNECT, "another"), now + 0.2)
    assert len(sat.sent) == sent + 1
    sat._handle(M.Error("busy", "later").frames(), now)
    assert sat.counters["errors_received"] == 1 and not sat._uplink._redirect
    sat._handle(M.Error(P.E_NOT_ACTIVE, "ask its peer").frames(), now)
    assert sat.counters["errors_received"] == 2 and sat._uplink._redirect


@pytest.mark.parametrize(("frames", "code"), GARBAGE, ids=range(len(GARBAGE)))
def test_a_malformed_message_is_a_protocol_error_and_changes_nothing(sat: Satellite, frames: list[bytes],
                                                                   code: str) -> None:
    with pytest.raises(ProtocolError) as e:
        sat._handle(frames, 0.0)
    assert e.value.code == code
    assert not sat._queue and not sat.registered and sat.sent == []  # type: ignore[attr-defined]


def test_the_satellite_loop_counts_answers_and_goes_on(socket: Any) -> None:
    """Over a socket, as ``Satellite.run`` drains it: garbage, then valid messages."""
    router = socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    sat = Satellite([endpoint], sid="sat-1", workers=1, heartbeat_interval=0.5)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        orch = sat._uplink.open(ctx)
        sat._register(time.monotonic())
        sat._flush(time.monotonic())  # (what a wake-up produced goes out at its end)
        ident, sig, cmd, hdr = router.recv_multipart()
        assert (sig, cmd) == (P.SIGNATURE, P.REGISTER) and unpack(hdr)["sid"] == "sat-1"
        for frames, _ in GARBAGE:
            router.send_multipart([ident, *frames])
        router.send_multipart([ident, *M.welcome(E, 0.5, 3)])
        router.send_multipart([ident, *M.dispatch("t1", 1, {}), pack({"id": "t1", "k": "echo"}), b"body"])
        deadline = time.monotonic() + 5
        while sat.counters["received"] < 1 and time.monotonic() < deadline:
            if orch.poll(100):
                sat._drain_orchestrator(orch, time.monotonic())  # never raises for what it received
        sat._flush(time.monotonic())
        assert sat.registered and sat.counters["received"] == 1 and sat._queue[0][:2] == ("t1", 1)
        assert sat.counters["bad_messages"] == len(GARBAGE)
        answered = [code for frames, code in GARBAGE if len(frames) > 1 and frames[1] != P.ERROR]
        errors = []
        while router.poll(500) and len(errors) < len(answered):
            received = router.recv_multipart()  # the answers of one wake-up: one BATCH
            for _, sig, cmd, hdr in M.unbatch(received, 2) if received[2] == P.BATCH else [received]:
                assert (sig, cmd) == (P.SIGNATURE, P.ERROR)
                errors.append(M.PeerError.decode(unpack(hdr)))
        assert [e.code for e in errors] == answered and {e.sid for e in errors} == {"sat-1"}
        assert not router.poll(100)  # nothing more: the malformed ERROR got no answer
    finally:
        sat._uplink.close()
        ctx.destroy(linger=0)


def test_a_light_kind_is_marked_for_the_inline_thread_unless_it_asks_for_more_cores(sat: Satellite) -> None:
    assert "echo.inline" in sat.inline_kinds and "echo" not in sat.inline_kinds
    for tid, kind, cores in (("a", "echo.inline", 1), ("b", "echo", 1), ("c", "echo.inline", 2)):
        sat._handle([*M.dispatch(tid, 1, {}, cores=cores), pack({"id": tid, "k": kind}), b"body"], 100.0)
    assert [(tid, light is not None) for tid, _, _, _, light in sat._queue] == [("a", True), ("b", False),
                                                                                ("c", False)]
    order, task = sat._queue[0][4]  # a light task's headers, as the loop decoded them: its thread uses them
    assert (order.id, order.attempt, task["k"]) == ("a", 1, "echo.inline")


def test_a_dispatch_whose_kind_is_not_text_is_refused_not_fatal(sat: Satellite) -> None:
    sat._handle([*M.dispatch("x", 1, {}), pack({"id": "x", "k": ["echo.inline"]}), b"body"], 100.0)
    assert [light for *_, light in sat._queue] == [None]  # (its worker reports the bad header)


def test_a_task_that_ends_at_once_is_told_by_its_done_alone_a_longer_one_by_started_first(
        socket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A satellite tells which tasks began (``STARTED``) once the oldest began ``STARTED_DELAY`` ago: one that
    ends sooner is told by its ``DONE`` alone (which starts it too), a longer one shows as running meanwhile."""
    monkeypatch.setattr(satellite_module, "STARTED_DELAY", 1.5)  # (a loaded machine never makes "at once" longer)
    router = socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    sat = Satellite([endpoint], sid="sat-started", workers=1, heartbeat_interval=0.5, tasks=["orchester_test_tasks"])
    thread = threading.Thread(target=sat.run, daemon=True)
    thread.start()
    try:
        assert router.poll(60_000), "the satellite never registered"
        ident, _, cmd, _ = router.recv_multipart()
        assert cmd == P.REGISTER
        router.send_multipart([ident, *M.welcome(E, 0.5, 3)])
        body = encode([[7], {}])[1]
        hold = encode([[4.0], {}])[1]
        for tid, kind, payload in (("quick", "echo.inline", body), ("also-quick", "echo", body),
                                   ("long", "t.hold", hold)):
            router.send_multipart([ident, *M.dispatch(tid, 1, {}), pack({"id": tid, "k": kind, "c": "msgpack"}),
                                   *payload])
        told: list[tuple[bytes, str]] = []  # (command, task id), in the order they came
        deadline = time.monotonic() + 60
        while sum(cmd == P.DONE for cmd, _ in told) < 3 and time.monotonic() < deadline:
            if not router.poll(200):
                continue
            _, _, cmd, hdr, *_ = router.recv_multipart()
            router.send_multipart([ident, *M.beat(P.HEARTBEAT, E)])  # (an orchestrator that stays alive)
            if cmd == P.STARTED:
                told.extend((cmd, tid) for tid, _ in M.Started.decode(unpack(hdr)).tasks)
            elif cmd == P.DONE:
                done = M.Done.decode(unpack(hdr))
                assert done.ok, done.error
                told.append((cmd, done.id))
        assert {tid for cmd, tid in told if cmd == P.DONE} == {"quick", "also-quick", "long"}
        assert (P.STARTED, "quick") not in told  # ended within STARTED_DELAY: its DONE says it all
        assert told.index((P.STARTED, "long")) < told.index((P.DONE, "long"))  # running, told, then done
        assert told.count((P.STARTED, "long")) == 1
    finally:
        sat.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_started_is_told_after_the_delay_in_headers_the_orchestrator_reads_whatever_the_ids(sat: Satellite) -> None:
    """Tasks begun within one ``STARTED_DELAY`` are told together, cut into headers a peer reads (long
    non-ASCII ids included), and once."""
    now = 100.0
    begun = [(f"{'é' * 250}{i:06d}", 1) for i in range(300)] + [(f"t{i}", 2) for i in range(3000)]
    sat._starting.update(dict.fromkeys(begun, now))
    sat._tell_started(now + satellite_module.STARTED_DELAY / 2)
    assert sat.sent == []  # type: ignore[attr-defined]  # (not yet: one of them may end meanwhile)
    sat._tell_started(now + satellite_module.STARTED_DELAY)
    told = []
    for command, header in sat.sent:  # type: ignore[attr-defined]
        assert command == P.STARTED and len(header) <= MAX_HEADER
        told.extend(M.decode(P.STARTED, header).tasks)  # (as the orchestrator reads it)
    assert told == begun and len(sat.sent) > 1 and not sat._starting  # type: ignore[attr-defined]
    sent = len(sat.sent)  # type: ignore[attr-defined]
    sat._tell_started(now + 1.0)
    assert len(sat.sent) == sent  # type: ignore[attr-defined]  # (told once)
