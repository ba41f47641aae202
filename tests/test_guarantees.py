"""What docs/guarantees.rst promises and no other test showed: when an acknowledgement may go out
(per ``--durability`` and ``--replication``), ``batch`` durability against ``kill -9``, a client
killed with tasks pending, how long a task id is remembered, and the chapter's idempotent kind."""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import FAST_HB, TEST_ENV, Unbatched, broker_config, executions, wait_for

from orchester import Client, LocalCluster, RemoteError
from orchester.journal.wal import SegmentWriter
from orchester.local.pair import LocalPair
from orchester.server.broker import BrokerThread
from serializers import encode, pack, unpack
from serializers import protocol as P

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ when an ACK may go out
class Held:
    """Make one method of :class:`SegmentWriter` wait, once armed, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.go = threading.Event()
        original = getattr(SegmentWriter, name)

        def held(writer: SegmentWriter, *args: Any) -> Any:
            if self.armed.is_set():
                self.entered.set()
                self.go.wait(30)
            return original(writer, *args)

        monkeypatch.setattr(SegmentWriter, name, held)


def submit_raw(sock: Any, tid: str) -> None:
    _, body = encode([[tid], {}])
    sock.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": tid, "k": "echo"}), *body])


def acked(sock: Any, tid: str, wait_ms: int) -> bool:
    """Whether an ACK naming ``tid`` arrives within ``wait_ms``."""
    deadline = time.monotonic() + wait_ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return False
        frames = sock.recv_multipart()
        if frames[1] == P.ACK and tid in unpack(frames[2])["ids"]:
            return True
    return False


@pytest.fixture
def journaled(tmp_path: Path, request: pytest.FixtureRequest, socket: Any) -> Iterator[tuple[Any, Any, Path]]:
    """An orchestrator in this process with a journal of the durability ``request.param`` and no
    satellite (a submission is only journaled and acknowledged), and a raw client connected to it."""
    journal = tmp_path / "journal"
    with BrokerThread(broker_config(journal=str(journal), durability=request.param)) as broker:
        sock = socket(zmq.DEALER)
        sock.connect(broker.client_endpoint)
        submit_raw(sock, "warm-up")  # the journal thread has started and written once
        assert acked(sock, "warm-up", 10_000)
        yield broker, sock, journal


@pytest.mark.parametrize("journaled", ["off", "batch", "full"], indirect=True)
def test_an_ack_waits_for_the_journal_write_unless_durability_is_off(
        journaled: tuple[Any, Any, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    broker, sock, _ = journaled
    write = Held(monkeypatch, "write")
    write.armed.set()
    try:
        submit_raw(sock, "t1")
        assert write.entered.wait(10)  # the journal thread is about to write t1's record, and waits
        if broker.config.durability == "off":
            assert acked(sock, "t1", 10_000)  # acknowledged while its record is only in memory
        else:
            assert not acked(sock, "t1", 1_000)  # held: its record is not written yet
    finally:
        write.armed.clear()
        write.go.set()
    if broker.config.durability != "off":
        assert acked(sock, "t1", 10_000)  # written: now it goes


@pytest.mark.parametrize("journaled", ["full"], indirect=True)
def test_with_full_durability_an_ack_waits_for_fsync(journaled: tuple[Any, Any, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _, sock, journal = journaled
    sync = Held(monkeypatch, "sync")
    sync.armed.set()
    try:
        submit_raw(sock, "t-fsync")
        assert sync.entered.wait(10)  # written, fsync not yet returned
        assert any(b"t-fsync" in p.read_bytes() for p in journal.glob("wal-*.log"))
        assert not acked(sock, "t-fsync", 1_000)
    finally:
        sync.armed.clear()
        sync.go.set()
    assert acked(sock, "t-fsync", 10_000)


@pytest.mark.parametrize("replication", ["sync", "async"])
def test_an_ack_waits_for_the_passive_only_with_synchronous_replication(replication: str) -> None:
    """The passive frozen (SIGSTOP): the active counts on it for two more --ha-heartbeat (3 s here),
    then falls back to local durability for good (the passive stays frozen). With ``sync`` nothing is
    acknowledged while it counts on it; with ``async`` every result comes meanwhile."""
    pair = LocalPair(satellites=1, workers=2, heartbeat_interval=FAST_HB, liveness=3, ha_heartbeat=3.0,
                     replication=replication, durability="batch", env=TEST_ENV, log_level="ERROR")
    with pair:
        pair.wait_state("backup", "passive", timeout=60)
        backup = pair.servers["backup"]
        assert backup is not None
        with pair.client(heartbeat_interval=0.5, liveness=20) as client:
            assert client.submit("echo", "warm").result(timeout=30) == "warm"
            wait_for(lambda: (pair.state("primary") or {}).get("replication") == replication, 60)
            backup.send_signal(signal.SIGSTOP)
            try:
                futs = [client.submit("echo", i) for i in range(20)]
                client.status()  # requests on one socket are handled in order: the submissions are in
                if replication == "sync":
                    time.sleep(0.5)  # (room for an acknowledgement that would not wait)
                    assert not any(f.accepted.is_set() for f in futs)
                    st = pair.state("primary")  # ... and the active still counted on the passive then
                    assert st is not None and st["replication"] == "sync" and st["peer_alive"], st
                assert [f.result(timeout=60) for f in futs] == list(range(20))
                st = pair.state("primary")
                assert st is not None
                # sync: released once the active gave the passive up; async: while it still counted on it
                assert st["replication"] == ("local" if replication == "sync" else "async"), st
            finally:
                backup.send_signal(signal.SIGCONT)


# ------------------------------------------------------------------ batch durability and kill -9
def test_batch_durability_loses_no_acknowledged_task_to_kill_9(tmp_path: Path) -> None:
    """As tests/integration/test_journal.py does for ``full``: a raw client that never resends,
    the orchestrator killed at random moments of a stream of submissions."""
    rng = random.Random(20260101)
    acks: set[str] = set()
    results: collections.Counter[str] = collections.Counter()
    sent = 0
    ctx = zmq.Context()
    with LocalCluster(satellites=1, workers=2, heartbeat_interval=FAST_HB, log_level="ERROR",
                      serve_args=["--journal", str(tmp_path / "journal"), "--durability", "batch"]) as cluster:
        raw = Unbatched(ctx.socket(zmq.DEALER))
        raw.linger = 0
        raw.routing_id = b"c:raw-batch-test"
        raw.connect(cluster.endpoint)

        def pump(seconds: float) -> None:
            nonlocal sent
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for _ in range(rng.randint(1, 20)):
                    _, body = encode([[sent], {}])
                    raw.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": f"b-{sent}", "k": "echo"}), *body])
                    sent += 1
                while raw.poll(5):
                    frames = raw.recv_multipart()
                    if frames[1] == P.ACK:
                        acks.update(unpack(frames[2])["ids"])
                    elif frames[1] == P.RESULT:
                        results[unpack(frames[2])["id"]] += 1

        try:
            for _ in range(6):
                pump(rng.uniform(0.05, 0.4))
                assert cluster.orchestrator is not None
                cluster.orchestrator.kill()  # SIGKILL: no goodbye, no flush
                cluster.orchestrator.wait(10)
                cluster.start_orchestrator(bind=cluster.endpoint, pub=cluster.pub_endpoint)
            pump(0.5)
            with Client(cluster.endpoint) as c:
                for tid in sorted(acks):
                    assert c.result(tid, timeout=60) == int(tid.split("-")[1]), tid
        finally:
            raw.close(0)
            ctx.term()
    assert len(acks) > 50
    assert not [tid for tid, n in results.items() if n > 1], "a result was delivered twice"


# ------------------------------------------------------------------ clients
def test_a_killed_clients_tasks_run_once_and_another_client_gets_their_results(tmp_path: Path) -> None:
    path = tmp_path / "marks"
    with LocalCluster(satellites=1, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      env=TEST_ENV, log_level="ERROR") as cluster:
        code = (f"import time\nfrom orchester import Client\n"
                f"with Client({cluster.endpoint!r}) as c:\n"
                f"    futs = [c.submit('t.mark', {str(path)!r}, f'k{{i}}', 0.3, task_id=f'orphan-{{i}}')"
                f" for i in range(6)]\n"
                f"    assert all(f.accepted.wait(30) for f in futs)\n"
                f"    print('acked', flush=True)\n"
                f"    time.sleep(60)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "acked"
        finally:
            proc.kill()  # SIGKILL: the client is gone with its tasks pending
            proc.wait(10)
        with Client(cluster.endpoint) as c:
            assert [c.result(f"orphan-{i}", timeout=30) for i in range(6)] == [f"k{i}" for i in range(6)]
            # submitting an id again (a restarted client) gets the same task, not a second run
            assert c.submit("t.mark", str(path), "k0", 0.3, task_id="orphan-0").result(timeout=30) == "k0"
    assert executions(path) == {f"k{i}": 1 for i in range(6)}


def test_without_a_journal_a_living_client_resends_what_a_killed_orchestrator_had_acknowledged(
        tmp_path: Path) -> None:
    path = tmp_path / "marks"
    with LocalCluster(satellites=0, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      env=TEST_ENV, log_level="ERROR") as cluster, Client(cluster.endpoint) as c:
        futs = [c.submit("t.mark", str(path), f"k{i}") for i in range(5)]
        assert all(f.accepted.wait(30) for f in futs)  # acknowledged, queued (no satellite yet)
        assert cluster.orchestrator is not None
        cluster.orchestrator.kill()  # SIGKILL, no journal: the new orchestrator knows nothing of them
        cluster.orchestrator.wait(10)
        cluster.start_orchestrator(bind=cluster.endpoint, pub=cluster.pub_endpoint)
        cluster.add_satellite("late")
        assert [f.result(timeout=60) for f in futs] == [f"k{i}" for i in range(5)]
        assert c.status()["counters"]["submitted"] == 5  # the new orchestrator had them from the client
    assert executions(path) == {f"k{i}": 1 for i in range(5)}


def test_a_task_id_is_remembered_only_as_long_as_its_result_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "marks"
    with LocalCluster(satellites=1, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      env=TEST_ENV, log_level="ERROR", serve_args=["--result-retention", "2"]) as cluster:
        with Client(cluster.endpoint) as c:
            assert c.submit("t.mark", str(path), "again", task_id="again").result(timeout=30) == "again"
            assert c.submit("t.mark", str(path), "again", task_id="again").result(timeout=30) == "again"
            assert executions(path)["again"] == 1  # remembered: answered with the stored result
            for i in range(4):  # newer results push it out of the store (--result-retention 2)
                c.submit("echo", i).result(timeout=30)
            wait_for(lambda: c.status()["results_retained"] <= 2)
            with pytest.raises(RemoteError):
                c.show("again")  # forgotten with its result
            assert c.submit("t.mark", str(path), "again", task_id="again").result(timeout=30) == "again"
    assert executions(path)["again"] == 2  # the same id ran a second time


# ------------------------------------------------------------------ the chapter's idempotent kind
def chapter_example() -> str:
    """The code block of docs/guarantees.rst that defines ``mylab.total``."""
    text = (ROOT / "docs" / "guarantees.rst").read_text()
    for block in re.split(r"^\.\. code-block:: python\n", text, flags=re.M)[1:]:
        lines = []
        for line in block.split("\n")[1:]:  # (a blank line after the directive)
            if line and not line.startswith("   "):
                break
            lines.append(line[3:])
        code = "\n".join(lines)
        if '@task("mylab.total")' in code:
            return code
    raise AssertionError("docs/guarantees.rst has no example defining mylab.total")


def test_the_chapters_idempotent_kind_run_twice_leaves_one_whole_output(tmp_path: Path) -> None:
    """The satellite running it is frozen (SIGSTOP) mid-task: its worker goes on and finishes the first
    attempt while a second one runs elsewhere. One output file, whole, and no temporary file left."""
    package = tmp_path / "lib" / "mylab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(chapter_example())
    out = tmp_path / "out"
    out.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), TEST_ENV["PYTHONPATH"]])}
    with LocalCluster(satellites=2, workers=1, tasks=["mylab.tasks"], heartbeat_interval=FAST_HB, liveness=3,
                      env=env, log_level="ERROR") as cluster, Client(cluster.endpoint) as c:
        values = list(range(1_000))
        fut = c.submit("mylab.total", values, str(out), 1.0, task_id="total-1")
        running = wait_for(lambda: (lambda s: s if s["state"] == "running" else None)(c.show("total-1")))
        victim = cluster.satellites[int(running["satellite"].split("-")[1])]
        victim.send_signal(signal.SIGSTOP)
        try:
            assert fut.result(timeout=60) == {"total": sum(values)}
            assert c.show("total-1")["attempt"] == 2  # it ran under a second attempt
        finally:
            victim.send_signal(signal.SIGCONT)
        time.sleep(1.5)  # the first attempt's worker has long finished (not a speed assertion)
    assert sorted(p.name for p in out.iterdir()) == ["total-1.json"]
    assert json.loads((out / "total-1.json").read_text()) == {"total": sum(values)}
