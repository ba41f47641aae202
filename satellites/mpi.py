"""Satellites on the ranks of an MPI job (``mpiexec -n N satellite mpi``).

Rank ``--orchestrator-rank`` (0 by default) runs the orchestrator, binds its endpoints and
broadcasts the client endpoint with ``comm.bcast``; every other rank runs a satellite that
connects to it, tagged with its host name and rank. With ``--connect`` there is no
orchestrator rank: every rank is a satellite of that external orchestrator.

MPI is used only to place and start processes: liveness is the bus's business. When one rank
dies, MPI implementations usually abort the whole job (MPICH's hydra kills every rank); the
orchestrator then reroutes the tasks those satellites held as soon as it notices them gone.
The orchestrator process of rank 0 gets SIGTERM when its rank dies, even by ``kill -9``.

A job that cannot start says so in one line, from the orchestrator rank: a wrong
``--orchestrator-rank``, a job of one rank, or an orchestrator that refuses to start (its own
message, e.g. a wildcard bind without keys or ``--insecure``); the other ranks exit with the
same code (2) and print nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket as _socket
import sys
import threading
from typing import IO, Any

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
            walltime: float | None, serve_args: list[str], *, numba: bool = True,
            numba_threads: int | None = None) -> int:
    """Run this rank's part of the job; return its exit code (``numba``, ``numba_threads``: GenX's
    kernels on each satellite rank, see :mod:`satellites.genx_numba`)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    check_world(size)
    host = _socket.gethostname()
    if connect:
        return _satellite(connect, rank, host, workers, tags, modules, heartbeat_interval, liveness, walltime,
                          numba, numba_threads)
    if not 0 <= orchestrator_rank < size or size < 2:
        if rank != 0:
            return EXIT_NOT_STARTED  # every rank sees the same mistake: rank 0 alone says it
        if size < 2:
            raise ValueError("with an orchestrator rank the job needs at least 2 ranks (one orchestrator, "
                             "one satellite)")
        raise ValueError(f"--orchestrator-rank {orchestrator_rank} is not a rank of this job of size {size}")
    if rank == orchestrator_rank:
        return _orchestrator(comm, host, bind_host, endpoint_file, heartbeat_interval, liveness, serve_args)
    endpoint = comm.bcast(None, root=orchestrator_rank)
    if not endpoint:  # the orchestrator rank says why, once for the whole job
        log.debug("rank %d: no orchestrator: leaving", rank)
        return EXIT_NOT_STARTED
    return _satellite([endpoint], rank, host, workers, tags, modules, heartbeat_interval, liveness, walltime,
                      numba, numba_threads)


#: The exit code of every rank of a job whose orchestrator could not start (a usage or configuration error).
EXIT_NOT_STARTED = 2
#: Lines of the orchestrator's early output kept to explain a failed start.
_HELD_LINES = 200


class _StderrRelay:
    """The orchestrator's stderr: held back while it starts, then passed on to this rank's stderr.

    A failed start is then told in one line (:meth:`reason`) instead of the orchestrator's usage
    text; once it runs, its log goes out as it comes.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._held: list[bytes] = []
        self._forward = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="orchestrator-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for line in iter(self._stream.readline, b""):
            with self._lock:
                if self._forward:
                    _write_stderr(line)
                elif len(self._held) < _HELD_LINES:
                    self._held.append(line)

    def forward(self) -> None:
        """Pass on what was held, and everything that follows."""
        with self._lock:
            self._forward = True
            held, self._held = self._held, []
            for line in held:
                _write_stderr(line)

    def join(self, timeout: float) -> None:
        """Wait (bounded) until the orchestrator closed its stderr."""
        self._thread.join(timeout)

    def reason(self) -> str:
        """Why the orchestrator stopped, from what it printed: its ``Error:`` line, else its last line."""
        with self._lock:
            lines = [b.decode(errors="replace").strip() for b in self._held]
        lines = [line for line in lines if line]
        for line in reversed(lines):
            if line.startswith("Error: ") or line.startswith("error: "):
                return line.split(": ", 1)[1]
        return lines[-1] if lines else ""


def _write_stderr(data: bytes) -> None:
    out = getattr(sys.stderr, "buffer", None)
    with contextlib.suppress(OSError, ValueError):  # stderr closed: the orchestrator must not block on a full pipe
        if out is not None:
            out.write(data)
            out.flush()
        else:
            sys.stderr.write(data.decode(errors="replace"))
            sys.stderr.flush()


def _orchestrator(comm: Any, host: str, bind_host: str, endpoint_file: str | None, heartbeat_interval: float,
                  liveness: int, serve_args: list[str]) -> int:
    """Run ``orchester serve`` as a child process of this rank and broadcast its endpoint."""
    import json
    import subprocess
    import tempfile
    import time

    from orchester.signals import parent_death_signal

    wildcard = bind_host in ("*", "0.0.0.0")
    with tempfile.TemporaryDirectory(prefix="orchester-mpi-") as tmp:
        efile = os.path.join(tmp, "endpoints.json")
        proc = subprocess.Popen([sys.executable, "-m", "orchester", "serve", "--bind", f"tcp://{bind_host}:*",
                                 "--pub", f"tcp://{bind_host}:*", "--endpoint-file", efile,
                                 "--heartbeat-interval", str(heartbeat_interval), "--liveness", str(liveness),
                                 *serve_args], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=parent_death_signal(signal.SIGTERM))
        assert proc.stderr is not None
        relay = _StderrRelay(proc.stderr)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        signal.signal(signal.SIGINT, lambda *_: proc.terminate())
        deadline = time.monotonic() + 120
        while not os.path.exists(efile):
            late = time.monotonic() > deadline
            if proc.poll() is not None or late:
                if late:
                    proc.kill()
                proc.wait()
                relay.join(5)
                comm.bcast("", root=comm.Get_rank())  # the satellites leave instead of waiting forever
                why = "it did not start within 120 s" if late else relay.reason() or f"exit code {proc.returncode}"
                print(f"error: the orchestrator rank could not start: {why}", file=sys.stderr, flush=True)
                return EXIT_NOT_STARTED
            time.sleep(0.02)
        relay.forward()
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
    code = proc.wait()
    relay.join(5)
    return code


def _satellite(connect: list[str], rank: int, host: str, workers: int, tags: list[str], modules: list[str],
               heartbeat_interval: float, liveness: int, walltime: float | None, numba: bool,
               numba_threads: int | None) -> int:
    from .satellite import Satellite

    sat = Satellite(connect, workers=workers, tags=[*tags, host, f"rank{rank}"], tasks=modules,
                    sid=f"{host}-rank{rank}", heartbeat_interval=heartbeat_interval, liveness=liveness,
                    walltime=walltime, numba=numba, numba_threads=numba_threads)
    signal.signal(signal.SIGTERM, lambda *_: sat.stop())
    signal.signal(signal.SIGINT, lambda *_: sat.stop())
    sat.run()
    return 0
