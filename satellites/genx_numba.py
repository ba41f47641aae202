"""numba for GenX's kernels in a satellite's workers: warmed once per satellite, threads kept to a worker's share.

GenX compiles its reflectivity kernels (Parratt's recursion, the neutron matrices, the
instrument resolution) with numba when numba is installed (``pip install 'orchester[numba]'``),
and runs them in parallel over numba's threads. On a satellite:

* **warmed once**: before it registers, the satellite compiles the kernels in a child process
  (:func:`warm`), which writes numba's on-disk cache
  (``NUMBA_CACHE_DIR``, by default ``~/.cache/orchester/numba``); the first satellite on a
  machine compiles, the others (and every later start) load the cache. A warm-up that fails or
  takes longer than its timeout turns numba off for this satellite (one warning): GenX then runs
  its numpy kernels, and the fits go on.
* **loaded by each worker**: a worker loads the compiled kernels from that cache when its first
  fit imports GenX (about a second, once per worker process), never compiling them. They are not
  loaded in the forkserver the workers are forked from: loading them starts numba's threads, and
  numba's fastest threading layer here (GNU OpenMP) kills a child forked after that (numba's
  fork-safe ``workqueue`` layer made GenX's kernels slower than numpy in ``bench/genx.py``).
* **a worker's share of the cores**: numba's threads per worker are the cores this satellite
  may use (its CPU affinity: a batch scheduler's allocation) divided by its workers, at least
  one (``--numba-threads``, or :data:`ENV_THREADS`, overrides it; a :class:`~orchester.LocalCluster`
  divides by every worker of every satellite it starts), so a satellite running one fit per core
  never oversubscribes the machine.

``satellite run --no-numba`` (or :data:`ENV_ENABLED` ``=0``) keeps GenX on numpy whatever is installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib.machinery import PathFinder
from importlib.util import find_spec

log = logging.getLogger("satellites")

#: GenX's numba kernels: importing them compiles them (GenX declares their signatures) or loads the cache.
KERNELS = ("genx.models.lib.paratt_numba", "genx.models.lib.neutron_numba", "genx.models.lib.instrument_numba")
#: Set to ``0`` to keep GenX on numpy (``satellite run --no-numba``); workers read it before GenX loads.
ENV_ENABLED = "ORCHESTER_GENX_NUMBA"
#: numba's threads per worker (``satellite run --numba-threads``).
ENV_THREADS = "ORCHESTER_NUMBA_THREADS"
#: The warm-up child: compile (or load) the kernels, exit 0.
_WARM = "from satellites.genx_numba import load_kernels; load_kernels()"
#: Most numba threads per worker taken (``--numba-threads``; numba starts them all in every worker).
MAX_THREADS = 1024
#: Seconds a first compilation may take (GenX's kernels compile in about a minute on one core).
WARM_TIMEOUT = 900.0


@dataclasses.dataclass(frozen=True)
class NumbaState:
    """What a satellite set up: whether GenX's kernels run with numba, on how many threads per worker."""

    enabled: bool
    threads: int = 1
    warm_seconds: float = 0.0
    reason: str = ""  #: why numba is off, when it is

    def describe(self) -> str:
        """One line for the log."""
        if self.enabled:
            return f"numba on, {self.threads} thread(s) per worker, warmed in {self.warm_seconds:.1f} s"
        return f"numba off: {self.reason}"


def installed(env: Mapping[str, str] | None = None) -> bool:
    """Whether GenX and numba are both importable here, or (``env``) in a process started with ``env``'s
    ``PYTHONPATH`` before this one's path."""
    if env is None or not env.get("PYTHONPATH"):
        return find_spec("genx") is not None and find_spec("numba") is not None
    path = [p for p in env["PYTHONPATH"].split(os.pathsep) if p] + sys.path
    return all(PathFinder.find_spec(name, path) is not None for name in ("genx", "numba"))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a batch scheduler sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_share(workers: int, satellites: int = 1) -> int:
    """numba threads per worker: the usable cores over every worker sharing them, at least one."""
    return max(1, usable_cores() // max(1, workers * satellites))


def cache_dir() -> str:
    """Where numba keeps compiled kernels: ``NUMBA_CACHE_DIR``, else ``~/.cache/orchester/numba``."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "orchester", "numba")


def setup(workers: int, *, enabled: bool = True, threads: int | None = None, timeout: float = WARM_TIMEOUT,
          stopped: Callable[[], bool] = lambda: False, pool: int = 0) -> NumbaState:
    """Set this process's environment for its workers (and the forkserver they come from) and warm the
    kernels; call it before the worker pool starts. Never raises for numba's sake: numba off instead.
    ``stopped``: asked while the warm-up runs; when it says so, the warm-up is killed (numba off).
    ``pool``: numba's pool in each worker is at least this many threads (the satellite's cores: a task
    that asked for that many gets them all; :mod:`satellites.threads` sets each task's share)."""
    if os.environ.get(ENV_ENABLED, "1") == "0":
        enabled = False
    if not enabled:
        os.environ[ENV_ENABLED] = "0"
        return NumbaState(False, reason="turned off (--no-numba)")
    if not installed():
        os.environ[ENV_ENABLED] = "0"
        return NumbaState(False, reason="not installed (pip install 'orchester[numba]')")
    if threads is None:
        given = os.environ.get(ENV_THREADS, "")
        threads = int(given) if re.fullmatch(r"[0-9]{1,6}", given) and int(given) > 0 else worker_share(workers)
    threads = min(max(1, threads), MAX_THREADS)
    # read by numba when it loads in a worker: the pool; each task then uses its share (satellites.threads)
    os.environ["NUMBA_NUM_THREADS"] = str(min(max(threads, pool), MAX_THREADS))
    os.environ[ENV_THREADS] = str(threads)
    os.environ["NUMBA_CACHE_DIR"] = cache_dir()
    t0 = time.monotonic()
    error = warm(timeout=timeout, stopped=stopped)
    if error:
        os.environ[ENV_ENABLED] = "0"
        return NumbaState(False, reason=f"its warm-up failed ({error}): GenX runs on numpy")
    os.environ[ENV_ENABLED] = "1"
    return NumbaState(True, threads, time.monotonic() - t0)


def warm(env: Mapping[str, str] | None = None, *, timeout: float = WARM_TIMEOUT,
         stopped: Callable[[], bool] = lambda: False) -> str:
    """Compile (or load) GenX's kernels into numba's cache, in a child process with this process's
    environment and ``env``; ``""`` when it worked, else why not. The child ends with this process
    (``PR_SET_PDEATHSIG``) and when ``stopped()`` says so. (A :class:`~orchester.LocalCluster` calls
    it once before its satellites start: they then load what it compiled.)"""
    from orchester.signals import parent_death_signal

    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("NUMBA_CACHE_DIR", cache_dir())
    with tempfile.TemporaryFile() as errors:  # (a file, not a pipe: a chatty compiler never blocks on it)
        try:
            os.makedirs(child_env["NUMBA_CACHE_DIR"], mode=0o700, exist_ok=True)
            child = subprocess.Popen([sys.executable, "-c", _WARM], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=errors, env=child_env,
                                     preexec_fn=parent_death_signal())
        except OSError as exc:
            return str(exc)
        deadline = time.monotonic() + timeout
        try:
            while child.poll() is None:
                if stopped():
                    return "stopped"
                if time.monotonic() > deadline:
                    return f"longer than {timeout:g} s"
                time.sleep(0.1)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        errors.seek(0)
        err = errors.read(1 << 20).decode(errors="replace").strip().splitlines()
    if child.returncode != 0:
        return (err[-1] if err else f"exit code {child.returncode}")[:300]
    return ""


def load_kernels() -> None:
    """Import GenX's numba kernels (compiling them or loading numba's cache)."""
    import importlib

    for name in KERNELS:
        importlib.import_module(name)


def apply_in_worker() -> None:
    """In a worker, before GenX loads: keep GenX on numpy when numba is off for this satellite."""
    if os.environ.get(ENV_ENABLED) == "0" and find_spec("genx") is not None:
        import genx.models.lib as lib

        lib.USE_NUMBA = False


def in_use() -> dict[str, object]:
    """Whether this process's GenX runs its kernels with numba, and on how many threads (for a fit's provenance)."""
    mod = sys.modules.get("genx.models.lib.paratt")
    on = mod is not None and getattr(getattr(mod, "Refl", None), "__module__", "").endswith("_numba")
    threads = 0
    if on:
        import numba

        threads = int(numba.get_num_threads())
    return {"numba": bool(on), "numba_threads": threads}


