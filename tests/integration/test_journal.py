"""The journal: acknowledged tasks survive kill -9 of the orchestrator; damaged journals still open."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from conftest import Unbatched

from orchester import Client, LocalCluster, RemoteError, TaskFailed
from orchester.journal.wal import ReadReport, encode_record, read_all
from serializers import decode, encode, pack, unpack
from serializers import protocol as P

pytestmark = pytest.mark.integration
HB = 0.2


def journal_cluster(path: Path, durability: str = "full", satellites: int = 2) -> LocalCluster:
    return LocalCluster(satellites=satellites, workers=2, heartbeat_interval=HB, log_level="ERROR",
                        serve_args=["--journal", str(path), "--durability", durability])


def restart(cluster: LocalCluster) -> None:
    assert cluster.orchestrator is not None
    endpoint, pub = cluster.endpoint, cluster.pub_endpoint
    cluster.orchestrator.kill()  # SIGKILL: no goodbye, no flush
    cluster.orchestrator.wait(10)
    cluster.start_orchestrator(bind=endpoint, pub=pub)


def test_finished_results_and_unfinished_tasks_survive_a_kill(tmp_path: Path) -> None:
    with journal_cluster(tmp_path / "journal") as cluster:
        with Client(cluster.endpoint) as c:
            quick = [c.submit("echo", i) for i in range(50)]
            assert [f.result(30) for f in quick] == list(range(50))
            slow = [c.submit("sleep", 1.0) for _ in range(4)]
            assert all(f.accepted.wait(30) for f in slow)  # acknowledged: durable in the journal
        restart(cluster)  # the client is gone: only the journal can bring these back
        with Client(cluster.endpoint) as fresh:
            assert [fresh.result(f.task_id, timeout=60) for f in quick] == list(range(50))
            assert [fresh.result(f.task_id, timeout=60) for f in slow] == [1.0] * 4
            shown = fresh.show(slow[0].task_id)
            assert shown["state"] == "done" and shown["attempt"] >= 1
            st = fresh.status()
            assert st["counters"]["journal_restored"] == 54


@pytest.mark.parametrize("kills", [8, pytest.param(40, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_loses_no_acknowledged_task(tmp_path: Path, kills: int) -> None:
    """Kills at random moments of a stream of submissions (8 in the default run; ``-m slow``: a 40-kill soak)."""
    rng = random.Random(20261124)
    acked: set[str] = set()
    results: collections.Counter[str] = collections.Counter()
    submitted = 0
    ctx = zmq.Context()
    with journal_cluster(tmp_path / "journal", durability="full") as cluster:
        raw = ctx.socket(zmq.DEALER)  # a client that never resends: only the journal keeps its tasks
        raw = Unbatched(raw)  # (a BATCH read message by message)
        raw.linger = 0
        raw.routing_id = b"c:raw-journal-test"
        raw.connect(cluster.endpoint)

        def pump(seconds: float) -> None:
            nonlocal submitted
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for _ in range(rng.randint(1, 20)):
                    _, body = encode([[submitted], {}])
                    raw.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": f"j-{submitted}", "k": "echo"}), *body])
                    submitted += 1
                while raw.poll(5):
                    frames = raw.recv_multipart()
                    hdr = unpack(frames[2])
                    if frames[1] == P.ACK:
                        acked.update(hdr["ids"])
                    elif frames[1] == P.RESULT:
                        results[hdr["id"]] += 1
                        assert decode("msgpack", [], frames[3:]) == int(hdr["id"].split("-")[1]), hdr

        try:
            for _ in range(kills):
                pump(rng.uniform(0.05, 0.4))
                restart(cluster)
            pump(0.5)
            with Client(cluster.endpoint) as c:  # (a result the raw client got may have left the retention window)
                for tid in sorted(acked - set(results)):
                    assert c.result(tid, timeout=60) == int(tid.split("-")[1]), tid
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and raw.poll(200):
                frames = raw.recv_multipart()
                if frames[1] == P.RESULT:
                    results[unpack(frames[2])["id"]] += 1
        finally:
            raw.close(0)
            ctx.term()
    assert len(acked) > 10 * kills and submitted > len(acked) / 2
    assert not [tid for tid, n in results.items() if n > 1], "a result was delivered twice"


def test_damaged_tail_loses_only_what_follows_the_damage(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    with journal_cluster(journal, satellites=1) as cluster, Client(cluster.endpoint) as c:
        ids = [c.submit("echo", i).task_id for i in range(30)]
        for tid in ids:
            c.result(tid, timeout=30)
    seg = sorted(journal.glob("wal-*.log"))[0]
    data = seg.read_bytes()
    report = ReadReport()
    n_before = len(list(read_all(journal, report)))
    cut = len(data) * 2 // 3
    seg.write_bytes(data[:cut] + b"\xff" * 7 + data[cut + 7:])  # flip bytes in the middle of a record
    report = ReadReport()
    intact = list(read_all(journal, report))
    assert len(intact) < n_before and report.damaged and report.damaged[0][0] == seg.name
    with journal_cluster(journal, satellites=1) as cluster, Client(cluster.endpoint) as c:
        st = c.status()
        assert st["counters"]["journal_lost_bytes"] > 0
        restored = []
        for tid in ids:
            try:
                c.show(tid, timeout=10)
                restored.append(tid)
            except RemoteError:  # recorded after the damage: lost, and said so
                pass
        assert restored[:5] == ids[:5]  # what came before the damage is back (what follows may be lost)
        assert c.submit("echo", "after").result(30) == "after"  # and it serves


def test_garbage_journal_files_do_not_stop_the_orchestrator(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.mkdir()
    (journal / "wal-000001.log").write_bytes(os.urandom(4096))
    (journal / "wal-000002.log").write_bytes(encode_record(["S", "broken"]) + encode_record(["T", "x"]))
    with journal_cluster(journal, satellites=1) as cluster, Client(cluster.endpoint) as c:
        assert c.submit("echo", 1).result(30) == 1
        assert c.status()["counters"].get("journal_bad_records", 0) >= 1


def test_two_orchestrators_cannot_share_a_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    with journal_cluster(journal, satellites=1):
        r = subprocess.run([sys.executable, "-m", "orchester", "serve", "--bind", "tcp://127.0.0.1:*", "--pub",
                            "tcp://127.0.0.1:*", "--journal", str(journal)], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "open for writing by another process" in r.stderr


@pytest.mark.parametrize("durability", ["batch", "off"])
def test_other_durabilities_serve_and_keep_results(tmp_path: Path, durability: str) -> None:
    with journal_cluster(tmp_path / "j", durability=durability, satellites=1) as cluster:
        with Client(cluster.endpoint) as c:
            futs = [c.submit("echo", i) for i in range(100)]
            assert [f.result(30) for f in futs] == list(range(100))
        time.sleep(0.3)  # off: the background writer catches up
        cluster.orchestrator.terminate()  # type: ignore[union-attr]
        cluster.orchestrator.wait(10)  # type: ignore[union-attr]
        cluster.start_orchestrator(bind=cluster.endpoint, pub=cluster.pub_endpoint)
        with Client(cluster.endpoint) as c:
            assert c.result(futs[-1].task_id, timeout=30) == 99




def test_history_from_the_journal_across_restarts(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    with journal_cluster(journal, satellites=1) as cluster:
        with Client(cluster.endpoint) as c:
            ok = [c.submit("echo", i) for i in range(5)]
            bad = [c.submit("fail", "nope") for _ in range(2)]
            for f in ok:
                f.result(30)
            for f in bad:
                with pytest.raises(TaskFailed):
                    f.result(30)
            # from the log tail: the error's type and message (issue 15, item 10)
            assert {r["error"] for r in c.history(state="failed")} == {"RuntimeError: nope"}
        cluster.orchestrator.terminate()  # type: ignore[union-attr]
        cluster.orchestrator.wait(10)  # type: ignore[union-attr]
        cluster.start_orchestrator(bind=cluster.endpoint, pub=cluster.pub_endpoint)
        assert list(journal.glob("seg-*.h5"))  # the closed segment went to PyTables
        with Client(cluster.endpoint) as c:
            c.submit("echo", "after").result(30)
            rows = c.history()
            assert len(rows) == 8 and {r["state"] for r in rows} == {"done", "failed"}
            failed = c.history(state="failed")
            assert sorted(r["id"] for r in failed) == sorted(f.task_id for f in bad)
            # from a compacted segment too
            assert all(r["error"] == "RuntimeError: nope" and r["kind"] == "fail" for r in failed)
            assert [r["id"] for r in c.history(limit=1)] == [rows[-1]["id"]]
            assert c.history(kind="sleep") == []
        r = subprocess.run([sys.executable, "-m", "orchester", "history", "--connect", cluster.endpoint,
                            "--state", "failed", "--format", "csv"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert lines[0].startswith("id,kind,state") and len(lines) == 3
        r = subprocess.run([sys.executable, "-m", "orchester", "history", "--connect", cluster.endpoint,
                            "--since", "1h", "--format", "json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and len(json.loads(r.stdout)) == 8
        r = subprocess.run([sys.executable, "-m", "orchester", "history", "--connect", cluster.endpoint],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "8 task(s)" in r.stdout
        r = subprocess.run([sys.executable, "-m", "orchester", "history", "--connect", cluster.endpoint,
                            "--state", "exploded"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "unknown state" in r.stderr


def test_history_without_a_journal_comes_from_memory() -> None:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=HB, log_level="ERROR") as cluster:
        with Client(cluster.endpoint) as c:
            futs = [c.submit("echo", i) for i in range(3)]
            for f in futs:
                f.result(30)
            rows = c.history()
            assert [r["id"] for r in rows] == [f.task_id for f in futs]
            assert all(r["state"] == "done" and r["kind"] == "echo" and r["attempts"] == 1 for r in rows)


def test_replay_resubmits_chosen_tasks_and_compact_applies_retention(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    with journal_cluster(journal, satellites=1) as cluster:
        with Client(cluster.endpoint) as c:
            first = c.submit("echo", {"v": 1})
            assert first.result(30) == {"v": 1}
            later = [c.submit("echo", i) for i in range(3)]
            for f in later:
                f.result(30)
        r = subprocess.run([sys.executable, "-m", "orchester", "replay", str(journal), "--task", first.task_id,
                            "--connect", cluster.endpoint, "--wait"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        old, new = r.stdout.splitlines()[0].split(" -> ")
        assert old == first.task_id and new != old and '{"v": 1}' in r.stdout
        r = subprocess.run([sys.executable, "-m", "orchester", "replay", str(journal), "--since", "1h",
                            "--connect", cluster.endpoint], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.count(" -> ") == 5  # four originals and the first replay
        r = subprocess.run([sys.executable, "-m", "orchester", "replay", str(journal), "--task", "nope",
                            "--connect", cluster.endpoint], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        r = subprocess.run([sys.executable, "-m", "orchester", "journal", "compact", str(journal)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "an orchestrator is running" in r.stdout  # its logs are left to it
        cluster.orchestrator.terminate()  # type: ignore[union-attr]
        cluster.orchestrator.wait(10)  # type: ignore[union-attr]
        r = subprocess.run([sys.executable, "-m", "orchester", "journal", "compact", str(journal),
                            "--keep-results", "0"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "dropped" in r.stdout, r.stderr
        assert not list(journal.glob("wal-*.log")) and list(journal.glob("seg-*.h5"))
        cluster.start_orchestrator(bind=cluster.endpoint, pub=cluster.pub_endpoint)
        with Client(cluster.endpoint) as c:
            assert len(c.history()) >= 9  # the history is intact
            assert c.show(first.task_id)["state"] == "done"
            with pytest.raises(RemoteError, match="no longer kept"):
                c.result(first.task_id, timeout=30)


def test_queued_payloads_spill_to_the_journal_and_come_back(tmp_path: Path) -> None:
    with LocalCluster(satellites=0, workers=1, heartbeat_interval=HB, log_level="ERROR",
                      serve_args=["--journal", str(tmp_path / "j"), "--spill-bytes", "100000"]) as cluster:
        with Client(cluster.endpoint) as c:
            blobs = [bytes([i % 256]) * 10_000 for i in range(200)]
            futs = [c.submit("echo", b) for b in blobs]
            assert all(f.accepted.wait(30) for f in futs)
            deadline = time.monotonic() + 20
            while c.status()["counters"].get("spilled", 0) < 150:
                assert time.monotonic() < deadline, c.status()["counters"]
                time.sleep(0.05)
            cluster.add_satellite("late")  # now they can run: payloads are read back from disk
            assert [f.result(60) for f in futs] == blobs
            assert c.status()["counters"]["unspilled"] >= 150


def test_a_spilled_payload_is_found_after_its_segment_was_compacted(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from orchester.journal.segments import compact
    from orchester.journal.wal import SegmentWriter
    from orchester.journal.writer import load_spilled

    w = SegmentWriter(tmp_path)
    rec = ["S", "spilled-task", b"c", pack({"id": "spilled-task", "k": "echo"}), [b"body", b"buffer"], 1.0, None]
    offsets = w.write([encode_record(["T", "x", 0, 0, None, None, 0.0]), encode_record(rec)])
    w.sync()
    path = w.path
    w.close()
    task = SimpleNamespace(id="spilled-task", spilled=(path, offsets[1]))
    assert load_spilled(task) == [b"body", b"buffer"]
    compact(path)
    assert load_spilled(task) == [b"body", b"buffer"]


def test_restarts_under_load_never_run_a_task_twice_on_untouched_satellites(tmp_path: Path) -> None:
    """A restarted orchestrator answered each older satellite message with RECONNECT, each extra
    REGISTER was taken as a lost satellite and its tasks ran two and three times (issue 15, item 2)."""
    marks = tmp_path / "marks"
    cluster = LocalCluster(satellites=2, workers=2, heartbeat_interval=HB, log_level="ERROR",
                           tasks=["topology_tests.tasks"],
                           serve_args=["--journal", str(tmp_path / "journal"), "--retry-backoff", "0"])
    with cluster, Client(cluster.endpoint) as client:
        futures = [client.submit("topo.mark", str(marks), f"k{i}", 0.25) for i in range(40)]
        for _ in range(3):
            time.sleep(0.6)  # tasks in flight on both satellites, more queued
            restart(cluster)
        assert sorted(f.result(timeout=120) for f in futures) == sorted(f"k{i}" for i in range(40))
        counters = client.status()["counters"]
    runs = collections.Counter(marks.read_text().split())
    assert {k for k, n in runs.items() if n > 1} == set(), runs
    assert counters.get("satellites_lost", 0) == 0
