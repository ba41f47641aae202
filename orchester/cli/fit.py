"""``orchester fit``: the main job, GenX fits on satellites or on a local cluster."""

from __future__ import annotations

import sys
from typing import Any

import click

from orchester.cli.common import EXIT_OK, EXIT_TASK_FAILED, check_connect, open_client, timeout_option, unreachable
from orchester.genx import MIN_POPULATION, TRIAL_METHODS
from orchester.render import clean_text


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--connect", "connect", multiple=True, envvar="ORCHESTER_CONNECT", callback=check_connect,
              help="Orchestrator endpoint; without it, a local cluster runs the fits (on ipc:// sockets in "
              "a folder only you can open).")
@click.option("--local", "local", type=click.IntRange(min=0), default=0,
              help="Satellites of the local cluster (default: one per core).")
@click.option("--generations", type=click.IntRange(min=1), default=None,
              help="Generations of differential evolution per fit (at least 1; default: the model file's).")
@click.option("--population", type=click.IntRange(min=MIN_POPULATION), default=None,
              help=f"Candidate parameter sets per generation (at least {MIN_POPULATION}; default: the model file's).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Random seed (0 to 2**32-1): the same model, settings and seed give the same fit.")
@click.option("--method", type=click.Choice(TRIAL_METHODS), default=None,
              help="Differential-evolution trial method (default: the model file's).")
@click.option("--km", type=click.FloatRange(0.0, 2.0, min_open=True), default=None,
              help="Mutation constant (0 < km <= 2; default: the model file's).")
@click.option("--kr", type=click.FloatRange(0.0, 1.0), default=None,
              help="Crossover constant (0 to 1; default: the model file's).")
@click.option("--start-guess/--no-start-guess", default=None,
              help="Start from the model's values (default: the model file's choice).")
@click.option("--boundaries/--no-boundaries", default=None,
              help="Keep parameters within their bounds (default: the model file's choice).")
@click.option("--min-spread", type=click.FloatRange(0.0, 100.0), default=None,
              help="Stop when every parameter's spread is below this % of its range (default: the model file's).")
@click.option("--max-seconds", type=click.FloatRange(0.0, 1e9, min_open=True), default=None,
              help="Stop each fit after this many seconds of wall time (its best so far is its result).")
@click.option("--max-evaluations", type=click.IntRange(min=1), default=None,
              help="Budget of figure-of-merit evaluations (instead of --generations).")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A series fit: fit the one model to each of these data files (GenX's default columns "
              "x, y, error; ORSO .ort), in parallel over the satellites: --data series/*.dat (the files "
              "after it that are not .hgx are data files too).")
@click.option("--chain", is_flag=True, help="Series: fit in sequence order, each from the previous result.")
@click.option("--adjust-bounds", is_flag=True,
              help="Series with --chain: centre each parameter's bounds on the previous result.")
@click.option("--sequence", default=None, help="Series: the sequence values, comma-separated, one per data file "
              "(default: the last number in each file's name).")
@click.option("--figures", default="png", show_default=True,
              help="Formats of the figures, comma-separated: png, and pdf or svg beside it.")
@click.option("--out", default="fits", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the results.")
@click.option("--no-cache", is_flag=True, help="Fit again even when an identical fit is cached.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Fit cache folder (default $ORCHESTER_CACHE or ~/.cache/orchester/fits).")
@click.option("--genx-examples", is_flag=True, help="Also fit the example models that ship inside genx3.")
@timeout_option
def fit(files: tuple[str, ...], connect: tuple[str, ...], local: int, generations: int | None,
        population: int | None, seed: int, method: str | None, km: float | None, kr: float | None,
        start_guess: bool | None, boundaries: bool | None, min_spread: float | None, max_seconds: float | None,
        max_evaluations: int | None, data: tuple[str, ...], chain: bool, adjust_bounds: bool, sequence: str | None,
        figures: str, out: str, no_cache: bool, cache_dir: str | None, genx_examples: bool, timeout: float) -> None:
    """Fit GenX models (.hgx) on satellites, each with its own optimizer settings (a flag overrides
    only the setting it names); write CSVs, plots, fitted models, summary.csv and summary.json."""
    from orchester.genx.fits import FitCache, FitSettings, default_cache_dir

    paths = list(files)
    if genx_examples:
        paths += genx_example_files()
    if not paths:
        raise click.UsageError("give model files (.hgx), or --genx-examples")
    if data:  # `--data series/*.dat`: the shell gives the first to --data, the others come as arguments
        data = data + tuple(p for p in paths if not p.lower().endswith((".hgx", ".gx")))
        paths = [p for p in paths if p.lower().endswith((".hgx", ".gx"))]
    series = _series_options(paths, data, chain, adjust_bounds, sequence)
    formats = _figure_formats(figures)
    settings = FitSettings(generations=generations, population=population, seed=seed, km=km, kr=kr,
                           method=method, max_evaluations=max_evaluations, start_guess=start_guess,
                           boundaries=boundaries, min_spread=min_spread, max_seconds=max_seconds)
    cache = None if no_cache else FitCache(cache_dir or default_cache_dir())
    from pathlib import Path

    from orchester.genx.fits import write_summary
    from orchester.genx.job import FitsInterrupted, interrupted_rows
    from orchester.signals import interrupt_exit_code, signal_name, stop_on_signals

    with stop_on_signals():  # SIGINT/SIGTERM/SIGHUP: the local cluster stops; exit 128 + the signal's number
        try:
            code = _run_fit_job(list(connect), local, paths, settings, out, cache, timeout, series, formats)
        except KeyboardInterrupt as exc:
            code = interrupt_exit_code(exc)
            rows = exc.rows if isinstance(exc, FitsInterrupted) else interrupted_rows(paths, code - 128)
            if not isinstance(exc, FitsInterrupted):  # stopped before the fits started: say so all the same
                Path(out).mkdir(parents=True, exist_ok=True)
                write_summary(rows, out)
            done = sum(r["status"] == "done" for r in rows)
            click.echo(f"interrupted by {signal_name(code - 128)}: {done} of {len(rows)} fits done; the others "
                       f"are marked interrupted in {out}/summary.csv", err=True)
    sys.exit(code)


def genx_example_files() -> list[str]:
    """The .hgx example models shipped inside the installed genx3 package (GenX is not imported)."""
    import glob
    import os
    from importlib.util import find_spec

    spec = find_spec("genx")
    if spec is None or not spec.origin:
        raise click.UsageError("--genx-examples needs GenX installed here (pip install --no-deps genx3)")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "examples", "*.hgx")))


def _figure_formats(text: str) -> list[str]:
    """``--figures``: the formats, checked (a usage error names the ones it takes)."""
    from orchester.genx.fits import FIGURE_FORMATS

    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown or not formats:
        raise click.BadParameter(f"{', '.join(unknown) or 'nothing'}: use {', '.join(FIGURE_FORMATS)}",
                                 param_hint="--figures")
    return formats


def _series_options(paths: list[str], data: tuple[str, ...], chain: bool, adjust_bounds: bool,
                    sequence: str | None) -> dict[str, Any] | None:
    """The series fit the flags ask for (``None``: none); a usage error (exit 2) for flags that do not fit."""
    if not data:
        if chain or adjust_bounds or sequence is not None:
            raise click.UsageError("--chain, --adjust-bounds and --sequence are for a series fit (--data FILES)")
        return None
    if len(paths) != 1:
        raise click.UsageError(f"a series fit takes one model and many data files; got {len(paths)} models")
    if adjust_bounds and not chain:
        raise click.UsageError("--adjust-bounds moves the bounds around the previous result: it needs --chain")
    values = None
    if sequence is not None:
        import math

        try:
            values = [float(v) for v in sequence.split(",")]
        except ValueError:
            raise click.BadParameter(f"{sequence[:60]!r} is not a comma-separated list of numbers",
                                     param_hint="--sequence") from None
        if len(values) != len(data) or not all(math.isfinite(v) for v in values):
            raise click.BadParameter(f"{len(values)} values for {len(data)} data files (finite numbers, one each)",
                                     param_hint="--sequence")
    return {"data": list(data), "chain": chain, "adjust_bounds": adjust_bounds, "sequence": values}


def _run_fit_job(connect: list[str], local: int, paths: list[str], settings: Any, out: str, cache: Any,
                 timeout: float, series: dict[str, Any] | None = None, figures: list[str] | None = None) -> int:
    import os

    from rich.console import Console

    from orchester.errors import OrchesterError, Unreachable
    from orchester.genx.job import run_fits
    from orchester.local.cluster import LocalCluster

    console = Console(stderr=True)
    cluster = None
    try:
        if connect:
            client = open_client(connect)
            try:
                client.status(timeout=timeout)
            except Unreachable:
                client.close()
                unreachable(connect, timeout)
        else:
            n = local or os.cpu_count() or 1
            with console.status(f"starting a local cluster: {n} satellite(s)"):
                cluster = LocalCluster(satellites=n, workers=1, log_level="WARNING").start()
            client = cluster.client()
        with client:
            try:
                if series is not None:
                    from orchester.genx.series import run_series

                    rows = run_series(client, paths[0], series["data"], settings, out, chain=series["chain"],
                                      adjust_bounds=series["adjust_bounds"], sequence=series["sequence"],
                                      console=console, figures=figures or ())
                else:
                    rows = run_fits(client, paths, settings, out, cache, console, figures=figures or ())
            except (OrchesterError, OSError, ValueError) as exc:
                click.echo(f"error: {exc}", err=True)
                return EXIT_TASK_FAILED
    finally:
        if cluster is not None:
            cluster.close()
    failed = [r for r in rows if r["status"] != "done"]
    for r in rows:
        mark = "ok " if r["status"] == "done" else "FAILED"
        detail = f"fom {r['fom']}  {r['seconds']}s" + ("  (cached)" if r.get("cached") == "yes" else "") \
            if r["status"] == "done" else r.get("error", "")
        click.echo(f"{mark} {clean_text(r['file'], 300)}: {clean_text(detail, 500)}")
    made = "summary.csv, summary.json" + (", series.csv, series.png" if series is not None else "")
    click.echo(f"{len(rows) - len(failed)} of {len(rows)} fits done; results in {out}/ ({made})")
    return EXIT_TASK_FAILED if failed else EXIT_OK
