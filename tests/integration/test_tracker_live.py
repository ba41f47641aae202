"""The tracker with real processes: frozen satellites, hung tasks, unroutable tasks, long runs."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import FAST_HB, TEST_ENV, wait_for

from orchester import LocalCluster, TaskFailed
from serializers import protocol as P

pytestmark = pytest.mark.integration


def test_sigstop_satellite_task_rerouted_and_late_reply_discarded() -> None:
    with LocalCluster(satellites=2, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      liveness=3, env=TEST_ENV, log_level="ERROR") as cluster:
        c = cluster.client()
        with c.subscribe(["task:"]) as events:
            time.sleep(0.3)
            fut = c.submit("t.identity", "x", priority=1)
            first = c.submit("sleep", 1.0)  # the frozen satellite's worker finishes this one meanwhile
            running = wait_for(lambda: (lambda s: s if s["state"] == "running" else None)(c.show(first.task_id)))
            victim = cluster.satellites[int(running["satellite"].split("-")[1])]
            assert fut.result(30)["x"] == "x"
            victim.send_signal(signal.SIGSTOP)  # TCP stays up, heartbeats stop
            try:
                assert first.result(30) == 1.0  # rerouted to the other satellite and finished there
                shown = c.show(first.task_id)
                assert shown["attempt"] == 2 and shown["satellite"] != running["satellite"]
                assert "lost" in [h for h in shown["history"] if h["state"] == "stalled"][0]["reason"]
            finally:
                victim.send_signal(signal.SIGCONT)
            # the woken satellite delivers its stale answer; it must not become a second result
            wait_for(lambda: c.status()["counters"].get("stale_results", 0)
                     + c.status()["counters"].get("unknown_satellite", 0) > 0)
            wait_for(lambda: len(c.status()["satellites"]) == 2)  # and it re-registers
            done_events = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                ev = events.recv(timeout=0.2)
                if ev is not None and ev.data.get("id") == first.task_id and ev.data.get("state") == "done":
                    done_events.append(ev)
            assert len(done_events) == 1
        assert c.status()["counters"]["done"] == 2


def test_hung_task_stalls_and_is_quarantined_while_satellites_survive() -> None:
    with LocalCluster(satellites=2, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      env=TEST_ENV, log_level="ERROR", serve_args=["--retry-backoff", "0.1"]) as cluster:
        c = cluster.client()
        fut = c.submit("t.hang")
        with pytest.raises(TaskFailed) as e:
            fut.result(60)
        assert e.value.type == P.ERR_QUARANTINED and "no progress for 0.5s" in e.value.message
        shown = c.show(fut.task_id)
        assert shown["crashes"] == 3 and len({h["sat"] for h in shown["history"] if h["sat"]}) == 2
        st = c.status()
        assert len(st["satellites"]) == 2 and st["counters"].get("satellites_lost", 0) == 0
        assert list(c.map("echo", range(10), timeout=30)) == list(range(10))  # hung workers were killed


def test_unsatisfiable_tags_expire_at_their_ttl(cluster: LocalCluster) -> None:
    c = cluster.client()
    with pytest.raises(TaskFailed) as e:
        c.submit("echo", 1, tags=["gpu"], ttl=0.5).result(30)
    assert e.value.type == P.ERR_EXPIRED
    assert "no satellite offers kind 'echo' with tags ['gpu']" in e.value.message
    assert c.submit("echo", 2).result(30) == 2


def test_max_run_time_kills_the_worker(cluster: LocalCluster) -> None:
    c = cluster.client()
    with pytest.raises(TaskFailed) as e:
        c.submit("sleep", 30, max_run=0.5).result(30)
    assert e.value.type == P.ERR_MAX_RUN
    wait_for(lambda: sum(s["inflight"] for s in c.status()["satellites"]) == 0, 10)
    assert list(c.map("echo", range(8), timeout=30)) == list(range(8))
