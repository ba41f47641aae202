"""``python -m topology_tests run TOPOLOGY.toml [--strategy a,b] [--repeat N] [--out DIR]``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .report import plots, table, write_csv
from .runner import run
from .schema import TopologyError, load


@click.group()
def main() -> None:
    """Build a topology, run it with each routing strategy, and compare."""


@main.command("run")
@click.argument("topology", type=click.Path(exists=True, dir_okay=False))
@click.option("--strategy", "strategies", default=None,
              help="Comma-separated strategies (built-in names or module:Class); default: the file's.")
@click.option("--repeat", type=int, default=1, show_default=True)
@click.option("--out", default="topology-report", show_default=True, type=click.Path(file_okay=False))
def run_command(topology: str, strategies: str | None, repeat: int, out: str) -> None:
    """Run TOPOLOGY with each strategy (--repeat times) and write a table, results.csv and plots."""
    try:
        topo = load(topology)
    except TopologyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    names = [s for s in (strategies or topo.strategy).split(",") if s]
    results = [run(topo, name) for name in names for _ in range(repeat)]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table(results)
    write_csv(results, out_dir / "results.csv")
    written = plots(results, out_dir)
    click.echo(f"report in {out_dir}/ (results.csv, {', '.join(p.name for p in written)})")
    if any(r.lost or r.duplicated for r in results):
        click.echo("error: tasks were lost or duplicated", err=True)
        sys.exit(1)


main()
