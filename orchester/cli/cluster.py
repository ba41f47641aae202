"""``orchester cluster script``: a SLURM or PBS batch script that starts the bus in an allocation."""

from __future__ import annotations

import click


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
    from orchester.cli.scripts import ScriptSettings, render

    try:
        click.echo(render(ScriptSettings(scheduler, nodes, walltime, workers, list(modules), endpoint_file,
                                         job_name, journal, python, list(directives))), nl=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
