"""BATCH (protocol version 3): several messages in one, their small frames packed into one body frame,
each decoded, checked and answered as if it had come alone; the frames, the checks of a batch's header,
the runs a sender cuts, and the core."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from test_core import C, Harness, S, dispatched_ids, of

from serializers import ProtocolError, encode, pack, unpack
from serializers import messages as M
from serializers import protocol as P


def submit_message(tid: str, kind: str = "echo") -> list[Any]:
    _, body = encode([[tid], {}])
    return [P.SUBMIT, pack({"id": tid, "k": kind, "c": "msgpack"}), *body]


def test_a_batch_carries_messages_in_order_with_their_payloads() -> None:
    messages = [submit_message("a"), [P.HEARTBEAT, pack({"rx": 0})], submit_message("b")]
    frames = M.batch(messages)
    sizes = [len(f) for m in messages for f in m]
    assert frames[:2] == [P.SIGNATURE, P.BATCH] and unpack(frames[2]) == {"n": [3, 2, 3], "z": sizes}
    assert len(frames) == 4 and frames[3] == b"".join(f for m in messages for f in m)  # one body, packed
    assert M.unbatch([b"ident", *frames], 2) == [[b"ident", P.SIGNATURE, *m] for m in messages]
    assert M.unbatch(frames, 1) == [[P.SIGNATURE, *m] for m in messages]


def test_a_large_payload_frame_travels_alone_without_a_copy() -> None:
    array = np.arange(P.BATCH_ALONE // 8 + 1, dtype=np.float64)
    big = memoryview(array).cast("B")
    messages = [[P.DONE, pack({"id": "a"}), b"body", big], [P.DONE, pack({"id": "b"}), b"", b"x" * 10]]
    frames = M.batch(messages)
    header = unpack(frames[2])
    assert header["z"] == [1, len(messages[0][1]), 4, -1, 1, len(messages[1][1]), 0, 10]
    assert len(frames) == 5 and frames[4] is big  # (the very buffer: sent without a copy)
    out = M.unbatch(frames, 1)
    assert out[0][:4] == [P.SIGNATURE, P.DONE, messages[0][1], b"body"] and out[0][4] is big
    assert out[1] == [P.SIGNATURE, *messages[1]]
    # as a receiver gets it: the body and the lone frame as zmq Frames
    received = [*frames[:3], zmq.Frame(frames[3]), zmq.Frame(big)]
    again = M.unbatch(received, 1)
    assert again[0][:4] == out[0][:4] and bytes(again[0][4]) == big.tobytes() and again[1] == out[1]


def _frames(header: dict[str, Any], body: bytes, alone: int = 0) -> list[Any]:
    return [P.SIGNATURE, P.BATCH, pack(header), body, *[b"y"] * alone]


@pytest.mark.parametrize("frames", [
    _frames({"n": [2, 2], "z": [1, 1, 1]}, b"\x01\x80\x01"),  # three lengths for four frames
    _frames({"n": [1, 2], "z": [1, 1, 1]}, b"\x01\x80\x01"),  # a message needs a command and a header
    _frames({"n": [], "z": []}, b""),
    _frames({"n": "22", "z": [1, 1, 1, 1]}, b"\x01\x80\x01\x80"),
    _frames({"n": [2.0, 2], "z": [1, 1, 1, 1]}, b"\x01\x80\x01\x80"),
    _frames({"n": [True, 3], "z": [1, 1, 1, 1]}, b"\x01\x80\x01\x80"),
    _frames({"z": [1, 1]}, b"\x01\x80"),
    _frames({"n": [2]}, b"\x01\x80"),  # version 2's header: no lengths
    _frames({"n": [2], "z": [1, 2]}, b"\x01\x80"),  # lengths past the body
    _frames({"n": [2], "z": [1, 0]}, b"\x01\x80"),  # lengths short of it
    _frames({"n": [2], "z": [1, 1.0]}, b"\x01\x80"),
    _frames({"n": [2], "z": [1, -2]}, b"\x01"),
    _frames({"n": [3], "z": [1, 1, -1]}, b"\x01\x80"),  # a lone frame announced, none follows
    _frames({"n": [2], "z": [1, 1]}, b"\x01\x80", alone=1),  # a frame follows, none announced
    _frames({"n": [2], "z": [1, -1]}, b"\x01", alone=1),  # a header travels in the body
    _frames({"n": [2] * (P.BATCH_MAX + 1), "z": [1, 1] * (P.BATCH_MAX + 1)}, b"\x01\x80" * (P.BATCH_MAX + 1)),
    [P.SIGNATURE, P.BATCH, pack({"n": [2], "z": [1, 1]})],  # no body
])
def test_a_batch_header_that_does_not_fit_its_frames_is_malformed(frames: list[Any]) -> None:
    with pytest.raises(ProtocolError) as e:
        M.unbatch(frames, 1)
    assert e.value.code == P.E_MALFORMED


def test_a_batch_never_carries_a_batch_and_needs_a_header() -> None:
    inner = M.batch([[P.HEARTBEAT, pack({})], [P.HEARTBEAT, pack({})]])
    with pytest.raises(ProtocolError, match="may not carry a BATCH"):
        M.unbatch(M.batch([[P.BATCH, inner[2], inner[3]]]), 1)
    with pytest.raises(ProtocolError):
        M.unbatch([P.SIGNATURE, P.BATCH], 1)
    with pytest.raises(ProtocolError):
        M.unbatch([P.SIGNATURE, P.BATCH, b"\xc1", b"\x01\x80"], 1)  # not msgpack
    with pytest.raises(ProtocolError) as e:
        M.unbatch([b"ORCH/2", *inner[1:]], 1)
    assert e.value.code == P.E_VERSION


def test_senders_cut_runs_by_count_and_bytes_and_a_large_message_goes_alone() -> None:
    assert M.runs([10] * 5, limit=2, max_bytes=1000) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert M.runs([10, 2000, 10, 10], limit=100, max_bytes=1000) == [slice(0, 1), slice(1, 2), slice(2, 4)]
    assert M.runs([]) == []
    small, big = [P.DONE, b"h"], [P.DONE, b"h", b"x" * (P.BATCH_BYTES + 1)]
    out = M.batches([small, small, big, small])
    assert [f[1] for f in out] == [P.BATCH, P.DONE, P.DONE]  # two as a batch, the large one, the last alone
    assert out[1] == [P.SIGNATURE, *big] and out[2] == [P.SIGNATURE, *small]


def test_the_core_handles_each_message_of_a_batch_and_answers_each_on_its_own() -> None:
    h = Harness()
    sat = h.register(slots=10)
    h.tick()
    bad = [P.SUBMIT, pack({"id": "bad", "k": "echo", "c": "msgpack"})]  # no payload: malformed
    h.core.handle(C, [b"cli", *M.batch([submit_message("a"), bad, submit_message("b")])], h.now)
    out = h.tick()
    assert unpack(of(out, P.ACK)[0][3])["ids"] == ["a", "b"]
    errors = [unpack(f[3]) for f in of(out, P.ERROR)]
    assert [e.get("id") for e in errors] == ["bad"]
    assert dispatched_ids(out) == ["a", "b"]
    counters = h.core.state.counters
    assert counters["batches_in"] == 1 and counters["submitted"] == 2
    # a satellite's results, several in one
    done = [[P.DONE, pack({"id": t, "a": 1, "ok": True, "c": "msgpack"}), b"\xc0"] for t in ("a", "b")]
    h.core.handle(S, [sat, *M.batch(done)], h.now)
    assert [unpack(f[3])["id"] for f in of(h.tick(), P.RESULT)] == ["a", "b"]


def test_a_malformed_batch_is_refused_as_a_whole_and_nothing_in_it_happens() -> None:
    h = Harness()
    h.register()
    h.tick()
    frames = M.batch([submit_message("a"), submit_message("b")])
    header = unpack(frames[2])
    frames[2] = pack({"n": [3, 4], "z": [*header["z"], 5]})  # one frame more than the body holds
    h.core.handle(C, [b"cli", *frames], h.now)
    out = h.tick()
    assert [unpack(f[3])["code"] for f in of(out, P.ERROR)] == [P.E_MALFORMED]
    assert not of(out, P.ACK) and not h.core.state.tasks


def test_the_rate_limit_counts_each_message_a_batch_carries() -> None:
    h = Harness(request_rate=5.0)
    h.tick()
    status = [[P.STATUS, pack({"rid": i})] for i in range(20)]
    h.core.handle(C, [b"cli", *M.batch(status)], h.now)
    out = h.tick()
    codes = [unpack(f[3])["code"] for f in of(out, P.ERROR)]
    assert len(of(out, P.REPLY)) + len(codes) == 20 and codes and set(codes) == {P.E_BUSY}


def test_a_sender_bounds_the_frames_of_a_batch_so_its_header_stays_small() -> None:
    assert M.runs([10] * 3, frames=[3, 3, 3], max_frames=6) == [slice(0, 2), slice(2, 3)]
    assert M.runs([10] * 3, frames=[3, 9, 3], max_frames=6) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    # a SUBMIT of 70,000 one-element arrays (allowed: under a MiB) goes alone, its neighbours batched
    many = [P.SUBMIT, pack({"id": "many"}), b"\x90", *[b"\x00" * 8] * 70_000]
    out = M.batches([submit_message("a"), many, submit_message("b"), submit_message("c")])
    assert [f[1] for f in out] == [P.SUBMIT, P.SUBMIT, P.BATCH]
    assert len(unpack(out[2][2])["z"]) == 6


def test_a_batch_body_past_what_a_sender_packs_is_refused_before_it_is_read() -> None:
    frames = _frames({"n": [2], "z": [1, P.BATCH_BYTES]}, b"\x01" + b"\x80" * P.BATCH_BYTES)
    with pytest.raises(ProtocolError) as e:
        M.unbatch(frames, 1)
    assert e.value.code == P.E_TOO_LARGE


def test_a_memoryview_of_any_format_travels_as_its_bytes() -> None:
    values = memoryview(np.arange(10, dtype=np.float64))  # len() counts 10 items, 80 bytes travel
    out = M.unbatch(M.batch([[P.DONE, pack({"id": "a"}), b"", values], [P.HEARTBEAT, pack({})]]), 1)
    assert out[0][4] == values.tobytes() and out[1] == [P.SIGNATURE, P.HEARTBEAT, pack({})]
    received = M.unbatch([*M.batch([[P.DONE, b"h", values]])[:3], zmq.Frame(M.batch([[P.DONE, b"h", values]])[3])], 1)
    assert received[0][3] == values.tobytes() and type(received[0][3]) is bytes


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    """Two connected inproc PAIR sockets (closed after the test)."""
    ctx: zmq.Context[Any] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://pair")
        b.connect("inproc://pair")
        yield a, b
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_both_ways_of_receiving_a_message_give_the_same_parts(pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    """``Frame.more`` (pyzmq's Cython backend) and the ``RCVMORE`` option (its cffi backend) alike."""
    from serializers import zmqframes

    a, b = pair
    big = b"x" * (zmqframes.SMALL_FRAME + 1)
    message = [b"sig", P.DONE, pack({"id": "a"}), b"small", big]
    got = []
    for receive in (zmqframes.recv_frames, zmqframes._recv_frames_rcvmore):
        for head in (1, 3, 4):
            zmqframes.send_frames(a, message)
            got.append([(type(p), bytes(p)) for p in receive(b, 0, head)])
    assert all(g == got[0] for g in got[1:3]) and all(g == got[3] for g in got[4:])
    assert got[0] == got[3] and [t for t, _ in got[2]] == [bytes] * 4 + [zmq.Frame]
    with pytest.raises(zmq.Again):
        zmqframes.recv_frames(b, zmq.NOBLOCK)


def test_a_drain_loop_asks_whether_a_message_waits_instead_of_failing_a_receive(
        pair: tuple[zmq.Socket[Any], zmq.Socket[Any]]) -> None:
    """:func:`~serializers.zmqframes.readable` says whether a receive now would find a message, whole."""
    from serializers import zmqframes

    a, b = pair
    assert not zmqframes.readable(b)
    for n in range(2):
        zmqframes.send_frames(a, [b"sig", P.DONE, pack({"n": n})])
    assert b.poll(5000)
    got = []
    while zmqframes.readable(b):  # (as the orchestrator's, the satellites' and the clients' loops drain)
        got.append(unpack(zmqframes.recv_frames(b, zmq.NOBLOCK)[2])["n"])
    assert got == [0, 1] and not zmqframes.readable(b)
    with pytest.raises(zmq.Again):
        zmqframes.recv_frames(b, zmq.NOBLOCK)
