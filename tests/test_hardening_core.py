"""Issue 14's rules in the pure parts: header numbers, the timer wheel, replay, identities, rates, subscriptions."""

from __future__ import annotations

import math
from typing import Any

import pytest
from test_core import C, Harness, S, dispatched_ids, of

from orchester.server.peers import ConnectionKeys, RequestRate, Subscriptions, UnreadResults
from orchester.server.restore import RestoreFold
from serializers import encode, pack, unpack
from serializers import protocol as P
from serializers.header import ProtocolError
from serializers.messages import Submit
from tracker import TaskState, TimerWheel

BAD_NUMBERS: list[Any] = [1e308, -1e308, math.inf, -math.inf, math.nan, 2**63, -(2**63), True, "1", [1], {"a": 1}]


@pytest.mark.parametrize("key", ["to", "ttl", "mr", "dur", "p"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_a_submit_header_with_an_extreme_number_is_refused(key: str, value: Any) -> None:
    with pytest.raises(ProtocolError) as err:
        Submit.decode({"id": "t", "k": "echo", key: value})
    assert err.value.code == P.E_MALFORMED


def test_a_refused_submit_changes_nothing() -> None:
    """``ttl: 1e308`` was answered malformed with the task already queued; ``to: 1e308`` left it without history."""
    h = Harness()
    for n, key in enumerate(("ttl", "to", "mr", "dur")):
        h.submit(f"x{n}", **{key: 1e308})
    out = h.tick()
    assert len(of(out, P.ERROR)) == 4 and not of(out, P.ACK)
    st = h.core.state
    assert not st.tasks and not len(st.queues) and not st.client_load and st.queued_bytes == 0
    h.send(C, b"cli", P.HISTORY, {"rid": 1})
    reply = unpack(of(h.tick(), P.REPLY)[0][3])
    assert reply["rows"] == []


def test_the_timer_wheel_clamps_what_it_cannot_place() -> None:
    wheel: TimerWheel[str] = TimerWheel()
    for i, deadline in enumerate([1e308, math.inf, math.nan, -1e308, 5.0]):
        wheel.schedule(deadline, f"k{i}")
    assert [t.key for t in wheel.pop_expired(10.0)] == ["k3", "k4"]  # far past: at once
    assert len(wheel) == 3  # the others wait in the last tick: never, in practice


def test_one_failing_timer_is_counted_and_the_others_fire() -> None:
    h = Harness(queue_ttl=1.0)
    h.core.strict = False  # (the suite runs strict: this test is about the boundary itself)
    h.submit("a")
    h.submit("b")
    h.tick()
    original = h.core.life.on_timer

    def broken(tid: str, code: int, now: float) -> None:
        if tid == "a":
            raise OverflowError("cannot convert float infinity to integer")
        original(tid, code, now)

    h.core.life.on_timer = broken  # type: ignore[method-assign]
    h.tick(2.0)
    assert h.core.state.counters["timer_errors"] == 1
    assert h.core.state.tasks["b"].state is TaskState.EXPIRED


def test_our_own_failure_in_a_handler_is_answered_internal_counted_and_raised_when_strict() -> None:
    h = Harness()
    h.submit("a")
    h.tick()

    def broken(sock: Any, ident: bytes, msg: Any, frames: list[Any], now: float) -> None:
        raise KeyError("a bug of ours, not the peer's")

    h.core._handlers[P.STATUS] = broken
    h.core.strict = False
    h.send(C, b"cli", P.STATUS, {"rid": 7})
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [(e["code"], e["rid"]) for e in errors] == [(P.E_INTERNAL, 7)] and "KeyError" in errors[0]["msg"]
    assert h.core.state.counters["handler_errors"] == 1 and h.core.state.counters["bad_messages"] == 1
    assert h.core.state.tasks["a"].state is TaskState.PENDING  # nothing else changed
    h.core.strict = True
    with pytest.raises(KeyError):
        h.send(C, b"cli", P.STATUS, {"rid": 8})
    assert h.core.state.counters["handler_errors"] == 2
    h.tick()
    h.send(C, b"cli", P.HEARTBEAT, {})  # the core still serves what is not broken
    assert of(h.tick(), P.HEARTBEAT)


def test_replay_skips_a_record_a_live_server_would_refuse() -> None:
    fold = RestoreFold()
    _, body = encode([[1], {}])
    good = pack({"id": "good", "k": "echo"})
    bad = pack({"id": "bad", "k": "echo", "ttl": 1e308})
    fold.add(["S", "bad", b"cli", bad, list(body), 1.0, None, None])
    fold.add(["S", "good", b"cli", good, list(body), 1.0, None, None])
    fold.add(["S", "other", b"cli", good, list(body), 1.0, None, None])  # header of another task
    assert set(fold.tasks) == {"good"} and fold.bad == 2
    h = Harness()
    counts = fold.finish(h.core, h.now, C)
    assert counts["requeued"] == 1
    h.register(slots=1)
    assert dispatched_ids(h.tick()) == ["good"]


def test_status_counts_tasks_without_walking_them() -> None:
    h = Harness(result_retention=2)
    sat = h.register(slots=10)
    for i in range(5):
        h.submit(f"t{i}")
    h.tick()
    for i in range(3):
        h.done(sat, f"t{i}")
    h.tick()
    assert h.core.requests.status(h.now)["tasks"] == {"done": 2, "dispatched": 2}  # one done task left the retention
    states = [t.state for t in h.core.state.tasks.values()]
    assert sum(h.core.state.state_counts) == len(states)


def test_the_memory_history_is_paged() -> None:
    h = Harness()
    for i in range(1500):
        h.submit(f"t{i:04d}")
    h.tick()
    h.send(C, b"cli", P.HISTORY, {"rid": 1})
    rows = unpack(of(h.tick(), P.REPLY)[0][3], limit=1 << 24)["rows"]
    assert len(rows) == 1000 and rows[0]["id"] == "t0500" and rows[-1]["id"] == "t1499"
    h.send(C, b"cli", P.HISTORY, {"rid": 2, "limit": 10**9, "ids": ["t0001", "nope", 7]})
    rows = unpack(of(h.tick(), P.REPLY)[0][3])["rows"]
    assert [r["id"] for r in rows] == ["t0001"]


def test_failed_tasks_show_their_error_type_and_message_in_the_memory_history() -> None:
    h = Harness()
    sat = h.register()
    h.submit("f")
    h.tick()
    h.done(sat, "f", ok=False, etype="ValueError")
    h.tick()
    h.send(C, b"cli", P.HISTORY, {"rid": 1})
    (row,) = unpack(of(h.tick(), P.REPLY)[0][3])["rows"]
    assert row["error"] == "ValueError: bad" and row["state"] == "failed" and row["satellite"] == "s1"


def test_an_identity_belongs_to_the_first_key_and_a_contest_stops_deliveries() -> None:
    conns = ConnectionKeys(max_per_key=2)
    conns.bind(b"c:1", "alice", 0.0)
    assert conns.owns(b"c:1", "alice")
    with pytest.raises(ProtocolError) as err:
        conns.bind(b"c:1", "mallory", 1.0)
    assert err.value.code == P.E_FORBIDDEN and not conns.owns(b"c:1", "alice")
    conns.bind(b"c:1", "alice", 2.0)  # its owner speaks again: delivered again
    assert conns.owns(b"c:1", "alice")
    conns.bind(b"c:2", "alice", 2.0)
    with pytest.raises(ProtocolError) as err:
        conns.bind(b"c:3", "alice", 3.0)
    assert err.value.code == P.E_LIMIT
    conns.bind(b"c:3", "alice", 10_000.0)  # the idle ones were forgotten
    assert conns.forget_key("alice") == 1 and len(conns) == 0


def test_results_go_only_to_a_connection_of_the_owners_key() -> None:
    h = Harness()
    keys = {"alice": object(), "sat": object(), "bob": object()}
    h.use_ports(identify=lambda name: type("Who", (), {"name": name, "roles": frozenset(
        {"submit", "satellite"})})() if name in keys else None)
    _, body = encode([[1], {}])
    h.core.handle(S, [b"s", P.SIGNATURE, P.REGISTER, pack({"sid": "s", "slots": 1, "kinds": ["echo"]})], h.now,
                  "sat")
    h.core.handle(C, [b"c:a", P.SIGNATURE, P.SUBMIT, pack({"id": "t", "k": "echo"}), *body], h.now, "alice")
    h.tick()
    h.core.handle(C, [b"c:a", P.SIGNATURE, P.HEARTBEAT, pack({})], h.now, "bob")  # bob on alice's id
    h.core.handle(S, [b"s", P.SIGNATURE, P.DONE, pack({"id": "t", "a": 1, "ok": True})], h.now, "sat")
    out = h.tick()
    assert not of(out, P.RESULT) and h.core.state.counters["results_withheld"] == 1
    h.core.handle(C, [b"c:b", P.SIGNATURE, P.FETCH, pack({"id": "t", "rid": 1})], h.now, "alice")
    assert [f[0] for f in of(h.tick(), P.RESULT)] == [b"c:b"]


def test_a_satellite_id_is_bound_to_its_key_and_adoption_needs_the_tags() -> None:
    h = Harness()
    roles = frozenset({"submit", "satellite"})
    h.use_ports(identify=lambda name: type("Who", (), {"name": name, "roles": roles})() if name else None,
                journal=True)
    reg = {"sid": "s", "slots": 1, "kinds": ["echo"]}
    h.core.handle(S, [b"s1", P.SIGNATURE, P.REGISTER, pack(reg)], h.now, "sat")
    h.core.handle(S, [b"s2", P.SIGNATURE, P.REGISTER, pack(reg)], h.now, "impostor")
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [e["code"] for e in errors] == [P.E_FORBIDDEN]
    assert h.core.state.fleet.by_id["s"].ident == b"s1"
    assert ["K", "s", "sat"] == h.core.outbox.records[0][:3]
    fold = RestoreFold()
    fold.add(h.core.outbox.records[0])
    assert fold.sat_keys == {"s": "sat"}


def test_a_request_rate_is_a_token_bucket_per_caller() -> None:
    rate = RequestRate(10.0)
    assert sum(rate.take("a", 0.0) for _ in range(30)) == 10
    assert rate.take("b", 0.0)
    assert sum(rate.take("a", 1.0) for _ in range(30)) == 10
    assert all(RequestRate(0).take("a", 0.0) for _ in range(1000))


def test_subscriptions_are_counted_incrementally_and_capped() -> None:
    subs = Subscriptions((b"task:", b"sat:"), max_topics=3, max_topic=16, per_key=2)
    assert subs.update(b"\x01task:1") and subs.want[b"task:"] and not subs.want[b"sat:"]
    assert subs.update(b"\x01") and subs.want[b"sat:"]  # everything
    assert not subs.update(b"\x01" + b"x" * 17)  # too long
    assert subs.update(b"\x01sat:a") and not subs.update(b"\x01sat:b")  # the fourth distinct topic
    assert subs.update(b"\x00") and subs.want[b"sat:"]  # sat:a still wants it
    assert subs.update(b"\x00sat:a") and not subs.want[b"sat:"] and subs.want[b"task:"]
    assert subs.update(b"\x01task:2", key="bob") and subs.update(b"\x01task:2", key="bob")
    assert not subs.update(b"\x01task:3", key="bob") and subs.over == {"bob"}
    assert not subs.update(b"\x02junk") and subs.refused == 3


def test_a_forged_progress_is_not_published() -> None:
    h = Harness()
    h.core.subscription(b"\x01progress:")
    sat = h.register("a", slots=1)
    other = h.register("b", slots=1, kinds=("nothing",))
    h.submit("t")
    h.tick()
    h.send(S, other, P.PROGRESS, {"id": "t", "a": 1, "fom": "boom"})
    h.send(S, sat, P.PROGRESS, {"id": "t", "a": 2, "fom": 1.0})
    h.send(S, sat, P.PROGRESS, {"id": "t", "a": True, "fom": 1.0})
    assert not h.core.outbox.events and h.core.state.counters["progress_refused"] == 3
    h.send(S, sat, P.PROGRESS, {"id": "t", "a": 1, "fom": 1.0})
    assert [f[0] for f in h.core.outbox.events] == [b"progress:t"]


def test_slots_are_cut_and_revocation_cancels_a_keys_work() -> None:
    h = Harness(max_slots=8)
    h.register("big", slots=1_000_000)
    assert h.core.state.fleet.by_id["big"].slots == 8
    h.submit("mine", tags=["nobody"])
    h.core.state.tasks["mine"].owner = "bob"
    counts = h.core.revoke({"bob"}, h.now)
    assert counts["tasks"] == 1 and h.core.state.tasks["mine"].state is TaskState.CANCELLED
    err = unpack(h.core.state.results.get("mine").frames[2])["err"]  # type: ignore[union-attr]
    assert err["type"] == P.ERR_REVOKED


def test_unread_result_bytes_are_capped_per_key() -> None:
    unread = UnreadResults(cap=10)
    assert unread.admit(b"c", "k", 25, 0.0)  # one result always goes to an idle connection
    assert not unread.admit(b"c", "k", 1, 0.0)
    assert unread.hold(b"c", "t2", 1) and not unread.hold(b"c", "t2", 1)  # once, however often asked
    assert not unread.admit(b"c", "k", 1, 0.0)  # no overtaking what waits
    assert unread.hold(b"c", "t3", 1) and unread.pinned == {"t2", "t3"} and unread.waiting_bytes("k") == 2
    assert unread.admit(b"d", "k", 1, 0.0) is not False  # another connection of the key: idle, one goes
    assert unread.ack(b"c", 1, 1.0) == ["t2", "t3"] and unread.unread(b"c") == 0 and not unread.pinned
    assert unread.admit(b"c", "k", 6, 1.0) and not unread.admit(b"c", "k", 6, 1.0)
    unread.hold(b"c", "t4", 6)
    assert unread.ack(b"c", 1, 2.0) == ["t4"]  # a stale count frees nothing, but what waits is retried
    assert not unread.admit(b"c", "k", 6, 2.0)
    unread.hold(b"c", "t5", 6)
    assert unread.forget(b"c") == ["t5"] and unread.unread(b"c") == 0  # a failed send: stop counting
    assert unread.admit(b"c", "k", 6, 3.0)
    unread.sweep(10_000.0)
    assert len(unread) == 0 and unread.waiting_bytes("k") == 0


def test_results_waiting_for_room_are_not_evicted_by_retention() -> None:
    from orchester.server.results import ResultStore

    store = ResultStore(max_results=2)
    for i in range(4):
        store.put(f"r{i}", [b"x"], 1)
    assert store.trim({"r0"}) == ["r1", "r2"] and "r0" in store and "r3" in store


def test_a_client_that_reads_gets_every_result_and_one_that_does_not_is_held() -> None:
    h = Harness(max_unread_bytes=300)  # each result is about 140 bytes
    sat = h.register(slots=10)
    for i in range(6):
        h.submit(f"t{i}")
    h.tick()
    for i in range(6):
        h.send(S, sat, P.DONE, {"id": f"t{i}", "a": 1, "ok": True, "c": "msgpack"}, b"x" * 90)
    sent = [unpack(f[3])["id"] for f in of(h.tick(), P.RESULT)]
    assert sent == ["t0", "t1"] and h.core.state.counters["results_waiting"] == 4
    h.send(C, b"cli", P.HEARTBEAT, {"rx": 2})
    assert [unpack(f[3])["id"] for f in of(h.tick(), P.RESULT)] == ["t2", "t3"]
    h.send(C, b"cli", P.HEARTBEAT, {"rx": 4})
    assert [unpack(f[3])["id"] for f in of(h.tick(), P.RESULT)] == ["t4", "t5"]


def test_subscriptions_are_counted_while_they_last_and_a_flood_is_flagged() -> None:
    subs = Subscriptions((b"task:",), max_topics=100, max_topic=16, per_key=3, max_live=5)
    for _ in range(10):  # a key subscribing and unsubscribing for ever holds one at a time
        assert subs.update(b"\x01task:a", key="alice") and subs.update(b"\x00task:a", key="alice")
    assert not subs.over and subs.live == 0
    subs.update(b"\x01task:x", key="bob")
    subs.update(b"\x01task:y", key="bob")
    subs.update(b"\x00task:x")  # bob's connection left: libzmq reports its subscriptions gone, unattributed
    subs.update(b"\x00task:y")
    assert subs.live == 0 and not subs.over
    for i in range(4):
        subs.update(b"\x01t%d" % i, key="carol")
    assert subs.over == {"carol"} and not subs.flooded
    for i in range(2):
        subs.update(b"\x01u%d" % i)  # without a key
    assert subs.flooded


def _keyed(h: Harness, admins: tuple[str, ...] = ("ops",)) -> None:
    def identify(name: str | None) -> Any:
        if name is None or name.startswith("!"):
            return None
        roles = {"submit", "satellite"} | ({"admin"} if name in admins else set())
        return type("Who", (), {"name": name, "roles": frozenset(roles), "kinds": None})()

    h.use_ports(identify=identify)


def _alice_task_on_sat(h: Harness) -> None:
    """With keys: satellite ``s`` of key ``sat`` runs task ``t`` of key ``alice`` (her connection ``c:a``)."""
    _keyed(h)
    _, body = encode([[1], {}])
    h.core.handle(S, [b"s", P.SIGNATURE, P.REGISTER, pack({"sid": "s", "slots": 1, "kinds": ["echo"]})], h.now, "sat")
    h.core.handle(C, [b"c:a", P.SIGNATURE, P.SUBMIT, pack({"id": "t", "k": "echo"}), *body], h.now, "alice")
    h.tick()


def test_a_header_nested_too_deep_is_refused_before_anything_prints_it() -> None:
    h = Harness()
    deep: Any = []
    for _ in range(1000):
        deep = [deep]
    for cmd, hdr in ((P.ERROR, {"code": "x", "msg": deep}), (P.STATUS, {"rid": 1, "task": deep}),
                     (P.SUBMIT, {"id": "t", "k": "echo", "tg": deep})):
        h.send(C, b"cli", cmd, hdr, b"\xc0")
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [e["code"] for e in errors] == [P.E_MALFORMED, P.E_MALFORMED]  # an ERROR is never answered
    assert all("deeper" in e["msg"] for e in errors) and h.core.state.counters["handler_errors"] == 0


def test_a_result_error_of_the_wrong_shape_is_replaced() -> None:
    h = Harness()
    sat = h.register()
    h.submit("t")
    h.tick()
    h.send(S, sat, P.DONE, {"id": "t", "a": 1, "ok": False, "err": [1]})
    (res,) = of(h.tick(), P.RESULT)
    assert unpack(res[3])["err"]["type"] == "BadResult" and h.core.state.counters["bad_results"] == 1


def test_an_admin_fetch_does_not_take_the_owners_delivery() -> None:
    h = Harness()
    _alice_task_on_sat(h)
    h.core.handle(C, [b"c:o", P.SIGNATURE, P.FETCH, pack({"id": "t", "rid": 1})], h.now, "ops")
    h.tick()
    h.core.handle(S, [b"s", P.SIGNATURE, P.DONE, pack({"id": "t", "a": 1, "ok": True})], h.now, "sat")
    assert [f[0] for f in of(h.tick(), P.RESULT)] == [b"c:a"]  # the owner's connection still gets it
    h.core.handle(C, [b"c:o", P.SIGNATURE, P.FETCH, pack({"id": "t", "rid": 2})], h.now, "ops")
    assert [f[0] for f in of(h.tick(), P.RESULT)] == [b"c:o"]  # and the admin a copy, once it is there
    assert h.core.state.tasks["t"].client == b"c:a"


def test_the_memory_history_shows_error_messages_of_ones_own_tasks_only() -> None:
    h = Harness()
    _alice_task_on_sat(h)
    h.core.handle(S, [b"s", P.SIGNATURE, P.DONE, pack({"id": "t", "a": 1, "ok": False,
                                                        "err": {"type": "KeyError", "msg": "secret"}})], h.now, "sat")
    h.tick()
    rows = {}
    for who, ident in (("alice", b"c:a"), ("bob", b"c:b"), ("ops", b"c:o")):
        h.core.handle(C, [ident, P.SIGNATURE, P.HISTORY, pack({"rid": 1})], h.now, who)
        rows[who] = unpack(of(h.tick(), P.REPLY)[0][3])["rows"][0]["error"]
    assert rows == {"alice": "KeyError: secret", "bob": "KeyError", "ops": "KeyError: secret"}


def test_with_keys_a_satellite_cannot_claim_a_queued_task_after_a_restart() -> None:
    """The "attempt + 1" claim let any satellite key take any queued task (issue 14, finding 3)."""
    _, body = encode([[1], {}])
    fold = RestoreFold()
    fold.add(["S", "t", b"c:a", pack({"id": "t", "k": "echo"}), list(body), 1.0, None, "alice"])
    fold.add(["K", "m1", "mallory", 1.0])
    for keyed in (False, True):
        h = Harness()
        if keyed:
            _keyed(h)
        fold.finish(h.core, h.now, C, reclaim=5.0)
        reg = {"sid": "m1", "slots": 1, "kinds": ["echo"], "running": [["t", 1]]}
        h.core.handle(S, [b"m", P.SIGNATURE, P.REGISTER, pack(reg)], h.now, "mallory" if keyed else None)
        h.tick()
        assert (h.core.state.tasks["t"].state is TaskState.RUNNING) is not keyed


def test_work_of_a_key_revoked_while_the_server_was_down_is_cancelled_at_restore() -> None:
    _, body = encode([[1], {}])
    fold = RestoreFold()
    for tid, owner in (("a", "alice"), ("b", "bob")):
        fold.add(["S", tid, b"c", pack({"id": tid, "k": "echo"}), list(body), 1.0, None, owner])
    h = Harness()
    _keyed(h)
    known = h.core.ports.identify
    assert known is not None
    h.use_ports(identify=lambda name: None if name == "bob" else known(name))
    fold.finish(h.core, h.now, C)
    assert h.core.state.tasks["a"].state is TaskState.PENDING and h.core.state.tasks["b"].state is TaskState.CANCELLED


def test_ids_with_control_characters_are_refused() -> None:
    h = Harness()
    h.send(S, b"s", P.REGISTER, {"sid": "a\nFORGED line", "slots": 1, "kinds": ["echo"]})
    h.submit("t\x1b[2J")
    assert [unpack(f[3])["code"] for f in of(h.tick(), P.ERROR)] == [P.E_MALFORMED, P.E_MALFORMED]


def test_a_restored_task_keeps_its_overall_timeout_counted_from_its_submission() -> None:
    """``timeout`` counts from the submission: a restart from the journal re-arms it for what is left
    (the core's wall clock says 1234.5 here)."""
    _, body = encode([[1], {}])
    fold = RestoreFold()
    for tid, submitted, timeout in (("left", 1230.5, 10.0), ("late", 1000.0, 10.0), ("none", 1000.0, None)):
        hdr = {"id": tid, "k": "echo"} if timeout is None else {"id": tid, "k": "echo", "to": timeout}
        fold.add(["S", tid, b"c", pack(hdr), list(body), submitted, None, None])
    h = Harness()
    fold.finish(h.core, h.now, C)
    tasks = h.core.state.tasks
    assert tasks["left"].deadline is not None and tasks["none"].deadline is None
    h.tick(0.1)
    assert tasks["late"].state is TaskState.FAILED  # its 10 s were over before the restart
    h.tick(5.7)
    assert tasks["left"].state is TaskState.PENDING  # 4 s had passed: 6 s are left
    h.tick(0.4)
    assert tasks["left"].state is TaskState.FAILED and tasks["none"].state is TaskState.PENDING
