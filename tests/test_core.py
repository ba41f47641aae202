"""The orchestrator's policy core, driven with in-memory messages and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from orchester.config import OrchestratorConfig
from orchester.server.core import Orchestrator
from orchester.server.ports import Ports
from serializers import encode, pack, unpack
from serializers import protocol as P
from tracker import TaskState

C, S = "client-socket", "satellite-socket"  # socket keys are opaque to the core


class Harness:
    """An Orchestrator with a fake clock and helpers to speak to it."""

    def __init__(self, **cfg: Any) -> None:
        base = {"heartbeat_interval": 1.0, "liveness": 3}
        base.update(cfg)
        self.now = 100.0
        self.core = Orchestrator(OrchestratorConfig(**base), self.now, wall=lambda: 1234.5)

    def use_ports(self, **ports: Any) -> Orchestrator:
        """A fresh core with these :class:`~orchester.server.ports.Ports` (before any message)."""
        self.core = Orchestrator(self.core.cfg, self.now, ports=Ports(**ports), wall=lambda: 1234.5)
        return self.core

    def tick(self, dt: float = 0.0, undeliverable: tuple[str, ...] = ()) -> list[tuple[Any, list[Any], Any]]:
        """Run housekeeping and 'send' what it produced, as the adapter would."""
        self.now += dt
        self.core.housekeeping(self.now)
        out = self.core.outbox.take_messages()
        for _, _, tid in out:
            if tid is not None:
                if tid in undeliverable:
                    self.core.undeliverable(tid)
                else:
                    self.core.delivered(tid)
        return out

    def send(self, sock: Any, ident: bytes, cmd: bytes, hdr: Any, *payload: Any, raw: bool = False) -> None:
        frames = [ident, P.SIGNATURE, cmd, hdr if raw else pack(hdr), *payload]
        self.core.handle(sock, frames, self.now)

    def register(self, sid: str = "s1", slots: int = 2, kinds: tuple[str, ...] = ("echo",),
                 tags: tuple[str, ...] = ()) -> bytes:
        ident = f"id-{sid}".encode()
        self.send(S, ident, P.REGISTER, {"sid": sid, "slots": slots, "kinds": list(kinds), "tags": list(tags)})
        return ident

    def submit(self, tid: str, kind: str = "echo", client: bytes = b"cli", **hdr: Any) -> None:
        _, body = encode([[tid], {}])
        self.send(C, client, P.SUBMIT, {"id": tid, "k": kind, "c": "msgpack", **hdr}, *body)

    def done(self, ident: bytes, tid: str, attempt: int = 1, ok: bool = True, etype: str = "ValueError") -> None:
        hdr = {"id": tid, "a": attempt, "ok": ok, "c": "msgpack"}
        if not ok:
            hdr["err"] = {"type": etype, "msg": "bad", "tb": ""}
        self.send(S, ident, P.DONE, hdr, b"\xc0")


def of(out: list[tuple[Any, list[Any], Any]], cmd: bytes) -> list[list[Any]]:
    return [frames for _, frames, _ in out if frames[2] == cmd]


def dispatched_ids(out: list[tuple[Any, list[Any], Any]]) -> list[str]:
    return [unpack(f[3], 2**20)["id"] for f in of(out, P.DISPATCH)]


def test_submit_is_acked_then_dispatched_within_credit() -> None:
    h = Harness()
    sat = h.register(slots=2)
    out = h.tick()
    assert of(out, P.WELCOME)
    for i in range(5):
        h.submit(f"t{i}")
    out = h.tick()
    acks = of(out, P.ACK)
    assert len(acks) == 1 and unpack(acks[0][3])["ids"] == [f"t{i}" for i in range(5)]
    assert dispatched_ids(out) == ["t0", "t1"]  # credit is 2
    d = of(out, P.DISPATCH)[0]
    assert d[0] == sat and unpack(d[3]) == {"id": "t0", "a": 1}
    assert unpack(d[4])["k"] == "echo"  # the client's header, forwarded as is
    h.done(sat, "t0")
    out = h.tick()
    results = of(out, P.RESULT)
    assert len(results) == 1 and results[0][0] == b"cli" and unpack(results[0][3])["id"] == "t0"
    assert dispatched_ids(out) == ["t2"]
    assert h.core.state.tasks["t0"].state is TaskState.DONE


def test_priority_first_then_fifo() -> None:
    h = Harness()
    h.submit("low1")
    h.submit("high1", p=5)
    h.submit("low2")
    h.submit("high2", p=5)
    h.submit("mid", p=1)
    h.tick()
    sat = h.register(slots=1)
    order = []
    for _ in range(5):
        out = h.tick()
        ids = dispatched_ids(out)
        assert len(ids) == 1
        order.append(ids[0])
        h.done(sat, ids[0])
    assert order == ["high1", "high2", "mid", "low1", "low2"]


def test_tags_route_to_satellites_that_have_them() -> None:
    h = Harness()
    plain = h.register("plain", slots=4)
    gpu = h.register("gpu", slots=4, tags=("gpu", "fast"))
    h.tick()
    h.submit("needs-gpu", tg=["gpu"])
    h.submit("any")
    out = h.tick()
    where = {unpack(f[3])["id"]: f[0] for f in of(out, P.DISPATCH)}
    assert where["needs-gpu"] == gpu
    assert where["any"] in (plain, gpu)


def test_a_blocked_queue_does_not_block_others() -> None:
    h = Harness()
    h.register("plain", slots=4)
    h.tick()
    h.submit("needs-gpu", tg=["gpu"])  # nobody can run it
    h.submit("any")
    out = h.tick()
    assert dispatched_ids(out) == ["any"]
    assert h.core.state.tasks["needs-gpu"].state is TaskState.PENDING


def test_unknown_kind_is_refused_when_satellites_exist() -> None:
    h = Harness()
    h.register(kinds=("echo",))
    h.tick()
    h.submit("x", kind="nope")
    err = of(h.tick(), P.ERROR)
    assert len(err) == 1
    hdr = unpack(err[0][3])
    assert hdr["code"] == P.E_UNKNOWN_KIND and hdr["id"] == "x" and "echo" in hdr["msg"]
    assert h.core.state.counters["errors.unknown_kind"] == 1


def test_lost_satellite_requeues_with_a_new_attempt_and_stale_results_are_dropped() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=3)
    a = h.register("a", slots=1)
    h.tick()
    h.submit("t")
    assert dispatched_ids(h.tick()) == ["t"]
    b = h.register("b", slots=1)
    h.tick(2.0)
    h.send(S, b, P.HEARTBEAT, {"sid": "b"})
    out = h.tick(1.5)  # a silent for 3.5 s > 3 × 1 s
    assert "a" not in h.core.state.fleet.by_id and h.core.state.counters["satellites_lost"] == 1
    assert h.core.state.tasks["t"].state is TaskState.RETRY and h.core.state.tasks["t"].crashes == 1
    assert not of(out, P.DISPATCH)  # back-off first
    h.send(S, b, P.HEARTBEAT, {"sid": "b"})
    out = h.tick(0.6)
    d = of(out, P.DISPATCH)
    assert d and d[0][0] == b and unpack(d[0][3]) == {"id": "t", "a": 2}
    h.done(a, "t", attempt=1)  # the old satellite comes back late: unknown, told to reconnect
    out = h.tick()
    assert of(out, P.RECONNECT) and not of(out, P.RESULT)
    h.done(b, "t", attempt=1)  # an old attempt on the new satellite: stale
    assert not of(h.tick(), P.RESULT) and h.core.state.counters["stale_results"] == 1
    h.done(b, "t", attempt=2)
    assert len(of(h.tick(), P.RESULT)) == 1


def test_heartbeats_keep_a_satellite_and_are_sent_every_interval() -> None:
    h = Harness(heartbeat_interval=1.0, liveness=3)
    sat = h.register("a")
    h.tick()
    for _ in range(10):
        out = h.tick(1.0)
        assert [f[0] for f in of(out, P.HEARTBEAT)] == [sat]
        h.send(S, sat, P.HEARTBEAT, {"sid": "a"})
    assert "a" in h.core.state.fleet.by_id
    assert h.core.next_wakeup(h.now) <= 1.0


def test_a_task_that_keeps_crashing_is_quarantined_with_its_history() -> None:
    h = Harness(retries=2, liveness=1, retry_backoff=0)
    sats = [h.register(f"s{n}", slots=1) for n in range(2)]
    h.submit("t")
    out = h.tick()
    for n in range(2):
        d = of(out, P.DISPATCH)
        assert len(d) == 1 and unpack(d[0][3]) == {"id": "t", "a": n + 1} and d[0][0] in sats
        h.done(d[0][0], "t", attempt=n + 1, ok=False, etype=P.ERR_WORKER_DIED)
        out = h.tick()
    res = of(out, P.RESULT)
    err = unpack(res[0][3])["err"]
    assert len(res) == 1 and err["type"] == P.ERR_QUARANTINED and "2 crashes" in err["msg"]
    states = [a["state"] for a in err["attempts"]]
    assert states == ["pending", "dispatched", "running", "stalled", "pending", "dispatched", "running",
                      "stalled", "quarantined"]  # a result implies the task had started
    assert h.core.state.tasks["t"].state is TaskState.QUARANTINED and h.core.state.counters["quarantined"] == 1
    assert len(h.core.state.fleet) == 2  # the satellites survive


def test_satellite_reregistration_requeues_its_tasks() -> None:
    h = Harness()
    h.register("a", slots=1)
    h.tick()
    h.submit("t")
    h.tick()
    h.send(S, b"id-a-new-session", P.REGISTER, {"sid": "a", "slots": 1, "kinds": ["echo"]})  # a reconnect
    out = h.tick()
    assert [unpack(f[3]) for f in of(out, P.DISPATCH)] == [{"id": "t", "a": 2}]


def test_a_registration_again_from_the_same_session_keeps_its_tasks() -> None:
    """A burst of REGISTERs after an orchestrator restart (issue 15, item 2) is idempotent."""
    h = Harness()
    h.register("a", slots=1)
    h.tick()
    h.submit("t")
    h.tick()
    h.register("a", slots=1)  # the same routing id: the same session
    out = h.tick()
    assert of(out, P.WELCOME) and not of(out, P.DISPATCH)
    assert h.core.state.tasks["t"].attempt == 1 and h.core.state.counters["registered_again"] == 1


def test_failed_task_result_is_forwarded() -> None:
    h = Harness()
    sat = h.register()
    h.tick()
    h.submit("t")
    h.tick()
    h.done(sat, "t", ok=False)
    res = of(h.tick(), P.RESULT)
    assert unpack(res[0][3])["err"]["type"] == "ValueError"
    assert h.core.state.tasks["t"].state is TaskState.FAILED and h.core.state.counters["failed"] == 1


def test_cancel_pending_and_running() -> None:
    h = Harness()
    sat = h.register(slots=1)
    h.tick()
    h.submit("run")
    h.submit("wait")
    h.tick()
    h.send(C, b"cli", P.CANCEL, {"id": "wait", "rid": 1})
    out = h.tick()
    assert unpack(of(out, P.REPLY)[0][3]) == {"id": "wait", "cancelled": True, "state": "cancelled", "rid": 1}
    assert unpack(of(out, P.RESULT)[0][3])["err"]["type"] == P.ERR_CANCELLED
    h.send(C, b"cli", P.CANCEL, {"id": "run", "rid": 2})
    out = h.tick()
    abort = of(out, P.ABORT)
    assert abort and abort[0][0] == sat and unpack(abort[0][3]) == {"id": "run", "a": 1}
    assert h.core.state.fleet.by_id["s1"].free == 1  # the lease is revoked at once
    h.done(sat, "run", ok=False, etype=P.ERR_CANCELLED)  # the satellite confirms the kill
    out = h.tick()
    assert not of(out, P.RESULT)  # the client already had its answer
    assert h.core.state.counters["stale_results"] == 1
    h.send(C, b"cli", P.CANCEL, {"id": "nope", "rid": 3})
    assert unpack(of(h.tick(), P.ERROR)[0][3])["code"] == P.E_UNKNOWN_TASK


def test_task_timeout_aborts_and_fails() -> None:
    h = Harness()
    sat = h.register()
    h.tick()
    h.submit("t", to=5.0)
    h.tick()
    assert h.core.next_wakeup(h.now) <= 1.0
    out = h.tick(5.1)
    assert of(out, P.ABORT)[0][0] == sat
    assert unpack(of(out, P.RESULT)[0][3])["err"]["type"] == P.ERR_TIMEOUT
    assert h.core.state.counters["timeouts"] == 1


def test_duplicate_submit_is_idempotent_and_resends_a_finished_result() -> None:
    h = Harness()
    sat = h.register()
    h.tick()
    h.submit("t")
    h.tick()
    h.done(sat, "t")
    h.tick()
    h.submit("t", client=b"cli2")  # resent after a reconnect
    out = h.tick()
    assert not of(out, P.DISPATCH)
    res = of(out, P.RESULT)
    assert len(res) == 1 and res[0][0] == b"cli2"
    assert h.core.state.counters["duplicate_submits"] == 1 and h.core.state.counters["submitted"] == 1


def test_fetch_by_id_from_another_client() -> None:
    h = Harness()
    sat = h.register()
    h.tick()
    h.submit("t")
    h.tick()
    h.send(C, b"other", P.FETCH, {"id": "t", "rid": 9})
    out = h.tick()
    assert unpack(of(out, P.REPLY)[0][3]) == {"id": "t", "state": "dispatched", "rid": 9}
    h.done(sat, "t")
    assert of(h.tick(), P.RESULT)[0][0] == b"other"
    h.send(C, b"third", P.FETCH, {"id": "t", "rid": 10})
    assert of(h.tick(), P.RESULT)[0][0] == b"third"


def test_results_are_retained_within_bounds_and_undelivered_ones_kept_longest() -> None:
    h = Harness(result_retention=3)
    sat = h.register(slots=10)
    h.tick()
    for i in range(6):
        h.submit(f"t{i}")
    h.tick()
    for i in range(6):
        h.done(sat, f"t{i}")
        h.tick(undeliverable=("t0",))  # the adapter could not hand t0 over
    h.tick()
    assert len(h.core.state.results) == 3
    assert "t0" in h.core.state.results and h.core.state.results.undelivered() == ["t0"]
    assert set(h.core.state.tasks) == {"t0", "t4", "t5"}  # finished tasks leave with their results


def test_queue_limit_gives_busy() -> None:
    h = Harness(max_queue=2)
    for i in range(3):
        h.submit(f"t{i}")
    errs = of(h.tick(), P.ERROR)
    assert [unpack(e[3])["code"] for e in errs] == [P.E_BUSY]


@pytest.mark.parametrize("frames,code", [
    ([b"x"], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, P.SUBMIT], P.E_MALFORMED),
    ([b"x", b"ORCH/9", P.SUBMIT, pack({})], P.E_VERSION),
    ([b"x", b"HTTP/1.1", P.SUBMIT, pack({})], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, b"\x7f", pack({})], P.E_UNKNOWN_COMMAND),
    ([b"x", P.SIGNATURE, P.SUBMIT, b"\xc1garbage"], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, P.SUBMIT, pack({"id": 5, "k": "echo"}), b""], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, P.SUBMIT, pack({"id": "a", "k": "echo"})], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, P.SUBMIT, pack({"id": "a", "k": "echo", "tg": [1]}), b""], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, P.REGISTER, pack({"sid": "s", "slots": 0, "kinds": []})], P.E_MALFORMED),
    ([b"x", P.SIGNATURE, P.CONTROL, pack({"op": "explode"})], P.E_BAD_REQUEST),
    ([b"x", P.SIGNATURE, P.CONTROL, pack({"op": "strategy", "name": "nope"})], P.E_BAD_REQUEST),
])
def test_bad_messages_get_structured_errors(frames: list[bytes], code: str) -> None:
    h = Harness()
    h.core.handle(C, frames, h.now)
    out = h.tick()
    assert len(out) == 1
    assert out[0][1][0] == b"x" and out[0][1][2] == P.ERROR
    assert unpack(out[0][1][3])["code"] == code
    assert h.core.state.counters["bad_messages"] == 1


def test_errors_are_never_answered_with_errors() -> None:
    h = Harness()
    h.core.handle(C, [b"x", P.SIGNATURE, P.ERROR, b"\xc1"], h.now)
    h.send(C, b"x", P.ERROR, {"code": "malformed", "msg": "you"})
    assert h.tick() == []
    assert h.core.state.counters["bad_messages"] == 1 and h.core.state.counters["peer_errors"] == 1


def test_oversized_message_is_refused() -> None:
    h = Harness(max_message=1000)
    h.register()
    h.tick()
    _, body = encode([["x" * 2000], {}])
    h.send(C, b"c", P.SUBMIT, {"id": "big", "k": "echo"}, *body)
    out = h.tick()
    assert unpack(of(out, P.ERROR)[0][3]) == {"code": P.E_TOO_LARGE, "msg": "message exceeds 1000 bytes",
                                             "id": "big"}
    assert "big" not in h.core.state.tasks


def test_unknown_satellite_is_asked_to_reconnect() -> None:
    h = Harness()
    h.send(S, b"ghost", P.HEARTBEAT, {"sid": "ghost"})
    h.send(S, b"ghost", P.PROGRESS, {"id": "t", "a": 1})
    out = h.tick()
    assert len(of(out, P.RECONNECT)) == 2


def test_client_ping_is_answered_with_the_epoch() -> None:
    h = Harness()
    h.send(C, b"c", P.HEARTBEAT, {})
    out = h.tick()
    assert unpack(of(out, P.HEARTBEAT)[0][3]) == {"e": h.core.state.epoch}


def test_status_reports_tasks_queues_and_satellites() -> None:
    h = Harness()
    h.register("a", slots=1)
    h.tick()
    h.submit("t1")
    h.submit("t2")
    h.tick()
    h.send(C, b"c", P.STATUS, {"rid": 4})
    st = unpack(of(h.tick(), P.REPLY)[0][3])
    assert st["rid"] == 4 and st["strategy"] == "least_loaded"
    assert st["tasks"] == {"dispatched": 1, "pending": 1} and st["queued"] == {"echo": 1}
    assert st["satellites"][0]["id"] == "a" and st["satellites"][0]["inflight"] == 1


def test_status_lists_a_page_of_satellites_and_sums_up_the_whole_fleet() -> None:
    h = Harness()
    for i in range(250):
        ident = h.register(f"sat{i:03d}", slots=2, kinds=("echo", "genx.fit") if i % 2 else ("echo",))
        h.send(S, ident, P.HEARTBEAT, {})
    h.tick()

    def status(**hdr: Any) -> dict[str, Any]:
        h.send(C, b"c", P.STATUS, hdr)
        return dict(unpack(of(h.tick(), P.REPLY)[0][3]))

    st = status()  # by default: 100 listed, the whole fleet summed up
    assert [s["id"] for s in st["satellites"]] == [f"sat{i:03d}" for i in range(100)]
    assert st["satellites_next"] == "sat099"
    fleet = st["fleet"]
    assert fleet["satellites"] == 250 and fleet["slots"] == 500 and fleet["free"] == 500
    assert fleet["kinds"] == {"echo": 250, "genx.fit": 125} and sum(fleet["states"].values()) == 250
    assert st["satellite_states"] == fleet["states"]
    seen, after = [], None  # paged: every satellite once, in id order
    for _ in range(10):
        page = status(sats=120, **({"after": after} if after else {}))
        seen += [s["id"] for s in page["satellites"]]
        after = page["satellites_next"]
        if after is None:
            break
    assert seen == [f"sat{i:03d}" for i in range(250)]
    assert status(sats=0)["satellites"] == [] and status(sats=0)["fleet"]["satellites"] == 250
    assert status(after="sat248")["satellites"][0]["id"] == "sat249"


def test_a_status_names_the_kinds_most_offered_and_sums_a_large_fleet_up_once_a_second() -> None:
    h = Harness()
    h.register("wide", kinds=tuple(f"k{i:03d}" for i in range(200)))
    for i in range(1001):
        h.register(f"sat{i:04d}")
    h.tick()

    def status() -> dict[str, Any]:
        h.send(C, b"c", P.STATUS, {"sats": 5})
        return dict(unpack(of(h.tick(), P.REPLY)[0][3]))

    fleet = status()["fleet"]
    assert fleet["kinds_offered"] == 201 and len(fleet["kinds"]) == 64 and fleet["kinds"]["echo"] == 1001
    assert fleet["satellites"] == 1002
    h.register("sat9999")  # a fleet this large is summed up again a second later; its list is up to date
    st = status()
    assert st["fleet"]["satellites"] == 1002 and st["satellites"][0]["id"] == "sat0000"
    h.now += 1.1
    assert status()["fleet"]["satellites"] == 1003


@pytest.mark.parametrize("hdr", [{"sats": -1}, {"sats": 1001}, {"sats": "all"}, {"sats": True}, {"sats": 1.5},
                                 {"after": ""}, {"after": "x" * 500}, {"after": 7}])
def test_a_status_page_out_of_range_is_refused(hdr: dict[str, Any]) -> None:
    h = Harness()
    h.register("a")
    h.tick()
    h.send(C, b"c", P.STATUS, hdr)
    err = unpack(of(h.tick(), P.ERROR)[0][3])
    assert err["code"] == P.E_MALFORMED


def test_events_only_when_subscribed_and_strategy_switch_is_published() -> None:
    h = Harness()
    h.register()
    h.tick()
    h.submit("quiet")
    h.tick()
    assert h.core.outbox.events == []
    h.core.subscription(b"\x01task:")
    h.core.subscription(b"\x01control:")
    h.submit("loud")
    h.tick()
    topics = [f[0] for f in h.core.outbox.events]
    assert topics == [b"task:loud", b"task:loud"]
    assert [unpack(f[1])["state"] for f in h.core.outbox.events] == ["pending", "dispatched"]
    h.core.outbox.events.clear()
    h.send(C, b"c", P.CONTROL, {"op": "strategy", "name": "round_robin", "rid": 1})
    out = h.tick()
    assert unpack(of(out, P.REPLY)[0][3]) == {"strategy": "round_robin", "previous": "least_loaded", "rid": 1}
    assert h.core.state.strategy.name == "round_robin"
    assert h.core.outbox.events[0][0] == b"control:strategy"
    assert unpack(h.core.outbox.events[0][1])["new"] == "round_robin"
    h.core.subscription(b"\x00task:")
    h.core.subscription(b"\x00control:")
    h.core.outbox.events.clear()
    h.submit("quiet2")
    h.tick()
    assert h.core.outbox.events == []


def test_progress_is_published_without_reencoding() -> None:
    h = Harness()
    sat = h.register()
    h.tick()
    h.core.subscription(b"\x01")  # everything
    h.submit("t")
    h.tick()
    h.core.outbox.events.clear()
    raw = pack({"id": "t", "a": 1, "step": 3})
    h.send(S, sat, P.PROGRESS, raw, raw=True)
    assert h.core.outbox.events[-1] == [b"progress:t", raw]  # forwarded as received
    assert unpack(h.core.outbox.events[0][1])["state"] == "running"  # progress implies the task started


def test_satellite_leave_requeues_at_once() -> None:
    h = Harness()
    a = h.register("a", slots=1)
    h.tick()
    h.submit("t")
    h.tick()
    h.send(S, a, P.LEAVE, {"sid": "a"})
    b = h.register("b", slots=1)
    out = h.tick()
    assert of(out, P.DISPATCH)[0][0] == b


def test_per_client_limits_refuse_with_a_structured_error_and_free_up_with_results() -> None:
    h = Harness(max_client_tasks=3, max_client_bytes=10_000)
    sat = h.register(slots=1)
    h.tick()
    for i in range(3):
        h.submit(f"a{i}", client=b"alice")
    h.submit("a3", client=b"alice")  # a fourth unfinished task: refused
    h.submit("b0", client=b"bob")  # another client is not affected
    out = h.tick()
    errors = [unpack(f[3]) for f in of(out, P.ERROR)]
    assert [(e["code"], e["id"]) for e in errors] == [(P.E_LIMIT, "a3")]
    assert "max-client-tasks" in errors[0]["msg"]
    assert h.core.state.client_load[b"alice"][0] == 3 and h.core.state.client_load[b"bob"][0] == 1
    h.done(sat, "a0")
    h.tick()
    assert h.core.state.client_load[b"alice"][0] == 2
    h.submit("a3", client=b"alice")  # room again
    out = h.tick()
    assert not of(out, P.ERROR) and "a3" in h.core.state.tasks
    big = b"x" * 20_000
    h.send(C, b"carol", P.SUBMIT, {"id": "c0", "k": "echo", "c": "msgpack"}, big)
    err = unpack(of(h.tick(), P.ERROR)[0][3])
    assert err["code"] == P.E_LIMIT and "max-client-bytes" in err["msg"] and b"carol" not in h.core.state.client_load


def test_a_client_takes_a_reply_larger_than_a_request_header() -> None:
    """Found by the 100k-frame fuzz run: a status of a large fleet passed 64 KiB and clients dropped it."""
    from orchester.client.core import ClientCore

    got: list[Any] = []
    core = ClientCore(lambda fut, v: got.append(v), lambda fut, e: got.append(e))
    frames = core.request("fut", P.STATUS, {})
    rid = unpack(frames[2])["rid"]
    core.handle([P.SIGNATURE, P.REPLY, pack({"rid": rid, "satellites": ["x" * 100] * 2000})])
    assert len(got) == 1 and len(got[0]["satellites"]) == 2000


def test_an_operator_drains_a_satellite() -> None:
    h = Harness()
    sat = h.register("s1", slots=2)
    h.register("s2", slots=2)
    h.tick()
    h.send(C, b"ops", P.CONTROL, {"op": "drain", "sid": "s1", "rid": 5})
    out = h.tick()
    reply = unpack(of(out, P.REPLY)[0][3])
    assert reply == {"rid": 5, "sid": "s1", "state": "draining", "inflight": 0}
    for i in range(4):
        h.submit(f"t{i}")
    out = h.tick()
    assert all(f[0] == b"id-s2" for f in of(out, P.DISPATCH))  # nothing more for the drained one
    h.send(C, b"ops", P.CONTROL, {"op": "drain", "sid": "nope", "rid": 6})
    err = unpack(of(h.tick(), P.ERROR)[0][3])
    assert err["code"] == P.E_BAD_REQUEST and "no satellite 'nope'" in err["msg"]
    assert sat == b"id-s1"


def test_an_ack_of_many_tasks_is_cut_into_acks_a_client_reads() -> None:
    """A client resending tens of thousands of tasks after a failover gets them accepted in several ACKs, each
    within what a peer reads (64 KiB headers), in order, every id once."""
    from serializers import messages as M
    from serializers.header import MAX_HEADER

    h = Harness()
    h.tick()
    ids = [f"{i:08d}-" + "x" * 40 for i in range(5_000)] + ["é" * 256] * 3
    for tid in ids[:-3]:
        h.submit(tid)
    for i in range(3):
        h.submit("é" * 255 + str(i))
    out = h.tick()
    acks = of(out, P.ACK)
    assert len(acks) > 1 and all(len(f[3]) <= MAX_HEADER for f in acks)
    got = [tid for f in acks for tid in unpack(f[3])["ids"]]
    assert got == ids[:-3] + ["é" * 255 + str(i) for i in range(3)]
    assert len(M.acks(["é" * 256] * 200, "e")) > 1  # (non-ASCII ids weigh their UTF-8 bytes)
    assert all(len(frames[2]) <= MAX_HEADER for frames in M.acks(["é" * 256] * 200, "e"))


def test_a_task_told_by_its_done_alone_began_as_long_ago_as_it_ran_never_before_its_dispatch() -> None:
    """A satellite tells no STARTED for a task that ended within its STARTED_DELAY: the DONE's ``dt`` dates the
    running row (the history's work seconds), bounded by the dispatch (a satellite's ``dt`` cannot move it back)."""
    h = Harness()
    clock = [1234.5]
    h.core = Orchestrator(h.core.cfg, h.now, wall=lambda: clock[0])
    sat = h.register("s", slots=2)
    for tid in ("short", "liar"):
        h.submit(tid)
    h.tick()
    clock[0] += 1.0  # a second after their dispatch
    for tid, dt in (("short", 0.005), ("liar", 1e6)):
        h.send(S, sat, P.DONE, {"id": tid, "a": 1, "ok": True, "c": "msgpack", "sat": "s", "dt": dt}, b"\xc0")
    h.tick()
    for tid, dt in (("short", 0.005), ("liar", None)):
        rows = {state: when for when, state, *_ in h.core.state.tasks[tid].history.rows()}
        running, done, dispatched = rows[TaskState.RUNNING], rows[TaskState.DONE], rows[TaskState.DISPATCHED]
        assert dispatched <= running <= done
        if dt is not None:
            assert done - running == pytest.approx(dt, abs=0.002)
        else:
            assert running == dispatched  # not before its dispatch, whatever the satellite says
