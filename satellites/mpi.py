"""Satellites on the ranks of an MPI job (``mpiexec -n N satellite mpi``).

Rank ``--orchestrator-rank`` (0 by default) runs the orchestrator, binds its endpoints and
broadcasts the client endpoint with ``comm.bcast``; every other rank runs a satellite that
connects to it, tagged with its host name and rank. With ``--connect`` there is no
orchestrator rank: every rank is a satellite of that external orchestrator.

MPI is used only to place and start processes: liveness is the bus's business. When one rank
dies, MPI implementations usually abort the whole job (MPICH's hydra kills every rank); the
orchestrator then reroutes the tasks those satellites held as soon as it notices them gone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as _socket
from typing import Any

log = logging.getLogger("satellites.mpi")

#: Environment variables by which launchers announce the job's size.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE", "SLURM_NTASKS")


class MPIMismatch(RuntimeError):
    """mpiexec and mpi4py belong to different MPI installations (N jobs of size 1)."""


def check_world(size: int, env: dict[str, str] | None = None) -> None:
    """Fail clearly when the launcher started more ranks than mpi4py sees."""
    env = dict(os.environ) if env is None else env
    for var in SIZE_VARIABLES:
        value = env.get(var)
        if value and value.isdigit() and int(value) > 1 and size == 1:
            raise MPIMismatch(
                f"the launcher says {var}={value} but MPI.COMM_WORLD.size is 1: mpiexec and mpi4py come from "
                "different MPI installations (use the mpiexec of the environment mpi4py was built for, "
                "e.g. the venv's bin/mpiexec with 'pip install mpi4py mpich')")


def run_mpi(connect: list[str], orchestrator_rank: int, workers: int, tags: list[str], modules: list[str],
            endpoint_file: str | None, bind_host: str, heartbeat_interval: float, liveness: int,
            walltime: float | None, serve_args: list[str]) -> int:
    """Run this rank's part of the job; return its exit code."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    check_world(size)
    host = _socket.gethostname()
    if connect:
        return _satellite(connect, rank, host, workers, tags, modules, heartbeat_interval, liveness, walltime)
    if not 0 <= orchestrator_rank < size:
        raise ValueError(f"--orchestrator-rank {orchestrator_rank} is not a rank of this job of size {size}")
    if size < 2:
        raise ValueError("with an orchestrator rank the job needs at least 2 ranks (one orchestrator, one satellite)")
    if rank == orchestrator_rank:
        return _orchestrator(comm, host, bind_host, endpoint_file, heartbeat_interval, liveness, serve_args)
    endpoint = comm.bcast(None, root=orchestrator_rank)
    if not endpoint:
        raise RuntimeError("the orchestrator rank could not start an orchestrator")
    return _satellite([endpoint], rank, host, workers, tags, modules, heartbeat_interval, liveness, walltime)


def _orchestrator(comm: Any, host: str, bind_host: str, endpoint_file: str | None, heartbeat_interval: float,
                  liveness: int, serve_args: list[str]) -> int:
    """Run ``orchester serve`` as a child process of this rank and broadcast its endpoint."""
    import json
    import subprocess
    import sys
    import tempfile
    import time

    wildcard = bind_host in ("*", "0.0.0.0")
    with tempfile.TemporaryDirectory(prefix="orchester-mpi-") as tmp:
        efile = os.path.join(tmp, "endpoints.json")
        proc = subprocess.Popen([sys.executable, "-m", "orchester", "serve", "--bind", f"tcp://{bind_host}:*",
                                 "--pub", f"tcp://{bind_host}:*", "--endpoint-file", efile,
                                 "--heartbeat-interval", str(heartbeat_interval), "--liveness", str(liveness),
                                 *serve_args], stdin=subprocess.DEVNULL)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        signal.signal(signal.SIGINT, lambda *_: proc.terminate())
        deadline = time.monotonic() + 120
        while not os.path.exists(efile):
            if proc.poll() is not None or time.monotonic() > deadline:
                comm.bcast("", root=comm.Get_rank())  # let the satellites fail instead of waiting forever
                raise RuntimeError(f"the orchestrator did not start (exit code {proc.poll()})")
            time.sleep(0.02)
        with open(efile) as f:
            eps = json.load(f)
    public = {k: [ep.replace("0.0.0.0", host) if wildcard else ep for ep in v]
              for k, v in eps.items() if isinstance(v, list)}
    comm.bcast(public["bind"][0], root=comm.Get_rank())
    if endpoint_file:
        tmpname = f"{endpoint_file}.{os.getpid()}.tmp"
        with open(tmpname, "w") as f:
            json.dump({**public, "pid": proc.pid}, f)
        os.replace(tmpname, endpoint_file)
    log.info("rank %d: orchestrator at %s", comm.Get_rank(), public["bind"][0])
    return proc.wait()


def _satellite(connect: list[str], rank: int, host: str, workers: int, tags: list[str], modules: list[str],
               heartbeat_interval: float, liveness: int, walltime: float | None) -> int:
    from .satellite import Satellite

    sat = Satellite(connect, workers=workers, tags=[*tags, host, f"rank{rank}"], tasks=modules,
                    sid=f"{host}-rank{rank}", heartbeat_interval=heartbeat_interval, liveness=liveness,
                    walltime=walltime)
    signal.signal(signal.SIGTERM, lambda *_: sat.stop())
    signal.signal(signal.SIGINT, lambda *_: sat.stop())
    sat.run()
    return 0
