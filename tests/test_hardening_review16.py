"""Findings of the attacker's review of the restructured core (issue 16), one test each.

Each failed before its fix: a satellite key that pumps a task's attempt number until the journal
cannot be compacted; spilled payloads read back by a cut task id; values nested a thousand deep
in a peer-link message or a journal record; ids cut inside a UTF-8 character; a refusal that
lists every kind of a large fleet; cancelled entries that fill the queue; a task restored
without an owner on a keyed server; a refused registration that still claims its satellite id;
an acknowledgement of records never sent.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from test_core import C, Harness, S, of

from orchester.config import OrchestratorConfig
from orchester.ha import link
from orchester.ha.leader import Leader
from orchester.ha.pair import Pair
from orchester.ha.star import HAState
from orchester.journal import records as R
from orchester.journal.hdf5 import read_h5_fields
from orchester.journal.historian import history
from orchester.journal.segments import compact, read_task_record
from orchester.journal.wal import encode_record
from orchester.journal.writer import load_spilled, replay
from orchester.server.core import Orchestrator
from orchester.server.lifecycle import MAX_ATTEMPTS
from orchester.server.ports import Ports
from orchester.server.restore import RestoreFold
from serializers import encode, pack, unpack
from serializers import protocol as P
from tracker import TaskState

_, BODY = encode([[1], {}])


def _deep(depth: int = 1000) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _log(directory: Path, recs: list[list[Any]]) -> Path:
    path = directory / "wal-000001.log"
    path.write_bytes(b"".join(encode_record(r) for r in recs))
    return path


def _who(name: str | None, roles: frozenset[str] = frozenset({"submit", "satellite"}),
         kinds: frozenset[str] | None = None) -> Any:
    return None if name is None else type("Who", (), {"name": name, "roles": roles, "kinds": kinds})()


def test_a_satellite_re_registering_in_a_loop_cannot_pump_a_task_s_attempts(tmp_path: Path) -> None:
    h = Harness()
    h.use_ports(journal=True)
    h.submit("t")
    h.tick()
    for i in range(MAX_ATTEMPTS + 50):  # each registration on the same connection reroutes, with no crash
        h.send(S, b"mallory", P.REGISTER, {"sid": f"m{i % 2}", "slots": 1, "kinds": ["echo"]})
        h.tick()
    task = h.core.state.tasks["t"]
    assert task.state is TaskState.QUARANTINED and task.attempt == MAX_ATTEMPTS and task.crashes == 0
    written = h.core.outbox.take_records()
    assert max(r[3] for r in written if r[0] == R.TRANSITION) == MAX_ATTEMPTS
    # and a journal that holds more than its index column can (an older server's): compacted all the same
    log = _log(tmp_path, [R.submitted("t", b"c", pack({"id": "t", "k": "echo"}), BODY, 1.0, None, None),
                          R.transition("t", int(TaskState.DISPATCHED), 40_000, "s", None, 2.0)])
    h5 = compact(log)
    assert [r[3] for r in replay(tmp_path)[0] if r[0] == R.TRANSITION] == [40_000]  # the body keeps the truth
    assert h5.exists()


def test_a_spilled_payload_is_read_back_by_its_whole_id(tmp_path: Path) -> None:
    alice, mallory = "A" * 64 + "-alice-secret-task", "A" * 64
    log = _log(tmp_path, [
        ["S", alice, b"c:a", pack({"id": alice, "k": "echo"}), [b"ALICE"], 1.0, None, "alice"],
        ["S", mallory, b"c:m", pack({"id": mallory, "k": "echo"}), [b"MALLORY"], 2.0, None, "mallory"]])
    h5 = compact(log)
    for tid, payload in ((alice, b"ALICE"), (mallory, b"MALLORY")):
        found = read_task_record(h5, tid)
        assert found is not None and R.Submitted.of(found).task_id == tid
        assert bytes(R.Submitted.of(found).payload[0]) == payload
    assert read_task_record(h5, "A" * 64 + "-nobody") is None


def test_a_payload_lost_from_the_journal_fails_its_task_not_the_loop(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    h.use_ports(journal=True, load_spilled=load_spilled)
    h.submit("lost")
    h.submit("kept")
    h.tick()
    h.core.outbox.take_records()
    h.core.life.spilled(h.core.state.tasks["lost"], (tmp_path / "wal-000009.log", 0))  # a log that is gone
    sat = h.register("s1", slots=2)
    with caplog.at_level(logging.ERROR):
        out = h.tick()
    assert [unpack(f[3])["id"] for f in of(out, P.DISPATCH)] == ["kept"]
    assert h.core.state.tasks["lost"].state is TaskState.FAILED and h.core.state.counters["spill_lost"] == 1
    result = unpack(of(out, P.RESULT)[0][3])
    assert result["err"]["type"] == P.ERR_PAYLOAD_LOST
    assert h.core.state.queued_bytes == 0 and sat


def test_values_nested_a_thousand_deep_are_malformed_on_the_peer_link() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    cfg = OrchestratorConfig(ha="backup", state_bind="inproc://mine", peer="inproc://peer", ha_heartbeat=1.0)
    core = Orchestrator(cfg, 0.0, wall=lambda: 1000.0, ports=Ports(journal=True))
    half = Pair(cfg, ctx, core, "router", 0.0, None, lambda: 0)
    try:
        half.receive(link.encode_state(HAState.ACTIVE, "primary", "feedface", 0, False), 1.0)
        for frames in ([link.STATE, b"\x80", msgpack.packb([_deep()])],
                       [link.REC, msgpack.packb({"e": "feedface", "q": 1}), msgpack.packb([_deep()])]):
            assert half.receive(frames, 2.0) is None  # strict: anything escaping would raise here
        assert half.counters["ha_bad_messages"] == 2 and half.counters["handler_errors"] == 0
    finally:
        half.close()
        ctx.term()


def test_journal_records_nested_a_thousand_deep_are_skipped_not_fatal(tmp_path: Path) -> None:
    deep = _deep()
    for bad in (["T", "t", deep, 1, None, None, 1.0], ["T", "t", 1, deep, None, None, 1.0], [deep, "x"], ["S", deep]):
        assert R.head(bad)[0] in ("T", "S", "") and R.head(bad)[1] in ("t", "x", "")
        fold = RestoreFold()
        fold.add(bad)
        assert fold.bad == 1
    log = _log(tmp_path, [R.submitted("t", b"c", pack({"id": "t", "k": "echo"}), BODY, 1.0, None, None),
                          ["T", "t", 1, deep, None, None, 1.0]])
    compact(log)
    fold = RestoreFold()
    for rec in replay(tmp_path)[0]:
        fold.add(rec)
    assert set(fold.tasks) == {"t"} and fold.bad == 1


def test_an_id_cut_inside_a_character_never_breaks_the_history(tmp_path: Path) -> None:
    h = Harness()
    h.use_ports(journal=True)
    evil = "a" * 63 + "é"  # 64 printable characters, 65 bytes: the column holds 64
    h.submit("good")
    h.submit(evil)
    h.tick()
    h5 = compact(_log(tmp_path, h.core.outbox.take_records()))
    rows = list(read_h5_fields(h5))
    assert [r["task_id"] for r in rows] == ["good", "a" * 63]
    # the history reads the records themselves (the index column is only for lookups): the id is whole
    assert sorted(r["id"] for r in history(tmp_path, {})) == [evil, "good"]


def test_refusing_an_unknown_kind_costs_the_same_whatever_the_fleet() -> None:
    h = Harness()
    for n in range(20):
        h.send(S, f"s{n}".encode(), P.REGISTER, {"sid": f"s{n}", "slots": 1,
                                                   "kinds": [f"k{n}-{i}" for i in range(300)]})
    h.tick()
    h.send(C, b"cli", P.SUBMIT, {"id": "x", "k": "nope"}, *BODY)
    err = unpack(of(h.tick(), P.ERROR)[0][3])
    assert err["code"] == P.E_UNKNOWN_KIND and "6000 kind(s) offered" in err["msg"] and len(err["msg"]) < 300


def test_cancelled_tasks_never_fill_the_queue_for_others() -> None:
    h = Harness(max_queue=100)
    for i in range(100):
        h.submit(f"junk{i}", client=b"mallory")
        h.send(C, b"mallory", P.CANCEL, {"id": f"junk{i}", "rid": i})
    h.tick()
    h.submit("alice", client=b"alice")
    out = h.tick()
    assert not of(out, P.ERROR) and "alice" in h.core.state.tasks


def test_a_task_restored_without_an_owner_belongs_to_no_key() -> None:
    fold = RestoreFold()
    fold.add(["S", "old", b"cli", pack({"id": "old", "k": "echo"}), list(BODY), 1.0, None, None])
    h = Harness()
    h.use_ports(identify=lambda name: _who(name, frozenset({"submit", "satellite"}) | (
        {"admin"} if name == "ops" else set())))
    fold.finish(h.core, h.now, C)
    _, body = encode([[1], {}])
    for cmd, hdr in ((P.SUBMIT, {"id": "old", "k": "echo"}), (P.FETCH, {"id": "old", "rid": 1}),
                     (P.CANCEL, {"id": "old", "rid": 2})):
        h.core.handle(C, [b"c:bob", P.SIGNATURE, cmd, pack(hdr), *(body if cmd == P.SUBMIT else [])], h.now, "bob")
        assert [unpack(f[3])["code"] for f in of(h.tick(), P.ERROR)] == [P.E_FORBIDDEN]
    h.core.handle(C, [b"c:ops", P.SIGNATURE, P.CANCEL, pack({"id": "old", "rid": 3})], h.now, "ops")
    h.tick()
    assert h.core.state.tasks["old"].state is TaskState.CANCELLED


def test_a_refused_registration_claims_no_satellite_id() -> None:
    h = Harness()
    h.use_ports(identify=lambda name: _who(name, kinds=frozenset({"echo"}) if name == "mallory" else None),
                journal=True)
    h.core.handle(S, [b"m", P.SIGNATURE, P.REGISTER, pack({"sid": "gpu-1", "slots": 1, "kinds": ["gpu"]})],
                  h.now, "mallory")
    assert [unpack(f[3])["code"] for f in of(h.tick(), P.ERROR)] == [P.E_FORBIDDEN]
    assert h.core.state.sat_keys == {} and not h.core.outbox.take_records()
    h.core.handle(S, [b"g", P.SIGNATURE, P.REGISTER, pack({"sid": "gpu-1", "slots": 1, "kinds": ["gpu"]})],
                  h.now, "rightful")
    assert of(h.tick(), P.WELCOME) and h.core.state.sat_keys == {"gpu-1": "rightful"}


def test_an_acknowledgement_beyond_what_was_sent_releases_nothing_more() -> None:
    core = Orchestrator(OrchestratorConfig(), 0.0, wall=lambda: 1.0, ports=Ports(journal=True))
    seq = [10]
    leader = Leader(core=core, router="r", heartbeat=1.0, sync=True, last_seq=lambda: seq[0], send=lambda f: None,
                    clock=lambda: 0.0, now=0.0)
    leader.receive(link.decode(link.encode_sync("passive-epoch")), 0.1)  # a snapshot as of record 10
    for _ in range(100):
        if not leader.sending:
            break
        leader.tick(0.2, True)
    leader.receive(link.decode(link.encode_ack(core.state.epoch, 2**63 - 1)), 0.3)
    seq[0] = 500  # more records journaled, none acknowledged
    assert leader.acked <= leader.sent_upto and (leader.gate(True) or 0) <= 10


def test_entries_of_cancelled_tasks_are_dropped_before_they_outnumber_the_live_ones() -> None:
    h = Harness(max_queue=10_000)
    for i in range(3000):  # no satellite: nothing pops the queue heads
        h.submit(f"junk{i}", client=b"mallory")
        h.send(C, b"mallory", P.CANCEL, {"id": f"junk{i}", "rid": i})
        if i % 100 == 99:
            h.tick()
    h.submit("alice", client=b"alice")
    h.tick()
    assert len(h.core.state.queues) <= 1024 + 100 + 1 and h.core.state.queues.depth() == {"echo": 1}
