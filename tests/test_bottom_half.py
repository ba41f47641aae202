"""The bottom half of a satellite (``docs/bottom_half.rst``), with real processes on loopback.

A satellite's I/O loop hands tasks to worker processes and, for light (``inline=True``) kinds,
to one thread of its own. These tests show what that split buys and what the exception costs:

* a model that fails for lack of memory (a real ``MemoryError``) fails its task, and the same
  worker serves the next one;
* a worker killed with SIGKILL, as the kernel's OOM killer kills, costs a worker, not the
  satellite;
* cancelling a running task, its overall timeout and its maximum run time each end the worker
  process that runs it, its temporary files go with it, and a new worker serves;
* a light task that ends the interpreter ends the satellite with it;
* light tasks never wait behind a light task that is not light: they run in a worker meanwhile;
* on an MPI rank, a worker's death is no rank's death: the job goes on.

The satellites import this module (``--tasks test_bottom_half``) for the kinds below; every wait is
bounded, and nothing asserts how fast anything is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_for

from orchester import LocalCluster, TaskFailed
from satellites import task

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
#: Satellites and their workers import this module (and ``conftest``'s neighbours) from here.
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH", "")]))}
HB = 0.2
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


# ------------------------------------------------------------------ the kinds the satellites load
@task("bh.pid")
def worker_pid(_: object = None) -> int:
    """The process that ran the task."""
    return os.getpid()


@task("bh.memory")
def out_of_memory() -> None:
    """Ask for 4 EiB: ``malloc`` fails and Python raises a real ``MemoryError`` (nothing is touched)."""
    bytearray(1 << 62)


@task("bh.sigkill")
def killed() -> None:
    """Die by SIGKILL, the signal of the kernel's OOM killer."""
    os.kill(os.getpid(), signal.SIGKILL)


@task("bh.exit")
def hard_exit(code: int = 3) -> None:
    """Leave the process at once (``os._exit``), as a crashing extension would."""
    os._exit(code)


@task("bh.park")
def park(path: str, seconds: float = 60.0) -> None:
    """Make a temporary folder with a file in it, write this worker's pid and that folder to ``path``, then
    wait ``seconds`` (a task that must be stopped from outside, leaving what it made)."""
    scratch = tempfile.mkdtemp(prefix="bh-park-")
    with open(os.path.join(scratch, "model.hgx"), "wb") as f:
        f.write(b"x" * 4096)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {scratch}")
    os.replace(tmp, path)
    time.sleep(seconds)


@task("bh.inline_pid", inline=True)
def inline_pid(_: object = None) -> int:
    """A light kind: the process it ran in."""
    return os.getpid()


@task("bh.inline_exit", inline=True)
def inline_exit(code: int = 3) -> None:
    """A light kind that ends the interpreter it runs in."""
    os._exit(code)


@task("bh.inline_block", inline=True)
def inline_block(flag: str, limit: float = 60.0) -> int:
    """A light kind that is not light: waits until the file ``flag`` exists (at most ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


# ------------------------------------------------------------------ helpers

def running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def rss(pid: int) -> int:
    """The resident memory of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def bus(**kw: Any) -> LocalCluster:
    """One satellite of one worker loading this module, fast heartbeats, quick retries."""
    args: dict[str, Any] = {"satellites": 1, "workers": 1, "tasks": ["test_bottom_half"], "heartbeat_interval": HB,
                            "liveness": 3, "env": ENV, "log_level": "ERROR",
                            "serve_args": ["--retry-backoff", "0.1"]}
    args.update(kw)
    return LocalCluster(**args)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with bus() as c:
        yield c


# ------------------------------------------------------------------ a model that crashes
def test_a_memory_error_fails_its_task_and_the_same_worker_serves_on(cluster: LocalCluster) -> None:
    c = cluster.client()
    before = c.submit("bh.pid").result(30)
    fut = c.submit("bh.memory")
    with pytest.raises(TaskFailed) as e:
        fut.result(30)
    assert e.value.type == "MemoryError"  # the handler's exception, as any other: FAILED, not retried
    shown = c.show(fut.task_id)
    assert shown["state"] == "failed" and shown["attempt"] == 1 and shown["crashes"] == 0
    assert c.submit("bh.pid").result(30) == before  # the worker process lived through it
    st = c.status()
    assert len(st["satellites"]) == 1 and st["counters"].get("satellites_lost", 0) == 0


def test_a_worker_killed_like_the_oom_killer_kills_costs_a_worker_not_the_satellite(cluster: LocalCluster) -> None:
    c = cluster.client()
    satellite = cluster.satellites[0]
    before = c.submit("bh.pid").result(30)
    fut = c.submit("bh.sigkill")
    with pytest.raises(TaskFailed) as e:
        fut.result(60)
    assert e.value.type == "Quarantined" and "signal 9" in e.value.message  # WorkerDied three times
    assert c.show(fut.task_id)["crashes"] == 3
    assert satellite.poll() is None  # the satellite process is the one that started
    st = c.status()
    assert [s["pid"] for s in st["satellites"]] == [satellite.pid]
    assert st["counters"].get("satellites_lost", 0) == 0
    after = c.submit("bh.pid").result(30)
    assert after != before and not running(before)  # a new worker serves


# ------------------------------------------------------------------ kills on cancel and timeouts
@pytest.mark.parametrize("how", ["cancel", "timeout", "max_run"])
def test_a_running_task_given_up_on_ends_its_worker_process(cluster: LocalCluster, tmp_path: Path, how: str) -> None:
    c = cluster.client()
    pidfile = tmp_path / "pid"
    limits: dict[str, Any] = {"timeout": {"timeout": 3.0}, "max_run": {"max_run": 1.0}}.get(how, {})
    fut = c.submit("bh.park", str(pidfile), 60.0, **limits)
    pid_text, scratch = wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30, "the task started").split()
    pid = int(pid_text)
    assert running(pid)
    assert os.path.isfile(os.path.join(scratch, "model.hgx"))
    assert not scratch.startswith(os.path.join(tempfile.gettempdir(), "bh-park-"))  # in its worker's own folder
    if how == "cancel":
        assert c.cancel(fut.task_id)["cancelled"] is True
    with pytest.raises(TaskFailed) as e:
        fut.result(30)
    assert e.value.type == {"cancel": "Cancelled", "timeout": "TaskTimeout", "max_run": "MaxRunTime"}[how]
    wait_for(lambda: not running(pid), 10, "the worker process ended")  # killed, not left to sleep 60 s
    assert c.submit("bh.pid").result(30) not in (pid, None)  # its replacement serves
    # what the killed task left in its temporary folder went with its worker
    wait_for(lambda: not os.path.exists(scratch), 10, "the worker's temporary folder removed")
    st = c.status()
    assert len(st["satellites"]) == 1 and st["counters"].get("satellites_lost", 0) == 0


def test_each_worker_has_a_temporary_folder_of_its_own_removed_when_it_ends(tmp_path: Path) -> None:
    from satellites.pool import WorkerPool

    pool = WorkerPool(2, f"ipc://{tmp_path}/nobody", "scratch-test", [], False, scratch=str(tmp_path))
    pool.start()
    try:
        folders = [w.scratch for w in pool.workers.values()]
        assert len(set(folders)) == 2 and all(os.path.dirname(f) == str(tmp_path) for f in folders)
        assert all(stat_mode(f) == 0o700 for f in folders)
        victim = next(iter(pool.workers.values()))
        pool.kill(victim)
        victim.process.join(30)
        assert pool.reap(victim.sentinel) is victim and not os.path.exists(victim.scratch)
        survivor = next(iter(pool.workers.values()))
        assert os.path.isdir(survivor.scratch)
    finally:
        pool.close()
    assert not os.path.exists(survivor.scratch)
    # the satellite's folder removed from under it: a worker still starts, in the system's temporary folder
    pool = WorkerPool(1, f"ipc://{tmp_path}/nobody", "scratch-test", [], False, scratch=str(tmp_path / "gone"))
    pool.start()
    try:
        assert [w.scratch for w in pool.workers.values()] == [""]
    finally:
        pool.close()


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


# ------------------------------------------------------------------ light kinds: the exception
def test_a_light_task_that_ends_the_interpreter_ends_its_satellite() -> None:
    with bus() as cluster:
        c = cluster.client()
        satellite = cluster.satellites[0]
        assert c.submit("bh.inline_pid").result(30) == satellite.pid  # light kinds run in the satellite
        c.submit("bh.inline_exit", 3)
        assert satellite.wait(30) == 3  # the satellite process itself exited
        wait_for(lambda: c.status()["counters"].get("satellites_lost", 0) == 1, 30, "the satellite was lost")


def test_a_light_task_given_up_on_is_answered_while_its_handler_still_runs(tmp_path: Path) -> None:
    flag = tmp_path / "go"
    with bus() as cluster:
        c = cluster.client()
        satellite = cluster.satellites[0].pid
        held = c.submit("bh.inline_block", str(flag))
        wait_for(lambda: c.show(held.task_id)["state"] == "running", 30, "the light task runs")
        assert c.cancel(held.task_id)["cancelled"] is True
        with pytest.raises(TaskFailed) as e:
            held.result(30)
        assert e.value.type == "Cancelled"  # answered although the handler cannot have returned: no flag yet
        # the satellite's own answer to the ABORT (DONE, Cancelled) comes for an attempt already taken back
        stale = wait_for(lambda: c.status()["counters"].get("stale_results", 0), 30, "the satellite answered")
        assert c.submit("bh.inline_pid").result(30) != satellite  # the thread is still held: a worker runs it
        flag.touch()  # the handler returns; the satellite drops its result
        wait_for(lambda: c.submit("bh.inline_pid").result(30) == satellite, 30, "light tasks inline again")
        assert c.show(held.task_id)["state"] == "cancelled"
        assert c.status()["counters"].get("stale_results", 0) == stale  # the late result was never sent


def test_light_tasks_never_wait_behind_a_light_task_that_is_not(tmp_path: Path) -> None:
    flag = tmp_path / "go"
    with bus(prefetch=8) as cluster:
        c = cluster.client()
        satellite = cluster.satellites[0].pid
        blocker = c.submit("bh.inline_block", str(flag))  # holds the inline thread until the flag exists
        light = [c.submit("bh.inline_pid", i) for i in range(4)]  # dispatched right behind it
        pids = [f.result(60) for f in light]
        assert not blocker.done()  # they finished while the thread was still held ...
        assert satellite not in pids  # ... because a worker process ran them
        flag.touch()
        assert blocker.result(60) == satellite
        assert c.submit("bh.inline_pid").result(30) == satellite  # the thread is free: light runs inline again


@pytest.mark.parametrize("light_credit", [128, 0])
def test_light_tasks_pass_tasks_waiting_for_a_worker_on_a_credit_of_their_own(tmp_path: Path,
                                                                              light_credit: int) -> None:
    with bus(light_credit=light_credit) as cluster:  # one worker, prefetch 1: two slots
        c = cluster.client()
        satellite = cluster.satellites[0].pid
        parked = [c.submit("bh.park", str(tmp_path / f"p{i}"), 120.0) for i in range(2)]
        wait_for(lambda: (tmp_path / "p0").exists() or (tmp_path / "p1").exists(), 30, "a parked task runs")
        wait_for(lambda: all(c.show(f.task_id)["state"] in ("dispatched", "running") for f in parked), 30,
                 "both slots taken")
        light = [c.submit("bh.inline_pid", i) for i in range(5)]
        if light_credit:  # they run at once, in the satellite's thread, while both slots stay taken
            assert [f.result(60) for f in light] == [satellite] * 5
            assert not any(f.done() for f in parked)
            sat = c.status()["satellites"][0]
            assert sat["light"] == light_credit and "bh.inline_pid" in sat["inline"]
        else:  # without: they wait for a slot, as any task
            wait_for(lambda: all(c.show(f.task_id)["state"] == "pending" for f in light), 30, "the light tasks queued")
            assert not any(f.done() for f in light) and c.status()["satellites"][0]["light"] == 0
        for f in parked:
            c.cancel(f.task_id)
        assert [f.result(60) for f in light] == [satellite] * 5


def test_results_kept_to_send_again_after_a_failover_stay_within_the_resend_memory() -> None:
    """A satellite keeps the results it sent lately (a failover may have lost them) for tens of seconds, but
    never more than ``--resend-memory`` bytes of them: 1 MiB results at full speed do not grow it."""
    arr = np.random.default_rng(0).random(131072)  # 1 MiB
    with bus(satellites=0, prefetch=4) as cluster:
        sat = cluster.add_satellite(extra=["--resend-memory", "4M"])
        cluster.wait_for_satellites(1)
        c = cluster.client()
        for f in [c.submit("echo.inline", arr) for _ in range(10)]:
            assert np.array_equal(f.result(60), arr)
        before = rss(sat.pid)
        window: list[Any] = []
        for _ in range(160):  # 160 MiB of results, within seconds: all of them would still be kept
            window.append(c.submit("echo.inline", arr))
            if len(window) == 8:
                assert np.array_equal(window.pop(0).result(60), arr)
        for f in window:
            f.result(60)
        grown = rss(sat.pid) - before
        assert grown < 48 << 20, f"the satellite grew by {grown >> 20} MiB"


def test_a_resend_memory_that_is_no_size_is_refused_in_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "satellites", "run", "--resend-memory", "lots"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'lots' is not a size" in out.stderr


# ------------------------------------------------------------------ MPI ranks
@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec comes with the test extras (pip install mpich)")
def test_a_worker_that_dies_on_an_mpi_rank_does_not_end_the_job() -> None:
    """MPI aborts the whole job when a rank dies (``tests/integration/test_mpi.py``); a worker is no rank."""
    assert MPIEXEC is not None
    env = {**os.environ, **ENV, "UCX_TLS": "self,sm", "MPIEXEC_PORT_RANGE": "50000:50100", "HYDRA_IFACE": "lo"}
    with bus(satellites=0) as cluster:
        job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "satellites", "--log-level", "ERROR", "mpi",
                                "--connect", cluster.endpoint, "--heartbeat-interval", str(HB),
                                "--workers-per-rank", "1", "--tasks", "test_bottom_half", "--no-numba"],
                               env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            c = cluster.client()
            ranks = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(c.status()["satellites"]), 60,
                             "both ranks registered")
            fut = c.submit("bh.exit", 3)
            with pytest.raises(TaskFailed) as e:
                fut.result(60)
            assert e.value.type == "Quarantined" and "exit code 3" in e.value.message
            assert job.poll() is None  # the job runs on
            st = c.status()
            assert sorted(s["pid"] for s in st["satellites"]) == sorted(s["pid"] for s in ranks)
            assert st["counters"].get("satellites_lost", 0) == 0
            assert list(c.map("echo", range(20), timeout=60)) == list(range(20))
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
            job.wait(30)
