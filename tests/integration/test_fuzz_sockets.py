"""Random and mutated frames thrown at real sockets: the orchestrator and a satellite keep serving."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from conftest import Unbatched
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchester import LocalCluster
from serializers import encode, pack, unpack
from serializers import protocol as P

pytestmark = pytest.mark.integration

frames_strategy = st.lists(
    st.one_of(st.binary(max_size=40), st.sampled_from([P.SIGNATURE, b"ORCH/7", *P.COMMAND_NAMES]),
              st.dictionaries(st.text(max_size=4), st.integers(-2**63, 2**64 - 1), max_size=4).map(pack)),
    min_size=1, max_size=7)


def mutations(rng: random.Random, n: int) -> Iterator[list[bytes]]:
    """Valid messages of every kind, then flipped, truncated, dropped or duplicated frames."""
    _, body = encode([["x", 1], {}])
    valid = [
        [P.SIGNATURE, P.SUBMIT, pack({"id": "m", "k": "echo", "c": "msgpack"}), *body],
        [P.SIGNATURE, P.STATUS, pack({"rid": 1})],
        [P.SIGNATURE, P.REGISTER, pack({"sid": "fz", "slots": 1, "kinds": ["echo"]})],
        [P.SIGNATURE, P.DONE, pack({"id": "m", "a": 1, "ok": True})],
        [P.SIGNATURE, P.CONTROL, pack({"op": "strategy", "name": "round_robin", "rid": 2})],
        [P.SIGNATURE, P.HEARTBEAT, pack({})],
    ]
    for i in range(n):
        msg = [bytearray(f) for f in rng.choice(valid)]
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(5)
            j = rng.randrange(len(msg))
            if op == 0 and msg[j]:
                msg[j][rng.randrange(len(msg[j]))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del msg[j][rng.randrange(len(msg[j]) + 1):]
            elif op == 2 and len(msg) > 1:
                del msg[j]
            elif op == 3:
                msg.insert(j, bytearray(rng.randbytes(rng.randrange(12))))
            else:
                msg[j] += rng.randbytes(rng.randrange(1, 6))
        if rng.random() < 0.05:  # now and then an id that stays unique, so submits really queue
            msg = [*valid[0][:2], pack({"id": f"ok-{i}", "k": "echo"}), *body]
        yield [bytes(f) for f in msg]


@pytest.fixture(scope="module")
def fuzz_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=0.2, log_level="ERROR") as c:
        yield c


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


#: Frames thrown in the CI run, and how much the orchestrator's memory may grow meanwhile.
FUZZ_FRAMES = 100_000
RSS_GROWTH_MB = 64


def test_orchestrator_survives_random_and_mutated_frames(fuzz_cluster: LocalCluster) -> None:
    assert fuzz_cluster.orchestrator is not None
    pid = fuzz_cluster.orchestrator.pid
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s = Unbatched(s)  # (a BATCH read message by message)
    s.linger = 0
    s.connect(fuzz_cluster.endpoint)
    rng = random.Random(1234)
    sent = 0
    rss_before = 0.0
    try:
        for msg in mutations(rng, FUZZ_FRAMES * 9 // 10):
            s.send_multipart(msg)
            sent += 1
            while s.poll(0):
                s.recv_multipart()
            if sent == 5000:  # after the warm-up: imports, buffers and caches are in place
                rss_before = rss_mb(pid)
        for _ in range(FUZZ_FRAMES // 10):
            s.send_multipart([rng.randbytes(rng.randrange(30)) for _ in range(rng.randrange(1, 6))])
            sent += 1
            while s.poll(0):
                s.recv_multipart()
        s.send_multipart([P.SIGNATURE, P.STATUS, pack({"rid": 424242})])  # answered after all of the above
        deadline = time.monotonic() + 120
        while True:
            assert s.poll(max(0.0, deadline - time.monotonic()) * 1000), "the orchestrator stopped answering"
            reply = s.recv_multipart()
            if reply[1] == P.REPLY and unpack(reply[2], 1 << 30).get("rid") == 424242:
                break
    finally:
        s.close(0)
        ctx.term()
    assert fuzz_cluster.orchestrator.poll() is None
    c = fuzz_cluster.client()
    assert c.submit("echo", "still here").result(60) == "still here"
    st_ = c.status()
    assert st_["counters"]["messages_in"] >= FUZZ_FRAMES  # every one reached the handlers
    assert st_["counters"]["bad_messages"] > FUZZ_FRAMES // 4
    assert sent == FUZZ_FRAMES
    growth = rss_mb(pid) - rss_before
    assert growth < RSS_GROWTH_MB, f"the orchestrator grew by {growth:.0f} MB under {FUZZ_FRAMES} fuzzed messages"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=frames_strategy)
def test_orchestrator_answers_hypothesis_frames(fuzz_cluster: LocalCluster, frames: list[bytes]) -> None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s = Unbatched(s)  # (a BATCH read message by message)
    s.linger = 0
    try:
        s.connect(fuzz_cluster.endpoint)
        s.send_multipart(frames)
        s.send_multipart([P.SIGNATURE, P.HEARTBEAT, pack({})])
        deadline = time.monotonic() + 10
        while True:  # our ping is answered after whatever the fuzzed frames got
            assert s.poll(max(0, deadline - time.monotonic()) * 1000), "orchestrator stopped answering"
            reply = s.recv_multipart()
            assert reply[0] == P.SIGNATURE
            if reply[1] == P.HEARTBEAT:
                break
            if reply[1] == P.ERROR:
                assert set(unpack(reply[2])) >= {"code", "msg"}
    finally:
        s.close(0)


class FakeOrchestrator:
    """A ROUTER bound by the test, with one real satellite process connected to it."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.sndhwm = 0  # a ROUTER drops what exceeds its high-water mark: keep the whole storm
        self.router.router_mandatory = 1
        self.router = Unbatched(self.router)  # (a BATCH read message by message)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        level = os.environ.get("FZ_LOG", "ERROR")
        self.proc = subprocess.Popen([sys.executable, "-m", "satellites", "--log-level", level, "run",
                                      "--connect", f"tcp://127.0.0.1:{port}", "--workers", "1", "--id", "fz",
                                      "--heartbeat-interval", "5"], stdin=subprocess.DEVNULL)
        self.ident = b""
        msg = self.recv(lambda m: m[2] == P.REGISTER)
        self.ident = msg[0]

    def recv(self, want: Any, timeout: float = 30) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.router.poll(max(0, deadline - time.monotonic()) * 1000), "satellite went quiet"
            msg = self.router.recv_multipart()
            if want(msg):
                return msg

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.router.close(0)
        self.ctx.term()


def test_satellite_survives_garbage_and_still_runs_a_task() -> None:
    fake = FakeOrchestrator()
    try:
        rng = random.Random(99)
        for msg in mutations(rng, 3000):
            fake.router.send_multipart([fake.ident, *msg])
        for _ in range(2000):
            fake.router.send_multipart([fake.ident, *[rng.randbytes(rng.randrange(20)) for _ in range(3)]])
        fake.router.send_multipart([fake.ident, P.SIGNATURE, P.DISPATCH, pack({"id": "x", "a": 1})])  # short
        errors = fake.recv(lambda m: m[2] == P.ERROR)
        assert unpack(errors[3])["code"] in (P.E_MALFORMED, P.E_VERSION, P.E_UNKNOWN_COMMAND, P.E_TOO_LARGE)
        _, body = encode([["after the storm"], {}])
        fake.router.send_multipart([fake.ident, P.SIGNATURE, P.DISPATCH, pack({"id": "real", "a": 1}),
                                    pack({"id": "real", "k": "echo", "c": "msgpack"}), *body])
        done = fake.recv(lambda m: m[2] == P.DONE and unpack(m[3]).get("id") == "real",
                         timeout=float(os.environ.get("FZ_TIMEOUT", "120")))
        hdr = unpack(done[3])
        assert hdr["ok"] is True and hdr["a"] == 1
        assert fake.proc.poll() is None
    finally:
        fake.close()
