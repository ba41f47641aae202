"""Workflows through real processes: dependencies, results by reference, failure propagation, cores.

An orchestrator and satellites are started as processes (:class:`~orchester.LocalCluster`); the
clients are the public :class:`~orchester.Client` and :class:`~orchester.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest
from conftest import FAST_HB, TEST_ENV

import orchester
from orchester import LocalCluster, RemoteError, TaskFailed
from serializers import protocol as P


def test_a_chain_passes_each_result_by_reference_and_the_client_gets_only_the_last(
        cluster: LocalCluster) -> None:
    with cluster.client() as client:
        fut = client.submit("t.inc", 0)
        for _ in range(30):
            fut = client.submit("t.inc", fut)
        assert fut.result(timeout=60) == 31
        assert client.core.rx == 1  # one RESULT came over this connection: the last one


def test_an_intermediate_result_comes_when_asked_for(cluster: LocalCluster) -> None:
    with cluster.client() as client:
        a = client.submit("t.inc", 1)
        b = client.submit("t.inc", a, by=10)
        assert b.result(timeout=30) == 12
        assert a.result(timeout=30) == 2  # kept by the orchestrator for b, fetched now


def test_a_fan_out_and_its_fan_in(cluster: LocalCluster) -> None:
    with cluster.client() as client:
        parts = [client.submit("t.inc", i) for i in range(3000)]  # its DISPATCH header is above 64 KiB
        total = client.submit("t.sum", parts)
        assert total.result(timeout=120) == sum(range(1, 3001))
        show = client.show(total.task_id)
        assert show["after"] == [p.task_id for p in parts] and show["state"] == "done"
        assert client.show(parts[0].task_id)["dependents"] == [total.task_id]


def test_a_failure_fails_its_dependents_unless_they_run_on_failure(cluster: LocalCluster) -> None:
    with cluster.client() as client:
        bad = client.submit("fail", "no", "ValueError")
        child = client.submit("t.inc", bad)
        grandchild = client.submit("t.inc", child)
        cleanup = client.submit("t.describe", bad, on_failure="run")
        waits = client.submit("echo", 1, after=[grandchild])
        with pytest.raises(TaskFailed) as first:
            grandchild.result(timeout=30)
        assert first.value.type == P.ERR_DEPENDENCY and child.task_id in str(first.value)
        with pytest.raises(TaskFailed) as second:
            waits.result(timeout=30)
        assert second.value.type == P.ERR_DEPENDENCY
        assert cleanup.result(timeout=30) == {"type": "TaskFailed", "error": "ValueError", "task": bad.task_id}


def test_references_by_id_and_after_by_id(cluster: LocalCluster) -> None:
    with cluster.client() as client:
        a = client.submit("t.inc", 41)
        tid = a.task_id
        assert a.result(timeout=30) == 42
        b = client.submit("t.inc", orchester.ref(tid))
        c = client.submit("echo", "then", after=tid)
        assert b.result(timeout=30) == 43 and c.result(timeout=30) == "then"
        assert client.show(c.task_id)["after"] == [tid]
        rows = {r["id"]: r for r in client.history(ids=[tid, b.task_id, c.task_id])}
        assert rows[b.task_id]["after"] == [tid] and rows[c.task_id]["after"] == [tid] and rows[tid]["after"] == []
        mapped = list(client.map("t.inc", [1, 2], after=[c]))
        assert mapped == [2, 3]


def test_a_dependency_on_an_unknown_task_is_refused(cluster: LocalCluster) -> None:
    with cluster.client() as client:
        with pytest.raises(RemoteError) as err:
            client.submit("echo", 1, after=["f" * 32]).result(timeout=30)
        assert err.value.code == P.E_UNKNOWN_TASK
        with pytest.raises(ValueError):
            client.submit("echo", 1, on_failure="sometimes")
        with pytest.raises(ValueError):
            client.submit("echo", 1, cores=0)


def test_the_async_client_and_map_carry_dependencies(cluster: LocalCluster) -> None:
    async def main() -> tuple[int, list[Any]]:
        async with orchester.AsyncClient(cluster.endpoint) as client:
            a = client.submit_nowait("t.inc", 1)
            b = client.submit_nowait("t.inc", a)
            c = await client.submit("t.sum", [a, b])
            return c, await client.map("echo", [1, 2], after=[b])

    assert asyncio.run(asyncio.wait_for(main(), 60)) == (5, [1, 2])


def test_a_task_gets_its_cores_in_its_thread_pools() -> None:
    with LocalCluster(satellites=1, workers=2, cores=4, tasks=["orchester_test_tasks"],
                      heartbeat_interval=FAST_HB, env=TEST_ENV) as cluster, cluster.client() as client:
        wide = client.submit("t.threads", cores=3).result(timeout=60)
        narrow = client.submit("t.threads").result(timeout=60)
        assert wide["cores"] == 3 and wide["omp"] == "3" and set(wide["blas"]) <= {3}
        assert narrow["cores"] == 1 and narrow["omp"] == "1" and set(narrow["blas"]) <= {1}
        status = client.status()
        assert {s["cores"] for s in status["satellites"]} == {4}
        with pytest.raises(TaskFailed) as err:  # wider than any satellite: expires, saying why
            client.submit("t.threads", cores=8, ttl=1.0).result(timeout=30)
        assert err.value.type == P.ERR_EXPIRED and "8 cores" in str(err.value)


def test_mixed_narrow_and_wide_tasks_never_oversubscribe_a_satellite() -> None:
    """Two satellites of 4 cores, one-core and four-core tasks mixed: every task completes, no
    satellite ever runs more than 4 cores of tasks (from the tasks' own times, and from the
    satellites' reports), and each wide task waits at most the reservation bound and one narrow task."""
    reserve_after = 1.0
    with LocalCluster(satellites=2, workers=4, cores=4, tasks=["orchester_test_tasks"],
                      heartbeat_interval=FAST_HB, env=TEST_ENV,
                      serve_args=["--reserve-after", str(reserve_after)]) as cluster, \
            cluster.client() as client:
        futures = []
        submitted: dict[str, float] = {}
        for i in range(48):
            if i % 8 == 3:
                fut = client.submit("t.hold", 0.3, cores=4)
            else:
                fut = client.submit("t.hold", 0.15)
            submitted[fut.task_id] = time.monotonic()
            futures.append(fut)
        results = [(f.task_id, f.result(timeout=120)) for f in futures]
        per_sat: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
        for _, r in results:
            per_sat[r["sat"]].append((r["start"], r["end"], r["cores"]))
        for sat, runs in per_sat.items():  # the cores running at each start, on that satellite
            for start, _, _ in runs:
                busy = sum(c for s, e, c in runs if s <= start < e)
                assert busy <= 4, f"{sat} ran {busy} cores of tasks at once"
        assert sum(1 for _, r in results if r["cores"] == 4) == 6
        waits = [r["start"] - submitted[tid] for tid, r in results if r["cores"] == 4]
        assert max(waits) < 60  # every wide task ran (bounded: generous here, exact in the core's unit test)
        deadline = time.monotonic() + 30
        reports: list[float] = []
        while time.monotonic() < deadline:  # each satellite reports the most cores it held together
            sats = client.status()["satellites"]
            reports = [s["reported"].get("cores_busy_max", -1.0) for s in sats]
            if len(reports) == 2 and all(r >= 0 for r in reports):
                break
            time.sleep(0.2)
        assert len(reports) == 2 and all(0 <= r <= 4 for r in reports)
