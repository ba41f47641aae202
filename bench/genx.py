"""GenX through the bus: dispatch overhead against a direct fit, and scaling with satellites.

1. Overhead: the same fit (same model, settings, seed) run directly in this process and through
   a local cluster with one satellite, alternately; ``(bus - direct) / direct`` (target <= 2 %).
   Each is the median of ``--repeat`` runs after one warm-up run. GenX runs with numba in both
   when numba is installed here (``PYTHONPATH`` may bring it), on numpy otherwise.
2. Scaling: ``--k`` fits through one satellite, then through two (one worker each); the
   ratio of the makespans (target >= 1.8x on 2 cores).
3. numba (when installed: ``pip install 'orchester[numba]'``): the same fit run directly in a
   fresh process with GenX's numba kernels and with its numpy ones (``ORCHESTER_GENX_NUMBA=0``,
   what ``satellite run --no-numba`` sets), one thread per fit as on a satellite that runs one
   fit per core, then on all cores (processes alternately, two of each).

Run: ``python bench/genx.py [--generations 500] [--population 40] [--repeat 3] [--k 6] [--model FILE]
[--numba-only]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# this file is named like the package it measures: keep its own folder off the import path
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from orchester import LocalCluster  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "examples" / "genx" / "nickel_film.hgx"


def overhead(model: bytes, kwargs: dict[str, int], repeat: int) -> tuple[float, float, bool]:
    """The same fit directly in this process and through a local cluster of one satellite (one worker),
    alternately, ``repeat`` times each after one warm-up of each: the medians (s), and whether GenX ran
    its numba kernels (in this process as in the worker: numba is used wherever it is installed)."""
    from satellites.genx_task import genx_fit

    with LocalCluster(satellites=1, workers=1, log_level="ERROR") as cluster, cluster.client() as c:
        jit = bool(genx_fit(model, **kwargs)["numba"])  # warm-ups: imports, GenX's caches, the worker process
        c.submit("genx.fit", model, **kwargs).result(600)
        direct, bus = [], []
        for _ in range(repeat):  # alternately: a drift of the machine's speed falls on both
            t0 = time.perf_counter()
            genx_fit(model, **kwargs)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.submit("genx.fit", model, **kwargs).result(600)
            bus.append(time.perf_counter() - t0)
    return statistics.median(direct), statistics.median(bus), jit


def makespan(model: bytes, kwargs: dict[str, int], k: int, satellites: int) -> float:
    with LocalCluster(satellites=satellites, workers=1, log_level="ERROR") as cluster, cluster.client() as c:
        for f in [c.submit("genx.fit", model, **kwargs) for _ in range(satellites)]:
            f.result(600)  # warm every worker
        t0 = time.perf_counter()
        for f in [c.submit("genx.fit", model, **{**kwargs, "seed": i}) for i in range(k)]:
            f.result(600)
        return time.perf_counter() - t0


#: The child that times a fit run directly: GenX with numba or without, as the environment says.
_CHILD = """
import json, statistics, sys, time
from satellites.genx_task import genx_fit
model = open(sys.argv[1], "rb").read()
kwargs, repeat = json.loads(sys.argv[2]), int(sys.argv[3])
result = genx_fit(model, **kwargs)  # warm-up: imports, kernels from numba's cache
times = []
for _ in range(repeat):
    t0 = time.perf_counter()
    genx_fit(model, **kwargs)
    times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(times), "numba": result["numba"],
                  "threads": result["numba_threads"], "fom": result["fom"]}))
"""


def direct_in_child(model: Path, kwargs: dict[str, int], repeat: int, numba: bool, threads: int) -> dict[str, object]:
    """One fit, directly (no bus), timed in a fresh process: GenX's numba kernels on ``threads`` threads, or numpy."""
    from satellites import genx_numba

    env = {**os.environ, genx_numba.ENV_ENABLED: "1" if numba else "0", "NUMBA_NUM_THREADS": str(threads),
           "NUMBA_CACHE_DIR": genx_numba.cache_dir()}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model), json.dumps(kwargs), str(repeat)], env=env,
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def numba_section(model: Path, kwargs: dict[str, int], repeat: int) -> None:
    from satellites import genx_numba

    if not genx_numba.installed():
        print("numba: not installed (pip install 'orchester[numba]'): nothing to compare")
        return
    error = genx_numba.warm()
    if error:
        print(f"numba: GenX's kernels do not compile here: {error}")
        return
    cores = genx_numba.usable_cores()
    print(f"numba ({model.name}, {kwargs['generations']} generations, population {kwargs['population']}):")
    for threads in sorted({1, cores}):
        numpy: list[float] = []
        jit: list[float] = []
        foms = set()
        for _ in range(2):  # alternately: a drift of the machine's speed falls on both
            for on, times in ((False, numpy), (True, jit)):
                r = direct_in_child(model, kwargs, repeat, on, threads)
                assert r["numba"] is on, r
                times.append(float(r["seconds"]))  # type: ignore[arg-type]
                foms.add(r["fom"])
        a, b = statistics.median(numpy), statistics.median(jit)
        print(f"  {threads} thread(s): numpy {a:.3f} s, numba {b:.3f} s: {a / b:.2f}x   "
              f"(figures of merit: {', '.join(f'{f:.6g}' for f in sorted(foms))})")  # type: ignore[str-format]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generations", type=int, default=500)
    ap.add_argument("--population", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--model", type=Path, default=MODEL, help="the GenX model fitted (default: %(default)s)")
    ap.add_argument("--numba-only", action="store_true", help="only the numba comparison (part 3)")
    args = ap.parse_args(argv)
    model = args.model.read_bytes()
    kwargs = {"generations": args.generations, "population": args.population, "seed": 1}
    if args.numba_only:
        numba_section(args.model, kwargs, args.repeat)
        return 0
    t_direct, t_bus, jit = overhead(model, kwargs, args.repeat)
    print(f"one fit ({args.model.name}, {args.generations} generations, population {args.population}, GenX "
          f"{'with numba' if jit else 'on numpy'}): direct {t_direct:.3f} s, through the bus {t_bus:.3f} s")
    print(f"  dispatch overhead {(t_bus - t_direct) / t_direct * 100:+.2f} %   (target <= 2 %)")
    one = makespan(model, kwargs, args.k, 1)
    two = makespan(model, kwargs, args.k, 2)
    print(f"{args.k} fits: one satellite {one:.2f} s, two satellites {two:.2f} s")
    print(f"  speed-up {one / two:.2f}x   (target >= 1.8x on 2 cores)")
    numba_section(args.model, kwargs, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
