"""Hardening (issue 14) on real processes: a CONTROL strategy cannot run code (15); a satellite that
allows pickle still refuses a pickle task the orchestrator did not accept (17)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Unbatched, stop_processes

from orchester import Client
from orchester.errors import RemoteError
from serializers import ERR_CODEC_REFUSED, pack, unpack
from serializers import protocol as P

pytestmark = pytest.mark.integration
HB = "0.2"


def _endpoints(efile: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "orchestrator exited at start"
        assert time.monotonic() < deadline, "orchestrator did not start"
        try:
            return dict(json.loads(efile.read_text()))
        except (OSError, ValueError):  # not written yet (or half written)
            time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Callable[..., subprocess.Popen[bytes]]]]:
    """``orchester serve`` on tcp://127.0.0.1:* (no --allow-pickle), and a way to add satellites to it."""
    efile = tmp_path / "endpoints.json"
    procs = [subprocess.Popen([sys.executable, "-m", "orchester", "--log-level", "WARNING", "serve",
                               "--bind", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*",
                               "--heartbeat-interval", HB, "--endpoint-file", str(efile)],
                              stdin=subprocess.DEVNULL)]
    try:
        endpoint = _endpoints(efile, procs[0])["bind"][0]

        def satellite(*args: str) -> subprocess.Popen[bytes]:
            p = subprocess.Popen([sys.executable, "-m", "satellites", "--log-level", "WARNING", "run",
                                  "--connect", endpoint, "--workers", "1", "--heartbeat-interval", HB, *args],
                                 stdin=subprocess.DEVNULL)
            procs.append(p)
            return p

        yield procs[0], endpoint, satellite
    finally:
        stop_processes(procs)


def test_a_control_strategy_naming_sys_exit_is_refused_and_the_server_keeps_serving(served: Any) -> None:
    proc, endpoint, _ = served
    with Client(endpoint) as c:
        for name in ("sys:exit", "os:abort", "builtins:exit"):
            with pytest.raises(RemoteError) as e:
                c.set_strategy(name, timeout=10)
            assert e.value.code == P.E_BAD_REQUEST and "not allowed" in e.value.message
        time.sleep(0.3)
        assert proc.poll() is None, "the orchestrator stopped"
        st = c.status(timeout=10)
        assert st["strategy"] == "least_loaded"
        assert c.set_strategy("round_robin", timeout=10)["strategy"] == "round_robin"


class Mkdir:
    """A pickle payload argument that creates a directory when it is unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.makedirs, (self.path,))


def test_a_pickle_submit_never_runs_without_the_orchestrators_consent(served: Any, tmp_path: Path) -> None:
    """A submitter that never opted in (raw frames, pickle not allowed in its process) sends a pickle payload."""
    _, endpoint, satellite = served
    satellite("--allow-pickle")
    marker = tmp_path / "ran"
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s = Unbatched(s)  # (a BATCH read message by message)
    s.linger = 0
    try:
        s.connect(endpoint)
        deadline = time.monotonic() + 30
        while True:  # until the satellite is there (a submit before it would be refused as unknown_kind)
            s.send_multipart([P.SIGNATURE, P.STATUS, pack({"rid": 1})])
            assert s.poll(10_000), "no status reply"
            if unpack(s.recv_multipart()[2]).get("satellites"):
                break
            assert time.monotonic() < deadline, "the satellite did not register"
            time.sleep(0.1)
        s.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": "evil-1", "k": "echo", "c": "pickle"}),
                          pickle.dumps([[Mkdir(marker)], {}])])
        answer = None
        while answer is None:
            assert s.poll(30_000), "no answer to the pickle submit"
            frames = s.recv_multipart()
            if frames[1] in (P.RESULT, P.ERROR):
                answer = frames[1], unpack(frames[2])
        cmd, hdr = answer
        if cmd == P.ERROR:  # refused at submit by the orchestrator itself
            assert hdr["code"] == P.E_CODEC and "--allow-pickle" in hdr["msg"]
        else:  # or failed by the satellite, before anything was decoded
            assert hdr["ok"] is False and hdr["err"]["type"] == ERR_CODEC_REFUSED, hdr
            assert "orchestrator did not accept pickle" in hdr["err"]["msg"]
        time.sleep(0.5)
        assert not marker.exists(), "the pickle payload ran"
    finally:
        s.close(0)
        ctx.term()


def test_a_satellite_runs_pickle_only_when_the_dispatch_carries_the_orchestrators_consent(tmp_path: Path) -> None:
    """The test is the orchestrator: a real ``satellite run --allow-pickle`` gets two pickle DISPATCHes."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router = Unbatched(router)  # (a BATCH read message by message)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    sat = subprocess.Popen([sys.executable, "-m", "satellites", "--log-level", "WARNING", "run", "--allow-pickle",
                            "--connect", f"tcp://127.0.0.1:{port}", "--workers", "1", "--heartbeat-interval", "1"],
                           stdin=subprocess.DEVNULL)
    try:
        def next_message(want: bytes) -> tuple[bytes, dict[str, Any]]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if router.poll(200):
                    frames = router.recv_multipart()
                    if frames[2] == want:
                        return frames[0], unpack(frames[3])
                elif ident:
                    router.send_multipart([ident, P.SIGNATURE, P.HEARTBEAT, pack({})])
            raise AssertionError(f"no {P.command_name(want)} from the satellite")

        ident = b""
        ident, _ = next_message(P.REGISTER)
        router.send_multipart([ident, P.SIGNATURE, P.WELCOME, pack({"e": "test"})])
        refused, allowed = tmp_path / "refused", tmp_path / "allowed"
        for tid, dispatch, marker in (("t-1", {}, refused), ("t-2", {"pk": True}, allowed)):
            router.send_multipart([ident, P.SIGNATURE, P.DISPATCH, pack({"id": tid, "a": 1, **dispatch}),
                                   pack({"id": tid, "k": "echo", "c": "pickle"}),
                                   pickle.dumps([[Mkdir(marker)], {}])])
            _, done = next_message(P.DONE)
            assert done["id"] == tid
            if tid == "t-1":
                assert done["ok"] is False and done["err"]["type"] == ERR_CODEC_REFUSED
                assert "orchestrator did not accept pickle" in done["err"]["msg"]
                assert not refused.exists()
            else:
                assert done["ok"] is True and allowed.is_dir()
    finally:
        stop_processes([sat])
        router.close(0)
        ctx.term()


def _watch(*extra: str) -> tuple[int, str, str]:
    """Run ``orchester watch`` on a PUB socket of this test that publishes forged events until it exits."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    watcher = subprocess.Popen([sys.executable, "-m", "orchester", "watch", "--connect", "tcp://127.0.0.1:1",
                                "--pub", f"tcp://127.0.0.1:{pub_port}", "--count", "3", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    forged = {"id": "t-1", "a": 1, "t": "boom", "fom": float("nan"), "sat": "[/]",
              "msg": "ok\nFORGED LINE \x1b]0;owned\x07\x1b[2J\x9b31m\u202e", "\x1b[31mkey": 1}
    try:
        deadline = time.monotonic() + 30
        while watcher.poll() is None and time.monotonic() < deadline:
            pub.send_multipart([b"progress:t-1\x1b[2J", pack(forged)])
            time.sleep(0.05)
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
        pub.close(0)
        ctx.term()
    return watcher.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def test_watch_prints_forged_events_as_inert_text() -> None:
    """Item 11: a forged progress event (bad time, escape sequences, a planted newline) reaches ``watch``."""
    code, out, err = _watch()
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith("--:--:-- progress:t-1") for line in lines), out
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out and "fom=nan" in out
    code, out, err = _watch("--json")
    assert code == 0, err

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    events = [json.loads(line, parse_constant=no_constants) for line in out.splitlines()]
    assert len(events) == 3 and events[0]["fom"] is None and events[0]["topic"] == "progress:t-1\x1b[2J"
    assert "\x1b" not in out  # JSON escapes it


def test_a_task_failing_with_a_huge_message_ends_with_it_cut_instead_of_hanging(cluster: Any) -> None:
    """A DONE header is at most 64 KiB: a worker sends a failure's message and traceback cut to fit
    (their beginning and end), so the task ends instead of holding its slot forever."""
    from orchester import TaskFailed

    with cluster.client() as client:
        fut = client.submit("fail", "é" * 1_000_000 + "THE END", "ValueError")
        exc = fut.exception(timeout=60)
        assert isinstance(exc, TaskFailed) and exc.type == "ValueError"
        assert "characters cut" in exc.message and exc.message.endswith("THE END")
        assert len(exc.message) < 5_000 and len(exc.remote_traceback) < 9_000
        assert client.submit("echo", 1).result(timeout=30) == 1  # the satellite's slot is free again


@pytest.mark.parametrize("own", ["1.5", "0.05"])
def test_a_satellite_takes_the_orchestrators_heartbeat_pace(own: str) -> None:
    """A satellite started with another --heartbeat-interval than the orchestrator's beats at the orchestrator's
    once welcomed: it neither goes silent (slower) nor makes the orchestrator beat for nothing (faster), and
    it never reconnects for an orchestrator that beats slower than it expected."""
    from orchester import LocalCluster

    with LocalCluster(satellites=0, heartbeat_interval=0.3, liveness=3, log_level="WARNING") as cluster:
        cluster.add_satellite("paced", extra=["--heartbeat-interval", own, "--liveness", "2"])
        cluster.wait_for_satellites(1)
        with cluster.client() as client:
            time.sleep(4.0)  # many of the orchestrator's intervals (and of the satellite's own liveness)
            st = client.status()
            assert [(s["id"], s["state"]) for s in st["satellites"]] == [("paced", "idle")]
            counters = st["counters"]
            assert counters.get("satellites_lost", 0) == 0 and counters["satellites_registered"] == 1
            assert client.submit("echo", 1).result(timeout=30) == 1
