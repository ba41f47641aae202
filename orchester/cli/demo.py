"""``orchester demo``: the main job on the embedded default, a local cluster runs a batch of built-in tasks.

The local cluster, numpy and the progress bar are imported when the demo runs, not when the
command line starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from orchester.errors import TaskFailed
from orchester.signals import interrupt_exit_code, signal_name, stop_on_signals


@click.command()
@click.option("--satellites", type=click.IntRange(min=1), default=2, show_default=True,
              help="Satellite processes of the local cluster.")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes per satellite.")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=200, show_default=True,
              help="Tasks in the batch.")
@click.option("--seconds", type=click.FloatRange(min=0.0), default=0.02, show_default=True,
              help="Duration of each sleep task.")
def demo(satellites: int, workers: int, n_tasks: int, seconds: float) -> None:
    """Start a local cluster and run a batch of built-in tasks with a progress bar."""
    sys.exit(run_demo(satellites, workers, n_tasks, seconds))


def run_demo(satellites: int = 2, workers: int = 2, n_tasks: int = 200, seconds: float = 0.02,
             console: Console | None = None) -> int:
    """Run ``n_tasks`` mixed tasks (sleep, spin, echo of numpy arrays) on a local cluster.

    Returns the process exit code: 0 when every task succeeded, 1 otherwise, and 128 + the
    signal number after SIGINT (130), SIGTERM (143) or SIGHUP (129), which stop the local
    cluster's processes before returning (:func:`~orchester.signals.stop_on_signals`).
    """
    console = console or Console()
    with stop_on_signals():
        try:
            return _demo(satellites, workers, n_tasks, seconds, console)
        except KeyboardInterrupt as exc:
            code = interrupt_exit_code(exc)
            console.print(f"interrupted by {signal_name(code - 128)}: the local cluster is stopped")
            return code


def _demo(satellites: int, workers: int, n_tasks: int, seconds: float, console: Console) -> int:
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchester.local.cluster import LocalCluster

    rng = random.Random(0)
    t0 = time.monotonic()
    with console.status(f"starting an orchestrator and {satellites} satellites × {workers} workers"):
        cluster = LocalCluster(satellites=satellites, workers=workers).start()
    console.print(f"local cluster up in {time.monotonic() - t0:.1f}s: orchestrator at {escape(cluster.endpoint)} "
                  "(a private folder: no other user can connect)")
    failed = 0
    try:
        client = cluster.client()
        futures: list[tuple[str, cf.Future[Any], Any]] = []
        t1 = time.monotonic()
        for i in range(n_tasks):
            r = rng.random()
            if r < 0.5:
                futures.append(("sleep", client.submit("sleep", seconds), seconds))
            elif r < 0.8:
                arr = np.arange(1000, dtype=np.float64) * i
                futures.append(("echo", client.submit("echo", arr), arr))
            else:
                futures.append(("spin", client.submit("spin", seconds), None))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            bar = progress.add_task("tasks", total=n_tasks)
            for fut in cf.as_completed([f for _, f, _ in futures]):
                if fut.exception() is not None:
                    failed += 1
                progress.advance(bar)
        elapsed = time.monotonic() - t1
        wrong = 0
        for kind, fut, expected in futures:
            try:
                value = fut.result()
            except TaskFailed:
                continue
            if kind == "echo" and not np.array_equal(value, expected):
                wrong += 1
            elif kind == "sleep" and value != expected:
                wrong += 1
        st = client.status()
        console.print(f"{n_tasks} tasks in {elapsed:.2f}s ({n_tasks / elapsed:.0f} tasks/s), "
                      f"{failed} failed, {wrong} wrong results")
        for s in st["satellites"]:  # (a demo's few satellites: all listed)
            console.print(f"  satellite {s['id']}: {s['done']} done, {s['failed']} failed")
    finally:
        cluster.close()
    return 0 if failed == 0 and wrong == 0 else 1
