"""The worker-process pool of one satellite: start, watch, kill and replace workers.

Workers are forked from a ``forkserver`` (a clean interpreter with no ZeroMQ
context), so they never inherit the satellite's sockets. Each worker's
process sentinel is polled by the I/O thread, so a dead worker is noticed at
once, its task reported, and a replacement started.

Each worker has its own scratch folder, its temporary folder (``tempfile`` and ``TMPDIR``): the
pool removes it when the worker ends, so a task killed halfway (cancelled, timed out, its worker
lost) leaves none of its temporary files behind.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from typing import Any

from .worker import worker_main

log = logging.getLogger("satellites")

_mp = mp.get_context("forkserver")
_mp.set_forkserver_preload(["satellites.worker", "satellites.builtins", "numpy", "zmq", "msgpack"])


class Worker:
    """One worker process and the task it is running, if any."""

    __slots__ = ("index", "process", "scratch", "ident", "ready", "task", "started", "cores")

    def __init__(self, index: int, process: Any, scratch: str = "") -> None:
        self.index = index
        self.process = process
        self.scratch = scratch  #: its temporary folder, removed when it ends
        self.ident = f"w{index}-{process.pid}".encode()
        self.ready = False
        self.task: tuple[str, int] | None = None  #: (task id, attempt) running now
        self.started = 0.0
        self.cores = 0  #: cores of the task running now

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process ends."""
        return int(self.process.sentinel)

    @property
    def idle(self) -> bool:
        """Ready and not running a task."""
        return self.ready and self.task is None


class WorkerPool:
    """N worker processes connected to ``endpoint``; replacements are rate-limited.

    ``scratch``: the folder under which each worker gets its own temporary folder (the system's when empty).
    """

    def __init__(self, size: int, endpoint: str, sid: str, modules: list[str], allow_pickle: bool,
                 scratch: str = "") -> None:
        self.size = size
        self.scratch = scratch
        self.endpoint = endpoint
        self.sid = sid
        self.modules = modules
        self.allow_pickle = allow_pickle
        self.workers: dict[bytes, Worker] = {}
        self.by_sentinel: dict[int, Worker] = {}
        self._recent_deaths: list[float] = []

    def start(self) -> None:
        """Start the initial workers."""
        for i in range(self.size):
            self._spawn(i)

    def _spawn(self, index: int) -> Worker:
        try:
            scratch = tempfile.mkdtemp(prefix=f"w{index}-", dir=self.scratch or None)
        except OSError as exc:  # (the satellite's folder removed from under it: the worker still starts)
            log.warning("worker %s gets no temporary folder of its own (%s): it uses the system's", index, exc)
            scratch = ""
        p = _mp.Process(target=worker_main, name=f"satellite-{self.sid}-w{index}",
                        args=(self.endpoint, self.sid, index, self.modules, self.allow_pickle, os.getpid(),
                              scratch),
                        daemon=True)
        try:
            p.start()
        except BaseException:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        w = Worker(index, p, scratch)
        self.workers[w.ident] = w
        self.by_sentinel[w.sentinel] = w
        return w

    def sentinels(self) -> list[int]:
        """File descriptors to poll for worker exits."""
        return list(self.by_sentinel)

    def idle(self) -> Worker | None:
        """An idle worker, if any."""
        for w in self.workers.values():
            if w.ready and w.task is None:
                return w
        return None

    def reap(self, sentinel: int) -> Worker | None:
        """Forget the worker whose sentinel fired; return it (with the task it was running)."""
        w = self.by_sentinel.pop(sentinel, None)
        if w is None:
            return None
        self.workers.pop(w.ident, None)
        w.process.join(1)
        _remove_scratch(w)
        self._recent_deaths.append(time.monotonic())
        log.warning("worker %s (pid %s) exited with %s%s", w.index, w.process.pid, w.process.exitcode,
                    f" while running {w.task[0]}" if w.task else "")
        return w

    def replace(self, index: int) -> Worker | None:
        """Start a replacement for worker ``index``, unless workers die too fast (then later)."""
        now = time.monotonic()
        self._recent_deaths = [t for t in self._recent_deaths if now - t < 10]
        if len(self._recent_deaths) > 5 * self.size:
            return None
        return self._spawn(index)

    def missing(self) -> list[int]:
        """Indexes of workers that should exist but do not."""
        have = {w.index for w in self.workers.values()}
        return [i for i in range(self.size) if i not in have]

    def kill(self, worker: Worker) -> None:
        """Kill a worker at once (used to cancel its task); its sentinel then fires."""
        worker.ready = False  # never hand it another task while its death is on its way
        if worker.process.is_alive():
            worker.process.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Terminate every worker and wait for them (bounded)."""
        for w in self.workers.values():
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + timeout
        for w in self.workers.values():
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)
            _remove_scratch(w)
        self.workers.clear()
        self.by_sentinel.clear()


def _remove_scratch(worker: Worker) -> None:
    """Remove an ended worker's temporary folder, with what its tasks left there."""
    if worker.scratch:
        shutil.rmtree(worker.scratch, ignore_errors=True)
