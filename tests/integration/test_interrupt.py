"""Clean interruption, with real processes (issue 15, items 4, 7 and 8).

* ``orchester demo`` and ``orchester fit`` stop every process of their local cluster on SIGINT,
  SIGTERM and SIGHUP and exit 128 + the signal's number; a ``kill -9`` of them takes the cluster
  down too (the kernel's parent-death signal), and a satellite killed with ``kill -9`` takes its
  workers down, even in the middle of a task. Checked in ``/proc``: every descendant collected
  before the signal, and every process of the command's session, is gone.
* ``orchester fit`` interrupted keeps the finished fits, writes ``summary.csv`` with the others
  marked ``interrupted``, and never leaves a model's files half written.
* ``mpiexec -n 4 satellite mpi`` whose orchestrator rank cannot start prints one line, no traceback.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchester import LocalCluster

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; PR_SET_PDEATHSIG")]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "genx"
needs_genx = pytest.mark.skipif(importlib.util.find_spec("genx") is None, reason="pip install --no-deps genx3")
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]


# ------------------------------------------------------------------ /proc helpers
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, …); None: gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has ended; only its exit status is left)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    """Every descendant of ``pid`` now (children of all its threads, recursively)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for children in glob.glob(f"/proc/{p}/task/*/children"):
            try:
                with open(children) as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def session_members(sid: int) -> set[int]:
    """Running processes of session ``sid`` (a command started with ``start_new_session``)."""
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and st[0] not in ("Z", "X") and int(st[3]) == sid:
                members.add(int(entry))
    return members


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def assert_all_gone(pids: set[int], sid: int | None = None, within: float = 15.0) -> None:
    """Every pid in ``pids`` (and of session ``sid``) ends within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        left = {p for p in pids if running(p)} | (session_members(sid) if sid is not None else set())
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:  # do not leave them to the next test (one that ended meanwhile is fine)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            pytest.fail("left running: " + "; ".join(f"{p} {cmdline(p)[:120]}" for p in sorted(left)))
        time.sleep(0.1)


def _default_signals() -> None:
    """In the child before exec: SIGINT and SIGHUP as a terminal would deliver them (not ignored)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


class Command:
    """A command line in its own session, its output collected by a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "WARNING", *args], cwd=cwd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_default_signals,
                                     env={**os.environ, "COLUMNS": "200"})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"exited with {self.proc.returncode} before {what}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} after {timeout}s:\n{self.output}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for p in session_members(self.proc.pid):
            os.kill(p, signal.SIGKILL)
        self._reader.join(5)


@pytest.fixture
def command(tmp_path: Path) -> Iterator[Any]:
    started: list[Command] = []

    def start(*args: str) -> Command:
        c = Command(list(args), tmp_path)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def cluster_tree(c: Command, at_least: int, timeout: float = 60.0) -> set[int]:
    """The command's descendants once it has ``at_least`` of them (orchestrator, satellites, workers…)."""
    c.wait_for(lambda: len(descendants(c.proc.pid)) >= at_least, timeout, f"{at_least} processes started")
    time.sleep(0.5)
    tree = descendants(c.proc.pid)
    assert any("orchester" in cmdline(p) and " serve " in cmdline(p) for p in tree), [cmdline(p) for p in tree]
    assert any("satellites" in cmdline(p) and " run " in cmdline(p) for p in tree), [cmdline(p) for p in tree]
    return tree


# ------------------------------------------------------------------ item 7: demo
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_stops_every_process_of_orchester_demo(command: Any, sig: signal.Signals) -> None:
    c = command("demo", "--satellites", "2", "--workers", "1", "--tasks", "3000", "--seconds", "0.5")
    c.wait_for(lambda: "local cluster up" in c.output, 90, "the cluster was up")
    # orchestrator, 2 satellites, their workers (and forkservers)
    tree = cluster_tree(c, at_least=5)
    os.kill(c.proc.pid, sig)
    code = c.proc.wait(30)
    assert_all_gone(tree, sid=c.proc.pid)
    c._reader.join(5)
    assert code == 128 + sig, c.output
    assert f"interrupted by {sig.name}" in c.output
    assert "Traceback" not in c.output


def test_kill_9_of_orchester_demo_takes_its_cluster_down(command: Any) -> None:
    c = command("demo", "--satellites", "2", "--workers", "1", "--tasks", "3000", "--seconds", "0.5")
    c.wait_for(lambda: "local cluster up" in c.output, 90, "the cluster was up")
    tree = cluster_tree(c, at_least=5)
    os.kill(c.proc.pid, signal.SIGKILL)
    assert c.proc.wait(30) == -signal.SIGKILL
    assert_all_gone(tree, sid=c.proc.pid)


def test_kill_9_of_a_satellite_takes_its_busy_workers_down() -> None:
    with LocalCluster(satellites=1, workers=2, log_level="ERROR", heartbeat_interval=0.5) as cluster:
        client = cluster.client()
        futs = [client.submit("sleep", 120) for _ in range(2)]
        sat = cluster.satellites[0]
        deadline = time.monotonic() + 60
        while sum(s["inflight"] for s in client.status()["satellites"]) < 2:
            assert time.monotonic() < deadline, "the sleeps never started"
            time.sleep(0.1)
        time.sleep(0.5)
        tree = descendants(sat.pid)
        assert len(tree) >= 2, [cmdline(p) for p in tree]  # its workers (and its forkserver)
        sat.kill()
        sat.wait(10)
        assert_all_gone(tree, within=10)
        assert not any(f.done() for f in futs)


def test_a_cluster_started_from_the_main_thread_asks_for_the_parent_death_signal() -> None:
    from orchester.signals import parent_death_signal

    assert parent_death_signal() is not None
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(parent_death_signal()))
    t.start()
    t.join()
    assert result == [None]  # a thread may end before the process: its children must not die with it


# ------------------------------------------------------------------ items 7 and 8: fit
def _summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {Path(r["file"]).stem: r for r in csv.DictReader(f)}


@needs_genx
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_ends_orchester_fit_cleanly(command: Any, sig: signal.Signals, tmp_path: Path) -> None:
    """One satellite, two fits: the first finishes, the signal arrives during the second."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(EXAMPLES / "nickel_film.hgx", models / "first.hgx")
    shutil.copy(EXAMPLES / "nickel_film.hgx", models / "second.hgx")
    out = tmp_path / "out"
    # 12,000 evaluations per fit (a few thousand a second here): the signal comes during the second fit
    c = command("fit", str(models / "first.hgx"), str(models / "second.hgx"), "--local", "1", "--generations",
                "600", "--population", "20", "--out", str(out), "--no-cache")
    tree = cluster_tree(c, at_least=3, timeout=120)
    c.wait_for(lambda: (out / "first.png").exists(), 300, "the first fit was written")
    os.kill(c.proc.pid, sig)
    code = c.proc.wait(60)
    assert_all_gone(tree, sid=c.proc.pid)
    c._reader.join(5)
    assert code == 128 + sig, c.output
    assert "Traceback" not in c.output
    assert f"interrupted by {sig.name}: 1 of 2 fits done" in " ".join(c.output.split()), c.output
    rows = _summary(out / "summary.csv")
    assert rows["first"]["status"] == "done" and float(rows["first"]["fom"]) > 0
    assert rows["second"]["status"] == "interrupted"
    assert f"interrupted by {sig.name}" in rows["second"]["error"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["first.csv", "first.hgx", "first.ort", "first.png", "first_fom.csv", "first_params.csv",
                     "first_sld.csv", "first_sld.png", "summary.csv", "summary.json"]


@needs_genx
def test_a_stop_signal_while_the_cluster_starts_still_writes_the_summary(command: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    c = command("fit", str(EXAMPLES / "nickel_film.hgx"), "--local", "1", "--generations", "5", "--out", str(out),
                "--no-cache")
    c.wait_for(lambda: len(descendants(c.proc.pid)) >= 1, 60, "the orchestrator was started")
    os.kill(c.proc.pid, signal.SIGTERM)
    code = c.proc.wait(60)
    assert_all_gone(set(), sid=c.proc.pid)
    assert code == 143, c.output
    rows = _summary(out / "summary.csv")
    assert rows["nickel_film"]["status"] == "interrupted"


# ------------------------------------------------------------------ item 8: all-or-nothing files
RESULT: dict[str, Any] = {
    "fom": 1.5, "generations": 3, "seconds": 0.1, "fom_name": "chi2",
    "datasets": [{"name": "d", "x": [0.01, 0.02], "y": [1.0, 0.5], "error": [0.1, 0.05], "y_sim": [0.9, 0.6]}],
    "parameters": [{"name": "p", "value": 1.0, "min": 0, "max": 2}],
    "fom_history": [[0, 3.0], [1, 2.0], [2, 1.5]], "model": b"model bytes",
}


@pytest.mark.parametrize("where", ["plot", "replace"])
def test_a_model_is_written_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Ctrl-C while a model's files are written leaves none of them (and no temporary file)."""
    from orchester.genx import fits

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    if where == "plot":
        monkeypatch.setattr(fits, "plot", interrupt)
    else:
        real = os.replace
        monkeypatch.setattr(fits.os, "replace", lambda a, b: interrupt() if str(b).endswith(".hgx") else real(a, b))
    with pytest.raises(KeyboardInterrupt):
        fits.write_outputs("m", RESULT, tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    if where == "plot":  # nothing was renamed into place yet
        assert left == []
    else:  # Python's own Ctrl-C between two renames: what is in place is complete, no temporary file stays
        assert all(not n.startswith(".") for n in left)
    monkeypatch.undo()
    written = fits.write_outputs("m", RESULT, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_a_stop_signal_waits_for_the_files_to_be_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under stop_on_signals, SIGTERM during the renames is raised once every file is in place."""
    from orchester.genx import fits
    from orchester.signals import Interrupted, stop_on_signals

    real = os.replace
    calls = []

    def replace(a: Any, b: Any) -> None:
        calls.append(b)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here: it must wait
        real(a, b)

    monkeypatch.setattr(fits.os, "replace", replace)
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(), pytest.raises(Interrupted) as info:
        fits.write_outputs("m", RESULT, tmp_path)
    assert info.value.exit_code == 143 and len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.hgx", "m.png", "m_fom.csv", "m_params.csv"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_summary_is_written_when_run_fits_is_interrupted(tmp_path: Path) -> None:
    """run_fits marks the fits that did not finish and raises FitsInterrupted (no cluster needed)."""
    from concurrent.futures import Future

    from orchester.genx.fits import FitSettings
    from orchester.genx.job import FitsInterrupted, run_fits

    files = []
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.hgx").write_bytes(name.encode())
        files.append(tmp_path / f"{name}.hgx")

    class Stream:
        def recv(self, timeout: float) -> None:
            raise KeyboardInterrupt  # Ctrl-C while waiting

        def close(self) -> None:
            """A fake stream holds nothing to close."""

    class FakeClient:
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        def status(self, timeout: float = 10) -> dict[str, Any]:
            return {"satellites": [{"kinds": ["genx.fit"], "versions": {"genx.fit": "3.8.13"}}]}

        def subscribe(self, topics: Any) -> Stream:
            return Stream()

        def submit(self, kind: str, model: bytes, **kw: Any) -> Any:
            fut: Future[Any] = Future()
            fut.task_id = f"t-{model.decode()}"  # type: ignore[attr-defined]
            return fut

        def cancel(self, tid: str, timeout: float = 10) -> dict[str, Any]:
            self.cancelled.append(tid)
            return {}

    client = FakeClient()
    with pytest.raises(FitsInterrupted) as info:
        run_fits(client, files, FitSettings(generations=3), tmp_path / "out")  # type: ignore[arg-type]
    assert info.value.exit_code == 130
    rows = _summary(tmp_path / "out" / "summary.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"a": "interrupted", "b": "interrupted", "c": "interrupted"}
    assert client.cancelled == ["t-a", "t-b", "t-c"]


# ------------------------------------------------------------------ item 4: MPI
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
MPI_ENV = {**os.environ, "UCX_TLS": "self,sm", "MPIEXEC_PORT_RANGE": "50000:50100", "HYDRA_IFACE": "lo"}


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec comes with the test extras (pip install mpich)")
def test_an_orchestrator_rank_that_cannot_start_gives_one_line(tmp_path: Path) -> None:
    """A wildcard bind without --insecure: serve refuses; the job prints one line and no traceback."""
    assert MPIEXEC is not None
    r = subprocess.run([MPIEXEC, "-n", "4", sys.executable, "-m", "satellites", "--log-level", "WARNING", "mpi",
                        "--bind-host", "0.0.0.0"], env=MPI_ENV, cwd=tmp_path, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode != 0
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: the orchestrator rank could not start") and "--insecure" in lines[0], out
