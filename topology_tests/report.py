"""The report of a topology run: a terminal table, a CSV and PNG plots."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rich.console import Console

from .runner import RunResult

COLUMNS = ["strategy", "tasks", "makespan_s", "throughput_per_s", "latency_p50_ms", "latency_p99_ms", "fairness",
           "rerouted", "lost", "duplicated", "recovery_s", "utilisation", "jobs", "allocation_worker_s",
           "allocation_used"]


#: The columns a terminal table keeps whatever its width; the others join by this order while they fit
#: (results.csv has them all).
KEPT = ("strategy", "tasks", "makespan_s", "lost")
RANKS = ("throughput_per_s", "latency_p99_ms", "duplicated", "rerouted", "latency_p50_ms", "fairness", "jobs",
         "allocation_used", "allocation_worker_s", "recovery_s", "utilisation")


def table(results: list[RunResult], console: Console | None = None) -> None:
    """Print one row per run, as wide as the terminal allows (the columns left out are named below it)."""
    from orchester.render import Column, FittedTable, add_row

    console = console or Console()
    elastic = any(r.jobs for r in results)
    columns = [c for c in COLUMNS if elastic or c not in ("jobs", "allocation_worker_s", "allocation_used")]
    ranks = (("jobs", "allocation_used") if elastic else ()) + RANKS  # an elastic run: its jobs first
    cols = [Column(c, keep=c in KEPT, wrap=c == "utilisation", rank=ranks.index(c) if c in ranks else 0,
                   justify="left" if c == "strategy" else "right") for c in columns]
    for r in results:
        row = r.row()
        add_row(cols, *(str(row[c]) for c in columns))
    console.print(FittedTable("topology runs", cols, "results.csv has every column"))


def write_csv(results: list[RunResult], path: Path) -> Path:
    """``results.csv``: one row per run."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in results:
            w.writerow(r.row())
    return path


def plots(results: list[RunResult], out: Path) -> list[Path]:
    """Throughput over time (faults marked) and the latency CDF, per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        for r in results:
            if not r.completions:
                continue
            edges = np.arange(0, max(r.completions) + 0.5, 0.5)
            counts, _ = np.histogram(r.completions, bins=edges)
            ax.plot(edges[1:], counts / 0.5, label=r.strategy)
            for ft in r.faults:
                ax.axvline(ft, color="red", ls="--", lw=0.8)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("tasks done per second")
        ax.set_title("throughput (red: faults)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=100)
        written.append(out / "throughput.png")
    finally:
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        for r in results:
            lat = np.asarray(sorted(r.latencies)) * 1000.0
            if lat.size:
                ax.plot(lat, np.linspace(0, 1, lat.size), label=f"{r.strategy} (p99 {r.latency_p99 * 1e3:.0f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("latency, submission to result (ms)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title("latency CDF")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=100)
        written.append(out / "latency_cdf.png")
    finally:
        plt.close(fig)
    elastic = [r for r in results if r.job_spans]
    if elastic:
        written.append(_elastic_plot(elastic, out, plt, np))
    return written


def _elastic_plot(results: list[RunResult], out: Path, plt: Any, np: Any) -> Path:
    """``elastic.png``: tasks done per second and the jobs running, over time, per strategy."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    try:
        for r in results:
            end = max([*r.completions, *(e for _, e in r.job_spans)], default=1.0)
            edges = np.arange(0, end + 0.5, 0.5)
            counts, _ = np.histogram(r.completions, bins=edges)
            top.plot(edges[1:], counts / 0.5, label=r.strategy)
            t = np.linspace(0, end, 400)
            bottom.step(t, [sum(1 for s, e in r.job_spans if s <= x < e) for x in t], where="post",
                        label=f"{r.strategy} ({r.jobs} jobs, {r.allocation_used:.0%} of the allocation used)")
        top.set_ylabel("tasks done per second")
        top.set_title("an elastic fleet: work, and the jobs asked for it")
        top.legend()
        bottom.set_ylabel("jobs running")
        bottom.set_xlabel("seconds since start")
        bottom.yaxis.get_major_locator().set_params(integer=True)
        bottom.legend()
        fig.tight_layout()
        fig.savefig(out / "elastic.png", dpi=100)
    finally:
        plt.close(fig)
    return out / "elastic.png"
