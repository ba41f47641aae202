"""The threads a task may use: its cores, given to every thread pool of its worker before it runs.

A task that asked for ``cores=N`` runs in a worker whose thread pools are set to N before its
handler starts, and back to the worker's default after it:

* the environment (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ``BLIS_NUM_THREADS``,
  ``VECLIB_MAXIMUM_THREADS``, ``NUMEXPR_NUM_THREADS``, ``NUMBA_NUM_THREADS``): what a library loaded
  during the task, or a process the handler starts, reads;
* the pools already loaded in the worker (OpenMP, BLAS), through ``threadpoolctl``;
* numba's threads (``numba.set_num_threads``), when numba runs GenX's kernels on this satellite
  (:mod:`satellites.genx_numba`): numba is loaded before the task so that its pool never starts
  wider than the task's share. Its pool is as large as the satellite's cores (``NUMBA_NUM_THREADS``,
  set by the satellite before its workers start), so a wide task can have them all.

A one-core task (the default) gets one thread, except numba's, which keep the worker's share of
the cores that :mod:`satellites.genx_numba` computes (``--numba-threads``), as before tasks had cores.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("satellites")

#: The environment variables thread pools read for their size.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: numba's pool size (read once, when numba loads) and the threads a one-core task's numba kernels use.
NUMBA_POOL = "NUMBA_NUM_THREADS"
ENV_NUMBA_SHARE = "ORCHESTER_NUMBA_THREADS"
ENV_NUMBA_ON = "ORCHESTER_GENX_NUMBA"


class TaskThreads:
    """Sets a worker's thread pools for each task (:meth:`use`); one per worker process."""

    def __init__(self) -> None:
        self.cores = 0  #: the cores the pools are set for now (0: not set yet)
        self._limits: Any = None  #: threadpoolctl's handle (its original limits), once used

    def use(self, cores: int) -> None:
        """Give the next task ``cores`` threads in every pool (nothing to do when they already have them)."""
        if cores == self.cores:
            return
        for name in THREAD_VARIABLES:
            os.environ[name] = str(cores)
        self._loaded_pools(cores)
        self._numba(cores)
        self.cores = cores

    def _loaded_pools(self, cores: int) -> None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # (a dependency: only a broken installation lacks it) the environment still says it
            return
        try:
            self._limits = threadpool_limits(limits=cores)
        except Exception as exc:  # a pool that refuses: the task runs, with its pool as it was
            log.warning("threadpoolctl could not set %d threads: %s", cores, exc)

    @staticmethod
    def _numba(cores: int) -> None:
        if os.environ.get(ENV_NUMBA_ON) != "1" and "numba" not in sys.modules:
            return
        share = os.environ.get(ENV_NUMBA_SHARE, "")
        threads = cores if cores > 1 else (int(share) if share.isdigit() and int(share) > 0 else 1)
        try:
            import numba

            pool = int(numba.config.NUMBA_NUM_THREADS)
            numba.set_num_threads(max(1, min(threads, pool)))
        except Exception as exc:  # numba that does not load: GenX's fits go on without it (genx_numba)
            log.warning("numba threads not set to %d: %s", threads, exc)
