"""The release gate: acknowledgements, results (and, where asked, dispatches) wait for their records."""

from __future__ import annotations

from typing import Any

from orchester.server.gate import ReleaseGate, gate_bound
from serializers import protocol as P


def msg(cmd: bytes, n: int) -> tuple[Any, list[Any], str | None]:
    return ("sock", [b"peer", P.SIGNATURE, cmd, n], None)


def test_the_bound_is_what_both_the_journal_and_the_passive_have() -> None:
    assert gate_bound(None, None) is None
    assert gate_bound(7, None) == 7 and gate_bound(None, 5) == 5 and gate_bound(7, 5) == 5


def test_gated_messages_wait_for_their_record_and_others_pass() -> None:
    gate = ReleaseGate([P.ACK, P.RESULT])
    out = [msg(P.ACK, 1), msg(P.HEARTBEAT, 2), msg(P.RESULT, 3), msg(P.DISPATCH, 4)]
    sent = gate.route(out, last=10, bound=8)
    assert [m[1][3] for m in sent] == [2, 4] and len(gate) == 2
    assert gate.release(9) == [] and len(gate) == 2
    assert [m[1][3] for m in gate.release(10)] == [1, 3] and len(gate) == 0


def test_a_later_gated_message_never_overtakes_an_earlier_one() -> None:
    gate = ReleaseGate([P.ACK, P.RESULT, P.DISPATCH])
    gate.route([msg(P.ACK, 1)], last=5, bound=4)
    sent = gate.route([msg(P.DISPATCH, 2), msg(P.REPLY, 3)], last=5, bound=5)  # safe, but one waits before it
    assert [m[1][3] for m in sent] == [3]
    assert [m[1][3] for m in gate.release(5)] == [1, 2]


def test_nothing_waits_without_a_bound() -> None:
    gate = ReleaseGate([P.ACK])
    out = [msg(P.ACK, 1)]
    assert gate.route(out, last=3, bound=None) is out
    gate.route([msg(P.ACK, 2)], last=3, bound=1)
    assert [m[1][3] for m in gate.release(None)] == [2]
