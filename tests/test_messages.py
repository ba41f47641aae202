"""The typed messages (:mod:`serializers.messages`): every class round-trips, every decoder refuses
what is malformed with a ProtocolError and nothing else, and the headers are the bytes the senders
produced before the classes existed (an old peer and a new one understand each other)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serializers import ProtocolError, pack, unpack
from serializers import messages as M
from serializers import protocol as P

NAN, INF = float("nan"), float("inf")
E = "0f3c2a9b1d4e5f60"  # an epoch

#: At least one valid message of every class, optional fields set and unset.
EXAMPLES: list[M.Wire] = [
    M.Submit("t1", "echo"),
    M.Submit("t2", "genx.fit", priority=-7, tags=frozenset({"gpu", "big"}), timeout=30.0, ttl=60.0, max_run=10.5,
             duration=3.0, codec="json", arrays=(("<f8", (2, 3)), ("|u1", ()))),
    M.Status(), M.Status(rid=3), M.Status(rid="r-1", task="t1"),
    M.Fetch("t1"), M.Fetch("t1", 9),
    M.Cancel("t1", 2**63),
    M.Control("strategy", 4, name="round_robin"), M.Control("drain", 5, sid="s1"),
    M.Control("promote", 6, force=True), M.Control("promote", 7),
    M.Control("peer_link", 8, fields={"up": False}),
    M.History(), M.History(9, state="failed", kind="echo", since=1.5, until=2e9, limit=10, ids=("a", "b")),
    M.History(10, ids=("a",), timeline=True),
    M.Heartbeat(rx=0), M.Heartbeat(rx=12, vote=True), M.Heartbeat(sid="s1"),
    M.Heartbeat(sid="s1", report={"cpu_percent": 12.5, "rss_mb": 80.0}),
    M.PeerError("malformed", "bad header", "s1"), M.PeerError("internal", "x"),
    M.Register("s1", 3, ("echo", "sleep")),
    M.Register("s1", 3, ("echo",), tags=("gpu",), progress={"genx.fit": 30.0}, walltime=3600.0, pid=42, workers=2,
               host="node-1", versions={"genx.fit": "3.8.13"}, running=(("t1", 2),), recent=(("t0", 1),), vote=True),
    M.Started((("t1", 1), ("t2", 3))), M.Started(()),
    M.Done("t1", 1, True, sat="s1", codec="msgpack", duration=0.25, arrays=(("<i8", (4,)),)),
    M.Done("t1", 2, False, err={"type": "ValueError", "msg": "bad", "tb": "Traceback ..."}, sat="s1"),
    M.Progress("t1", 1, "s1", {"generation": 3, "fom": 0.5}), M.Progress("t1", None),
    M.Leave("s1"), M.Leave(),
    M.Welcome(E, 1.0, 3), M.Welcome(E, 0.25, 10),
    M.Beat(E), M.Reconnect(E),
    M.Ack(("t1", "t2"), E), M.Ack((), E),
    M.Result("t1", 1, True, sat="s1", codec="json"),
    M.Result("t1", 0, False, err={"type": "Cancelled", "msg": "cancelled", "tb": ""}),
    M.Reply(3, {"strategy": "least_loaded", "previous": "round_robin"}), M.Reply("r", {}), M.Reply(None, {"a": [1]}),
    M.Error("malformed", "header field 'id' is missing"), M.Error("busy", "queue full", id="t1"),
    M.Error("bad_request", "unknown strategy", id=5, rid=7),
    M.Dispatch("t1", 1), M.Dispatch("t1", 2, pickle=True),
    M.Abort("t1", 3),
]

#: Every message class of the module.
CLASSES = {cls for _, cls in inspect.getmembers(M, inspect.isclass)
           if issubclass(cls, M.Wire) and cls is not M.Wire and cls.__module__ == M.__name__}


def test_every_class_has_an_example() -> None:
    assert CLASSES == {type(m) for m in EXAMPLES}
    assert set(M.INBOUND.values()) | set(M.TO_CLIENT.values()) | set(M.TO_SATELLITE.values()) == CLASSES


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: M.Wire) -> None:
    raw = msg.encode()
    assert type(msg).decode(unpack(raw)) == msg
    frames = msg.frames()
    assert frames == [P.SIGNATURE, msg.command, raw]
    decoded = [table[msg.command].decode(unpack(raw)) for table in (M.INBOUND, M.TO_CLIENT, M.TO_SATELLITE)
               if table.get(msg.command) is type(msg)]
    assert decoded and all(d == msg for d in decoded)  # and the command's table picks this class


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_the_module_decoders_pick_the_class_by_command(msg: M.Wire) -> None:
    for table, decode in ((M.INBOUND, M.decode), (M.TO_CLIENT, M.decode_for_client),
                          (M.TO_SATELLITE, M.decode_for_satellite)):
        if table.get(msg.command) is type(msg):
            assert decode(msg.command, msg.encode()) == msg


def test_control_keeps_the_fields_of_an_operation_it_does_not_name() -> None:
    ctl = M.Control.decode({"op": "peer_link", "up": False, "rid": 3})
    assert ctl.fields == {"op": "peer_link", "up": False, "rid": 3} and ctl.rid == 3
    assert unpack(ctl.encode()) == {"op": "peer_link", "up": False, "rid": 3}


def test_a_progress_keyword_never_overrides_a_field() -> None:
    prog = M.Progress("t1", 2, "s1", {"id": "forged", "a": 99, "sat": "other", "done": 1})
    assert unpack(prog.encode()) == {"id": "t1", "a": 2, "sat": "s1", "done": 1}


def test_heartbeat_tells_satellites_from_clients() -> None:
    assert M.Heartbeat.decode({"sid": "s1"}).satellite and not M.Heartbeat.decode({"rx": 3}).satellite
    hb = M.Heartbeat.decode({"sid": "s1", "m": {"cpu": 5, "bad": NAN, "huge": INF, "text": "x", "flag": True}})
    assert hb.report == {"cpu": 5.0}  # finite numbers only: they go to carbon
    assert M.Heartbeat.decode({"vote": True, "rx": 0}) == M.Heartbeat(rx=0, vote=True)


def test_done_keeps_an_error_of_the_wrong_shape_for_the_orchestrator_to_replace() -> None:
    for err in ([1], "boom", {"type": ""}, {"type": "X" * 257}, {"type": "X", "msg": 5}):
        done = M.Done.decode({"id": "t", "a": 1, "ok": False, "err": err})
        assert done.err == err and done.error is None
    ok = M.Done.decode({"id": "t", "a": 1, "ok": False, "err": {"type": "X", "msg": "m", "tb": "", "attempts": 3}})
    assert ok.error == {"type": "X", "msg": "m", "tb": "", "attempts": 3}


def test_a_result_may_name_no_satellite() -> None:
    """The orchestrator builds the RESULT of a task that never ran with ``sat: nil``."""
    res = M.Result.decode({"id": "t", "a": 0, "ok": False, "err": {"type": "Expired", "msg": "", "tb": ""},
                           "sat": None})
    assert res.sat is None and res.error is not None and isinstance(res, M.Result)


def test_dispatch_consent_is_exactly_true() -> None:
    for pk in (1, "true", None, False, [True]):
        assert M.Dispatch.decode({"id": "t", "a": 1, "pk": pk}).pickle is False
    assert M.Dispatch.decode({"id": "t", "a": 1, "pk": True}).pickle is True


def test_a_task_header_gives_a_worker_its_kind_and_arrays() -> None:
    assert M.TaskHeader.decode({"id": "t", "k": "echo", "c": "json", "arr": [["<f8", [2, 3]]]}) == \
        M.TaskHeader("echo", (("<f8", (2, 3)),))
    assert M.TaskHeader.decode({"k": "echo"}) == M.TaskHeader("echo")
    for bad in ({}, {"k": 5}, {"k": ""}, {"k": "echo", "arr": "x"}, {"k": "echo", "arr": [["<f8", [-1]]]}):
        with pytest.raises(ProtocolError):
            M.TaskHeader.decode(bad)


def test_arrays_of_reads_what_the_codec_writes() -> None:
    from serializers import encode

    meta, _ = encode([np.zeros((2, 3)), np.arange(4, dtype="<i4"), np.ones(())])
    assert M.arrays_of(meta) == (("<f8", (2, 3)), ("<i4", (4,)), ("<f8", ()))


# ------------------------------------------------------------------ refusals

#: (class, a valid header, the fields it cannot do without, {field: values refused})
REFUSALS: list[tuple[type[Any], dict[str, Any], list[str], dict[str, list[Any]]]] = [
    (M.Submit, {"id": "t", "k": "echo"}, ["id", "k"], {
        "id": [None, 5, "", "x" * 257, "a\nb", ["t"], b"t"],
        "k": [None, 3, "", "\x1b[2J"],
        "p": [1.5, True, "1", 10**6 + 1, -(10**6) - 1, NAN],
        "tg": ["gpu", [1], [""], ["x"] * 257, [None]],
        "to": [NAN, INF, -INF, 1e308, "5", True],
        "ttl": [NAN, INF, 1e308, 2**63], "mr": [NAN, -INF, 2**64 - 1], "dur": [INF, "1"],
        "c": [5, "", "x" * 65, None, ["msgpack"]],
        "arr": ["x", {}, [["<f8"]], [[1, [2]]], [["<f8", [-1]]], [["<f8", [1.5]]], [["<f8", [True]]],
                [["<f8", [1] * 65]], [["", [1]]], [["x" * 65, [1]]], [["<f8", 2]]],
    }),
    (M.Status, {}, [], {"rid": [1.5, NAN, True, "x" * 257, 2**64, -(2**63) - 1, [1]], "task": [5, "", "a\x00"]}),
    (M.Fetch, {"id": "t"}, ["id"], {"id": [None, 1, ""], "rid": [NAN, {}]}),
    (M.Cancel, {"id": "t"}, ["id"], {"id": [b"t", 1.0], "rid": [{}, INF]}),
    (M.Control, {"op": "strategy", "name": "x"}, ["op", "name"],
     {"op": [None, 1, "", "x" * 65], "name": [None, 1, "", "x" * 4097], "rid": [1.5]}),
    (M.Control, {"op": "drain", "sid": "s"}, ["sid"], {"sid": [None, 2, "x" * 129]}),
    (M.Control, {"op": "promote"}, [], {"force": [1, "yes", None]}),
    (M.History, {}, [], {"state": [1, "x" * 65], "kind": ["", 2], "since": [NAN, INF, 1e13, "1"],
                         "until": [-INF, -1e13], "limit": [1.5, 2**63, True, NAN], "rid": [b"r"],
                         "ids": ["a", {}, ["a"] * (M.MAX_CLAIMS + 1)], "timeline": [1, "yes", True]}),
    (M.History, {"ids": ["a"], "timeline": True}, [],
     {"ids": [["a"] * (M.MAX_TIMELINES + 1)], "rollup": [60], "timeline": [1]}),
    (M.Heartbeat, {}, [], {"rx": [-1, 1.5, 2**63, True, NAN], "sid": [5, "", "x" * 129], "vote": [1, "true"]}),
    (M.Register, {"sid": "s", "slots": 1, "kinds": ["echo"]}, ["sid", "slots", "kinds"], {
        "sid": [None, 1, "", "x" * 129], "slots": [0, 2**31 + 1, 1.5, NAN, True],
        "kinds": ["echo", [1], ["x"] * 4097, [""]], "tags": [[""], "gpu"],
        "progress": [[], {"k": NAN}, {"k": -1}, {"k": INF}, {"k": "1"}, {"k": True}],
        "walltime": [NAN, INF, -1, 1e308], "pid": [-1, 2**31 + 1, 1.5], "workers": [2**20 + 1, -1],
        "running": [[["t"]], [[1, 1]], [["t", "1"]], [["t", True]], "x"], "recent": ["x", [["t", 1.5]]],
        "vote": [1, None],
    }),
    (M.Started, {"t": []}, ["t"], {"t": [None, "x", [[1]], [[1, 2, 3]], ["ab"]]}),
    (M.Done, {"id": "t", "a": 1, "ok": True}, ["id", "a"], {
        "id": [None, 5], "a": [None, 1.5, True, "1", NAN], "ok": [1, "true", None],
        "sat": [5, "", "x" * 129, "a\nb"], "c": [5, ""], "dt": [NAN, INF, -1.0, 1e308, "0.1"],
        "arr": [[["<f8", [NAN]]], "x"]}),
    (M.Progress, {"id": "t", "a": 1}, ["id"], {"id": [None, 1], "sat": [1, ""]}),
    (M.Leave, {}, [], {"sid": [1, "", "x" * 129]}),
    (M.Welcome, {"e": E, "hb": 1.0, "liveness": 3}, ["e", "hb", "liveness"],
     {"e": [None, 1, ""], "hb": [NAN, INF, -1.0, "1", 1e308], "liveness": [0, 1.5, NAN, True, 2**31 + 1]}),
    (M.Beat, {"e": E}, ["e"], {"e": [None, 5, "", "x" * 257]}),
    (M.Reconnect, {"e": E}, ["e"], {"e": [None, 5.0, "\x07"]}),
    (M.Ack, {"ids": [], "e": E}, ["ids", "e"], {"ids": [None, "t", [1], ["t", None], {}], "e": [None, 1, ""]}),
    (M.Result, {"id": "t", "a": 1, "ok": True}, ["id", "a"], {
        "id": [None, 5], "a": [None, 1.5, True], "ok": [1, "true"], "sat": [5, ""], "c": [5],
        "dt": [NAN, -INF], "arr": [[[1, [1]]]]}),
    (M.Reply, {"rid": 1}, [], {"rid": [1.5, NAN, True, "x" * 257, 2**64, [1]]}),
    (M.Error, {"code": "busy", "msg": "m"}, ["code", "msg"],
     {"code": [None, 1, "", "x" * 65, "a\nb"], "msg": [None, 1, b"m"], "id": [True, 1.5, [1]], "rid": [NAN]}),
    (M.Dispatch, {"id": "t", "a": 1}, ["id", "a"],
     {"id": [None, 1, ""], "a": [-1, 2**31 + 1, 1.5, True, None, NAN]}),
    (M.Abort, {"id": "t", "a": 1}, ["id", "a"], {"id": [None, 1, "\n"], "a": [-1, 2**63, 1.5, False]}),
]


@pytest.mark.parametrize(("cls", "valid", "required", "bad"), REFUSALS,
                         ids=[f"{r[0].__name__}-{i}" for i, r in enumerate(REFUSALS)])
def test_every_decoder_refuses_what_is_malformed(cls: Any, valid: dict[str, Any], required: list[str],
                                                 bad: dict[str, list[Any]]) -> None:
    cls.decode(dict(valid))  # the base header is valid
    for key in required:
        with pytest.raises(ProtocolError) as e:
            cls.decode({k: v for k, v in valid.items() if k != key})
        assert e.value.code == P.E_MALFORMED
    for key, values in bad.items():
        for value in values:
            with pytest.raises(ProtocolError) as e:
                cls.decode({**valid, key: value})
            assert e.value.code == P.E_MALFORMED, (key, value)


def test_a_peer_error_always_decodes_and_cuts_what_it_shows() -> None:
    err = M.PeerError.decode({"code": ["x"], "msg": "m" * 1000, "sid": 5})
    assert err == M.PeerError("['x']", "m" * 200, None)
    assert M.PeerError.decode({}) == M.PeerError("None", "None")


def test_the_module_decoders_refuse_unknown_commands_and_bad_frames() -> None:
    for decode, foreign in ((M.decode, P.ACK), (M.decode_for_client, P.DISPATCH),
                            (M.decode_for_satellite, P.RESULT)):
        with pytest.raises(ProtocolError) as e:
            decode(foreign, pack({}))
        assert e.value.code == P.E_UNKNOWN_COMMAND
        with pytest.raises(ProtocolError) as e:
            decode(b"\xff", pack({}))
        assert e.value.code == P.E_UNKNOWN_COMMAND
    for raw in (b"", b"\xc1", pack([1]), pack("x"), b"\x81"):  # not msgpack, or not a map
        for command, decode in ((P.STATUS, M.decode), (P.ACK, M.decode_for_client),
                                (P.WELCOME, M.decode_for_satellite)):
            with pytest.raises(ProtocolError) as e:
                decode(command, raw)
            assert e.value.code == P.E_MALFORMED


def test_only_a_reply_may_be_larger_than_a_header() -> None:
    big = pack({"rid": 1, "rows": ["x" * 100] * 2000})
    assert len(M.decode_for_client(P.REPLY, big).body["rows"]) == 2000  # type: ignore[union-attr]
    with pytest.raises(ProtocolError) as e:
        M.decode_for_client(P.ERROR, pack({"code": "busy", "msg": "x" * 70_000}))
    assert e.value.code == P.E_TOO_LARGE


# ------------------------------------------------------------------ property: only ProtocolError

KEYS = sorted({"id", "k", "c", "p", "tg", "to", "ttl", "mr", "dur", "arr", "rid", "task", "op", "name", "sid", "force",
               "up", "state", "kind", "since", "until", "limit", "ids", "vote", "rx", "m", "code", "msg", "slots",
               "kinds", "tags", "progress", "walltime", "pid", "workers", "host", "versions", "running", "recent",
               "t", "a", "ok", "err", "sat", "dt", "e", "hb", "liveness", "pk", "x"})
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=8),
                   st.binary(max_size=8),
                   st.sampled_from([1e308, -1e308, INF, -INF, NAN, 2**63 - 1, 2**31, 0, -1, "", "x" * 300, "a\nb"]))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                      max_leaves=10)
HEADERS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8)
DECODERS = sorted(CLASSES | {M.TaskHeader}, key=lambda c: c.__name__)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cls=st.sampled_from(DECODERS), hdr=HEADERS)
def test_decode_of_any_map_raises_only_a_protocol_error(cls: Any, hdr: dict[str, Any]) -> None:
    try:
        msg = cls.decode(hdr)
    except ProtocolError:
        return
    if isinstance(msg, M.Wire):  # what decoded encodes, and decodes again to the same bytes
        raw = msg.encode()
        assert type(msg).decode(unpack(raw)).encode() == raw


COMMANDS = sorted(P.COMMAND_NAMES) + [b"", b"\xff"]


@settings(max_examples=400, deadline=None)
@given(command=st.sampled_from(COMMANDS), raw=st.one_of(st.binary(max_size=64), HEADERS.map(pack)))
def test_decode_of_any_frame_raises_only_a_protocol_error(command: bytes, raw: bytes) -> None:
    for decode in (M.decode, M.decode_for_client, M.decode_for_satellite):
        with contextlib.suppress(ProtocolError):  # the only exception allowed out
            decode(command, raw)


# ------------------------------------------------------------------ the bytes of before
# The expected headers are written out as the senders built them before serializers.messages
# (dicts in the senders' key order): the same bytes mean an old peer and a new one agree.

def _header(frames: list[Any]) -> bytes:
    return bytes(frames[2])


def test_a_clients_submits_fetches_and_pings_are_the_bytes_of_before() -> None:
    from orchester.client.core import ClientCore

    core = ClientCore(lambda fut, v: None, lambda fut, e: None)
    _, frames = core.submit("f", "echo", (1, "x"), {"k": 2}, task_id="t1")
    assert frames[:2] == [P.SIGNATURE, P.SUBMIT] and len(frames) == 4
    assert _header(frames) == pack({"id": "t1", "k": "echo", "c": "msgpack"})
    _, frames = core.submit("f", "genx.fit", (), {}, priority=5, tags=["gpu"], timeout=30, ttl=60, max_run=10.5,
                            duration=3, codec="json", task_id="t2")
    assert _header(frames) == pack({"id": "t2", "k": "genx.fit", "c": "json", "p": 5, "tg": ["gpu"], "to": 30.0,
                                    "ttl": 60.0, "mr": 10.5, "dur": 3.0})
    _, frames = core.submit("f", "echo", (np.zeros((2, 3)), np.arange(4, dtype="<i4")), {}, task_id="t3")
    assert _header(frames) == pack({"id": "t3", "k": "echo", "c": "msgpack",
                                    "arr": [["<f8", [2, 3]], ["<i4", [4]]]})
    assert len(frames) == 6  # body and two buffers
    # values the orchestrator refuses (or reads as "none") are sent as given, as before
    _, frames = core.submit("f", "echo", (), {}, priority=-3, timeout=-1, max_run=1e308, task_id="t4")
    assert _header(frames) == pack({"id": "t4", "k": "echo", "c": "msgpack", "p": -3, "to": -1.0, "mr": 1e308})
    _, frames = core.submit("f", "echo", (), {}, timeout=0, task_id="t5")
    assert _header(frames) == pack({"id": "t5", "k": "echo", "c": "msgpack", "to": 0.0})
    assert core.fetch("f", "t9") == [P.SIGNATURE, P.FETCH, pack({"id": "t9", "rid": 1})]
    assert core.ping() == [P.SIGNATURE, P.HEARTBEAT, pack({"rx": 0})]
    assert core.ping(vote=True) == [P.SIGNATURE, P.HEARTBEAT, pack({"vote": True, "rx": 0})]


def test_a_clients_requests_are_the_bytes_of_before() -> None:
    from orchester.client.core import ClientCore

    core = ClientCore(lambda fut, v: None, lambda fut, e: None)
    cases: list[tuple[Any, bytes, dict[str, Any]]] = [
        (M.Status(), P.STATUS, {"rid": 1}),
        (M.Status(task="t1"), P.STATUS, {"task": "t1", "rid": 2}),
        (M.Cancel("t1"), P.CANCEL, {"id": "t1", "rid": 3}),
        (M.Control("strategy", name="round_robin"), P.CONTROL, {"op": "strategy", "name": "round_robin", "rid": 4}),
        (M.Control("drain", sid="s1"), P.CONTROL, {"op": "drain", "sid": "s1", "rid": 5}),
        (M.Control("promote", force=False), P.CONTROL, {"op": "promote", "force": False, "rid": 6}),
        (M.History(), P.HISTORY, {"rid": 7}),
        (M.History(state="failed", kind="echo", since=1, until=2.5, limit=3, ids=("a",)), P.HISTORY,
         {"state": "failed", "kind": "echo", "since": 1, "until": 2.5, "limit": 3, "ids": ["a"], "rid": 8}),
    ]
    for message, command, expected in cases:
        assert core.ask("f", message) == [P.SIGNATURE, command, pack(expected)]
    # the raw path (a test's fault hook): the body as given, then the request id
    assert core.request("f", P.CONTROL, {"op": "peer_link", "up": False}) == \
        [P.SIGNATURE, P.CONTROL, pack({"op": "peer_link", "up": False, "rid": 9})]
    assert sorted(core.requests) == list(range(1, 10))


def test_a_satellites_messages_are_the_bytes_of_before() -> None:
    import os
    import socket as _socket

    from satellites.satellite import Satellite

    sat = Satellite(["tcp://127.0.0.1:1"], sid="sat-1", workers=2, tags=["gpu", "big"])
    sent: list[list[Any]] = []
    sat._send = lambda frames, now: sent.append(frames)  # type: ignore[method-assign]
    sat._register(5.0)
    before = {"sid": "sat-1", "slots": 3, "workers": 2, "kinds": sat.kinds, "progress": sat.progress_kinds,
              "versions": sat.versions}
    after = {"tags": ["big", "gpu"], "host": _socket.gethostname(), "pid": os.getpid(), "running": [], "recent": []}
    resources = {"cores": sat.cores, "mem": sat.memory}  # (since tasks ask for cores and memory: what it has)
    # (since light tasks have a credit of their own: its light kinds and that credit)
    resources.update(inline=sorted(sat.inline_kinds), light=M.LIGHT_CREDIT)
    assert sat.inline_kinds and sent[-1] == [P.REGISTER, pack({**before, **after, **resources})]
    sat.deadline = 1000.0
    sat._keep_recent(4.0, "t0", 1, [P.DONE, b""])
    sat._register(400.0, vote=True)
    assert sent[-1] == [P.REGISTER, pack({"vote": True, **before, "walltime": 600.0, **after,
                                          "recent": [["t0", 1]], **resources})]
    sat._abort("t-unknown", 1, 0.0)  # neither queued nor running here: nothing to say
    sat._queue.append(("t1", 2, [], 1))
    sat._abort("t1", 2, 0.0)
    assert sent[-1] == [P.DONE, pack({"id": "t1", "a": 2, "ok": False, "sat": "sat-1",
                                      "err": {"type": "Cancelled", "msg": "cancelled", "tb": ""}})]
    # what the loop sends, built as it builds them
    assert M.Heartbeat(sid="sat-1").frames() == [P.SIGNATURE, P.HEARTBEAT, pack({"sid": "sat-1"})]
    report = {"cpu_percent": 1.5, "rss_mb": 80.0, "tasks_done": 2.0}
    assert M.Heartbeat(sid="sat-1", report=report).encode() == pack({"sid": "sat-1", "m": report})
    assert M.Started((("t1", 2), ("t2", 1))).encode() == pack({"t": [["t1", 2], ["t2", 1]]})
    assert M.Leave("sat-1").frames() == [P.SIGNATURE, P.LEAVE, pack({"sid": "sat-1"})]
    assert M.PeerError("malformed", "bad", "sat-1").encode() == pack({"code": "malformed", "msg": "bad",
                                                                      "sid": "sat-1"})


def test_a_workers_results_and_progress_are_the_bytes_of_before() -> None:
    import satellites.builtins  # noqa: F401  (registers echo and sleep)
    from satellites.worker import error_header, run_task
    from serializers import encode

    dispatch = pack({"id": "t1", "a": 3})
    meta, body = encode([[np.arange(3.0)], {}])
    task = pack({"id": "t1", "k": "echo", "c": "msgpack", "arr": meta})
    out = run_task([dispatch, task, *body], "sat-1", lambda h: None)
    hdr = unpack(out[0])
    assert list(hdr) == ["id", "a", "ok", "c", "sat", "dt", "arr"] and isinstance(hdr["dt"], float)
    assert out[0] == pack({"id": "t1", "a": 3, "ok": True, "c": "msgpack", "sat": "sat-1", "dt": hdr["dt"],
                           "arr": [["<f8", [3]]]})
    out = run_task([dispatch, pack({"id": "t1", "k": "echo", "c": "json"}), b'[["x"],{}]'], "sat-1",
                   lambda h: None)
    dt = unpack(out[0])["dt"]
    assert out[0] == pack({"id": "t1", "a": 3, "ok": True, "c": "json", "sat": "sat-1", "dt": dt})
    assert error_header("t1", 2, "sat-1", etype="WorkerDied", msg="gone") == pack(
        {"id": "t1", "a": 2, "ok": False, "sat": "sat-1", "err": {"type": "WorkerDied", "msg": "gone", "tb": ""}})
    progress: list[bytes] = []
    _, body = encode([[], {"seconds": 0.0, "steps": 2}])
    out = run_task([dispatch, pack({"id": "t1", "k": "sleep", "c": "msgpack"}), *body], "sat-1", progress.append)
    assert unpack(out[0])["ok"] is True
    assert progress[0] == pack({"id": "t1", "a": 3, "sat": "sat-1", "done": 1, "total": 2})
    # a dispatch header that does not decode fails the task without killing the worker
    bad = unpack(run_task([pack({"id": "t1"}), b"", b""], "sat-1", progress.append)[0])
    assert bad["ok"] is False and bad["err"]["type"] == "ProtocolError" and bad["id"] == ""


def test_the_orchestrators_messages_are_the_bytes_of_before() -> None:
    assert M.welcome(E, 0.5, 3) == [P.SIGNATURE, P.WELCOME, pack({"e": E, "hb": 0.5, "liveness": 3})]
    assert M.beat(P.HEARTBEAT, E) == [P.SIGNATURE, P.HEARTBEAT, pack({"e": E})]
    assert M.beat(P.RECONNECT, E) == [P.SIGNATURE, P.RECONNECT, pack({"e": E})]
    assert M.ack(["t1", "t2"], E) == [P.SIGNATURE, P.ACK, pack({"ids": ["t1", "t2"], "e": E})]
    body = {"strategy": "x", "previous": "y"}
    assert M.reply(5, body) == [P.SIGNATURE, P.REPLY, pack({"strategy": "x", "previous": "y", "rid": 5})]
    assert M.reply(None, {}) == [P.SIGNATURE, P.REPLY, pack({"rid": None})]
    assert M.dispatch("t1", 2, {}) == [P.SIGNATURE, P.DISPATCH, pack({"id": "t1", "a": 2})]
    assert M.dispatch("t1", 2, {"pk": True}) == [P.SIGNATURE, P.DISPATCH, pack({"id": "t1", "a": 2, "pk": True})]
    assert M.abort("t1", 4) == [P.SIGNATURE, P.ABORT, pack({"id": "t1", "a": 4})]
    # the builders the orchestrator calls for every task write what their typed messages write
    assert M.beat(P.HEARTBEAT, E)[2] == M.Beat(E).encode() and M.ack(["t1"], E) == M.Ack(("t1",), E).frames()
    assert M.dispatch("t1", 2, {"pk": True}) == M.Dispatch("t1", 2, True).frames()
    assert M.dispatch("t1", 2, {}) == M.Dispatch("t1", 2).frames() and M.abort("t1", 4) == M.Abort("t1", 4).frames()
    # and so do the builders of a client's submit and a worker's DONE and a satellite's STARTED
    assert M.submit("t1", "echo", "msgpack") == M.Submit("t1", "echo").frames()
    full = M.Submit("t2", "fit", 3, frozenset({"b", "a"}), 5.0, 6.0, 7.0, 8.0, "json", (("<f8", (2, 3)),))
    assert M.submit("t2", "fit", "json", 3, ["b", "a", "b"], 5.0, 6.0, 7.0, 8.0, (("<f8", (2, 3)),)) == full.frames()
    assert M.submit("t3", "echo", "msgpack", timeout=0.0) == M.Submit("t3", "echo", timeout=0.0).frames()
    for arrays in ((), (("<i4", (4,)),)):
        assert M.done("t1", 2, "s1", "msgpack", 0.25, arrays) == M.Done(
            "t1", 2, True, sat="s1", codec="msgpack", duration=0.25, arrays=arrays).encode()
    assert M.started([("t1", 1), ("t2", 3)]) == M.Started((("t1", 1), ("t2", 3))).encode()
    # and the fast paths of the decoders that run for every task refuse what the full checks refuse
    for hdr in ({"id": "", "a": 1}, {"id": "t\n", "a": 1}, {"id": "t", "a": -1}, {"id": "t", "a": True},
                {"id": "t" * 300, "a": 1}, {"id": "t", "a": 2**31 + 1}, {"id": 5, "a": 1}):
        with pytest.raises(ProtocolError):
            M.Dispatch.decode(hdr)
    for hdr in ({"k": ""}, {"k": "a\tb"}, {"k": 3}, {"k": "x" * 300}, {"k": "echo", "arr": "bad"}):
        with pytest.raises(ProtocolError):
            M.TaskHeader.decode(hdr)
    assert M.TaskHeader.decode({"k": "echo"}) == M.TaskHeader("echo")
    # what the orchestrator decides itself (a failed RESULT) and its errors, as it builds them
    err = {"type": "Expired", "msg": "ttl", "tb": ""}
    assert M.Result("t1", 1, False, err=err, sat="s1").encode() == pack(
        {"id": "t1", "a": 1, "ok": False, "sat": "s1", "err": err})
    from serializers import error_frames

    assert M.Error("busy", "queue full", id="t1", rid=3).frames() == error_frames("busy", "queue full", id="t1",
                                                                                  rid=3)
