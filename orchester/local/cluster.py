"""The embedded default: an orchestrator and N satellites as processes on this machine.

Example::

    from orchester import LocalCluster

    with LocalCluster(satellites=2, workers=2) as cluster:
        with cluster.client() as client:
            print(client.submit("echo", 42).result(timeout=30))

By default the orchestrator binds ``ipc://`` sockets in a private folder (mode 0700, made
by :func:`tempfile.mkdtemp`): no other user of the machine can connect to them, whereas any
local user can reach a ``tcp://127.0.0.1`` port. Explicit ``bind``/``pub`` endpoints (tcp
too) are still accepted by :meth:`LocalCluster.start_orchestrator`. Everything started is
stopped on exit (SIGTERM, then SIGKILL after a grace period) and the folder removed.

Signals and hard deaths: on Linux, every process a cluster started from the main thread gets
SIGTERM from the kernel when the process that started it dies, even by ``kill -9``
(:func:`~orchester.signals.parent_death_signal`); the satellites then stop their workers.
Commands that run a cluster (``orchester fit``, ``orchester demo``) wrap their work in
:func:`~orchester.signals.stop_on_signals`, so that :meth:`LocalCluster.close` runs on SIGINT,
SIGTERM and SIGHUP; :meth:`LocalCluster.close` itself is :func:`~orchester.signals.shielded`: a
signal that arrives while it stops the processes waits until it is done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from importlib.machinery import PathFinder
from typing import Any

from orchester.client.status import fleet_of
from orchester.client.sync import Client
from orchester.errors import OrchesterError
from orchester.signals import parent_death_signal, shielded

log = logging.getLogger("orchester")


#: Seconds the one compilation of GenX's numba kernels may take (``satellites.genx_numba.WARM_TIMEOUT``).
WARM_TIMEOUT = 900.0


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), as ``satellites.genx_numba.usable_cores``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ClusterError(OrchesterError, RuntimeError):
    """A process of the local cluster did not start."""


#: The longest ``ipc://`` path the kernel accepts (``sun_path`` less its final NUL).
IPC_PATH_MAX = 103 if sys.platform == "darwin" else 107
#: Room kept for a socket's file name inside the private folder (``primary.state`` is 13).
IPC_NAME_ROOM = 16


def private_dir(prefix: str = "orchester-local-") -> str:
    """A fresh folder only this user may enter (0700), short enough for ``ipc://`` paths.

    Made by :func:`tempfile.mkdtemp` in the usual temporary folder (``$TMPDIR``, else
    ``/tmp``); when that path would leave no room for a socket name below
    :data:`IPC_PATH_MAX`, in ``/tmp`` instead. Its owner and mode are checked after creation.
    """
    for base in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
        room = len(os.fsencode(os.path.join(base, prefix + "x" * 8, "x" * IPC_NAME_ROOM)))
        if room <= IPC_PATH_MAX and os.path.isdir(base):
            break
    else:
        raise ClusterError(f"no temporary folder short enough for ipc:// sockets (at most {IPC_PATH_MAX} "
                           "bytes): set TMPDIR to a short path")
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o700)  # mkdtemp makes it 0700 less the umask: make sure we can use it
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        shutil.rmtree(path, ignore_errors=True)
        raise ClusterError(f"{path} is not private to this user")
    return path


def _stop(procs: Iterable[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every process still running, wait up to ``grace`` seconds, then SIGKILL the rest."""
    procs = list({id(p): p for p in procs}.values())
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _cleanup(procs: list[subprocess.Popen[bytes]], directory: str, grace: float) -> None:
    """Stop ``procs`` (emptied) and remove ``directory``; also run if a cluster is never closed."""
    try:
        _stop(procs, grace)
    finally:
        procs.clear()
        shutil.rmtree(directory, ignore_errors=True)


class LocalCluster:
    """Start an orchestrator and ``satellites`` satellite processes with ``workers`` workers each.

    The processes talk over ``ipc://`` sockets in :attr:`dir`, a private folder (0700), so
    that no other local user can submit tasks or pose as a satellite; :attr:`endpoint` and
    :attr:`pub_endpoint` are set once the orchestrator runs.
    """

    def __init__(self, satellites: int = 2, workers: int = 2, *, tasks: Sequence[str] = (),
                 tags: Sequence[str] = (), strategy: str = "least_loaded",
                 heartbeat_interval: float = 1.0, liveness: int = 3, prefetch: int = 1,
                 serve_args: Sequence[str] = (), start_timeout: float = 60.0,
                 log_level: str = "WARNING", env: dict[str, str] | None = None, web: bool = False,
                 web_bind: str = "127.0.0.1:0", web_data_dir: str | None = None, cores: int | None = None,
                 light_credit: int | None = None) -> None:
        self.n_satellites = satellites
        #: light tasks each satellite takes beside its slots (``satellite run --light-credit``; default: its own)
        self.light_credit = light_credit
        #: cores each satellite announces (``satellite run --cores``; default: its own choice)
        self.cores = cores
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
        #: the private folder (0700) of the sockets and endpoint files, removed by :meth:`close`
        self.dir = private_dir()
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.satellites: list[subprocess.Popen[bytes]] = []
        self.endpoint = ""
        self.pub_endpoint = ""
        #: ``web``: also start ``orchester web`` on the cluster (``web_bind``; its fits in ``web_data_dir``,
        #: by default a folder inside :attr:`dir`); :attr:`web_url` is its link, with the access token
        self.web = web
        self.web_bind = web_bind
        self.web_data_dir = web_data_dir
        self.web_url = ""
        self.web_process: subprocess.Popen[bytes] | None = None
        self._clients: list[Client] = []
        self._started = False
        #: every process ever started: stopped by close(), or at exit if close() is never called
        self._procs: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self.dir, 5.0)

    def _private_endpoint(self, name: str) -> str:
        """``ipc://`` endpoint ``name`` inside the private folder."""
        return f"ipc://{self.dir}/{name}"

    def _popen(self, cmd: list[str], env: dict[str, str], private: bool = False) -> subprocess.Popen[bytes]:
        """Start a process of the cluster (``private``: files it creates are this user's only).

        It gets SIGTERM if this process dies without stopping it (:func:`parent_death_signal`),
        and it is recorded before a stop signal can interrupt (:func:`~orchester.signals.shielded`).
        """
        with shielded():
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, umask=0o077 if private else -1,
                                 preexec_fn=parent_death_signal(signal.SIGTERM))
            self._procs.append(p)
        return p

    # ------------------------------------------------------------ lifecycle
    def start(self) -> LocalCluster:
        """Start the orchestrator, then the satellites; wait until all satellites registered."""
        if self._started:
            return self
        self._started = True
        try:
            self.start_orchestrator()
            self._warm_numba()
            for i in range(self.n_satellites):
                self.add_satellite(f"local-{i}")
            self.wait_for_satellites(self.n_satellites)
            if self.web:
                self.start_web()
        except BaseException:
            self.close()
            raise
        return self

    def _warm_numba(self) -> None:
        """GenX's numba kernels compiled once, before the satellites start (each then loads them from
        numba's cache in a second, not compiling them side by side against the start timeout): by
        :func:`satellites.genx_numba.warm`, in a process of its own, when the satellites would use numba."""
        env = {**os.environ, **self.env}
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + sys.path
        if env.get("ORCHESTER_GENX_NUMBA", "1") == "0" or \
                any(PathFinder.find_spec(name, path) is None for name in ("genx", "numba")):
            return
        code = ("import sys; from satellites.genx_numba import warm; e = warm(); print(e, file=sys.stderr); "
                "sys.exit(bool(e))")
        with shielded():
            r = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=WARM_TIMEOUT + 60, preexec_fn=parent_death_signal(signal.SIGTERM))
        if r.returncode != 0:  # each satellite tries again, and runs GenX on numpy if it fails too
            log.warning("GenX's numba kernels could not be compiled: %s", (r.stderr.strip() or "?")[-300:])

    def start_orchestrator(self, bind: str | None = None, pub: str | None = None) -> None:
        """Start (or restart) the orchestrator process.

        Without ``bind``/``pub`` it binds ``ipc://`` sockets in the private folder (the same
        ones at every restart); given endpoints (``tcp://`` too) are bound as they are.
        """
        efile = os.path.join(self.dir, "endpoints.json")
        if os.path.exists(efile):
            os.unlink(efile)
        cmd = [sys.executable, "-m", "orchester", "--log-level", self.log_level, "serve",
               "--bind", bind or self._private_endpoint("bus.sock"),
               "--pub", pub or self._private_endpoint("events.sock"),
               "--endpoint-file", efile, "--strategy", self.strategy,
               "--heartbeat-interval", str(self.heartbeat_interval), "--liveness", str(self.liveness),
               *self.serve_args]
        self.orchestrator = self._popen(cmd, self.env, private=True)
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

    def start_web(self) -> str:
        """Start ``orchester web`` on this cluster, a process of its own; return its link (with the token)."""
        import select

        cmd = [sys.executable, "-m", "orchester", "--log-level", self.log_level, "web", "--connect", self.endpoint,
               "--bind", self.web_bind, "--data-dir", self.web_data_dir or os.path.join(self.dir, "web")]
        with shielded():
            p = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 preexec_fn=parent_death_signal(signal.SIGTERM))
            self._procs.append(p)
        self.web_process = p
        assert p.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while not line.endswith(b"\n"):  # "Orchester web: <link>", once it listens
            left = deadline - time.monotonic()
            if p.poll() is not None or left <= 0:
                raise ClusterError("the web process exited at start" if p.poll() is not None
                                   else "the web process did not start in time")
            if select.select([p.stdout], [], [], min(left, 0.2))[0]:
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        self.web_url = line.decode().split()[-1]
        return self.web_url

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
        if self.cores is not None:
            cmd += ["--cores", str(self.cores)]
        if self.light_credit is not None:
            cmd += ["--light-credit", str(self.light_credit)]
        if sid:
            cmd += ["--id", sid]
        t = self.tags if tags is None else list(tags)
        if t:
            cmd += ["--tags", ",".join(t)]
        for m in self.tasks:
            cmd += ["--tasks", m]
        merged = {**os.environ, **self.env, **(env or {})}
        if "ORCHESTER_NUMBA_THREADS" not in merged:  # numba's threads: the cores over every worker started here
            cmd += ["--numba-threads", str(max(1, _usable_cores() // ((workers or self.workers)
                                                                      * max(1, self.n_satellites))))]
        cmd += list(extra)
        p = self._popen(cmd, {**self.env, **(env or {})})
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
                    if fleet_of(st)["satellites"] >= n:
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
        """Stop every client and process started (SIGTERM, then SIGKILL) and remove the private folder.

        A stop signal that arrives meanwhile (under :func:`~orchester.signals.stop_on_signals`) is raised once
        everything is stopped, never halfway.
        """
        with shielded():
            try:
                for c in self._clients:
                    c.close()
            finally:
                self._clients.clear()
                self._procs.extend([*self.satellites, *([self.orchestrator] if self.orchestrator else [])])
                self.satellites.clear()
                self.orchestrator = None
                _cleanup(self._procs, self.dir, grace)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
