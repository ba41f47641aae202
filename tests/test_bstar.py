"""The Binary Star table, cell by cell, and the pure pieces of failover (restore fold, snapshot)."""

from __future__ import annotations

from typing import Any

import pytest

from orchester.config import OrchestratorConfig
from orchester.ha.star import (
    ALIVE,
    DUAL_ACTIVE,
    DUAL_PASSIVE,
    EXPIRED,
    MISCONFIGURED,
    REFUSE,
    SERVE,
    TABLE,
    BinaryStar,
    HAEvent,
    HAState,
    compile_table,
)
from orchester.journal.records import BARRIER
from orchester.server.core import Orchestrator
from orchester.server.ports import Ports
from orchester.server.restore import RestoreFold, snapshot
from serializers import pack
from serializers import protocol as P
from tracker import TaskState

S, E = HAState, HAEvent
HB = 1.0

# Every cell, written out independently of the module's table: (state, event, guard) -> (next, verdict, alarm).
EXPECTED: dict[tuple[HAState, HAEvent, str | None], tuple[HAState | None, str | None, str | None]] = {
    (S.PRIMARY, E.PEER_PRIMARY, None): (None, None, MISCONFIGURED),
    (S.PRIMARY, E.PEER_BACKUP, None): (S.ACTIVE, None, None),
    (S.PRIMARY, E.PEER_ACTIVE, None): (S.PASSIVE, None, None),
    (S.PRIMARY, E.PEER_PASSIVE, None): (None, None, None),
    (S.BACKUP, E.PEER_PRIMARY, None): (None, None, None),
    (S.BACKUP, E.PEER_BACKUP, None): (None, None, MISCONFIGURED),
    (S.BACKUP, E.PEER_ACTIVE, None): (S.PASSIVE, None, None),
    (S.BACKUP, E.PEER_PASSIVE, None): (None, None, None),
    (S.ACTIVE, E.PEER_PRIMARY, None): (None, None, None),
    (S.ACTIVE, E.PEER_BACKUP, None): (None, None, None),
    (S.ACTIVE, E.PEER_ACTIVE, None): (None, None, DUAL_ACTIVE),
    (S.ACTIVE, E.PEER_PASSIVE, None): (None, None, None),
    (S.PASSIVE, E.PEER_PRIMARY, None): (S.ACTIVE, None, None),
    (S.PASSIVE, E.PEER_BACKUP, None): (S.ACTIVE, None, None),
    (S.PASSIVE, E.PEER_ACTIVE, None): (None, None, None),
    (S.PASSIVE, E.PEER_PASSIVE, None): (None, None, DUAL_PASSIVE),
}
for _event in (E.CLIENT_REQUEST, E.CLIENT_VOTE):
    EXPECTED.update({
        (S.PRIMARY, _event, EXPIRED): (S.ACTIVE, SERVE, None),
        (S.PRIMARY, _event, ALIVE): (None, REFUSE, None),
        (S.BACKUP, _event, EXPIRED): (None, REFUSE, None),
        (S.BACKUP, _event, ALIVE): (None, REFUSE, None),
        (S.ACTIVE, _event, EXPIRED): (None, SERVE, None),
        (S.ACTIVE, _event, ALIVE): (None, SERVE, None),
        (S.PASSIVE, _event, ALIVE): (None, REFUSE, None),
    })
EXPECTED[(S.PASSIVE, E.CLIENT_REQUEST, EXPIRED)] = (None, REFUSE, None)  # only a vote fails over
EXPECTED[(S.PASSIVE, E.CLIENT_VOTE, EXPIRED)] = (S.ACTIVE, SERVE, None)


def star_in(state: HAState, primary: bool = True) -> BinaryStar:
    """A machine put in ``state`` at time 0 (peer heard at time 0: alive until 2 s)."""
    star = BinaryStar(primary, HB, 0.0)
    star.state = state
    return star


def test_the_table_has_exactly_one_row_per_cell() -> None:
    index = compile_table()
    assert set(index) == set(EXPECTED)
    assert len(TABLE) == len(EXPECTED)


def test_a_table_with_a_hole_or_a_duplicate_is_refused() -> None:
    with pytest.raises(ValueError, match="no row"):
        compile_table(TABLE[1:])
    with pytest.raises(ValueError, match="two rows"):
        compile_table((*TABLE, TABLE[0]))


@pytest.mark.parametrize("cell", sorted(EXPECTED, key=lambda c: (c[0], c[1], str(c[2]))),
                         ids=lambda c: f"{c[0].name}-{c[1].name}-{c[2] or 'any'}")
def test_every_cell(cell: tuple[HAState, HAEvent, str | None]) -> None:
    state, event, guard = cell
    nxt, verdict, alarm = EXPECTED[cell]
    # the backup's machine for the dual-passive cell: the primary resolves it by taking over (tested below)
    star = star_in(state, primary=not (alarm == DUAL_PASSIVE))
    if event in (E.CLIENT_REQUEST, E.CLIENT_VOTE):
        now = 5.0 if guard == EXPIRED else 1.0
        serve, change = star.request(now, vote=event is E.CLIENT_VOTE)
        assert serve is (verdict == SERVE)
    else:
        change = star.peer_state(HAState(int(event)), 1.0)
        assert star.peer is HAState(int(event))
        assert star.peer_expiry == 1.0 + 2 * HB
    assert star.state is (nxt or state)
    if nxt is None and alarm is None:
        assert change is None
    else:
        assert change is not None and change.before is state and change.after is star.state
        assert change.row.alarm == alarm
    if alarm is not None:
        assert star.alarms == {alarm: 1}


def test_dual_passive_makes_the_primary_active_and_leaves_the_backup_passive() -> None:
    primary, backup = star_in(S.PASSIVE, True), star_in(S.PASSIVE, False)
    assert primary.peer_state(S.PASSIVE, 1.0).after is S.ACTIVE  # type: ignore[union-attr]
    assert backup.peer_state(S.PASSIVE, 1.0).after is S.PASSIVE  # type: ignore[union-attr]


def test_the_peer_expires_after_two_heartbeats_without_state() -> None:
    star = BinaryStar(False, HB, 0.0)
    star.peer_state(S.ACTIVE, 10.0)
    assert star.state is S.PASSIVE
    assert star.request(11.9, vote=True) == (False, None)
    serve, change = star.request(12.0, vote=True)
    assert serve and change is not None and star.state is S.ACTIVE


def test_a_fresh_primary_serves_once_no_backup_was_heard() -> None:
    star = BinaryStar(True, HB, 0.0)
    assert star.request(1.0)[0] is False
    assert star.request(2.0)[0] is True and star.state is S.ACTIVE


def test_promote_and_step_down() -> None:
    star = star_in(S.BACKUP, primary=False)
    assert star.promote().after is S.ACTIVE
    assert star.step_down().after is S.PASSIVE


# ----------------------------------------------------------------- restore fold and snapshot
def _core() -> Orchestrator:
    return Orchestrator(OrchestratorConfig(), 0.0, wall=lambda: 1000.0)


def _submit(core: Orchestrator, tid: str, now: float = 0.0) -> None:
    core.handle("c", [b"client", P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": "echo"}), b"body-" + tid.encode()],
                now)


def test_a_snapshot_rebuilds_the_same_table_and_a_barrier_supersedes_older_records() -> None:
    active = Orchestrator(OrchestratorConfig(), 0.0, wall=lambda: 1000.0, ports=Ports(journal=True))
    for i in range(5):
        _submit(active, f"t{i}")
    records: list[Any] = list(snapshot(active))
    assert records[0][0] == BARRIER
    fold = RestoreFold()
    fold.add(["S", "ghost", b"c", pack({"id": "ghost", "k": "echo"}), [b"x"], 1.0, None])  # superseded
    for rec in records:
        fold.add(rec)
    passive = _core()
    counts = fold.finish(passive, 0.0, "router")
    assert sorted(passive.state.tasks) == [f"t{i}" for i in range(5)]
    assert counts == {"requeued": 5}
    assert [bytes(f) for f in passive.state.tasks["t3"].payload] == [b"body-t3"]
    assert all(t.state is TaskState.PENDING for t in passive.state.tasks.values())


def test_in_flight_tasks_wait_for_their_satellite_then_run_again() -> None:
    fold = RestoreFold()
    fold.add(["S", "a", b"c", pack({"id": "a", "k": "echo"}), [b"x"], 1.0, None])
    fold.add(["T", "a", int(TaskState.DISPATCHED), 1, "sat-1", None, 2.0])
    fold.add(["T", "a", int(TaskState.RUNNING), 1, "sat-1", None, 2.5])
    core = _core()
    counts = fold.finish(core, 0.0, "router", reclaim=3.0)
    assert counts == {"requeued": 1, "reclaimable": 1}
    assert "a" in core.state.reclaim and len(core.state.queues) == 0
    core.housekeeping(2.9)
    assert "a" in core.state.reclaim
    core.housekeeping(3.0)
    assert not core.state.reclaim and len(core.state.queues) == 1


def test_a_re_registering_satellite_gets_its_running_task_back() -> None:
    fold = RestoreFold()
    fold.add(["S", "a", b"c", pack({"id": "a", "k": "echo"}), [b"x"], 1.0, None])
    fold.add(["T", "a", int(TaskState.RUNNING), 2, "sat-1", None, 2.5])
    core = _core()
    fold.finish(core, 0.0, "router", reclaim=3.0)
    core.handle("s", [b"sat", P.SIGNATURE, P.REGISTER, pack(
        {"sid": "sat-1", "slots": 2, "kinds": ["echo"], "running": [["a", 2], ["unknown", 1]]})], 0.5)
    task = core.state.tasks["a"]
    assert task.state is TaskState.RUNNING and task.attempt == 2 and task.satellite == "sat-1"
    assert core.state.counters["adopted"] == 1 and core.state.counters["adopt_refused"] == 1
    done = pack({"id": "a", "a": 2, "ok": True, "sat": "sat-1"})
    core.handle("s", [b"sat", P.SIGNATURE, P.DONE, done, b"result"], 0.6)
    assert task.state is TaskState.DONE


def test_docs_show_the_table_as_it_is() -> None:
    from pathlib import Path

    from orchester.ha.star import table_rst

    doc = (Path(__file__).parent.parent / "docs" / "ha.rst").read_text()
    assert table_rst() in doc, "docs/ha.rst is stale: paste orchester.ha.star.table_rst() into it"


def test_metrics_carry_the_pair_state_and_its_counters() -> None:
    from orchester.metrics.collector import Collector

    core = Orchestrator(OrchestratorConfig(), 0.0, wall=lambda: 1000.0, ports=Ports(
        ha_status=lambda now: {"state": "passive", "peer_alive": True, "replication": "follower"}))
    core.state.counters["ha_refused"] += 3
    core.state.counters["failovers"] += 1
    points = {name: value for name, _, value in Collector("o").collect(core, 0.0, 1000.0)}
    assert points["o.ha.state"] == 4 and points["o.ha.peer_alive"] == 1 and points["o.ha.replicating"] == 0
    assert points["o.counters.ha_refused"] == 3 and points["o.counters.failovers"] == 1


def test_a_following_fold_drops_finished_payloads_and_keeps_what_retention_keeps() -> None:
    fold = RestoreFold(keep_finished=2)
    for i in range(5):
        s_rec = ["S", f"t{i}", b"c", pack({"id": f"t{i}", "k": "echo"}), [b"payload"], 1.0, None]
        fold.add(s_rec)
        fold.add(["T", f"t{i}", int(TaskState.DONE), 1, "sat", None, 2.0])
        fold.add(["R", f"t{i}", [pack({"id": f"t{i}", "ok": True}), b"r"], 2.0])
        assert s_rec[4] == [b"payload"]  # the record itself is untouched (it may be on its way to disk)
    fold.add(["S", "open", b"c", pack({"id": "open", "k": "echo"}), [b"keep"], 1.0, None])
    assert sorted(fold.tasks) == ["open", "t3", "t4"] and sorted(fold.results) == ["t3", "t4"]
    assert fold.tasks["t4"][0].payload == [] and fold.tasks["open"][0].payload == [b"keep"]
