"""The report of a topology run: a terminal table, a CSV and PNG plots."""

from __future__ import annotations

import csv
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .runner import RunResult

COLUMNS = ["strategy", "tasks", "makespan_s", "throughput_per_s", "latency_p50_ms", "latency_p99_ms", "fairness",
           "rerouted", "lost", "duplicated", "recovery_s", "utilisation"]


def table(results: list[RunResult], console: Console | None = None) -> None:
    """Print one row per run."""
    console = console or Console()
    t = Table(title="topology runs")
    for col in COLUMNS:
        t.add_column(col, overflow="fold")
    for r in results:
        row = r.row()
        t.add_row(*(str(row[c]) for c in COLUMNS))
    console.print(t)


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
    return written
