"""The ``satellite`` command line: ``satellite run``.

Flags can also come from a TOML file (``--config``, table ``[satellite]``) and
from environment variables ``SATELLITE_RUN_<FLAG>``; the endpoint also from
``ORCHESTER_CONNECT``. Exit codes: 0 ok, 2 usage or configuration error.

``--tasks`` modules are imported as ``python -m`` would: the working directory comes first on
the import path, so ``satellite run --tasks mytasks`` finds ``./mytasks.py`` (in the satellite
and in its worker processes).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from orchester.cli.common import ByteSize, OneLineErrors, check_connect, config_option
from serializers.messages import LIGHT_CREDIT, MAX_CORES, MAX_LIGHT

from .genx_numba import MAX_THREADS as MAX_NUMBA_THREADS


@click.group(cls=OneLineErrors,
             context_settings={"auto_envvar_prefix": "SATELLITE", "help_option_names": ["-h", "--help"]})
@config_option({"run": "satellite"}, "TOML file with a [satellite] table of flags.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Least important log messages written to stderr.")
@click.version_option(package_name="orchester")
def main(log_level: str) -> None:
    """Orchester satellites: run tasks for an orchestrator."""
    from orchester.cli.common import setup_logging

    setup_logging(log_level)


@main.command()
@click.option("--connect", multiple=True, envvar="ORCHESTER_CONNECT", default=("tcp://127.0.0.1:5555",),
              show_default=True, callback=check_connect,
              help="Orchestrator endpoint (repeat for a failover pair; @FILE: from an endpoint file).")
@click.option("--workers", type=int, default=2, show_default=True, help="Worker processes.")
@click.option("--tags", default="", help="Comma-separated tags this satellite announces.")
@click.option("--tasks", "modules", multiple=True, help="Module registering task kinds; repeatable.")
@click.option("--id", "sid", default=None, help="Satellite id (default: host-pid-random).")
@click.option("--heartbeat-interval", type=float, default=1.0, show_default=True,
              help="Seconds between heartbeats until registered; then the orchestrator's own (its WELCOME).")
@click.option("--liveness", type=int, default=3, show_default=True,
              help="Heartbeats the orchestrator may miss before this satellite reconnects (or fails over).")
@click.option("--prefetch", type=int, default=1, show_default=True,
              help="Tasks accepted beyond the number of workers.")
@click.option("--light-credit", type=click.IntRange(0, MAX_LIGHT), default=LIGHT_CREDIT, show_default=True,
              help="Light tasks (of kinds declared inline=True) taken beside the slots: they run in the satellite's "
              "own thread (0: they count against the slots).")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pickle-coded tasks (they run code on load) that the orchestrator accepted too "
              "(orchester serve --allow-pickle).")
@click.option("--curve-secret", envvar="ORCHESTER_CURVE_SECRET", default=None, type=click.Path(dir_okay=False),
              help="CurveZMQ: this satellite's secret key file (orchester keys generate NAME --role satellite).")
@click.option("--server-key", envvar="ORCHESTER_SERVER_KEY", default=None, type=click.Path(dir_okay=False),
              help="CurveZMQ: the orchestrator's public key file.")
@click.option("--walltime", default=None, help="Time left in the allocation (seconds or HH:MM:SS): tasks that "
              "would not finish are not sent here, and the satellite leaves a minute before it ends.")
@click.option("--numba/--no-numba", default=True, show_default=True,
              help="GenX's kernels with numba, when it is installed (warmed once before the satellite registers).")
@click.option("--numba-threads", type=click.IntRange(1, MAX_NUMBA_THREADS), default=None,
              envvar="ORCHESTER_NUMBA_THREADS",
              help="numba threads per worker [default: the usable cores divided by --workers].")
@click.option("--cores", type=click.IntRange(1, MAX_CORES), default=None,
              help="Cores its tasks may use together (a task asking for 4 takes 4) [default: its usable cores, "
              "or --workers if more].")
@click.option("--chdir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Change to this folder first (task modules are found there, as in the working directory).")
@click.option("--job", default=None,
              help="The batch job it runs in, announced to the orchestrator [default: $SLURM_JOB_ID or $PBS_JOBID].")
@click.option("--memory", type=ByteSize(), default=None,
              help="Memory its tasks may use together, e.g. 64G [default: the machine's].")
@click.option("--resend-memory", type=ByteSize(), default="16M", show_default=True,
              help="Results sent lately kept to send again after a failover, at most this many bytes (the tasks "
              "of those let go run again if the orchestrator never got them).")
def run(connect: tuple[str, ...], workers: int, tags: str, modules: tuple[str, ...], sid: str | None,
        heartbeat_interval: float, liveness: int, prefetch: int, allow_pickle: bool, curve_secret: str | None,
        server_key: str | None, walltime: str | None, numba: bool, numba_threads: int | None, cores: int | None,
        chdir: str | None, job: str | None, memory: int | None, light_credit: int, resend_memory: int) -> None:
    """Connect to an orchestrator and run tasks until SIGTERM or Ctrl-C."""
    from .satellite import Satellite

    if chdir:
        os.chdir(chdir)
    import_from_working_directory()

    if workers < 1 or prefetch < 0 or heartbeat_interval <= 0 or liveness < 1:
        raise click.UsageError("need --workers >= 1, --prefetch >= 0, --heartbeat-interval > 0, --liveness >= 1")
    try:
        sat = Satellite(list(connect), workers=workers, tags=[t for t in tags.split(",") if t],
                        tasks=list(modules), sid=sid, heartbeat_interval=heartbeat_interval,
                        liveness=liveness, prefetch=prefetch, allow_pickle=allow_pickle,
                        walltime=parse_duration(walltime), curve_secret=curve_secret, server_key=server_key,
                        numba=numba, numba_threads=numba_threads, cores=cores, memory=memory, job=job,
                        light_credit=light_credit, resend_memory=resend_memory)
    except (ImportError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    def stop(*_: Any) -> None:
        sat.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sat.run()


def import_from_working_directory() -> None:
    """Put the working directory first on the import path, as ``python -m`` does.

    The ``satellite`` script's own folder is on the path, not the folder it is run from; without
    this, ``--tasks mytasks`` would not find ``./mytasks.py`` (while ``python -m satellites``
    and ``LocalCluster(tasks=["mytasks"])`` do). Worker processes inherit the path: the
    forkserver they come from is started with this process's ``sys.path``.
    """
    here = os.getcwd()
    if not any(entry in ("", ".", here) for entry in sys.path):
        sys.path.insert(0, here)


def parse_duration(text: str | None) -> float | None:
    """Seconds from ``3600``, ``90m``, ``2h`` or ``HH:MM:SS`` (``None`` stays ``None``)."""
    if text is None or text == "":
        return None
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            seconds = 0.0
            for p in parts:
                seconds = seconds * 60 + p
            return seconds
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration (seconds, 90m, 2h or HH:MM:SS)") from None


@main.command()
@click.option("--connect", multiple=True, default=(), callback=check_connect,
              help="An external orchestrator: every rank is a satellite.")
@click.option("--orchestrator-rank", type=int, default=0, show_default=True,
              help="The rank that runs the orchestrator (without --connect).")
@click.option("--workers-per-rank", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes of each rank's satellite (tasks it runs at once).")
@click.option("--tags", default="", help="Comma-separated tags for every satellite (host and rank are added).")
@click.option("--tasks", "modules", multiple=True, help="Module registering task kinds; repeatable.")
@click.option("--endpoint-file", type=click.Path(dir_okay=False), default=None,
              help="Write the orchestrator's endpoints (JSON) here, for clients on the login node.")
@click.option("--bind-host", default="*", show_default=True,
              help="Interface the orchestrator rank binds (its host name is broadcast).")
@click.option("--heartbeat-interval", type=float, default=1.0, show_default=True,
              help="Seconds between heartbeats, for the orchestrator rank and every satellite.")
@click.option("--liveness", type=int, default=3, show_default=True,
              help="Heartbeats missed before a peer counts as lost (orchestrator and satellites alike).")
@click.option("--walltime", default=None, help="Time left in the allocation (seconds or HH:MM:SS).")
@click.option("--serve-option", "serve_args", multiple=True,
              help="An option for the orchestrator rank's 'orchester serve' (e.g. --serve-option=--journal=DIR).")
@click.option("--insecure", is_flag=True,
              help="Let the orchestrator rank bind a non-loopback address without CurveZMQ keys.")
@click.option("--numba/--no-numba", default=True, show_default=True,
              help="GenX's kernels with numba on every satellite rank, when it is installed.")
@click.option("--numba-threads", type=click.IntRange(1, MAX_NUMBA_THREADS), default=None,
              envvar="ORCHESTER_NUMBA_THREADS",
              help="numba threads per worker [default: each rank's usable cores divided by --workers-per-rank].")
def mpi(connect: tuple[str, ...], orchestrator_rank: int, workers_per_rank: int, tags: str, modules: tuple[str, ...],
        endpoint_file: str | None, bind_host: str, heartbeat_interval: float, liveness: int, walltime: str | None,
        serve_args: tuple[str, ...], insecure: bool, numba: bool, numba_threads: int | None) -> None:
    """Run under mpiexec: one rank the orchestrator, every other rank a satellite.

    CurveZMQ: give the orchestrator rank its keys with ``--serve-option=--curve-secret=FILE``
    and ``--serve-option=--authorized-keys=DIR``, and the satellites theirs with
    ``ORCHESTER_CURVE_SECRET`` and ``ORCHESTER_SERVER_KEY``.
    """
    from .mpi import MPIMismatch, run_mpi

    import_from_working_directory()
    try:
        code = run_mpi(list(connect), orchestrator_rank, workers_per_rank, [t for t in tags.split(",") if t],
                       list(modules), endpoint_file, bind_host, heartbeat_interval, liveness,
                       parse_duration(walltime), [*serve_args, *(["--insecure"] if insecure else [])],
                       numba=numba, numba_threads=numba_threads)
    except (MPIMismatch, ValueError, ImportError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
