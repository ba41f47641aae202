"""The embedded default: an orchestrator and N satellites as processes on this machine.

Example::

    from orchester import LocalCluster

    with LocalCluster(satellites=2, workers=2) as cluster:
        with cluster.client() as client:
            print(client.submit("echo", 42).result(timeout=30))

Every process binds or connects on loopback with ports chosen by the OS, and
everything started is stopped on exit (SIGTERM, then SIGKILL after a grace
period).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .client import Client
from .errors import OrchesterError


class ClusterError(RuntimeError):
    """A process of the local cluster did not start."""


class LocalCluster:
    """Start an orchestrator and ``satellites`` satellite processes with ``workers`` workers each."""

    def __init__(self, satellites: int = 2, workers: int = 2, *, tasks: Sequence[str] = (),
                 tags: Sequence[str] = (), strategy: str = "least_loaded",
                 heartbeat_interval: float = 1.0, liveness: int = 3, prefetch: int = 1,
                 serve_args: Sequence[str] = (), start_timeout: float = 60.0,
                 log_level: str = "WARNING", env: dict[str, str] | None = None) -> None:
        self.n_satellites = satellites
        self.workers = workers
        self.tasks = list(tasks)
        self.tags = list(tags)
        self.strategy = strategy
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.prefetch = prefetch
        self.serve_args = list(serve_args)
        self.start_timeout = start_timeout
        self.log_level = log_level
        self.env = {**os.environ, **(env or {})}
        self.dir = tempfile.mkdtemp(prefix="orchester-local-")
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.satellites: list[subprocess.Popen[bytes]] = []
        self.endpoint = ""
        self.pub_endpoint = ""
        self._clients: list[Client] = []
        self._started = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LocalCluster:
        """Start the orchestrator, then the satellites; wait until all satellites registered."""
        if self._started:
            return self
        self._started = True
        try:
            self.start_orchestrator()
            for i in range(self.n_satellites):
                self.add_satellite(f"local-{i}")
            self.wait_for_satellites(self.n_satellites)
        except BaseException:
            self.close()
            raise
        return self

    def start_orchestrator(self, bind: str | None = None, pub: str | None = None) -> None:
        """Start (or restart, on the same endpoints if given) the orchestrator process."""
        efile = os.path.join(self.dir, "endpoints.json")
        if os.path.exists(efile):
            os.unlink(efile)
        cmd = [sys.executable, "-m", "orchester", "--log-level", self.log_level, "serve",
               "--bind", bind or "tcp://127.0.0.1:*", "--pub", pub or "tcp://127.0.0.1:*",
               "--endpoint-file", efile, "--strategy", self.strategy,
               "--heartbeat-interval", str(self.heartbeat_interval), "--liveness", str(self.liveness),
               *self.serve_args]
        self.orchestrator = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(efile):
            if self.orchestrator.poll() is not None:
                raise ClusterError(f"orchestrator exited with {self.orchestrator.returncode} at start")
            if time.monotonic() > deadline:
                raise ClusterError("orchestrator did not start in time")
            time.sleep(0.02)
        with open(efile) as f:
            eps = json.load(f)
        self.endpoint, self.pub_endpoint = eps["bind"][0], eps["pub"][0]

    def add_satellite(self, sid: str | None = None, workers: int | None = None,
                      tags: Sequence[str] | None = None, extra: Sequence[str] = (),
                      env: dict[str, str] | None = None,
                      connect: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
        """Start one more satellite process connected to the orchestrator (``env``: extra variables;
        ``connect``: other endpoints to reach it by, a relay for instance)."""
        where = [a for ep in connect for a in ("--connect", ep)] if connect else self._connect_args()
        cmd = [sys.executable, "-m", "satellites", "--log-level", self.log_level, "run",
               *where, "--workers", str(workers or self.workers),
               "--heartbeat-interval", str(self.heartbeat_interval), "--liveness", str(self.liveness),
               "--prefetch", str(self.prefetch)]
        if sid:
            cmd += ["--id", sid]
        t = self.tags if tags is None else list(tags)
        if t:
            cmd += ["--tags", ",".join(t)]
        for m in self.tasks:
            cmd += ["--tasks", m]
        cmd += list(extra)
        p = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL)
        self.satellites.append(p)
        return p

    def _connect_args(self) -> list[str]:
        return ["--connect", self.endpoint]

    def _status_endpoint(self) -> str:
        """The endpoint whose status counts the satellites (the active one of a pair)."""
        return self.endpoint

    def wait_for_satellites(self, n: int, timeout: float | None = None) -> None:
        """Block until at least ``n`` satellites are registered (bounded by ``timeout``)."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        with Client(self._status_endpoint()) as c:
            while True:
                for p in self.satellites:
                    if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                        raise ClusterError(f"satellite exited with {p.returncode} at start")
                try:
                    st = c.status(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                    if len(st["satellites"]) >= n:
                        return
                except OrchesterError:  # not up yet: the deadline below bounds the wait
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"fewer than {n} satellites registered in time")
                time.sleep(0.05)

    def client(self, **kwargs: Any) -> Client:
        """A new :class:`Client` connected to this cluster (closed with the cluster)."""
        c = Client(self.endpoint, pub=self.pub_endpoint, **kwargs)
        self._clients.append(c)
        return c

    def close(self, grace: float = 5.0) -> None:
        """Stop every client and process started (SIGTERM, then SIGKILL) and remove temp files."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        procs = [*self.satellites, *([self.orchestrator] if self.orchestrator else [])]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.satellites.clear()
        self.orchestrator = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
