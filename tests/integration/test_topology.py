"""The topology harness, run for real: strategies compared, faults injected, nothing lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from topology_tests import load
from topology_tests.runner import jain, recovery_time, run

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "topology_tests" / "examples"


def test_least_loaded_beats_round_robin_on_heterogeneous_satellites() -> None:
    topo = load(EXAMPLES / "heterogeneous.toml")
    least, robin = run(topo, "least_loaded"), run(topo, "round_robin")
    assert least.tasks == robin.tasks == 40 and least.lost == robin.lost == 0
    assert least.duplicated == robin.duplicated == 0
    assert least.makespan < robin.makespan  # the expected order
    assert least.done_per_satellite["g0-0"] > least.done_per_satellite.get("g1-0", 0)


def test_an_elastic_fleet_grows_for_each_burst_and_shrinks_between() -> None:
    """The example: two bursts, no satellite at first; jobs come for the first, go, and come again."""
    result = run(load(EXAMPLES / "elastic.toml"), "least_loaded")
    assert result.tasks == 160 and result.lost == 0 and result.duplicated == 0
    assert result.jobs > 3  # more jobs than max_jobs in all: given back after the first burst, asked for again
    second = 7.0  # the second client's start
    assert any(e < second for _, e in result.job_spans) and any(s >= second for s, _ in result.job_spans)
    assert 0 < result.allocation_used < 1 and result.allocation > 0
    held = sum(e - s for s, e in result.job_spans)
    assert held < 3 * result.makespan  # less than max_jobs held the whole run: the point of it


def test_faults_reroute_work_and_lose_nothing() -> None:
    result = run(load(EXAMPLES / "churn.toml"), "least_loaded")
    assert result.tasks == 120 and result.lost == 0 and result.duplicated == 0
    assert result.rerouted >= 1 and len(result.faults) == 3 and len(result.recovery) == 3


def test_the_command_line_writes_a_report_and_takes_a_strategy_by_import_path(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "topology_tests", "run", str(EXAMPLES / "heterogeneous.toml"),
                        "--strategy", "least_loaded,orchester.server.routing:TagAffinity", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.count("\n") == 3 and "least_loaded" in csv_text
    assert "orchester.server.routing:TagAffinity" in csv_text
    assert (tmp_path / "throughput.png").stat().st_size > 5000 and (tmp_path / "latency_cdf.png").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("[[satellites]]\ncount = 0\n")
    r = subprocess.run([sys.executable, "-m", "topology_tests", "run", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "satellites[0]" in r.stderr
    bad.write_text("[[satellites]\ncount = 1\n")
    r = subprocess.run([sys.executable, "-m", "topology_tests", "run", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "line 1" in r.stderr


def test_figures() -> None:
    assert jain([1.0, 1.0, 1.0]) == 1.0 and jain([1.0, 0.0]) == 0.5
    completions = [i * 0.01 for i in range(100)] + [1.5 + i * 0.01 for i in range(100)]
    assert recovery_time(completions, 1.0) == pytest.approx(0.4, abs=0.06)  # 80 % of the rate is back
    assert recovery_time([], 1.0) == 0.0


def test_an_orchestrator_failover_under_an_open_loop_loses_nothing() -> None:
    topo = load(EXAMPLES / "failover.toml")
    assert topo.orchestrators == 2 and topo.journal and topo.clients[0].rate > 0
    result = run(topo, "least_loaded")
    assert result.tasks == 400 and result.lost == 0 and result.duplicated == 0
    assert len(result.faults) == 2 and len(result.recovery) == 2
    # open loop: submissions went on during the failover, so some tasks waited for it
    assert result.latency_p99 > 0.5 * topo.heartbeat_interval * topo.liveness


def test_one_orchestrator_with_a_journal_survives_its_kill() -> None:
    from topology_tests import from_dict

    topo = from_dict({"heartbeat_interval": 0.2, "journal": True,
                      "satellites": [{"count": 2, "workers": 2}],
                      "clients": [{"tasks": 200, "concurrency": 20, "duration": 0.01}],
                      "faults": [{"at": 0.5, "action": "kill_orchestrator"},
                                 {"at": 0.8, "action": "restart_orchestrator"}]})
    result = run(topo, "least_loaded")
    assert result.tasks == 200 and result.lost == 0 and result.duplicated == 0


def test_a_link_proxy_delays_each_way_and_slow_links_cost_latency() -> None:
    import time as _time

    import zmq

    from topology_tests.linkproxy import LinkProxy

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind("tcp://127.0.0.1:*")
    proxy = LinkProxy(router.last_endpoint.decode(), delay=0.05).start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(proxy.endpoint)
        t0 = _time.monotonic()
        dealer.send(b"ping")
        assert router.poll(10_000)
        ident, msg = router.recv_multipart()
        router.send_multipart([ident, b"pong"])
        assert dealer.poll(10_000) and dealer.recv() == b"pong"
        assert _time.monotonic() - t0 >= 0.1  # at least the delay, each way (a lower bound, not a speed)
        assert msg == b"ping" and proxy.bytes > 0
    finally:
        dealer.close(0)
        router.close(0)
        proxy.close()
        ctx.term()
    result = run(load(EXAMPLES / "slow_link.toml"), "least_loaded")
    assert result.tasks == 600 and result.lost == 0 and result.duplicated == 0
    assert result.latency_p99 >= 0.08  # a task over the 40 ms link waits two crossings at least
    assert len(result.faults) == 1
