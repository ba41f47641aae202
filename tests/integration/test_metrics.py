"""Metrics to a real carbon-cache (Graphite), and a sender that never blocks when carbon is away."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orchester import Client, LocalCluster, TaskFailed
from orchester.metrics.collector import CarbonSender, quantiles
from serializers.messages import JobsReport

pytestmark = pytest.mark.integration
CARBON = os.path.join(os.path.dirname(sys.executable), "carbon-cache.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def carbon(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real carbon-cache on loopback, every listener overridden, tags off, whisper files in tmp."""
    if not os.path.exists(CARBON):
        pytest.fail("carbon-cache.py is missing: the test extras install carbon and whisper")
    line, pickle_port, query = free_port(), free_port(), free_port()
    storage = tmp_path / "storage"
    (tmp_path / "carbon.conf").write_text(f"""[cache]
STORAGE_DIR = {storage}
LOCAL_DATA_DIR = {storage}/whisper
LOG_DIR = {storage}/log
PID_DIR = {storage}
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {line}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {query}
ENABLE_MANHOLE = False
ENABLE_TAGS = False
MAX_CACHE_SIZE = inf
MAX_CREATES_PER_MINUTE = inf
WHISPER_AUTOFLUSH = True
CARBON_METRIC_INTERVAL = 0
""")
    (tmp_path / "storage-schemas.conf").write_text("[default]\npattern = .*\nretentions = 1s:1h,60s:1d\n")
    lib = os.path.join(sysconfig.get_paths()["purelib"], "opt", "graphite", "lib")  # where carbon's wheel puts it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([lib, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, CARBON, f"--config={tmp_path}/carbon.conf", "--debug", "start"],
                            stdout=open(tmp_path / "carbon.log", "w"), stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", pickle_port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "carbon.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "carbon-cache did not start"
                time.sleep(0.1)
        yield {"pickle": pickle_port, "line": line, "whisper": storage / "whisper"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def whisper_sum(root: Path, name: str, until: Callable[[float], bool] = lambda v: v > 0,
                timeout: float = 30.0) -> float:
    """The sum of the points of a metric, read from its whisper file once ``until(sum)`` holds.

    carbon's writer thread creates a file before it writes the points it holds for it, and may still
    hold points after the sender closed: so poll (bounded) until the points are there, and return the
    last sum read, for the caller's assertion to show.
    """
    import whisper

    path = root / (name.replace(".", "/") + ".wsp")
    deadline = time.monotonic() + timeout
    last: float | None = None
    while time.monotonic() < deadline:
        if path.exists():
            try:
                # The 1 s archive, named: left to choose, whisper takes the 60 s one (which averages these
                # sparse points away) whenever a second boundary falls between ``now`` here and in fetch.
                now = int(time.time())
                _, values = whisper.fetch(str(path), now - 1800, now + 5, now=now, archiveToSelect="1s")
                last = float(sum(v for v in values if v is not None))
                if until(last):
                    return last
            except whisper.CorruptWhisperFile:
                pass
        time.sleep(0.1)
    if last is None:
        raise AssertionError(f"no whisper file for {name}")
    return last


@pytest.mark.parametrize("protocol", ["pickle", "plaintext"])
def test_the_numbers_reach_carbon(carbon: dict[str, Any], protocol: str) -> None:
    port = carbon["pickle"] if protocol == "pickle" else carbon["line"]
    n = 300
    with LocalCluster(satellites=2, workers=1, heartbeat_interval=0.2, log_level="ERROR",
                      serve_args=["--carbon", f"127.0.0.1:{port}", "--carbon-protocol", protocol,
                                  "--metrics-interval", "1.1", "--metrics-prefix", f"test_{protocol}"]) as cluster:
        c = cluster.client()
        assert list(c.map("echo", range(n), timeout=60)) == list(range(n))
        with pytest.raises(TaskFailed):
            c.submit("fail").result(30)
        # what an autoscaler reports of its batch jobs (orchester autoscale sends it at every step)
        c.report_jobs(JobsReport("lab", "slurm", (("41", "running", 60.0), ("42", "pending", 5.0)), 4))
        time.sleep(3.0)  # two more reports
    root = carbon["whisper"]
    p = f"test_{protocol}"
    assert whisper_sum(root, f"{p}.counters.submitted", lambda v: v >= n + 1) == n + 1
    assert whisper_sum(root, f"{p}.counters.done", lambda v: v >= n) == n
    assert whisper_sum(root, f"{p}.tasks.echo.done", lambda v: v >= n) == n
    assert whisper_sum(root, f"{p}.tasks.fail.failed") == 1
    assert whisper_sum(root, f"{p}.latency.echo.count", lambda v: v >= n) == n
    assert whisper_sum(root, f"{p}.latency.echo.p99") > 0
    assert whisper_sum(root, f"{p}.satellites.idle") > 0
    assert whisper_sum(root, f"{p}.satellite.local-0.rss_mb") > 0  # reported by the satellite itself
    assert whisper_sum(root, f"{p}.counters.bytes_in") > 0
    assert whisper_sum(root, f"{p}.jobs.running") > 0 and whisper_sum(root, f"{p}.jobs.lab.pending") > 0


def test_a_missing_carbon_drops_points_without_blocking_then_reconnects() -> None:
    port = free_port()
    sender = CarbonSender("127.0.0.1", port, max_points=100, connect_timeout=0.5)
    try:
        t0 = time.perf_counter()
        for i in range(10):
            sender.send([(f"x.y{i}.{j}", time.time(), float(j)) for j in range(100)])
        assert time.perf_counter() - t0 < 0.5  # never waits for carbon
        deadline = time.monotonic() + 10
        while sender.errors == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert sender.dropped >= 900 and sender.stats()["metrics.connected"] == 0
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)
        server.settimeout(30)
        conn, _ = server.accept()  # the sender comes back by itself (back-off)
        conn.settimeout(10)
        head = conn.recv(4, socket.MSG_WAITALL)
        body = conn.recv(struct.unpack("!L", head)[0], socket.MSG_WAITALL)
        points = pickle.loads(body)
        assert points and points[0][0].startswith("x.y") and len(points[0][1]) == 2
        conn.close()
        server.close()
    finally:
        sender.close(1)


def test_quantiles() -> None:
    q = quantiles([float(i) for i in range(1, 101)])
    assert q["p50"] == 51 and q["p90"] == 91 and q["p99"] == 100 and q["count"] == 100
    assert quantiles([]) == {}


def test_status_shows_what_satellites_report() -> None:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=0.2, log_level="ERROR") as cluster, \
            Client(cluster.endpoint) as c:
        c.submit("spin", 0.3).result(30)
        deadline = time.monotonic() + 10
        while not c.status()["satellites"][0]["reported"].get("rss_mb"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        reported = c.status()["satellites"][0]["reported"]
        assert reported["rss_mb"] > 10 and "cpu_percent" in reported and reported["workers"] == 1


def test_top_renders_satellites_queues_throughput_and_latency() -> None:
    from rich.console import Console

    from orchester.cli.top import TopModel, run_top

    model = TopModel()
    model.on_status({"epoch": "e1", "strategy": "least_loaded", "counters": {"done": 0}, "tasks": {"pending": 3},
                     "queued": {"echo": 3}, "satellites": [
                         {"id": "sat-a", "state": "busy", "inflight": 2, "credit": 4, "slots": 4, "heartbeat_age": 0.3,
                          "done": 10, "failed": 1, "reported": {"cpu_percent": 87.0, "rss_mb": 140.0}}]}, 0.0)
    model.on_event("task:t1", {"id": "t1", "state": "pending", "attempt": 0, "t": 100.0})
    model.on_event("task:t1", {"id": "t1", "state": "running", "sat": "sat-a", "attempt": 1, "t": 100.1})
    console = Console(record=True, width=140)
    console.print(model.render())
    text = console.export_text()
    assert "sat-a" in text and "busy" in text and "2/4" in text and "t1" in text and "87" in text
    assert "queued echo" in text
    model.on_event("task:t1", {"id": "t1", "state": "done", "sat": "sat-a", "attempt": 1, "t": 100.25})
    model.on_status({"counters": {"done": 50}, "satellites": []}, 2.0)
    console = Console(record=True, width=140)
    console.print(model.render())
    text = console.export_text()
    assert "throughput 25.0 tasks/s" in text and "p50 250.0 ms" in text
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=0.2, log_level="ERROR") as cluster, \
            Client(cluster.endpoint) as c:
        futs = [c.submit("sleep", 0.05) for _ in range(20)]
        console = Console(record=True, width=140)
        live = run_top(c, interval=0.5, console=console, iterations=3)
        for f in futs:
            f.result(30)
        assert "local-0" in console.export_text() and live.status["satellites"]


def test_grafana_dashboard_targets_name_real_metrics() -> None:
    import json
    import re

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "examples" / "grafana" / "dashboard.json").read_text())
    docs = (root / "docs" / "metrics.rst").read_text()
    assert len(dash["panels"]) >= 10 and {v["name"] for v in dash["templating"]["list"]} == {"datasource", "prefix"}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for path in re.findall(r"\$prefix\.([\w.*{},]+)", target["target"]):
                first = path.split(".")[0]
                assert f"orchester.{first}." in docs, (panel["title"], path)
