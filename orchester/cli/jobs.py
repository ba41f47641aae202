"""``orchester`` commands for the jobs and the journal: fit, history, replay, journal compact."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from orchester.cli.main import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    EXIT_USAGE,
    _ask,
    check_connect,
    connect_option,
    main,
    open_client,
    timeout_option,
    unreachable,
    wait_for,
)
from orchester.render import clean_text

#: The differential-evolution trial methods of GenX (``satellites.genx_task.TRIAL_METHODS``, which
#: this process does not import: it would load GenX).
TRIAL_METHODS = ("best_1_bin", "rand_1_bin", "best_either_or", "rand_either_or", "jade_best", "simplex_best_1_bin")
#: The smallest population GenX's differential evolution (and the genx.fit task) takes.
MIN_POPULATION = 5


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--connect", "connect", multiple=True, envvar="ORCHESTER_CONNECT", callback=check_connect,
              help="Orchestrator endpoint; without it, a local cluster runs the fits (on ipc:// sockets in "
              "a folder only you can open).")
@click.option("--local", "local", type=click.IntRange(min=0), default=0,
              help="Satellites of the local cluster (default: one per core).")
@click.option("--generations", type=click.IntRange(min=1), default=100, show_default=True,
              help="Generations of differential evolution per fit (at least 1).")
@click.option("--population", type=click.IntRange(min=MIN_POPULATION), default=50, show_default=True,
              help=f"Candidate parameter sets per generation (at least {MIN_POPULATION}).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Random seed (0 to 2**32-1): the same model, settings and seed give the same fit.")
@click.option("--method", type=click.Choice(TRIAL_METHODS), default="best_1_bin", show_default=True,
              help="Differential-evolution trial method.")
@click.option("--km", type=click.FloatRange(0.0, 2.0, min_open=True), default=0.7, show_default=True,
              help="Mutation constant (0 < km <= 2).")
@click.option("--kr", type=click.FloatRange(0.0, 1.0), default=0.7, show_default=True,
              help="Crossover constant (0 to 1).")
@click.option("--max-evaluations", type=click.IntRange(min=1), default=None,
              help="Budget of figure-of-merit evaluations (instead of --generations).")
@click.option("--out", default="fits", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the results.")
@click.option("--no-cache", is_flag=True, help="Fit again even when an identical fit is cached.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Fit cache folder (default $ORCHESTER_CACHE or ~/.cache/orchester/fits).")
@click.option("--genx-examples", is_flag=True, help="Also fit the example models that ship inside genx3.")
@timeout_option
def fit(files: tuple[str, ...], connect: tuple[str, ...], local: int, generations: int, population: int,
        seed: int, method: str, km: float, kr: float, max_evaluations: int | None, out: str, no_cache: bool,
        cache_dir: str | None, genx_examples: bool, timeout: float) -> None:
    """Fit GenX models (.hgx) on satellites; write CSVs, plots, fitted models and summary.csv."""
    from orchester.genx.fits import FitCache, FitSettings, default_cache_dir

    paths = list(files)
    if genx_examples:
        paths += genx_example_files()
    if not paths:
        raise click.UsageError("give model files (.hgx), or --genx-examples")
    settings = FitSettings(generations=generations, population=population, seed=seed, km=km, kr=kr,
                           method=method, max_evaluations=max_evaluations)
    cache = None if no_cache else FitCache(cache_dir or default_cache_dir())
    from pathlib import Path

    from orchester.genx.fits import write_summary
    from orchester.genx.job import FitsInterrupted, interrupted_rows
    from orchester.signals import interrupt_exit_code, signal_name, stop_on_signals

    with stop_on_signals():  # SIGINT/SIGTERM/SIGHUP: the local cluster stops; exit 128 + the signal's number
        try:
            code = _run_fit_job(list(connect), local, paths, settings, out, cache, timeout)
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


def _run_fit_job(connect: list[str], local: int, paths: list[str], settings: Any, out: str, cache: Any,
                 timeout: float) -> int:
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
                rows = run_fits(client, paths, settings, out, cache, console)
            except OrchesterError as exc:
                click.echo(f"error: {exc}", err=True)
                return EXIT_TASK_FAILED
    finally:
        if cluster is not None:
            cluster.close()
    failed = [r for r in rows if r["status"] != "done"]
    for r in rows:
        mark = "ok " if r["status"] == "done" else "FAILED"
        detail = f"fom {r['fom']}  {r['seconds']}s" + ("  (cached)" if r.get("cached") else "") \
            if r["status"] == "done" else r.get("error", "")
        click.echo(f"{mark} {clean_text(r['file'], 300)}: {clean_text(detail, 500)}")
    click.echo(f"{len(rows) - len(failed)} of {len(rows)} fits done; results in {out}/ (summary.csv)")
    return EXIT_TASK_FAILED if failed else EXIT_OK


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch from ``1732460000``, ``2026-11-24T15:00``, or an age like ``30m``/``2h``/``7d``."""
    if text is None:
        return None
    import datetime
    import time as _time

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
            return _time.time() - float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a time (seconds since the epoch, ISO 8601, "
                                 "or an age such as 30m, 2h, 7d)") from None


@main.command()
@connect_option
@click.option("--state", default=None, help="Only tasks in this state (done, failed, quarantined, …).")
@click.option("--kind", default=None, help="Only tasks of this kind.")
@click.option("--since", default=None, help="Submitted at or after: epoch seconds, ISO 8601, or an age (2h).")
@click.option("--until", default=None, help="Submitted before (same forms).")
@click.option("--id", "ids", multiple=True, help="Only these task ids; repeatable.")
@click.option("--limit", type=int, default=None, help="Only the newest N rows.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="A table for the terminal (columns that do not fit are left out), or every column as CSV or JSON.")
@click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the orchestrator before exit code 3.")
def history(connect: tuple[str, ...], state: str | None, kind: str | None, since: str | None, until: str | None,
            ids: tuple[str, ...], limit: int | None, fmt: str, timeout: float) -> None:
    """The history of every task: one row per task, filtered, as a table, CSV or JSON."""
    from orchester.journal.history import COLUMNS

    rows = _ask(connect, timeout, lambda c: c.history(state=state, kind=kind, since=parse_time(since),
                                                      until=parse_time(until), ids=list(ids) or None,
                                                      limit=limit, timeout=timeout))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
    elif fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    else:
        from orchester.render import render_history

        render_history(rows)




@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "ids", multiple=True, help="A task id to resubmit; repeatable.")
@click.option("--since", default=None, help="Resubmit every task submitted since: epoch, ISO 8601 or an age (2h).")
@connect_option
@click.option("--wait", is_flag=True, help="Wait for the new tasks and print their results.")
@timeout_option
def replay(directory: str, ids: tuple[str, ...], since: str | None, connect: tuple[str, ...], wait: bool,
           timeout: float) -> None:
    """Resubmit chosen tasks of a journal (by id or by time) as new tasks; print old -> new ids."""
    from pathlib import Path

    from orchester.errors import TaskFailed
    from orchester.journal.segments import read_journal
    from serializers import ProtocolError, codecs, unpack

    if not ids and since is None:
        raise click.UsageError("choose tasks with --task ID or --since TIME")
    from orchester.journal.wal import JournalError

    start = parse_time(since)
    chosen = []
    if not Path(directory).is_dir():
        click.echo(f"error: {directory} is not a journal folder", err=True)
        sys.exit(EXIT_USAGE)
    try:
        for rec in read_journal(Path(directory)):
            if rec[0] == "S" and ((ids and rec[1] in ids) or (start is not None and float(rec[5]) >= start)):
                chosen.append(rec)
    except JournalError as exc:  # a damaged manifest, say: what is lost cannot be known
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if not chosen:
        click.echo("no task of the journal matches", err=True)
        sys.exit(EXIT_TASK_FAILED)

    def resubmit(client: Any) -> list[tuple[Any, Any]]:
        """Submit each chosen task anew; with ``--wait`` collect results, else wait until accepted."""
        futures = []
        for rec in chosen:
            hdr = unpack(rec[3])
            try:
                args, kwargs = codecs.decode(hdr.get("c", "msgpack"), hdr.get("arr"), rec[4])
            except (ProtocolError, ValueError) as exc:
                click.echo(f"{rec[1]}: cannot resubmit: {exc}", err=True)
                continue
            fut = client.submit(str(hdr["k"]), *args, priority=int(hdr.get("p", 0) or 0),
                                tags=hdr.get("tg") or (), codec=hdr.get("c"), **kwargs)
            futures.append(fut)
            click.echo(f"{rec[1]} -> {fut.task_id}")
        if not wait:
            for fut in futures:
                fut.accepted.wait(timeout)
            return [(fut, None) for fut in futures]
        return [(fut, _result(fut)) for fut in futures]

    outcomes = _ask(connect, timeout, resubmit)
    failed = 0
    for fut, value in outcomes if wait else []:
        if isinstance(value, TaskFailed):
            failed += 1
            click.echo(f"{fut.task_id}: failed: {clean_text(value.type, 100)}: {clean_text(value.message, 1000)}")
        else:
            click.echo(f"{fut.task_id}: {json.dumps(value, default=repr)}")
    sys.exit(EXIT_TASK_FAILED if failed or len(outcomes) < len(chosen) else EXIT_OK)


def _result(fut: Any) -> Any:
    from orchester.errors import TaskFailed

    try:
        return wait_for(fut)
    except TaskFailed as exc:
        return exc


@main.group()
def journal() -> None:
    """Maintain a journal folder."""


@journal.command("compact")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--keep-results", type=float, default=None,
              help="Days to keep results and inputs of finished tasks (headers and history stay forever).")
def journal_compact(directory: str, keep_results: float | None) -> None:
    """Move closed log segments to PyTables and apply the retention policy."""
    import fcntl
    import os
    import time
    from pathlib import Path

    from orchester.journal.segments import apply_retention, compact_closed
    from orchester.journal.wal import JournalError, open_lock, private_directory

    d = Path(directory)
    live = None
    if not d.is_dir():
        click.echo(f"error: {d} is not a journal folder", err=True)
        sys.exit(EXIT_USAGE)
    try:
        private_directory(d)  # refuse a folder others can write; never widen the files' modes
        fd = open_lock(d)
    except (JournalError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # an orchestrator writes it: leave its live (newest) segment alone
            logs = sorted(d.glob("wal-*.log"))
            live = logs[-1] if logs else None
        try:
            done = compact_closed(d, keep=live)
            click.echo(f"compacted {len(done)} log segment(s) to PyTables")
            if keep_results is not None:
                counts = apply_retention(d, time.time() - keep_results * 86400)
                click.echo(f"dropped {counts['results_dropped']} result(s) and {counts['inputs_dropped']} input(s) "
                           f"older than {keep_results:g} day(s) in {counts['segments_rewritten']} segment(s)")
        except JournalError as exc:  # a damaged manifest, say: nothing is changed
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
    finally:
        os.close(fd)


@main.group()
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


@main.command()
@connect_option
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=None, help="Stop after this many refreshes (default: Ctrl-C).")
@timeout_option
def top(connect: tuple[str, ...], interval: float, iterations: int | None, timeout: float) -> None:
    """A live view of satellites, queues, throughput and latency."""
    from orchester.cli.top import run_top

    _ask(connect, timeout, lambda c: (c.status(timeout=timeout), run_top(c, interval, iterations=iterations)))
