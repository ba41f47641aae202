"""Batch scripts for SLURM and PBS: a whole bus in one allocation, or satellite jobs for a bus elsewhere.

:func:`render` (``orchester cluster script``) starts one MPI job: rank 0 runs the orchestrator,
every other rank (one per node, each with ``--workers`` worker processes) a satellite; the
orchestrator's endpoints are written to ``--endpoint-file`` where a client on the login node
finds them (``orchester status --connect @FILE``).

:func:`satellite_job` (``orchester autoscale``) starts one satellite per node of the job, each
joining a bus that runs elsewhere and announcing the job's id (the autoscaler drains a job's
satellites before it gives the job back). No MPI: Slurm's ``srun`` or PBS's ``pbsdsh`` starts
them.

Either way satellites are given the allocation's walltime and stop taking tasks that would not
finish in it, leaving a minute before the end.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any


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
        return walltime_seconds(self.walltime)


def walltime_seconds(walltime: str) -> int:
    """``HH:MM:SS`` (or ``MM:SS``, or seconds) in seconds; :class:`ValueError` for anything else."""
    if not re.fullmatch(r"[0-9]{1,6}(:[0-9]{1,2}){0,2}", walltime or ""):
        raise ValueError(f"walltime {walltime!r} is not HH:MM:SS")
    seconds = 0
    for p in walltime.split(":"):
        seconds = seconds * 60 + int(p)
    if seconds < 1:
        raise ValueError(f"walltime {walltime!r} is no time at all")
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


def _arg(a: str) -> str:
    """One word of a script's command line: a ``$VARIABLE`` of the job's shell expanded in double quotes
    (only names of the scheduler's variables ever go in unquoted), anything else quoted as it is."""
    return f'"{a}"' if re.fullmatch(r"\$[A-Z_]+", a) else shlex.quote(a)


def check_satellite_job(cfg: Any) -> None:
    """What would make :func:`satellite_job` write a bad script, as a :class:`ValueError` (``cfg``: an
    :class:`~orchester.config.AutoscaleConfig`)."""
    from orchester.batch.scheduler import job_name

    job_name(cfg.tag)
    walltime_seconds(cfg.walltime)
    for directive in cfg.directives:
        if not directive.startswith(("#SBATCH", "#PBS")):
            raise ValueError(f"a directive starts with #SBATCH or #PBS, not {directive[:40]!r}")
    for option in cfg.satellite_options:
        if not option.startswith("--"):
            raise ValueError(f"a satellite option is a flag like --tags=gpu, not {option[:40]!r}")
    for name in ("partition", "account"):
        value = getattr(cfg, name)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,@+-]{1,128}", value):
            raise ValueError(f"{name} {value!r} is not a name the scheduler takes")


def satellite_job(cfg: Any, endpoints: list[str]) -> str:
    """The batch script of one autoscaler job (``cfg``: an :class:`~orchester.config.AutoscaleConfig`):
    one satellite per node, each joining ``endpoints`` and announcing the job's id."""
    check_satellite_job(cfg)
    nodes, cores = cfg.satellites_per_job, cfg.cores or cfg.workers
    workdir = cfg.workdir or "."
    name = f"orchester-{cfg.tag}"
    job_var = "$SLURM_JOB_ID" if cfg.scheduler == "slurm" else "$PBS_JOBID"
    argv = [cfg.python or sys.executable, "-m", "satellites", "run"]
    for ep in endpoints:
        argv += ["--connect", ep]
    argv += ["--workers", str(cfg.workers), "--cores", str(cores), "--walltime", str(walltime_seconds(cfg.walltime)),
             "--job", job_var, "--chdir", workdir]
    if cfg.satellite_secret and cfg.satellite_server_key:  # paths on the nodes, as flags (pbsdsh passes no
        argv += ["--curve-secret", cfg.satellite_secret, "--server-key", cfg.satellite_server_key]  # environment)
    for module in cfg.tasks:
        argv += ["--tasks", module]
    argv += list(cfg.satellite_options)
    command = " ".join(_arg(a) for a in argv)
    if cfg.scheduler == "slurm":
        head = [f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1",
                f"#SBATCH --cpus-per-task={cores}", f"#SBATCH --time={cfg.walltime}",
                f"#SBATCH --output={workdir.rstrip('/') or '/'}/{name}-%j.out"]
        head += [f"#SBATCH --partition={cfg.partition}"] if cfg.partition else []
        head += [f"#SBATCH --account={cfg.account}"] if cfg.account else []
        launch = f"exec srun --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={cores} --kill-on-bad-exit=0 {command}"
    elif cfg.scheduler == "pbs":
        head = [f"#PBS -N {name}", f"#PBS -l select={nodes}:ncpus={cores}:mpiprocs=1",
                f"#PBS -l walltime={cfg.walltime}", "#PBS -j oe", f"#PBS -o {workdir.rstrip('/') or ''}/"]
        head += [f"#PBS -q {cfg.partition}"] if cfg.partition else []
        head += [f"#PBS -A {cfg.account}"] if cfg.account else []
        launch = f"exec {command}" if nodes == 1 else f"exec pbsdsh -u -- {command}"
    else:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}: slurm or pbs")
    return "\n".join([
        "#!/bin/bash",
        *head,
        *cfg.directives,
        f"# Written by 'orchester autoscale' (tag {cfg.tag}): one satellite per node, joining the bus at",
        f"# {' '.join(endpoints)[:200]}. Each announces this job's id; the autoscaler drains a job's",
        "# satellites before it gives the job back, so no task is killed for scaling down.",
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        launch,
        "",
    ])
