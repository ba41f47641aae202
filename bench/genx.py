"""GenX through the bus: dispatch overhead against a direct fit, and scaling with satellites.

1. Overhead: the same fit (same model, settings, seed) run directly in this process, then
   through a local cluster with one satellite; ``(bus - direct) / direct`` (target <= 2 %).
   Each is the median of ``--repeat`` runs after one warm-up run.
2. Scaling: ``--k`` fits through one satellite, then through two (one worker each); the
   ratio of the makespans (target >= 1.8x on 2 cores).

Run: ``python bench/genx.py [--generations 500] [--population 40] [--repeat 3] [--k 6]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# this file is named like the package it measures: keep its own folder off the import path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from orchester import LocalCluster  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "examples" / "genx" / "nickel_film.hgx"


def direct(model: bytes, kwargs: dict[str, int], repeat: int) -> float:
    from satellites.genx_task import genx_fit

    genx_fit(model, **kwargs)  # warm-up: imports, GenX's model compilation caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        genx_fit(model, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def through_bus(model: bytes, kwargs: dict[str, int], repeat: int) -> float:
    with LocalCluster(satellites=1, workers=1, log_level="ERROR") as cluster, cluster.client() as c:
        c.submit("genx.fit", model, **kwargs).result(600)  # warm-up of the worker process
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            c.submit("genx.fit", model, **kwargs).result(600)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def makespan(model: bytes, kwargs: dict[str, int], k: int, satellites: int) -> float:
    with LocalCluster(satellites=satellites, workers=1, log_level="ERROR") as cluster, cluster.client() as c:
        for f in [c.submit("genx.fit", model, **kwargs) for _ in range(satellites)]:
            f.result(600)  # warm every worker
        t0 = time.perf_counter()
        for f in [c.submit("genx.fit", model, **{**kwargs, "seed": i}) for i in range(k)]:
            f.result(600)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generations", type=int, default=500)
    ap.add_argument("--population", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=6)
    args = ap.parse_args(argv)
    model = MODEL.read_bytes()
    kwargs = {"generations": args.generations, "population": args.population, "seed": 1}
    t_direct = direct(model, kwargs, args.repeat)
    t_bus = through_bus(model, kwargs, args.repeat)
    overhead = (t_bus - t_direct) / t_direct
    print(f"one fit ({args.generations} generations, population {args.population}): direct {t_direct:.3f} s, "
          f"through the bus {t_bus:.3f} s")
    print(f"  dispatch overhead {overhead * 100:+.2f} %   (target <= 2 %)")
    one = makespan(model, kwargs, args.k, 1)
    two = makespan(model, kwargs, args.k, 2)
    print(f"{args.k} fits: one satellite {one:.2f} s, two satellites {two:.2f} s")
    print(f"  speed-up {one / two:.2f}x   (target >= 1.8x on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
