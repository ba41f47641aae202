"""Satellites on MPI ranks (real mpiexec, MPICH from the mpich wheel) and batch scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchester import Client, LocalCluster

pytestmark = pytest.mark.integration
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec comes with the test extras (pip install mpich)")
MPI_ENV = {**os.environ, "UCX_TLS": "self,sm", "MPIEXEC_PORT_RANGE": "50000:50100", "HYDRA_IFACE": "lo"}


def wait_for(pred: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def mpi_job(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, n: int = 4) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, "-m", "satellites", "--log-level", "WARNING",
                              "mpi", "--heartbeat-interval", "0.2", *args], env=MPI_ENV, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


@needs_mpi
def test_mpiexec_4_one_orchestrator_three_satellites_then_a_clean_stop(mpi_job: Any, tmp_path: Path) -> None:
    efile = tmp_path / "endpoint.json"
    job = mpi_job("--endpoint-file", str(efile), "--bind-host", "127.0.0.1", "--workers-per-rank", "1")
    wait_for(efile.exists)
    with Client(f"@{efile}") as c:
        st = wait_for(lambda: (lambda s: s if len(s["satellites"]) == 3 else None)(c.status()))
        assert sorted(r for s in st["satellites"] for r in s["tags"] if r.startswith("rank")) == \
            ["rank1", "rank2", "rank3"]
        assert list(c.map("echo", range(60), timeout=60)) == list(range(60))
        satellite_pids = [s["pid"] for s in st["satellites"]]
    orchestrator_rank = ppid(json.loads(efile.read_text())["pid"])
    for pid in [*satellite_pids, orchestrator_rank]:
        os.kill(pid, signal.SIGTERM)  # every rank leaves cleanly
    assert job.wait(60) == 0


@needs_mpi
def test_killing_one_rank_requeues_its_tasks(mpi_job: Any) -> None:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=0.2, log_level="ERROR",
                      tags=["local"]) as cluster:
        job = mpi_job("--connect", cluster.endpoint, "--workers-per-rank", "1", n=2)
        c = cluster.client()
        wait_for(lambda: len(c.status()["satellites"]) == 3)
        futs = [c.submit("sleep", 0.5) for _ in range(6)]
        st = wait_for(lambda: (lambda s: s if sum(x["inflight"] for x in s["satellites"]
                                                  if "rank0" in x["tags"] or "rank1" in x["tags"]) else None)(
            c.status()))
        victim = next(s for s in st["satellites"] if s["inflight"] and "local" not in s["tags"])
        os.kill(victim["pid"], signal.SIGKILL)  # MPI then aborts the whole job
        assert [f.result(60) for f in futs] == [0.5] * 6  # everything finishes on the local satellite
        job.wait(60)
        assert c.status()["counters"]["stalled"] >= 1


def test_a_world_size_mismatch_fails_clearly() -> None:
    from satellites.mpi import MPIMismatch, check_world

    with pytest.raises(MPIMismatch, match="different MPI installations"):
        check_world(1, {"PMI_SIZE": "4"})
    check_world(4, {"PMI_SIZE": "4"})
    check_world(1, {})
    if MPIEXEC is not None:  # a rank started by another launcher sees a world of size 1
        r = subprocess.run([sys.executable, "-m", "satellites", "mpi"], capture_output=True, text=True,
                           timeout=60, env={**MPI_ENV, "OMPI_COMM_WORLD_SIZE": "8"})
        assert r.returncode == 2 and "different MPI installations" in r.stderr


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_batch_scripts_parse_and_their_launch_line_runs(scheduler: str, tmp_path: Path) -> None:
    efile = tmp_path / "ep-$JOB_ID.json"
    r = subprocess.run([sys.executable, "-m", "orchester", "cluster", "script", "--scheduler", scheduler,
                        "--nodes", "2", "--walltime", "00:30:00", "--workers", "1", "--endpoint-file", str(efile),
                        "--python", sys.executable], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    script = r.stdout
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    if scheduler == "slurm":
        directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
        assert directives == {"job-name": "orchester", "nodes": "2", "ntasks": "3", "cpus-per-task": "1",
                              "time": "00:30:00"}
        env = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "3", "SLURM_SUBMIT_DIR": str(tmp_path)}
    else:
        assert "#PBS -l select=2:ncpus=1:mpiprocs=1" in lines and "#PBS -l walltime=00:30:00" in lines
        nodefile = tmp_path / "nodes"
        nodefile.write_text("localhost\nlocalhost\n")
        env = {"PBS_JOBID": "42", "PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": str(tmp_path)}
    launch = next(line for line in lines if line.startswith("mpiexec"))
    assert "--walltime 7200" not in launch and "--walltime 1800" in launch
    if MPIEXEC is None:
        return
    job = subprocess.Popen(["bash", "-c", "\n".join(lines[lines.index("set -euo pipefail"):])],
                           env={**MPI_ENV, **env, "PATH": os.path.dirname(MPIEXEC) + os.pathsep + os.environ["PATH"]},
                           stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        endpoint = tmp_path / "ep-42.json"
        wait_for(endpoint.exists)
        with Client(f"@{endpoint}") as c:
            st = wait_for(lambda: (lambda s: s if len(s["satellites"]) == 2 else None)(c.status()))
            assert all(1700 < s["walltime_left"] <= 1800 for s in st["satellites"])
            assert c.submit("echo", "from the batch script").result(30) == "from the batch script"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(10)
