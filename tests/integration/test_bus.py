"""End to end on real processes: an orchestrator, satellites and clients on loopback."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest
from conftest import FAST_HB, TEST_ENV

from orchester import AsyncClient, Client, LocalCluster, RemoteError, TaskFailed
from serializers import protocol as P

pytestmark = pytest.mark.integration


def wait_until(pred, timeout: float = 30.0, every: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``pred`` until it is truthy (bounded); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def test_builtin_kinds(cluster: LocalCluster) -> None:
    c = cluster.client()
    assert c.submit("echo", {"a": [1, 2]}).result(30) == {"a": [1, 2]}
    assert c.submit("echo", 1, 2, k=3).result(30) == {"args": [1, 2], "kwargs": {"k": 3}}
    assert c.submit("sleep", 0.05).result(30) == 0.05
    with pytest.raises(TaskFailed) as e:
        c.submit("fail", "boom", "ValueError").result(30)
    assert e.value.type == "ValueError" and e.value.message == "boom"
    assert "Traceback" in e.value.remote_traceback and "raise cls(message)" in e.value.remote_traceback


def test_numpy_payloads_roundtrip(cluster: LocalCluster) -> None:
    c = cluster.client()
    arr = np.random.default_rng(1).random((256, 512))  # 1 MiB
    out = c.submit("echo", {"arr": arr, "label": "x"}).result(30)
    np.testing.assert_array_equal(out["arr"], arr)
    assert out["label"] == "x"
    out = c.submit("echo", arr[:, ::3], codec="json").result(30)
    np.testing.assert_array_equal(out, arr[:, ::3])


def test_ten_thousand_tasks_every_result_right_none_twice(cluster: LocalCluster) -> None:
    c = cluster.client()
    n = 10_000
    results = list(c.map("echo", range(n), timeout=300))
    assert results == list(range(n))
    st = c.status()
    assert st["counters"]["done"] == n
    done = sorted(s["done"] for s in st["satellites"])
    assert sum(done) == n and done[0] > 0  # both satellites worked


def test_unknown_kind_is_refused(cluster: LocalCluster) -> None:
    c = cluster.client()
    with pytest.raises(RemoteError) as e:
        c.submit("no.such.kind").result(30)
    assert e.value.code == P.E_UNKNOWN_KIND


def test_cpu_bound_task_does_not_stop_heartbeats(cluster: LocalCluster) -> None:
    c = cluster.client()
    spin = 10 * FAST_HB * 3  # ten liveness periods of CPU in the worker
    futs = [c.submit("spin", spin) for _ in range(4)]  # every worker of both satellites busy
    assert all(f.result(60) > 0 for f in futs)
    st = c.status()
    assert st["counters"].get("satellites_lost", 0) == 0 and st["counters"].get("requeued", 0) == 0
    assert len(st["satellites"]) == 2


@pytest.mark.parametrize("kind", ["t.exit", "t.segv"])
def test_a_task_that_kills_its_worker_is_quarantined_and_workers_replaced(cluster: LocalCluster, kind: str) -> None:
    c = cluster.client()
    before = set(c.map("t.pid", range(8), timeout=30))
    fut = c.submit(kind)
    with pytest.raises(TaskFailed) as e:
        fut.result(60)
    assert e.value.type == P.ERR_QUARANTINED and "3 crashes" in e.value.message
    assert ("exit code 3" if kind == "t.exit" else "signal 11") in e.value.message
    shown = c.show(fut.task_id)
    assert shown["state"] == "quarantined" and shown["crashes"] == 3 and shown["attempt"] == 3
    assert [h["state"] for h in shown["history"]].count("stalled") == 3
    st = c.status()
    assert len(st["satellites"]) == 2 and st["counters"]["quarantined"] == 1  # the fleet survives
    assert list(c.map("echo", range(20), timeout=30)) == list(range(20))
    after = wait_until(lambda: set(c.map("t.pid", range(16), timeout=30)) - before)
    assert after  # new worker processes serve


def test_cancel_running_task_kills_its_worker(cluster: LocalCluster) -> None:
    c = cluster.client()
    fut = c.submit("sleep", 30)
    wait_until(lambda: c.show(fut.task_id)["state"] == "running")
    reply = c.cancel(fut.task_id)
    assert reply["cancelled"] is True
    with pytest.raises(TaskFailed) as e:
        fut.result(10)
    assert e.value.type == P.ERR_CANCELLED
    assert wait_until(lambda: sum(s["inflight"] for s in c.status()["satellites"]) == 0, 10)
    assert c.submit("echo", 5).result(30) == 5


def test_task_timeout(cluster: LocalCluster) -> None:
    c = cluster.client()
    with pytest.raises(TaskFailed) as e:
        c.submit("sleep", 30, timeout=0.5).result(20)
    assert e.value.type == P.ERR_TIMEOUT
    assert c.submit("echo", 1).result(30) == 1


def test_progress_events_and_task_events(cluster: LocalCluster) -> None:
    c = cluster.client()
    with c.subscribe(["progress:", "task:"]) as events:
        time.sleep(0.3)  # let the subscription reach the orchestrator
        fut = c.submit("t.progress", 4, 0.08)
        assert fut.result(30) == fut.task_id
        seen: list = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ev = events.recv(timeout=1)
            if ev is None:
                break
            if ev.data.get("id") == fut.task_id:
                seen.append(ev)
            if any(e.data.get("state") == "done" for e in seen):
                break
    steps = [e.data["step"] for e in seen if e.category == "progress"]
    states = [e.data["state"] for e in seen if e.category == "task"]
    assert steps and steps == sorted(steps) and steps[-1] <= 4
    assert states[0] == "pending" and states[-1] == "done" and "dispatched" in states


def test_strategy_switch_at_run_time(cluster: LocalCluster) -> None:
    c = cluster.client()
    with c.subscribe(["control:"]) as events:
        time.sleep(0.3)
        assert c.set_strategy("round_robin") == {"strategy": "round_robin", "previous": "least_loaded"}
        ev = events.recv(timeout=10)
    assert ev is not None and ev.topic == "control:strategy" and ev.data["new"] == "round_robin"
    with pytest.raises(Exception, match="unknown routing strategy"):
        c.set_strategy("nonsense")
    assert list(c.map("echo", range(50), timeout=30)) == list(range(50))
    assert c.status()["strategy"] == "round_robin"


def test_kill_9_satellite_mid_run_every_task_completes() -> None:
    with LocalCluster(satellites=2, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      env=TEST_ENV, log_level="ERROR") as cluster:
        c = cluster.client()
        futs = [c.submit("t.identity", i) for i in range(400)]
        for f in futs[:20]:
            f.result(30)
        victim = cluster.satellites[0]
        victim.send_signal(signal.SIGKILL)
        results = [f.result(60) for f in futs]
        assert [r["x"] for r in results] == list(range(400))
        st = c.status()
        assert st["counters"]["satellites_lost"] == 1
        assert [s["id"] for s in st["satellites"]] == ["local-1"]
        assert st["counters"]["stalled"] > 0  # the victim had tasks in flight: they ran again elsewhere
        assert any(r["attempt"] == 2 and r["sat"] == "local-1" for r in results)
        assert st["counters"]["done"] == 400  # every task exactly once from the orchestrator's view


def test_orchestrator_restart_satellites_reregister_and_work_resumes() -> None:
    with LocalCluster(satellites=2, workers=1, heartbeat_interval=FAST_HB, log_level="ERROR") as cluster:
        c = cluster.client()
        assert c.submit("echo", "before").result(30) == "before"
        endpoint, pub = cluster.endpoint, cluster.pub_endpoint
        first_epoch = c.status()["epoch"]
        assert cluster.orchestrator is not None
        cluster.orchestrator.kill()
        cluster.orchestrator.wait(10)
        pending = c.submit("sleep", 0.1)  # submitted while no orchestrator runs
        cluster.start_orchestrator(bind=endpoint, pub=pub)
        assert pending.result(60) == 0.1  # resent by the client after the restart
        wait_until(lambda: len(c.status()["satellites"]) == 2, 30)
        assert c.status()["epoch"] != first_epoch
        assert list(c.map("echo", range(100), timeout=60)) == list(range(100))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_does_not_grow_the_orchestrator() -> None:
    """Results for a client that stopped reading are bounded: hwm messages in ZeroMQ plus the retention store."""
    import zmq

    from serializers import encode, pack

    retention, n, size = 200, 1500, 50_000
    with LocalCluster(satellites=1, workers=2, heartbeat_interval=FAST_HB, log_level="ERROR",
                      tasks=["orchester_test_tasks"], env=TEST_ENV,
                      serve_args=["--result-retention", str(retention), "--hwm", "50"]) as cluster:
        assert cluster.orchestrator is not None
        pid = cluster.orchestrator.pid
        rss0 = rss_mb(pid)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.rcvhwm = 1
        s.setsockopt(zmq.RCVBUF, 4096)
        s.connect(cluster.endpoint)
        blob = "x" * size
        try:
            for i in range(n):
                _, body = encode([[size], {}])
                s.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": f"mute-{i}", "k": "t.blob"}), *body])
            with Client(cluster.endpoint) as c:
                st = wait_until(lambda: (lambda st: st if st["counters"].get("done", 0) >= n else None)(
                    c.status()), 120)
                growth = rss_mb(pid) - rss0
                # unbounded, the results alone would be n * size = 75 MB; bounded: about
                # (retention + hwm) * size = 12.5 MB plus socket buffers
                assert growth < 30, f"orchestrator grew by {growth:.0f} MB"
                assert st["results_retained"] <= retention
                assert st["counters"]["results_undeliverable"] > 0
                assert st["tasks"].get("done", 0) <= retention
                # undelivered results stay available for fetch by id
                fetched = 0
                for i in range(n - 1, n - 300, -1):
                    try:
                        assert c.result(f"mute-{i}", timeout=30) == blob
                        fetched += 1
                        break
                    except RemoteError:
                        continue
                assert fetched
        finally:
            s.close(0)
            ctx.term()


def test_async_client(cluster: LocalCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster.endpoint) as c:
            assert await c.submit("echo", 7) == 7
            assert await c.map("echo", range(100)) == list(range(100))
            st = await c.status()
            assert len(st["satellites"]) == 2
            with pytest.raises(TaskFailed):
                await c.submit("fail")
            arr = np.arange(10.0)
            np.testing.assert_array_equal(await c.submit("echo", arr), arr)
            # options are options, never task arguments (they once reached the handler as keywords)
            assert await c.submit_nowait("echo", 5, duration=1.0, task_id="async-id") == 5
            assert (await c.show("async-id"))["state"] == "done"
            stream = await c.subscribe(["task:"])
            try:
                await asyncio.sleep(0.3)
                await c.submit("echo", "seen")
                events = [await asyncio.to_thread(stream.recv, 5.0) for _ in range(3)]
                assert any(e is not None and e.category == "task" for e in events)
            finally:
                stream.close()
            drained = await c.drain(st["satellites"][0]["id"])
            assert drained["state"] == "draining"

    asyncio.run(main())


def test_result_by_id_from_a_second_client(cluster: LocalCluster) -> None:
    a, b = cluster.client(), cluster.client()
    fut = a.submit("sleep", 0.2)
    a.status()  # requests on one socket are handled in order: the submit is in once this returns
    assert b.result(fut.task_id, timeout=30) == 0.2
    with pytest.raises(RemoteError) as e:
        b.result("never-submitted", timeout=30)
    assert e.value.code == P.E_UNKNOWN_TASK
