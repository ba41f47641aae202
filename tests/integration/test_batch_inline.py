"""Batches and light tasks on a real bus: a client's coalesced submissions, a satellite's results and
an orchestrator's dispatches travel as BATCHes; inline kinds run in the satellite's own thread."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import FAST_HB, TEST_ENV

from orchester import AsyncClient, LocalCluster, TaskFailed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bus() -> Iterator[LocalCluster]:
    with LocalCluster(satellites=1, workers=1, prefetch=8, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      env=TEST_ENV, log_level="ERROR") as cluster:
        yield cluster


def test_a_burst_travels_in_batches_and_every_result_comes_once(bus: LocalCluster) -> None:
    client = bus.client()
    before = client.status()["counters"]
    futures = client.submit_many("echo", [(i,) for i in range(2_000)])
    assert [f.result(120) for f in futures] == list(range(2_000))
    assert list(client.map("echo.inline", range(500), timeout=120)) == list(range(500))
    after = client.status()["counters"]
    # SUBMITs, STARTEDs and DONEs came several to a message, and dispatches, acks and results went so
    assert after["batches_in"] - before.get("batches_in", 0) > 0
    assert after["batches_out"] - before.get("batches_out", 0) > 0
    assert after["messages_in"] - before["messages_in"] >= 2_500
    assert after.get("stale_results", 0) == before.get("stale_results", 0)


def test_an_inline_kind_runs_in_the_satellite_process_and_others_in_workers(bus: LocalCluster) -> None:
    client = bus.client()
    assert len(bus.satellites) == 1
    satellite_pid = bus.satellites[0].pid
    assert {client.submit("t.inline_pid").result(60) for _ in range(5)} == {satellite_pid}
    worker_pids = {client.submit("t.pid").result(60) for _ in range(5)}
    assert satellite_pid not in worker_pids  # the default stays a worker process
    wide = client.submit("t.inline_pid", cores=2)  # more than one core: a worker process, whatever its kind
    assert wide.result(60) not in (satellite_pid, None)


def test_an_inline_task_cancelled_while_running_is_answered_at_once_and_others_go_on(bus: LocalCluster) -> None:
    client = bus.client()
    slow = client.submit("t.inline_wait", 3.0)
    deadline = time.monotonic() + 30
    while client.show(slow.task_id)["state"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    client.cancel(slow.task_id)
    with pytest.raises(TaskFailed) as e:
        slow.result(30)
    assert e.value.type == "Cancelled"
    # while the thread still runs the abandoned task, light tasks go to a worker process
    t0 = time.monotonic()
    pids = [client.submit("t.inline_pid").result(30) for _ in range(3)]
    assert time.monotonic() - t0 < 30
    assert bus.satellites[0].pid not in pids[:1]
    time.sleep(3.5)  # the abandoned task ends, its result is dropped; the thread serves again
    assert client.submit("t.inline_pid").result(30) == bus.satellites[0].pid


def test_an_asyncio_submit_loop_coalesces(bus: LocalCluster) -> None:
    import asyncio

    async def main() -> list[int]:
        async with AsyncClient(bus.endpoint) as client:
            futures = [client.submit_nowait("echo.inline", i) for i in range(300)]
            return list(await asyncio.gather(*futures))

    before = bus.client().status()["counters"].get("batches_in", 0)
    assert asyncio.run(main()) == list(range(300))
    assert bus.client().status()["counters"]["batches_in"] > before
