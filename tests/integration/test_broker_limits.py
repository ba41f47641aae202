"""The orchestrator in a thread of the test process: size limits, wildcard endpoints, clean leave."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import zmq
from conftest import FAST_HB, broker_config

from orchester import LocalCluster
from orchester.client.sync import reachable_endpoint
from orchester.server.broker import BrokerThread
from serializers import encode, pack, unpack
from serializers import protocol as P

pytestmark = pytest.mark.integration


def ask(sock: Any, frames: list[bytes], timeout: float = 10) -> list[bytes]:
    sock.send_multipart(frames)
    assert sock.poll(timeout * 1000), "no answer"
    return sock.recv_multipart()


def test_oversized_messages(socket: Any) -> None:
    with BrokerThread(broker_config(max_message=4096)) as broker:
        big = socket(zmq.DEALER)
        big.connect(broker.client_endpoint)
        # several frames, each under the limit, together over it: a structured error
        _, body = encode([["x" * 3000], {}])
        reply = ask(big, [P.SIGNATURE, P.SUBMIT, pack({"id": "big", "k": "echo"}), *body, b"y" * 3000])
        assert reply[1] == P.ERROR and unpack(reply[2])["code"] == P.E_TOO_LARGE
        assert unpack(reply[2])["id"] == "big"
        # one frame over the limit: ZMQ_MAXMSGSIZE drops the connection before Python sees it
        huge = socket(zmq.DEALER)
        huge.connect(broker.client_endpoint)
        huge.send_multipart([P.SIGNATURE, P.STATUS, pack({"rid": 1}), b"z" * 10_000])
        assert not huge.poll(500)
        # the orchestrator still serves everyone else
        ok = socket(zmq.DEALER)
        ok.connect(broker.client_endpoint)
        reply = ask(ok, [P.SIGNATURE, P.STATUS, pack({"rid": 2})])
        st = unpack(reply[2])
        assert reply[1] == P.REPLY and st["rid"] == 2 and st["counters"]["errors.too_large"] == 1


def test_version_mismatch_is_refused_with_the_supported_version(broker: Any, socket: Any) -> None:
    s = socket(zmq.DEALER)
    s.connect(broker.client_endpoint)
    reply = ask(s, [b"ORCH/1", P.SUBMIT, pack({"id": "x", "k": "echo"}), b"\x90"])
    hdr = unpack(reply[2])
    assert reply[:2] == [P.SIGNATURE, P.ERROR] and hdr["code"] == P.E_VERSION and P.SIGNATURE.decode() in hdr["msg"]


def test_wildcard_endpoints_are_reached_through_the_known_host() -> None:
    assert reachable_endpoint("tcp://0.0.0.0:5556", "tcp://head.example:5555") == "tcp://head.example:5556"
    assert reachable_endpoint("tcp://*:7", "tcp://10.1.2.3:5555") == "tcp://10.1.2.3:7"
    assert reachable_endpoint("tcp://127.0.0.1:5556", "tcp://other:1") == "tcp://127.0.0.1:5556"
    assert reachable_endpoint("ipc:///tmp/x", "tcp://h:1") == "ipc:///tmp/x"


def test_satellite_sigterm_leaves_cleanly_and_its_task_is_rerouted_at_once() -> None:
    with LocalCluster(satellites=2, workers=1, heartbeat_interval=FAST_HB, liveness=50,
                      log_level="ERROR") as cluster:
        c = cluster.client()
        futs = [c.submit("sleep", 1.0) for _ in range(2)]
        deadline = time.monotonic() + 20
        while sum(s["inflight"] for s in c.status()["satellites"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.satellites[0].send_signal(signal.SIGTERM)
        assert cluster.satellites[0].wait(20) == 0
        assert [f.result(30) for f in futs] == [1.0, 1.0]
        st = c.status()
        # liveness is 50 × 0.2 s: the task was requeued by the satellite's LEAVE, not by its silence
        assert [s["id"] for s in st["satellites"]] == ["local-1"]
        assert st["counters"]["requeued"] >= 1 and st["counters"].get("satellites_lost", 0) == 0


def test_a_satellite_leaves_before_its_walltime_ends() -> None:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=FAST_HB, log_level="ERROR") as cluster:
        c = cluster.client()
        registered = c.status()["counters"].get("satellites_registered", 0)
        short = cluster.add_satellite("short-lived", extra=["--walltime", "61.5"])  # leaves 60 s before the end
        deadline = time.monotonic() + 30
        # (counted, not looked for in the list: on a busy machine it may have come and gone between two looks)
        while c.status()["counters"].get("satellites_registered", 0) <= registered:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert short.wait(30) == 0  # it left by itself, cleanly
        assert [s["id"] for s in c.status()["satellites"]] == ["local-0"]
        assert c.submit("echo", 1, duration=10).result(30) == 1
