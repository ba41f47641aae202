"""Property-based: no sequence of frames makes the orchestrator core raise or lose a task."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchester.config import OrchestratorConfig
from orchester.server.core import Orchestrator
from serializers import encode, pack, unpack
from serializers import protocol as P
from tracker import TaskState

COMMANDS = sorted(P.COMMAND_NAMES) + [b"", b"\xff", b"\x10\x10"]
headers = st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.sampled_from(["id", "k", "p", "tg", "to", "sid", "slots", "kinds", "a", "ok", "op",
                                     "name", "rid", "c", "arr", "tags", "ttl", "mr", "dur", "walltime", "progress",
                                     "running", "recent", "workers", "pid", "limit", "since", "until", "ids",
                                     "state", "task", "t", "m"]),
                    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                              st.sampled_from([1e308, -1e308, float("inf"), float("-inf"), float("nan"), 2**63 - 1,
                                               -(2**63), 2**64 - 1, 0, -1, "x" * 70_000]),
                              st.dictionaries(st.text(max_size=4), st.floats(allow_nan=True), max_size=3),
                              st.text(max_size=8), st.binary(max_size=8),
                              st.lists(st.one_of(st.text(max_size=4), st.integers(-2**63, 2**64 - 1)), max_size=3)),
                    max_size=6).map(pack),
)
messages = st.lists(
    st.tuples(st.sampled_from([b"a", b"b", b"sat"]),
              st.sampled_from([P.SIGNATURE, P.SIGNATURE, b"ORCH/1", b"", b"junk"]),
              st.sampled_from(COMMANDS), headers, st.lists(st.binary(max_size=16), max_size=3)),
    max_size=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=messages, garbage=st.lists(st.lists(st.binary(max_size=12), max_size=6), max_size=5))
def test_core_survives_any_frames_and_still_serves(messages: list[Any], garbage: list[list[bytes]]) -> None:
    core = Orchestrator(OrchestratorConfig(max_message=10_000), 0.0)
    now = 0.0
    for ident, sig, cmd, hdr, payload in messages:
        core.handle("sock", [ident, sig, cmd, hdr, *payload], now)
        now += 0.01
        core.housekeeping(now)
    now += 1e6  # every timer a fuzzed message may have armed fires
    core.housekeeping(now)
    # nothing a peer sends is our own error: never a handler error, never a failing timer
    assert core.state.counters["handler_errors"] == 0 and core.state.counters["timer_errors"] == 0
    # the running counts status replies read agree with the table
    assert sum(core.state.state_counts) == len(core.state.tasks)
    assert [core.state.state_counts[s] for s in TaskState] == [sum(t.state is s for t in core.state.tasks.values())
                                                          for s in TaskState]
    assert dict(core.state.pending_kinds) == core.state.queues.depth()
    for frames in garbage:
        core.handle("sock", [b"g", *frames], now)
    core.housekeeping(now)
    # a normal task still goes through
    core.outbox.messages.clear()
    core.handle("sock", [b"good-sat", P.SIGNATURE, P.REGISTER,
                         pack({"sid": "good", "slots": 1, "kinds": ["echo"]})], now)
    _, body = encode([[1], {}])
    core.handle("sock", [b"good-cli", P.SIGNATURE, P.SUBMIT, pack({"id": "good-task", "k": "echo"}), *body], now)
    for _ in range(200):  # fuzzed tasks may be ahead of ours in the queue: finish them as they come
        core.housekeeping(now)
        dispatched = [f for _, f, _ in core.outbox.messages if f[0] == b"good-sat" and f[2] == P.DISPATCH]
        core.outbox.messages.clear()
        for f in dispatched:
            hdr = unpack(f[3])
            core.handle("sock", [b"good-sat", P.SIGNATURE, P.DONE,
                                 pack({"id": hdr["id"], "a": hdr["a"], "ok": True})], now)
        if core.state.tasks["good-task"].state is TaskState.DONE:
            break
    assert core.state.tasks["good-task"].state is TaskState.DONE
