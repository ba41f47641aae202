"""Batches and light tasks on a real bus: a client's coalesced submissions, a satellite's results and
an orchestrator's dispatches travel as BATCHes; inline kinds run in the satellite's own thread."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
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


def test_errors_go_alone_and_a_batch_of_another_version_is_refused_whole(broker: Any, socket: Any) -> None:
    """What a peer can provoke without bound (ERRORs) never travels batched: a peer that never reads holds
    at most --hwm of them queued, not --hwm batches of them."""
    from serializers import messages as M
    from serializers import pack, unpack
    from serializers import protocol as P

    s = socket(zmq.DEALER).sock  # read raw: no BATCH expanded here
    s.connect(broker.client_endpoint)
    bad = [[P.SUBMIT, pack({"id": f"b{i}", "k": "echo", "c": "msgpack"})] for i in range(3)]  # no payload
    s.send_multipart(M.batch(bad))
    got = []
    while len(got) < 3 and s.poll(10_000):
        got.append(s.recv_multipart())
    assert [f[1] for f in got] == [P.ERROR] * 3
    assert [unpack(f[2])["id"] for f in got] == ["b0", "b1", "b2"]
    old = M.batch(bad)
    old[0] = b"ORCH/1"
    s.send_multipart(old)
    assert s.poll(10_000)
    reply = s.recv_multipart()
    assert reply[1] == P.ERROR and unpack(reply[2])["code"] == P.E_VERSION
    assert not s.poll(300)  # one answer for the whole batch


def test_the_inline_runner_hands_back_what_waits_behind_a_task_that_is_not_light() -> None:
    import orchester_test_tasks  # noqa: F401  (registers t.inline_wait)

    from satellites.inline import InlineRunner
    from serializers import encode, pack
    from serializers import messages as M

    def frames(tid: str, kind: str, *args: Any) -> list[Any]:
        return [M.dispatch(tid, 1, {})[2], pack({"id": tid, "k": kind, "c": "msgpack"}), *encode([list(args), {}])[1]]

    ctx: zmq.Context[Any] = zmq.Context()
    runner = InlineRunner(ctx, "s-test")
    try:
        runner.run("slow", 1, frames("slow", "t.inline_wait", 1.0))
        runner.run("next", 1, frames("next", "echo.inline", 7))
        deadline = time.monotonic() + 10
        while runner.current != ("slow", 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        now = time.monotonic()
        assert not runner.wedged(now) and runner.wedged(now + 5.0)  # past its patience: not light
        assert runner.reclaim() == [("next", 1)] and list(runner.pending) == [("slow", 1)]
        answers: list[Any] = []
        deadline = time.monotonic() + 10
        while (runner.pending or runner.abandoned) and time.monotonic() < deadline and runner.results.poll(10_000):
            answers.extend(runner.drain())
        done = [a[1] for a in answers if a[0] == b"D"]
        assert done == ["slow"]  # "next" was skipped: a worker runs it now
        assert not runner.pending and not runner.abandoned
    finally:
        runner.close()
        ctx.destroy(linger=0)
