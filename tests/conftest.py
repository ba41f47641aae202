"""Shared fixtures: every socket and process a test makes is closed by the fixture that made it."""

from __future__ import annotations

import collections
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from debian_packages import apt_install

# strict: a failure of our own in the orchestrator's handlers or timers is raised (and a served
# orchestrator stops), never answered "internal" behind the error boundary; set before orchester
# is imported, and inherited by every process the tests start
os.environ.setdefault("ORCHESTER_STRICT", "1")

from orchester import LocalCluster  # noqa: E402
from orchester.config import OrchestratorConfig  # noqa: E402
from orchester.server.broker import BrokerThread  # noqa: E402
from serializers import messages as M  # noqa: E402
from serializers import protocol as P  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: Environment for processes that must import tests/orchester_test_tasks.py.
TEST_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH", "")]))}
FAST_HB = 0.2


@pytest.fixture(autouse=True)
def _environment_as_found() -> Iterator[None]:
    """Every test leaves this process's environment as it found it. A satellite run in the test's own process
    sets the environment its workers inherit (GenX's numba switch and threads): left behind, it turned numba
    off for the tests that came after it in the same worker."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A fresh context; terminated at teardown (a leaked socket would hang term: the timeout fails it)."""
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class Unbatched:
    """A raw socket read as a third party following ``docs/protocol.rst`` reads it: a ``BATCH`` is the
    messages it carries, returned one by one by :meth:`recv_multipart` (each with the envelope and the
    signature it came with). Everything else is the socket's own."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        object.__setattr__(self, "sock", sock)
        object.__setattr__(self, "pending", collections.deque())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.sock, name, value)

    def poll(self, timeout: float | None = None, flags: int = zmq.POLLIN) -> int:
        if self.pending and flags & zmq.POLLIN:
            return zmq.POLLIN
        return self.sock.poll(timeout, flags)

    def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> list[Any]:
        if not self.pending:
            frames = self.sock.recv_multipart(flags, copy=copy, track=track)
            for head in (1, 2):  # a DEALER's message starts with the signature, a ROUTER's with the envelope
                if len(frames) > head + 1 and bytes(frames[head - 1]) == P.SIGNATURE and bytes(frames[head]) == P.BATCH:
                    self.pending.extend(M.unbatch(frames, head))
                    break
            else:
                return frames
        return self.pending.popleft()


@pytest.fixture
def socket(ctx: zmq.Context[Any]) -> Iterator[Any]:
    """A socket factory: ``socket(zmq.DEALER)``; every socket made is closed with linger=0. What it
    receives is read message by message (:class:`Unbatched`)."""
    made: list[zmq.Socket[Any]] = []

    def make(kind: int) -> Any:
        s = ctx.socket(kind)
        s.linger = 0
        made.append(s)
        return Unbatched(s)

    yield make
    for s in made:
        s.close(0)


def broker_config(**kw: Any) -> OrchestratorConfig:
    """A loopback config with OS-chosen ports and fast heartbeats."""
    base: dict[str, Any] = {"bind": ["tcp://127.0.0.1:*"], "pub": ["tcp://127.0.0.1:*"],
                            "heartbeat_interval": FAST_HB, "liveness": 3}
    base.update(kw)
    return OrchestratorConfig(**base)


@pytest.fixture
def broker() -> Iterator[Any]:
    """An orchestrator running in a thread of this process, on loopback."""
    bt = BrokerThread(broker_config())
    with bt as b:
        yield b
    assert not any(t.name == "orchester-broker" and t.is_alive() for t in threading.enumerate())


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """An orchestrator and two satellites (two workers each) as real processes, fast heartbeats."""
    with LocalCluster(satellites=2, workers=2, tasks=["orchester_test_tasks"], heartbeat_interval=FAST_HB,
                      liveness=3, env=TEST_ENV, log_level="WARNING") as c:
        yield c


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate ``procs`` and wait for them (killed after 10 s): what a test's fixture started, it stops."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it is truthy (bounded by ``timeout`` seconds); return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not met in {timeout} s"
        time.sleep(0.05)


def executions(path: Path) -> collections.Counter[str]:
    """How many times each key was run by ``t.mark`` (which appends the key to ``path``)."""
    if not path.exists():
        return collections.Counter()
    return collections.Counter(path.read_text().split())


class SimulatedFleet:
    """``n`` satellites speaking ``docs/protocol.rst`` from one thread of this process (a DEALER each): they
    register, beat every ``interval`` seconds, register again when told to, and LEAVE when closed. They offer
    only ``kinds`` (by default one nobody submits: they never take real work)."""

    def __init__(self, endpoint: str, n: int, interval: float = FAST_HB, kinds: tuple[str, ...] = ("sim.none",),
                 hosts: int = 7) -> None:
        from serializers.header import pack

        self.sids = [f"sim{i:04d}" for i in range(n)]
        self._pack, self._kinds, self._hosts, self._interval = pack, list(kinds), hosts, interval
        self._ctx = zmq.Context()
        self._ctx.set(zmq.MAX_SOCKETS, n + 64)
        self._socks: list[zmq.Socket[bytes]] = []
        for sid in self.sids:
            s = self._ctx.socket(zmq.DEALER)
            s.linger = 0
            s.identity = f"s:{sid}:".encode()
            s.connect(endpoint)
            self._socks.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated-fleet", daemon=True)

    def _register(self, i: int) -> None:
        self._socks[i].send_multipart([P.SIGNATURE, P.REGISTER, self._pack(
            {"sid": self.sids[i], "slots": 2, "workers": 2, "kinds": self._kinds, "tags": [],
             "host": f"node{i % self._hosts:02d}", "pid": 1000 + i, "cores": 2})])

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in self._socks:
            poller.register(s, zmq.POLLIN)
        for i in range(len(self.sids)):
            self._register(i)
        index = {s: i for i, s in enumerate(self._socks)}
        beats = [self._pack({"sid": sid}) for sid in self.sids]
        next_beat = 0.0
        while not self._stop.is_set():
            for s, _ in poller.poll(50):
                for _ in range(100):
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if frames[1] == P.RECONNECT:
                        self._register(index[s])
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self._interval
                for s, beat in zip(self._socks, beats, strict=True):
                    s.send_multipart([P.SIGNATURE, P.HEARTBEAT, beat])
        for s, sid in zip(self._socks, self.sids, strict=True):
            s.send_multipart([P.SIGNATURE, P.LEAVE, self._pack({"sid": sid})])
        time.sleep(0.2)  # (the LEAVEs on their way before the sockets close)

    def __enter__(self) -> SimulatedFleet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        for s in self._socks:
            s.close(0)
        self._ctx.term()


#: Where Debian's Chromium lives (``apt-get install chromium``); the browser tests drive it with
#: Playwright through ``executable_path``: no browser is ever downloaded.
CHROMIUM = "/usr/bin/chromium"
#: Chromium's flags for a headless run on a machine without a network (as root: no sandbox).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def _install_chromium() -> None:
    """Install Debian's chromium when it is missing (CI runs as root on a fresh machine)."""
    if os.path.exists(CHROMIUM):
        return
    try:
        apt_install(["chromium"], [CHROMIUM], "the browser tests")
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real one-node Slurm (munged, slurmctld, slurmd: :mod:`slurm_node`), installed when missing;
    stopped, with every job, at the end of the module that uses it."""
    from slurm_node import OneNodeSlurm

    try:
        node = OneNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's) under Playwright; closed at the end of the module that uses it
    (Playwright's sync API holds an asyncio loop in this thread while it runs: later tests need none)."""
    _install_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
