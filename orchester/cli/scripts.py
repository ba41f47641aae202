"""Batch scripts that start an Orchester bus inside a SLURM or PBS allocation.

The script starts one MPI job: rank 0 runs the orchestrator, every other rank (one per node,
each with ``--workers`` worker processes) a satellite; the orchestrator's endpoints are written
to ``--endpoint-file`` where a client on the login node finds them
(``orchester status --connect @FILE``). Satellites are given the allocation's walltime and stop
taking tasks that would not finish in it, leaving a minute before the end.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field


@dataclass
class ScriptSettings:
    """What goes into a batch script."""

    scheduler: str = "slurm"  #: slurm or pbs
    nodes: int = 1
    walltime: str = "01:00:00"  #: HH:MM:SS
    workers: int = 1  #: worker processes per satellite (one satellite per node)
    tasks: list[str] = field(default_factory=list)  #: modules registering task kinds
    endpoint_file: str = "$HOME/.orchester/endpoint-$JOB_ID.json"
    job_name: str = "orchester"
    journal: str | None = None
    python: str = "python3"
    extra_directives: list[str] = field(default_factory=list)

    def walltime_seconds(self) -> int:
        """The walltime in seconds."""
        parts = [int(p) for p in self.walltime.split(":")]
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
            raise ValueError(f"walltime {self.walltime!r} is not HH:MM:SS")
        seconds = 0
        for p in parts:
            seconds = seconds * 60 + p
        return seconds


def launch_line(s: ScriptSettings, ranks: str) -> str:
    """The ``mpiexec`` line of the script (``ranks``: a shell expression for the number of ranks)."""
    args = [s.python, "-m", "satellites", "mpi", "--workers-per-rank", str(s.workers),
            "--endpoint-file", s.endpoint_file, "--walltime", str(s.walltime_seconds())]
    for module in s.tasks:
        args += ["--tasks", module]
    if s.journal:
        args += ["--serve-option", f"--journal={s.journal}"]
    args += ["--insecure"]  # explained in the script (render): keys are the way out
    quoted = " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in args)
    hosts = ' -f "$PBS_NODEFILE"' if s.scheduler == "pbs" else ""
    return f"mpiexec{hosts} -n {ranks} {quoted}"


def render(s: ScriptSettings) -> str:
    """The batch script, as text."""
    if s.nodes < 1 or s.workers < 1:
        raise ValueError("nodes and workers must be at least 1")
    s.walltime_seconds()
    if s.scheduler == "slurm":
        head = [f"#SBATCH --job-name={s.job_name}", f"#SBATCH --nodes={s.nodes}",
                f"#SBATCH --ntasks={s.nodes + 1}", f"#SBATCH --cpus-per-task={s.workers}",
                f"#SBATCH --time={s.walltime}", *s.extra_directives]
        job_id, ranks, workdir = "$SLURM_JOB_ID", "$SLURM_NTASKS", "${SLURM_SUBMIT_DIR:-$PWD}"
    elif s.scheduler == "pbs":
        head = [f"#PBS -N {s.job_name}", f"#PBS -l select={s.nodes}:ncpus={s.workers}:mpiprocs=1",
                f"#PBS -l walltime={s.walltime}", *s.extra_directives]
        job_id, ranks, workdir = "$PBS_JOBID", "$(( $(wc -l < \"$PBS_NODEFILE\") + 1 ))", "${PBS_O_WORKDIR:-$PWD}"
    else:
        raise ValueError(f"unknown scheduler {s.scheduler!r}: slurm or pbs")
    endpoint = s.endpoint_file.replace("$JOB_ID", job_id)
    line = launch_line(ScriptSettings(**{**s.__dict__, "endpoint_file": endpoint}), ranks)
    return "\n".join([
        "#!/bin/bash",
        *head,
        "# Written by 'orchester cluster script'. Rank 0 runs the orchestrator, every other rank a",
        "# satellite; clients find the bus with:  orchester status --connect @" + endpoint,
        "set -euo pipefail",
        f'cd "{workdir}"',
        f'mkdir -p "$(dirname "{endpoint}")"',
        "export UCX_TLS=${UCX_TLS:-self,sm,tcp}",
        "# --insecure: the orchestrator listens on the allocation's network without authentication.",
        "# To require keys instead (docs/security.rst): drop it, add",
        "#   --serve-option=--curve-secret=server.key_secret --serve-option=--authorized-keys=keys/",
        "# and export ORCHESTER_CURVE_SECRET=satellite.key_secret ORCHESTER_SERVER_KEY=server.key",
        line,
        "",
    ])
