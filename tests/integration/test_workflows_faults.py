"""Workflows across faults: a restart of the orchestrator (journal) and a failover of a binary-star pair
in the middle of a graph lose no edge and run nothing before what it waits for."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_ENV

from orchester import Client, LocalCluster
from orchester.local.pair import LocalPair

pytestmark = pytest.mark.integration
HB = 0.2
LINKS = 10


def graph(client: Client) -> tuple[list[Any], list[Any], Any]:
    """A chain by reference (each link takes the previous result), a chain by ``after`` only, and a
    fan-in waiting for both chains' last tasks and taking their results."""
    by_ref = [client.submit("t.link", None, 0.25)]
    for _ in range(LINKS - 1):
        by_ref.append(client.submit("t.link", by_ref[-1], 0.25))
    by_after = [client.submit("t.hold", 0.25)]
    for _ in range(LINKS - 1):
        by_after.append(client.submit("t.hold", 0.25, after=[by_after[-1]]))
    join = client.submit("t.describe", [by_ref[-1], by_after[-1]])
    return by_ref, by_after, join


def check(client: Client, by_ref: list[Any], by_after: list[Any], join: Any) -> None:
    """Every task ended well; none started before what it waited for ended."""
    assert join.result(timeout=120) == {"type": "list", "error": None, "task": None}
    links = [client.result(f.task_id, timeout=60) for f in by_ref]
    assert [link["n"] for link in links] == list(range(1, LINKS + 1))
    for link in links[1:]:
        assert link["start"] >= link["previous_end"]
    holds = [f.result(timeout=60) for f in by_after]
    for before, after in zip(holds, holds[1:], strict=False):
        assert after["start"] >= before["end"], "a task ran before the task it waited for had ended"


def wait_until(futures: list[Any], done: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(f.done() for f in futures) < done and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sum(f.done() for f in futures) >= done


def test_a_restart_mid_graph_loses_no_edge_and_runs_nothing_early(tmp_path: Path) -> None:
    with LocalCluster(satellites=2, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=HB,
                      env=TEST_ENV, log_level="ERROR",
                      serve_args=["--journal", str(tmp_path / "journal")]) as cluster, \
            Client(cluster.endpoint) as client:
        by_ref, by_after, join = graph(client)
        assert join.accepted.wait(30)  # acknowledged: durable in the journal, with its edges
        wait_until(by_after, 3)
        assert cluster.orchestrator is not None
        endpoint, pub = cluster.endpoint, cluster.pub_endpoint
        cluster.orchestrator.kill()  # SIGKILL mid-graph
        cluster.orchestrator.wait(10)
        cluster.start_orchestrator(bind=endpoint, pub=pub)
        check(client, by_ref, by_after, join)
        assert client.status()["counters"]["journal_restored"] >= 2 * LINKS + 1
        deadline = time.monotonic() + 30  # the journal's history (its index, another process) has the edges
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (rows and rows[0]["state"] == "done"):
            rows = client.history(ids=[join.task_id])
            time.sleep(0.2)
        assert rows[0]["after"] == [by_ref[-1].task_id, by_after[-1].task_id]


@pytest.fixture
def pair() -> Iterator[LocalPair]:
    with LocalPair(satellites=2, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=HB, liveness=3,
                   ha_heartbeat=HB, env=TEST_ENV, log_level="WARNING") as p:
        p.wait_state("backup", "passive")
        yield p


def test_a_failover_mid_graph_loses_no_edge_and_runs_nothing_early(pair: LocalPair) -> None:
    with pair.client(heartbeat_interval=HB, liveness=3) as client:
        by_ref, by_after, join = graph(client)
        assert join.accepted.wait(30)
        wait_until(by_after, 3)
        pair.kill("primary")
        check(client, by_ref, by_after, join)
    st = pair.state("backup")
    assert st is not None and st["state"] == "active"
