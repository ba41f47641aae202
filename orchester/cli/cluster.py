"""``orchester cluster script``: a SLURM or PBS batch script that starts the bus in an allocation; and
``orchester autoscale``: satellite jobs asked of the scheduler when work waits, given back when idle."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from typing import Any

import click

from orchester.cli.common import EXIT_USAGE, config_options
from orchester.config import AutoscaleConfig, ConfigError, from_mapping


@click.group()
def cluster() -> None:
    """Run the bus inside a batch-scheduler allocation."""


@cluster.command("script")
@click.option("--scheduler", type=click.Choice(["slurm", "pbs"]), default="slurm", show_default=True,
              help="The batch scheduler the script is for.")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes: one satellite on each.")
@click.option("--walltime", default="01:00:00", show_default=True, help="HH:MM:SS")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes per satellite.")
@click.option("--tasks", "modules", multiple=True, help="Module registering task kinds; repeatable.")
@click.option("--endpoint-file", default="$HOME/.orchester/endpoint-$JOB_ID.json", show_default=True,
              help="Where the orchestrator's endpoints are written ($JOB_ID: the job's id).")
@click.option("--journal", default=None, help="Journal folder for the orchestrator.")
@click.option("--job-name", default="orchester", show_default=True, help="The job's name in the scheduler's queue.")
@click.option("--python", default="python3", show_default=True, help="The Python with Orchester on the nodes.")
@click.option("--directive", "directives", multiple=True, help="An extra scheduler line (e.g. '#SBATCH -A proj').")
def cluster_script(scheduler: str, nodes: int, walltime: str, workers: int, modules: tuple[str, ...],
                   endpoint_file: str, journal: str | None, job_name: str, python: str,
                   directives: tuple[str, ...]) -> None:
    """Print a SLURM or PBS batch script that starts the orchestrator and the satellites."""
    from orchester.batch.scripts import ScriptSettings, render

    try:
        click.echo(render(ScriptSettings(scheduler, nodes, walltime, workers, list(modules), endpoint_file,
                                         job_name, journal, python, list(directives))), nl=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command(params=config_options(AutoscaleConfig))
def autoscale(**kw: Any) -> None:
    """Ask a batch scheduler for satellite jobs when work waits, and give them back when idle.

    Its jobs are named orchester-TAG; started again with the same tag it adopts them. Stopped
    (SIGTERM, SIGINT, SIGHUP), it leaves its jobs running: ``scancel --name orchester-TAG`` (or
    ``qdel``) gives them back. With CurveZMQ it needs an admin key (``--curve-secret``).
    """
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in kw.items()}
    try:
        cfg: AutoscaleConfig = from_mapping(AutoscaleConfig, settings, "autoscale")
    except ConfigError as exc:  # (one line, exit 2)
        raise click.UsageError(str(exc)) from None
    run_autoscale(cfg)


def run_autoscale(cfg: AutoscaleConfig) -> None:
    """Run an autoscaler until a stop signal."""
    from orchester.batch.autoscaler import Autoscale
    from orchester.batch.scheduler import scheduler
    from orchester.cli.common import is_loopback, open_client, reachable_endpoint
    from orchester.client.uplink import resolve_endpoint

    try:
        endpoints = [resolve_endpoint(ep) for ep in cfg.connect]
        for_satellites = [reachable_endpoint(resolve_endpoint(ep), socket.getfqdn())  # (an endpoint file may
                          for ep in cfg.satellite_connect or cfg.connect]           # name a wildcard bind)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if any(is_loopback(ep) for ep in for_satellites):
        logging.getLogger("orchester.autoscale").warning(
            "the jobs' satellites connect to %s: only jobs on this host can reach it (give --connect, or "
            "--satellite-connect, the bus's address on the cluster's network)", " ".join(for_satellites))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with open_client(endpoints) as client:
        Autoscale(cfg, client, scheduler(cfg.scheduler), for_satellites).run(stop)
