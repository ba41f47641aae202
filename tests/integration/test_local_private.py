"""The embedded default is private: ``ipc://`` sockets in a 0700 folder, not a loopback port.

Issue 14 item 5: on ``tcp://127.0.0.1`` without keys another local user reached the bus of
``orchester fit``, ran code as its owner and took over the satellite id ``local-0``. These tests
start real processes and check that the local cluster's sockets live in a folder only its user
may enter (and, run as root, that another uid really is refused), that work flows, and that
closing leaves no process and no folder behind.
"""

from __future__ import annotations

import errno
import gc
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST_HB

from orchester import LocalCluster
from orchester.local.cluster import IPC_NAME_ROOM, IPC_PATH_MAX, ClusterError, private_dir

pytestmark = pytest.mark.integration

NOBODY = 65534


def ipc_path(endpoint: str) -> str:
    assert endpoint.startswith("ipc://"), endpoint
    return endpoint[len("ipc://"):]


# -- /proc: the processes a cluster started, and whether they are gone ------------------------------


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def descendants(roots: list[int]) -> dict[int, int]:
    """``roots`` and every process below them: pid -> start time."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
            parent[int(entry)] = st[0]
    found = {r for r in roots if r in parent}
    grew = True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in found} - found
        grew = bool(more)
        found |= more
    return {pid: st[2] for pid in found if (st := proc_stat(pid)) is not None}


def alive(procs: dict[int, int]) -> list[int]:
    """The pids of ``procs`` still running (same start time, not a zombie)."""
    return [pid for pid, start in procs.items()
            if (st := proc_stat(pid)) is not None and st[2] == start and st[1] != "Z"]


def as_nobody_connect(path: str) -> int:
    """Connect to the unix socket ``path`` from a forked child running as uid/gid 65534: its errno (0: in)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 100
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                code = 0
            except OSError as exc:
                code = exc.errno or 101
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# -- tests ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=FAST_HB, log_level="ERROR") as c:
        yield c


def test_default_endpoints_are_ipc_in_a_folder_only_this_user_may_enter(private_cluster: LocalCluster) -> None:
    c = private_cluster
    folder = os.lstat(c.dir)
    assert stat.S_ISDIR(folder.st_mode) and stat.S_IMODE(folder.st_mode) == 0o700
    assert folder.st_uid == os.getuid()
    for endpoint in (c.endpoint, c.pub_endpoint):
        path = ipc_path(endpoint)
        assert os.path.dirname(path) == c.dir
        assert len(os.fsencode(path)) <= IPC_PATH_MAX
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0, oct(st.st_mode)  # the socket itself: owner only
    assert stat.S_IMODE(os.lstat(os.path.join(c.dir, "endpoints.json")).st_mode) & 0o077 == 0
    with c.client() as client:
        assert client.submit("echo", {"private": True}).result(30) == {"private": True}
        assert [s["id"] for s in client.status()["satellites"]] == ["local-0"]


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to act as another uid")
def test_another_user_cannot_connect(private_cluster: LocalCluster) -> None:
    c = private_cluster
    path = ipc_path(c.endpoint)
    assert as_nobody_connect(path) == errno.EACCES  # the 0700 folder stops it
    os.chmod(c.dir, 0o711)  # even with the folder opened up, the socket file's own mode refuses
    try:
        assert as_nobody_connect(path) == errno.EACCES
        assert as_nobody_connect(ipc_path(c.pub_endpoint)) == errno.EACCES
    finally:
        os.chmod(c.dir, 0o700)
    with c.client() as client:  # the owner still gets in
        assert client.submit("echo", 1).result(30) == 1


def test_close_stops_every_process_and_removes_the_folder() -> None:
    cluster = LocalCluster(satellites=2, workers=1, heartbeat_interval=FAST_HB, log_level="ERROR")
    try:
        cluster.start()
        with cluster.client() as client:
            assert list(client.map("echo", range(20), timeout=60)) == list(range(20))
        assert cluster.orchestrator is not None
        procs = descendants([cluster.orchestrator.pid, *(p.pid for p in cluster.satellites)])
        assert len(procs) >= 5  # orchestrator, two satellites and their workers
        folder = cluster.dir
    finally:
        cluster.close()
    assert not os.path.exists(folder)
    # a satellite's multiprocessing helpers (forkserver, resource tracker) end on their own when
    # their pipe to it closes, a moment after it exited: give them that moment, no more
    deadline = time.monotonic() + 10
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(procs) == []


def test_a_cluster_never_closed_is_cleaned_up_when_collected() -> None:
    cluster = LocalCluster(satellites=0, log_level="ERROR")
    cluster.start_orchestrator()
    assert cluster.orchestrator is not None
    pid, folder = cluster.orchestrator.pid, cluster.dir
    procs = descendants([pid])
    del cluster
    gc.collect()
    assert not os.path.exists(folder)
    assert alive(procs) == []


def test_a_failed_start_leaves_nothing_behind() -> None:
    cluster = LocalCluster(satellites=1, workers=1, log_level="ERROR", serve_args=["--no-such-option"])
    folder = cluster.dir
    with pytest.raises(ClusterError):
        cluster.start()
    assert not os.path.exists(folder)
    assert cluster.orchestrator is None and cluster.satellites == []


def test_explicit_tcp_endpoints_still_work() -> None:
    with LocalCluster(satellites=0, workers=1, heartbeat_interval=FAST_HB, log_level="ERROR") as cluster:
        cluster.start_orchestrator(bind="tcp://127.0.0.1:*", pub="tcp://127.0.0.1:*")
        assert cluster.endpoint.startswith("tcp://127.0.0.1:") and cluster.pub_endpoint.startswith("tcp://")
        cluster.add_satellite("tcp-0")
        cluster.wait_for_satellites(1)
        with cluster.client() as client:
            assert client.submit("echo", "tcp").result(30) == "tcp"


def test_a_long_tmpdir_falls_back_to_a_short_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    path = private_dir()
    try:
        assert os.path.dirname(path) == "/tmp"
        assert len(os.fsencode(os.path.join(path, "x" * IPC_NAME_ROOM))) <= IPC_PATH_MAX
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    finally:
        os.rmdir(path)
    short_dir = tempfile.mkdtemp(prefix="s", dir="/tmp")  # (short whatever pytest's own folders are called)
    monkeypatch.setattr(tempfile, "tempdir", short_dir)
    try:
        path = private_dir()
        assert os.path.dirname(path) == short_dir
    finally:
        shutil.rmtree(short_dir)


def test_a_private_folder_ignores_a_permissive_umask() -> None:
    old = os.umask(0o000)
    try:
        path = private_dir()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    finally:
        os.rmdir(path)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchester", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "400"}, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["fit", "demo"])
def test_fit_and_demo_still_have_help(command: str) -> None:
    r = cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_demo_runs_on_a_private_ipc_folder_that_is_gone_afterwards() -> None:
    r = cli("--log-level", "WARNING", "demo", "--tasks", "10", "--satellites", "1", "--workers", "1",
            "--seconds", "0.01")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"orchestrator at ipc://(\S+)/bus\.sock", r.stdout)
    assert m is not None, r.stdout
    assert not os.path.exists(m.group(1))
