"""Dependencies and resources in the orchestrator's policy core, with in-memory messages and a fake clock.

Chains, diamonds, a fan-in of 1,000, failure propagation, a cancelled middle task, results kept
for their dependents whatever the retention, results passed by reference in the DISPATCH; cores
counted as credit, memory, and the reservation that keeps a wide task from starving; a restart
mid-graph from journal records.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_core import C, Harness, S, dispatched_ids, of

from orchester.server.restore import RestoreFold, restore
from serializers import pack, unpack
from serializers import protocol as P
from tracker import TaskState

TS = TaskState


def results_of(out: list[tuple[Any, list[Any], Any]]) -> dict[str, dict[str, Any]]:
    return {unpack(f[3])["id"]: unpack(f[3]) for f in of(out, P.RESULT)}


def dispatches(out: list[tuple[Any, list[Any], Any]]) -> dict[str, list[Any]]:
    return {unpack(f[3])["id"]: f for f in of(out, P.DISPATCH)}


def run_all(h: Harness, sat: bytes, rounds: int = 10_000, fail: frozenset[str] = frozenset()) -> list[str]:
    """Finish every dispatched task until nothing is dispatched; the order they were dispatched in."""
    order: list[str] = []
    out = h.tick()
    for _ in range(rounds):
        ids = dispatched_ids(out)
        if not ids:
            return order
        for tid in ids:
            order.append(tid)
            h.done(sat, tid, ok=tid not in fail)
        out = h.tick()
    raise AssertionError("did not settle")


def test_a_chain_runs_in_order_and_waits_in_the_waiting_state() -> None:
    h = Harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.submit("b", af=["a"])
    h.submit("c", af=["b"])
    out = h.tick()
    assert dispatched_ids(out) == ["a"]
    tasks = h.core.state.tasks
    assert tasks["b"].state is TS.WAITING and tasks["c"].state is TS.WAITING
    assert [e["state"] for e in tasks["b"].history.entries()] == ["waiting"]
    assert h.core.state.state_counts[TS.WAITING] == 2
    h.done(sat, "a")
    assert run_all(h, sat) == ["b", "c"]
    assert all(tasks[t].state is TS.DONE for t in "abc")
    assert h.core.state.state_counts[TS.WAITING] == 0


def test_chain_order_exactly() -> None:
    h = Harness()
    sat = h.register(slots=4)
    for i in range(50):
        h.submit(f"t{i}", **({"af": [f"t{i - 1}"]} if i else {}))
    assert run_all(h, sat) == [f"t{i}" for i in range(50)]


def test_a_diamond_runs_its_join_once_both_sides_are_done() -> None:
    h = Harness()
    sat = h.register(slots=4)
    h.submit("top")
    h.submit("left", af=["top"])
    h.submit("right", af=["top"])
    h.submit("join", af=["left", "right"], rf=[0, 1])
    out = h.tick()
    assert dispatched_ids(out) == ["top"]
    h.done(sat, "top")
    out = h.tick()
    assert sorted(dispatched_ids(out)) == ["left", "right"]
    h.done(sat, "left")
    out = h.tick()
    assert dispatched_ids(out) == [] and h.core.state.tasks["join"].state is TS.WAITING
    assert h.core.state.tasks["join"].blockers == 1
    h.done(sat, "right")
    out = h.tick()
    d = dispatches(out)["join"]
    hdr = unpack(d[3])
    assert hdr["rs"] == [["left", 2], ["right", 2]]  # both results follow the payload: header and body each
    payload_end = 4 + 2  # task header, body
    assert [unpack(d[payload_end])["id"], unpack(d[payload_end + 2])["id"]] == ["left", "right"]


def test_a_fan_in_of_a_thousand_waits_for_every_one() -> None:
    h = Harness(max_client_tasks=5000)
    sat = h.register(slots=64)
    ids = [f"f{i}" for i in range(1000)]
    for tid in ids:
        h.submit(tid)
    h.submit("sum", af=ids, rf=list(range(1000)))
    order = run_all(h, sat)
    assert order[-1] == "sum" and sorted(order[:-1]) == sorted(ids)
    assert h.core.state.tasks["sum"].state is TS.DONE


def test_the_fan_in_gets_every_result_by_reference() -> None:
    h = Harness(max_client_tasks=5000)
    sat = h.register(slots=2000)
    ids = [f"f{i}" for i in range(1000)]
    for tid in ids:
        h.submit(tid)
    h.submit("sum", af=ids, rf=list(range(1000)))
    out = h.tick()
    for tid in dispatched_ids(out):
        h.done(sat, tid)
    d = dispatches(h.tick())["sum"]
    assert [tid for tid, _ in unpack(d[3])["rs"]] == ids
    assert len(d) == 4 + 2 + 2 * 1000


def test_a_failure_fails_every_dependent_transitively_with_a_dependency_error() -> None:
    h = Harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.submit("b", af=["a"])
    h.submit("c", af=["b"])
    h.submit("d", af=["a"], of="run")
    h.submit("e", af=["c", "d"])
    h.tick()
    h.done(sat, "a", ok=False)
    out = h.tick()
    res = results_of(out)
    assert res["b"]["err"]["type"] == P.ERR_DEPENDENCY and res["b"]["err"]["dependency"] == "a"
    assert res["c"]["err"]["dependency"] == "b" and res["c"]["err"]["cause"] == "a"
    assert "a" in res["c"]["err"]["msg"] and "b" in res["c"]["err"]["msg"]
    assert res["e"]["err"]["dependency"] == "c" and res["e"]["err"]["cause"] == "a"
    assert dispatched_ids(out) == ["d"]  # on_failure="run": it runs anyway
    assert h.core.state.tasks["d"].state is TS.DISPATCHED
    assert h.core.state.counters["dependency_failed"] == 3


def test_a_long_chain_fails_without_recursion() -> None:
    h = Harness(max_client_tasks=10_000, result_retention=100)
    sat = h.register(slots=4)
    for i in range(3000):
        h.submit(f"t{i}", **({"af": [f"t{i - 1}"]} if i else {}))
    h.tick()
    h.done(sat, "t0", ok=False)
    h.tick()
    assert all(h.core.state.tasks.get(f"t{i}") is None or h.core.state.tasks[f"t{i}"].state is TS.FAILED
               for i in range(3000))
    assert h.core.state.counters["dependency_failed"] == 2999


def test_cancelling_a_middle_task_fails_what_follows_and_leaves_what_came_before() -> None:
    h = Harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.submit("b", af=["a"])
    h.submit("c", af=["b"])
    h.tick()
    h.send(C, b"cli", P.CANCEL, {"id": "b", "rid": 1})
    out = h.tick()
    res = results_of(out)
    assert res["b"]["err"]["type"] == P.ERR_CANCELLED
    assert res["c"]["err"]["type"] == P.ERR_DEPENDENCY and "cancelled" in res["c"]["err"]["msg"]
    assert h.core.state.tasks["a"].state is TS.DISPATCHED
    h.done(sat, "a")
    assert dispatched_ids(h.tick()) == []


def test_a_dependency_already_ended_counts_at_once() -> None:
    h = Harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.tick()
    h.done(sat, "a")
    h.tick()
    h.submit("b", af=["a"], rf=[0])
    out = h.tick()
    assert dispatched_ids(out) == ["b"]
    h.submit("x")
    h.tick()
    h.done(sat, "x", ok=False)
    h.tick()
    h.submit("y", af=["x"])
    res = results_of(h.tick())
    assert res["y"]["err"]["type"] == P.ERR_DEPENDENCY  # failed at once: its dependency had failed


def test_a_dependency_on_an_unknown_task_is_refused_and_nothing_changes() -> None:
    h = Harness()
    h.register(slots=4)
    h.submit("b", af=["nope"])
    out = h.tick()
    errors = [unpack(f[3]) for f in of(out, P.ERROR)]
    assert errors and errors[0]["code"] == P.E_UNKNOWN_TASK and "nope" in errors[0]["msg"]
    assert "b" not in h.core.state.tasks and not of(out, P.ACK)


@pytest.mark.parametrize("hdr", [
    {"af": "a"}, {"af": ["a", "a"]}, {"af": [1]}, {"af": ["a"], "rf": [1]}, {"af": ["a", "b"], "rf": [1, 0]},
    {"af": ["a"], "rf": [True]}, {"af": ["a"], "of": "maybe"}, {"cr": 0}, {"cr": 1.5}, {"cr": 10**9},
    {"mem": -1}, {"mem": 2**60}, {"af": ["self"]}, {"af": ["a"] * 20_001},
])
def test_malformed_dependencies_and_resources_are_refused(hdr: dict[str, Any]) -> None:
    h = Harness()
    h.register(slots=4)
    h.submit("a")
    h.submit("self", **hdr)
    out = h.tick()
    assert [unpack(f[3])["code"] for f in of(out, P.ERROR)] == [P.E_MALFORMED]
    assert "self" not in h.core.state.tasks


def test_results_needed_by_dependents_outlive_the_retention() -> None:
    h = Harness(result_retention=2)
    sat = h.register(slots=2)
    h.submit("a")
    h.submit("slow")
    h.submit("b", af=["a", "slow"], rf=[0])
    assert sorted(dispatched_ids(h.tick())) == ["a", "slow"]
    h.done(sat, "a")
    h.tick()
    for i in range(10):  # many results come and go while slow runs
        h.submit(f"x{i}")
        assert dispatched_ids(h.tick()) == [f"x{i}"]
        h.done(sat, f"x{i}")
    h.tick()
    assert "a" in h.core.state.results and "a" in h.core.state.tasks
    assert "x0" not in h.core.state.results and "x0" not in h.core.state.tasks  # the others follow the retention
    assert len(h.core.state.results) == 3  # two within the bound, and a, pinned
    h.done(sat, "slow")
    out = h.tick()
    assert unpack(dispatches(out)["b"][3])["rs"] == [["a", 2]]
    h.done(sat, "b")
    h.tick()
    assert h.core.state.results.pinned_bytes == 0 and "a" not in h.core.state.graph.needed
    h.send(C, b"cli", P.FETCH, {"id": "a", "rid": 1})  # its client reads it (it was kept for the dependent)
    assert "a" in results_of(h.tick())
    for i in range(3):
        h.submit(f"z{i}")
        h.tick()
        h.done(sat, f"z{i}")
        h.tick()
    assert "a" not in h.core.state.results  # then the normal retention applies


def test_a_referenced_result_goes_to_the_dependent_not_to_the_client() -> None:
    h = Harness()
    sat = h.register(slots=2)
    h.submit("a")
    h.submit("b", af=["a"], rf=[0])
    h.submit("c")
    h.submit("d", af=["c"])  # waits for it, does not take its result: c's result goes to the client
    h.tick()
    h.done(sat, "a")
    h.done(sat, "c")
    out = h.tick()
    assert set(results_of(out)) == {"c"}
    assert h.core.state.counters["results_kept"] == 1
    h.send(C, b"cli", P.FETCH, {"id": "a", "rid": 9})  # asked for: it comes
    assert set(results_of(h.tick())) == {"a"}


def test_a_dependency_of_another_key_is_forbidden() -> None:
    class Who:
        roles = frozenset({"submit", "satellite"})

    h = Harness()
    core = h.use_ports(identify=lambda user: Who() if user else None)
    core.handle(S, [b"id-s1", P.SIGNATURE, P.REGISTER, pack({"sid": "s1", "slots": 2, "kinds": ["echo"]})], h.now,
                user="sat")
    body = pack([["a"], {}])
    core.handle(C, [b"alice", P.SIGNATURE, P.SUBMIT, pack({"id": "a", "k": "echo", "c": "msgpack"}), body], h.now,
                user="alice")
    core.handle(C, [b"mallory", P.SIGNATURE, P.SUBMIT, pack({"id": "m", "k": "echo", "c": "msgpack", "af": ["a"],
                                                              "rf": [0]}), body], h.now, user="mallory")
    out = h.tick()
    assert [unpack(f[3])["code"] for f in of(out, P.ERROR)] == [P.E_FORBIDDEN]
    assert "m" not in core.state.tasks
    core.handle(C, [b"alice", P.SIGNATURE, P.SUBMIT, pack({"id": "b", "k": "echo", "c": "msgpack", "af": ["a"]}),
                    body], h.now, user="alice")
    assert core.state.tasks["b"].state is TS.WAITING


# ---------------------------------------------------------------- resources

def register_cores(h: Harness, sid: str, cores: int, workers: int | None = None, mem: int = 0,
                   prefetch: int = 0) -> bytes:
    ident = f"id-{sid}".encode()
    workers = cores if workers is None else workers
    hdr = {"sid": sid, "slots": workers + prefetch, "workers": workers, "kinds": ["echo"], "tags": [],
           "cores": cores}
    if mem:
        hdr["mem"] = mem
    h.send(S, ident, P.REGISTER, hdr)
    return ident


def test_credit_is_counted_in_cores() -> None:
    h = Harness()
    sat = register_cores(h, "s8", 8)
    h.submit("w1", cr=4)
    h.submit("w2", cr=4)
    h.submit("n1")
    out = h.tick()
    assert dispatched_ids(out) == ["w1", "w2"]
    assert unpack(dispatches(out)["w1"][3])["cr"] == 4
    record = h.core.state.fleet.by_id["s8"]
    assert record.used == 8
    h.done(sat, "w1")
    assert dispatched_ids(h.tick()) == ["n1"]
    assert record.used == 5


def test_memory_is_counted_when_a_satellite_announces_it() -> None:
    h = Harness()
    register_cores(h, "s", 8, mem=1000)
    h.submit("m1", mem=600)
    h.submit("m2", mem=600)
    h.submit("n")
    out = h.tick()
    assert dispatched_ids(out) == ["m1", "n"]  # m2 waits for memory; the narrow task passes it


def test_a_task_wider_than_every_satellite_expires_with_the_reason() -> None:
    h = Harness(queue_ttl=5.0)
    register_cores(h, "s", 4, mem=10**9)
    h.submit("huge", cr=16)
    h.submit("fat", mem=10**12)
    register_cores(h, "m", 4, mem=10**9)
    h.tick()
    res = results_of(h.tick(6.0))
    assert res["huge"]["err"]["type"] == P.ERR_EXPIRED and "16 cores" in res["huge"]["err"]["msg"]
    assert "4" in res["huge"]["err"]["msg"]
    assert res["fat"]["err"]["type"] == P.ERR_EXPIRED and "memory" in res["fat"]["err"]["msg"]


def test_a_wide_task_is_not_overtaken_forever() -> None:
    """Narrow tasks pass a wide one that does not fit, until it waited ``reserve_after``: then a
    satellite is kept for it, takes no narrow task, and runs the wide one as soon as it fits."""
    h = Harness(reserve_after=10.0, max_client_tasks=100_000)
    sats = [register_cores(h, "a", 4), register_cores(h, "b", 4)]
    running: dict[str, bytes] = {}
    n = 0

    def top_up() -> None:  # keep narrow work flowing: more than the satellites can take
        nonlocal n
        for _ in range(8):
            h.submit(f"n{n}")
            n += 1

    top_up()
    out = h.tick()
    h.submit("wide", cr=4)
    started_wide = None
    for _ in range(200):
        for f in of(out, P.DISPATCH):
            tid = unpack(f[3])["id"]
            running[tid] = f[0]
        if "wide" in running and started_wide is None:
            started_wide = h.now
            break
        # one narrow task ends on each satellite per second: there is always a core free, never four
        for sat in sats:
            mine = [t for t, s in running.items() if s == sat]
            if mine:
                h.done(sat, mine[0])
                del running[mine[0]]
        top_up()
        out = h.tick(1.0)
        for rec in h.core.state.fleet.by_id.values():
            assert rec.used <= rec.capacity == 4
    assert started_wide is not None, "the wide task starved"
    assert started_wide - 100.0 <= 10.0 + 4 + 2  # reserve_after, then the reserved satellite's tasks end
    assert h.core.state.counters["reservations"] == 1


def test_without_the_bound_narrow_tasks_pass_a_wide_one() -> None:
    h = Harness(reserve_after=1e9)
    sat = register_cores(h, "a", 4)
    h.submit("n0")
    h.tick()
    h.submit("wide", cr=4)
    h.submit("n1")
    out = h.tick()
    assert dispatched_ids(out) == ["n1"]  # backfilled past the wide one
    h.done(sat, "n0")
    h.done(sat, "n1")
    assert dispatched_ids(h.tick()) == ["wide"]


# ---------------------------------------------------------------- restart mid-graph

def journaled_harness() -> tuple[Harness, list[list[Any]]]:
    """A core that journals: its records pile up in its outbox (nobody takes them here)."""
    h = Harness()
    core = h.use_ports(journal=True)
    assert core.outbox.records is not None
    return h, core.outbox.records


def test_a_restart_mid_graph_loses_no_edge_and_runs_nothing_early() -> None:
    h, written = journaled_harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.submit("b")
    h.submit("j", af=["a", "b"], rf=[0, 1])
    h.submit("k", af=["j"])
    h.tick()
    h.done(sat, "a")
    h.tick()

    h2 = Harness()
    restore(h2.core, list(written), h2.now, C)
    tasks = h2.core.state.tasks
    assert tasks["a"].state is TS.DONE and tasks["j"].state is TS.WAITING and tasks["k"].state is TS.WAITING
    assert tasks["j"].blockers == 1 and tasks["j"].after == ("a", "b") and tasks["j"].refs == ("a", "b")
    assert "a" in h2.core.state.results and h2.core.state.graph.needed["a"] == 1
    sat2 = h2.register(slots=4)
    out = h2.tick()
    assert dispatched_ids(out) == ["b"]  # b was in flight: it runs again; j and k wait
    h2.done(sat2, "b", attempt=2)
    out = h2.tick()
    assert dispatched_ids(out) == ["j"]
    assert [tid for tid, _ in unpack(dispatches(out)["j"][3])["rs"]] == ["a", "b"]
    h2.done(sat2, "j")
    assert dispatched_ids(h2.tick()) == ["k"]


def test_a_followers_fold_keeps_a_finished_dependency_while_a_dependent_waits() -> None:
    h, written = journaled_harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.submit("slow")
    h.submit("b", af=["a", "slow"], rf=[0])
    h.tick()
    h.done(sat, "a")
    h.tick()
    for i in range(20):
        h.submit(f"x{i}")
    for _ in range(10):
        for tid in dispatched_ids(h.tick()):
            if tid != "slow":
                h.done(sat, tid)
    fold = RestoreFold(keep_finished=3)
    for rec in written:
        fold.add(rec)
    assert "a" in fold.tasks and "a" in fold.results  # held while b waits
    assert "x0" not in fold.tasks


# ---------------------------------------------------------------- what an attacker's review found

def test_a_dependent_in_flight_is_installed_by_a_restart_or_a_takeover() -> None:
    from orchester.server.restore import take_over

    h, written = journaled_harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.submit("b", af=["a"], rf=[0])
    h.tick()
    h.done(sat, "a")
    assert dispatched_ids(h.tick()) == ["b"]
    for reclaim in (0.0, 5.0):
        h2 = Harness()
        restore(h2.core, list(written), h2.now, C, reclaim=reclaim)
        assert h2.core.state.tasks["b"].state is TS.PENDING
    h3 = Harness()
    ids, counts = take_over(h3.core, list(written), h3.now, C)
    assert ids == {"a", "b"} and h3.core.state.tasks["b"].state is TS.PENDING


def test_revoking_a_key_whose_tasks_wait_for_each_other() -> None:
    class Who:
        roles = frozenset({"submit", "satellite"})

    revoked: set[str] = set()
    h = Harness()
    core = h.use_ports(identify=lambda user: Who() if user and user not in revoked else None)
    body = pack([["a"], {}])
    core.handle(C, [b"alice", P.SIGNATURE, P.SUBMIT, pack({"id": "a", "k": "echo", "c": "msgpack"}), body], h.now,
                user="alice")
    core.handle(C, [b"alice", P.SIGNATURE, P.SUBMIT, pack({"id": "b", "k": "echo", "c": "msgpack", "af": ["a"]}),
                    body], h.now, user="alice")
    revoked.add("alice")
    core.revoke({"alice"}, h.now)
    assert core.state.tasks["a"].state is TS.CANCELLED and core.state.tasks["b"].state is TS.FAILED


def test_a_result_in_another_codec_than_its_tasks_is_refused() -> None:
    h = Harness()
    sat = h.register(slots=2)
    h.submit("a")
    h.submit("b", af=["a"], rf=[0])
    h.tick()
    h.send(S, sat, P.DONE, {"id": "a", "a": 1, "ok": True, "c": "pickle"}, b"\x80\x05N.")
    res = results_of(h.tick())  # (a's own result is kept for b's connection, which asks when it wants it)
    assert res["b"]["err"]["type"] == P.ERR_DEPENDENCY and h.core.state.tasks["a"].state is TS.FAILED
    stored = h.core.state.results.get("a")
    assert stored is not None and unpack(stored.frames[2])["err"]["type"] == "BadResult"


def test_a_workers_reference_is_decoded_with_the_dependents_consent_only(tmp_path: Any) -> None:
    from satellites.worker import result_value
    from serializers import codecs

    hdr = pack({"id": "dep", "a": 1, "ok": True, "c": "pickle", "sat": "s"})
    frames = [hdr, b"\x80\x05N."]
    with pytest.raises(codecs.ProtocolError):  # a msgpack task: no pickle, whatever the DISPATCH says
        result_value("dep", frames, {})
    codecs.allow_pickle(True)
    try:
        assert result_value("dep", frames, {codecs.PICKLE_CONSENT: True}) is None  # a pickle task, with consent
    finally:
        codecs.allow_pickle(False)


def test_pinned_results_count_against_their_owners_byte_limit() -> None:
    h = Harness(max_client_bytes=20_000, result_retention=2)
    sat = h.register(slots=8)
    h.submit("slow")
    for i in range(3):
        h.submit(f"d{i}")
    h.submit("holder", af=["slow", "d0", "d1", "d2"], rf=[1, 2, 3])
    h.tick()
    for i in range(3):
        h.send(S, sat, P.DONE, {"id": f"d{i}", "a": 1, "ok": True, "c": "msgpack"}, b"\xc4" + b"x" * 9000)
    h.tick()
    assert h.core.state.results.held_by(b"cli") > 20_000
    h.submit("more")
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [e["code"] for e in errors] == [P.E_LIMIT]  # until the holder has run
    h.done(sat, "slow")
    h.tick()
    h.done(sat, "holder")
    h.tick()
    assert h.core.state.results.held_by(b"cli") == 0


def test_a_submit_header_passes_64_kib_only_by_its_dependencies() -> None:
    h = Harness(max_client_tasks=10_000)
    sat = h.register(slots=64)
    h.submit("junk", pad="x" * 70_000)
    assert [unpack(f[3])["code"] for f in of(h.tick(), P.ERROR)] == [P.E_TOO_LARGE]
    ids = [f"{i:032x}" for i in range(3000)]
    for tid in ids:
        h.submit(tid)
    h.submit("fan-in", af=ids, rf=list(range(3000)))
    assert len(h.core.state.tasks["fan-in"].header) > 64 * 1024
    run_all(h, sat)
    task = h.core.state.tasks["fan-in"]
    assert task.state is TS.DONE and len(task.header) < 1024 and task.after == tuple(ids)


def test_a_dependent_that_left_the_table_leaves_its_dependencys_edges() -> None:
    h = Harness(result_retention=5, max_client_tasks=10_000)
    h.register(slots=1)
    h.submit("x")
    h.submit("blocker")
    for i in range(200):
        h.submit(f"w{i}", af=["x"])
        h.send(C, b"cli", P.CANCEL, {"id": f"w{i}", "rid": i})
        h.tick()
    assert len(h.core.state.graph.of("x")) <= 10


def test_only_the_connection_that_passes_a_result_keeps_it_from_itself() -> None:
    h = Harness()
    sat = h.register(slots=2)
    h.submit("a", client=b"notebook")
    h.submit("b", af=["a"], rf=[0], client=b"cli")  # another connection takes a's result
    h.tick()
    h.done(sat, "a")
    assert "a" in results_of(h.tick())  # the notebook still gets a


def test_a_followers_fold_holds_a_finished_dependency_the_active_still_had() -> None:
    h, written = journaled_harness()
    h.core.cfg.result_retention = 3
    sat = h.register(slots=8)
    for t in ("slow", "a", "x1", "x2", "x3"):
        h.submit(t)
    h.tick()
    for t in ("a", "x1", "x2", "x3"):
        h.done(sat, t)
    h.submit("b", af=["a", "slow"], rf=[0])
    h.tick()
    fold = RestoreFold(keep_finished=3)
    for rec in written:
        fold.add(rec)
    h2 = Harness()
    fold.finish(h2.core, h2.now, C, reclaim=3.0)
    assert h2.core.state.tasks["b"].state is TS.WAITING and "a" in h2.core.state.results


def test_a_fold_takes_an_id_submitted_again_after_it_ended() -> None:
    h, written = journaled_harness()
    sat = h.register(slots=4)
    h.submit("a")
    h.tick()
    h.done(sat, "a")
    h.tick()
    del h.core.state.tasks["a"]  # (as the retention does)
    h.core.state.state_counts[TS.DONE] -= 1
    h.core.state.results.pop("a")
    h.submit("a")  # the same id, a new task
    h.submit("b", af=["a"], rf=[0])
    h2 = Harness()
    restore(h2.core, list(written), h2.now, C)
    assert h2.core.state.tasks["a"].state is TS.PENDING and h2.core.state.tasks["b"].state is TS.WAITING


def test_waiting_tasks_count_in_the_queue_bound() -> None:
    h = Harness(max_queue=5)
    h.submit("x")
    for i in range(10):
        h.submit(f"w{i}", af=["x"], client=f"c{i}".encode())
    waiting = h.core.state.state_counts[TS.WAITING]
    assert waiting == 4 and h.core.state.state_counts[TS.PENDING] == 1


def test_a_refused_fan_in_is_answered_with_its_id() -> None:
    h = Harness()
    h.submit("fan-in", af=[f"{i:032x}" for i in range(3000)])  # a header past 64 KiB, naming unknown tasks
    errors = [unpack(f[3]) for f in of(h.tick(), P.ERROR)]
    assert [(e["code"], e.get("id")) for e in errors] == [(P.E_UNKNOWN_TASK, "fan-in")]  # its future fails at once


def test_the_status_says_what_the_queue_asks_for() -> None:
    """An autoscaler sizes its jobs by the cores the pending tasks ask for and how long they waited."""
    h = Harness()
    h.submit("a", cr=4, dur=10.0)
    h.submit("b")
    h.submit("c", af=["a"], cr=2, dur=3.0)
    h.tick(5.0)
    state = h.core.state

    def pending_cores() -> int:
        return sum(t.cores for t in state.tasks.values() if t.state is TS.PENDING)

    queue = h.core.requests.status(h.now)["queue"]
    assert queue == {"tasks": 2, "cores": 5, "work": 40.0, "oldest_wait": 5.0, "waiting": 1}
    assert state.pending_cores == 5
    sat = register_cores(h, "s", 4)
    h.tick()
    assert state.pending_cores == pending_cores()
    assert state.pending_work == sum(t.duration * t.cores for t in state.tasks.values() if t.state is TS.PENDING)
    for tid in ("a", "b"):
        if state.tasks[tid].state is TS.DISPATCHED:
            h.done(sat, tid)
    run_all(h, sat)
    assert state.pending_cores == pending_cores() == 0
    assert h.core.requests.status(h.now)["queue"] == {"tasks": 0, "cores": 0, "work": 0.0, "oldest_wait": 0.0,
                                                      "waiting": 0}
