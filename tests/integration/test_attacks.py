"""Issue 14's attacks on a live ``orchester serve``, each one refused (real processes, real sockets).

Every test here reproduces a finding of the security review against a real orchestrator
process and checks the rule that answers it (``docs/security.rst``, the threat table).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import TEST_ENV
from test_security_live import HB, Keys, secured  # noqa: F401, F811  (the fixture)

from orchester import Client, LocalCluster
from orchester.errors import TaskFailed
from orchester.security.keys import generate_keys, load_keypair, load_public
from serializers import encode, pack, unpack
from serializers import protocol as P

pytestmark = pytest.mark.integration


def dealer(socket: Any, endpoint: str, keys: Keys | None = None, name: str | None = None,
           ident: bytes | None = None) -> Any:
    """A raw DEALER, with ``name``'s key when given (the fixture closes it)."""
    s = socket(zmq.DEALER)
    if keys is not None and name is not None:
        s.curve_publickey, s.curve_secretkey = load_keypair(keys.secrets[name])
        s.curve_serverkey = load_public(keys.server_public)
    if ident is not None:
        s.routing_id = ident
    s.connect(endpoint)
    return s


def ask(s: Any, cmd: bytes, hdr: dict[str, Any], *payload: bytes, timeout: float = 20.0) -> tuple[bytes, dict]:
    """Send one message and return the first answer that is not an ACK or a HEARTBEAT."""
    s.send_multipart([P.SIGNATURE, cmd, pack(hdr), *payload])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if s.poll(200):
            frames = s.recv_multipart()
            if frames[1] in (P.ACK, P.HEARTBEAT):
                continue
            return frames[1], unpack(frames[2], limit=1 << 24)
    raise AssertionError(f"no answer to {P.command_name(cmd)} within {timeout}s")


def body(*args: Any) -> list[bytes]:
    return encode([list(args), {}])[1]


def status(s: Any, rid: int = 1) -> dict[str, Any]:
    cmd, hdr = ask(s, P.STATUS, {"rid": rid})
    assert cmd == P.REPLY, hdr
    return hdr


# ------------------------------------------------------------------ finding 1
def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


EXTREMES: list[Any] = [1e308, -1e308, math.inf, -math.inf, math.nan, 2**63 - 1, -(2**63), "x" * 100_000,
                       list(range(10_000)), {"a": 1}, None, True, _deep(400), "a\nFORGED\x1b[2J"]


def test_extreme_numbers_in_a_submit_are_refused_and_the_orchestrator_lives(tmp_path: Path, socket: Any) -> None:
    """``ttl: 1e308`` once killed the orchestrator at the first requeue, and every restart with a journal."""
    journal = tmp_path / "journal"
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR",
                      serve_args=["--journal", str(journal)]) as cluster:
        s = dealer(socket, cluster.endpoint)
        for n, field_name in enumerate(("ttl", "to", "mr", "dur", "p")):
            for m, value in enumerate(EXTREMES):
                cmd, hdr = ask(s, P.SUBMIT, {"id": f"x{n}-{m}", "k": "echo", "c": "msgpack", field_name: value},
                               *body(1))
                if cmd == P.ERROR:
                    assert hdr["code"] in (P.E_MALFORMED, P.E_TOO_LARGE), hdr
                else:  # a value in range (None for "to" is "no timeout"): accepted and run
                    assert cmd == P.RESULT, hdr
        st = status(s)
        assert st["tasks"].get("pending", 0) == 0
        cluster.orchestrator.send_signal(signal.SIGKILL)  # the journal is replayed at the next start
        cluster.orchestrator.wait(10)
        cluster.start_orchestrator()
        cluster.wait_for_satellites(1)
        s2 = dealer(socket, cluster.endpoint)
        assert status(s2)["epoch"] != st["epoch"]
        cmd, hdr = ask(s2, P.HISTORY, {"rid": 2})
        assert cmd == P.REPLY and all(r["state"] == "done" for r in hdr["rows"])
        with cluster.client() as client:
            assert client.submit("echo", "still here").result(timeout=30) == "still here"


def test_every_command_with_extreme_values_gets_a_structured_error(socket: Any) -> None:
    """The fuzz test's valid headers with extreme values, at every command (issue 14, 'done when')."""
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR",
                      serve_args=["--request-rate", "0"]) as cluster:
        s = dealer(socket, cluster.endpoint)
        keys = ["id", "k", "p", "tg", "to", "ttl", "mr", "dur", "a", "t", "sid", "slots", "kinds", "tags",
                "progress", "walltime", "pid", "workers", "running", "recent", "op", "name", "state", "kind",
                "since", "until", "limit", "ids", "task", "rid", "ok", "err", "m", "code", "msg"]
        commands = [P.SUBMIT, P.FETCH, P.STATUS, P.CANCEL, P.CONTROL, P.HISTORY, P.DONE, P.PROGRESS,
                    P.STARTED, P.LEAVE]
        answered = 0
        for cmd in commands:
            for value in EXTREMES:
                for key in keys:
                    s.send_multipart([P.SIGNATURE, cmd, pack({key: value, "rid": 7}), b"\xc0"])
        # REGISTER last (it makes this connection a satellite): with extreme values everywhere
        for value in EXTREMES:
            hdr = {"sid": "fz", "slots": 1, "kinds": ["echo"]}
            for key in ("sid", "slots", "kinds", "tags", "progress", "walltime", "pid", "workers", "running"):
                s.send_multipart([P.SIGNATURE, P.REGISTER, pack({**hdr, key: value})])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and s.poll(1000):
            frames = s.recv_multipart()
            if frames[1] == P.ERROR:
                answered += 1
                assert unpack(frames[2])["code"] in {P.E_MALFORMED, P.E_TOO_LARGE, P.E_UNKNOWN_TASK,
                                                       P.E_BAD_REQUEST, P.E_UNKNOWN_KIND}
        assert answered > len(commands) * len(EXTREMES)
        with cluster.client() as client:  # and it keeps serving
            assert client.submit("echo", 5).result(timeout=30) == 5
            assert client.status()["counters"].get("handler_errors", 0) == 0


# ------------------------------------------------------------------ finding 2
def test_a_result_never_goes_to_another_key_under_its_owners_identity(secured: Any, socket: Any) -> None:  # noqa: F811
    """After alice's connection is gone, another key connecting under her identity gets nothing."""
    cluster, keys = secured
    ident = b"c:alice-old-identity"
    alice = dealer(socket, cluster.endpoint, keys, "alice", ident=ident)
    alice.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": "alice-secret", "k": "sleep", "c": "msgpack"}),
                          *body(1.5)])
    assert alice.poll(10_000) and alice.recv_multipart()[1] == P.ACK
    alice.close(0)
    time.sleep(0.3)
    thief = dealer(socket, cluster.endpoint, keys, "sat", ident=ident)  # a satellite key, not a submitter
    thief.send_multipart([P.SIGNATURE, P.HEARTBEAT, pack({})])
    got: list[list[bytes]] = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        if thief.poll(200):
            got.append(thief.recv_multipart())
    assert not [f for f in got if f[1] == P.RESULT]
    assert [unpack(f[2])["code"] for f in got if f[1] == P.ERROR] == [P.E_FORBIDDEN]
    with keys.client(cluster.endpoint, "alice") as again:  # kept for its owner
        assert again.result("alice-secret", timeout=30) == 1.5


# ------------------------------------------------------------------ finding 3
def test_a_satellite_id_belongs_to_the_key_that_registered_it(secured: Any, socket: Any, tmp_path: Path) -> None:  # noqa: F811
    cluster, keys = secured
    public, secret = generate_keys("sat2", tmp_path / "sat2", ["satellite"])
    (keys.authorized / public.name).write_bytes(public.read_bytes())
    keys.secrets["sat2"] = secret
    cluster.orchestrator.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    impostor = dealer(socket, cluster.endpoint, keys, "sat2")
    cmd, hdr = ask(impostor, P.REGISTER, {"sid": "good", "slots": 4, "kinds": ["echo", "sleep"]})
    assert cmd == P.ERROR and hdr["code"] == P.E_FORBIDDEN and "another key" in hdr["msg"]
    with Client(cluster.endpoint) as ops:
        assert ops.submit("echo", "to the real one").result(timeout=30) == "to the real one"
        sats = ops.status()["satellites"]
        assert [(s["id"], s["user"]) for s in sats] == [("good", "sat")]
        assert ops.status()["counters"]["sid_refused"] == 1


# ------------------------------------------------------------------ finding 4
ATTACKER = """
import sys, time, zmq
ctx = zmq.Context()
many = ctx.socket(zmq.SUB)
many.sndhwm = 0  # every one of the 6,000 subscriptions goes out
many.connect(sys.argv[1])
for i in range(6000):
    many.setsockopt(zmq.SUBSCRIBE, b"t%08d" % i)
for i in range(20):  # 64 KB topics (libzmq's own SUB crashes past 256 KB): the XPUB's ZMQ_MAXMSGSIZE drops them
    big = ctx.socket(zmq.SUB)
    big.connect(sys.argv[1])
    big.setsockopt(zmq.SUBSCRIBE, bytes([65 + i]) * (1 << 16))
flood = ctx.socket(zmq.SUB)  # 40,000 topics of 248 bytes: libzmq would keep them all
flood.sndhwm = 0
flood.connect(sys.argv[1])
for i in range(40000):
    flood.setsockopt(zmq.SUBSCRIBE, b"%08d" % i + b"x" * 240)
print("subscribed", flush=True)
while True:  # a SUB resends its subscriptions after a reconnect only when its socket is used
    flood.poll(100)
    many.poll(100)
"""


def test_subscriptions_cannot_stall_or_bloat_the_orchestrator() -> None:
    """6,000 subscriptions once stalled the loop 8 s (a satellite was lost). Now: the loop keeps serving
    while a peer floods it, each flood is noticed and the event socket re-opened, freeing what
    libzmq kept (what one burst costs before it is noticed is the known limit in docs/security.rst)."""
    # heartbeats of 1 s: a satellite is lost after 3 s of a stalled loop (once: 8 s). (With 0.5 s, a full run
    # of the suite on 2 busy cores once lost the satellite: 1.5 s of starvation, not a stalled loop.)
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=1.0, env=TEST_ENV, log_level="ERROR") as cluster:
        assert cluster.orchestrator is not None
        attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, cluster.pub_endpoint], stdout=subprocess.PIPE)
        try:
            assert attacker.stdout is not None and attacker.stdout.readline() == b"subscribed\n"
            with cluster.client() as client:

                def floods() -> int:
                    return int(client.status()["counters"].get("subscription_floods", 0))

                deadline = time.monotonic() + 60
                while client.status()["counters"].get("subscriptions_refused", 0) < 6000 - 1024 or floods() < 2:
                    assert time.monotonic() < deadline, client.status()["counters"]
                    time.sleep(0.2)
                seen = floods()
                while floods() < seen + 4:  # the attacker subscribes again after each re-open
                    assert time.monotonic() < deadline, client.status()["counters"]
                    time.sleep(0.2)
                results = [client.submit("echo", i) for i in range(50)]
                assert [f.result(timeout=60) for f in results] == list(range(50))
                assert client.status()["counters"].get("satellites_lost", 0) == 0
        finally:
            attacker.kill()
            attacker.wait(10)


KEYED_ATTACKER = """
import sys, time, zmq
from orchester.security.keys import load_keypair, load_public
ctx = zmq.Context()
many = ctx.socket(zmq.SUB)
many.curve_publickey, many.curve_secretkey = load_keypair(sys.argv[2])
many.curve_serverkey = load_public(sys.argv[3])
many.sndhwm = 0
many.connect(sys.argv[1])
for i in range(3000):
    many.setsockopt(zmq.SUBSCRIBE, b"t%08d" % i)
print("subscribed", flush=True)
time.sleep(600)
"""


def test_a_key_subscribing_beyond_its_share_is_shut_out_of_the_events(secured: Any) -> None:  # noqa: F811
    """With keys, subscriptions count against the key: past ``--max-subscriptions`` it is muted."""
    cluster, keys = secured
    with keys.client(cluster.endpoint, "alice") as alice:
        stream = alice.subscribe(["task:"])
        attacker = subprocess.Popen([sys.executable, "-c", KEYED_ATTACKER, cluster.pub_endpoint,
                                     str(keys.secrets["bob"]), str(keys.server_public)], stdout=subprocess.PIPE,
                                    env={**os.environ, **TEST_ENV})
        try:
            assert attacker.stdout is not None and attacker.stdout.readline() == b"subscribed\n"
            with Client(cluster.endpoint) as ops:
                deadline = time.monotonic() + 30
                while ops.status()["counters"].get("subscribers_muted", 0) < 1:
                    assert time.monotonic() < deadline, ops.status()["counters"]
                    time.sleep(0.2)
                settle = time.monotonic() + 1.5  # alice's stream reconnects to the re-opened event socket and
                while time.monotonic() < settle:  # subscribes again as it is read (libzmq acts on a socket's call)
                    stream.recv(timeout=0.1)
                fut = alice.submit("echo", "seen")
                assert fut.result(timeout=30) == "seen"
                seen = []
                deadline = time.monotonic() + 15
                while not any(e.data.get("id") == fut.task_id for e in seen) and time.monotonic() < deadline:
                    ev = stream.recv(timeout=0.5)
                    if ev is not None:
                        seen.append(ev)
                assert any(e.data.get("id") == fut.task_id for e in seen)
                assert ops.status()["counters"]["subscribers_muted"] == 1  # it did not get back in
        finally:
            attacker.kill()
            attacker.wait(10)
            stream.close()


# ------------------------------------------------------------------ finding 6
def test_table_walking_requests_are_rate_limited_per_caller(socket: Any) -> None:
    with LocalCluster(satellites=0, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR",
                      serve_args=["--request-rate", "20"]) as cluster:
        s = dealer(socket, cluster.endpoint)
        for rid in range(200):
            s.send_multipart([P.SIGNATURE, P.STATUS, pack({"rid": rid})])
        codes: list[str] = []
        deadline = time.monotonic() + 30
        while len(codes) < 200 and time.monotonic() < deadline:
            if s.poll(500):
                frames = s.recv_multipart()
                codes.append("ok" if frames[1] == P.REPLY else unpack(frames[2])["code"])
        assert len(codes) == 200 and codes.count(P.E_BUSY) >= 150 and codes.count("ok") >= 20
        other = dealer(socket, cluster.endpoint)  # another caller has its own budget
        assert status(other)["uptime"] >= 0


# ------------------------------------------------------------------ finding 7
def test_headers_and_ids_count_against_the_client_byte_limit(socket: Any) -> None:
    with LocalCluster(satellites=0, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR",
                      serve_args=["--max-client-bytes", str(1 << 20)]) as cluster:
        s = dealer(socket, cluster.endpoint)
        accepted = 0
        for i in range(40):
            hdr = {"id": f"h{i}", "k": "echo", "c": "msgpack", "pad": "x" * 60_000}
            s.send_multipart([P.SIGNATURE, P.SUBMIT, pack(hdr), b"\xc0"])
            assert s.poll(10_000)
            frames = s.recv_multipart()
            if frames[1] == P.ACK:
                accepted += 1
            else:
                assert unpack(frames[2])["code"] == P.E_LIMIT
        assert 10 <= accepted <= 17  # 1 MiB of 60 KB headers, not 40 of them


def test_a_connection_that_does_not_read_holds_at_most_its_unread_byte_cap(socket: Any) -> None:
    """Results wait in the store once a connection has ``--max-unread-bytes`` it has not acknowledged."""
    with LocalCluster(satellites=1, workers=2, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR",
                      serve_args=["--max-unread-bytes", str(4 << 20)]) as cluster:
        s = dealer(socket, cluster.endpoint)
        blob = b"x" * (1 << 20)
        for i in range(12):
            s.send_multipart([P.SIGNATURE, P.SUBMIT, pack({"id": f"big{i}", "k": "echo", "c": "msgpack"}),
                              *body(blob)])
        with cluster.client() as client:
            deadline = time.monotonic() + 60
            while client.status()["tasks"].get("done", 0) < 12:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.status()["counters"]["results_waiting"] >= 8
        results = []
        while s.poll(1000):
            frames = s.recv_multipart()
            if frames[1] == P.RESULT:
                results.append(unpack(frames[2])["id"])
        assert 1 <= len(results) <= 4  # at most 4 MiB sent that it did not say it read
        deadline = time.monotonic() + 30
        while len(results) < 12 and time.monotonic() < deadline:
            s.send_multipart([P.SIGNATURE, P.HEARTBEAT, pack({"rx": len(results)})])  # what a Client does
            while s.poll(300):
                frames = s.recv_multipart()
                if frames[1] == P.RESULT:
                    results.append(unpack(frames[2])["id"])
        assert sorted(results) == sorted(f"big{i}" for i in range(12))


# ------------------------------------------------------------------ finding 8
def test_failing_tasks_do_not_drain_the_fleet() -> None:
    with LocalCluster(satellites=2, workers=1, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR") as cluster, \
            cluster.client() as client:
        futures = [client.submit("fail", "boom") for _ in range(20)]
        for f in futures:
            with pytest.raises(TaskFailed):
                f.result(timeout=60)
        states = {s["id"]: s["state"] for s in client.status()["satellites"]}
        assert set(states.values()) <= {"idle", "busy"}, states
        assert client.submit("echo", "served").result(timeout=30) == "served"


# ------------------------------------------------------------------ finding 9
def test_task_ids_are_random_and_not_predictable() -> None:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR") as cluster, \
            cluster.client() as client:
        ids = [client.submit("echo", i).task_id for i in range(20)]
        assert len(set(ids)) == 20 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


# ------------------------------------------------------------------ finding 10
def test_a_satellite_that_takes_tasks_and_never_runs_them_loses_them(socket: Any) -> None:
    with LocalCluster(satellites=0, workers=1, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR",
                      serve_args=["--dispatch-timeout", "1", "--retry-backoff", "0"]) as cluster:
        hole = dealer(socket, cluster.endpoint)
        cmd, hdr = ask(hole, P.REGISTER, {"sid": "hole", "slots": 1_000_000, "kinds": ["echo"]})
        assert cmd == P.WELCOME
        with cluster.client() as client:
            sat = client.status()["satellites"][0]
            assert sat["slots"] == 1024
            futures = [client.submit("echo", i) for i in range(40)]
            cluster.add_satellite("real")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(f.done() for f in futures):
                if hole.poll(100):  # answer heartbeats so it is never lost, run nothing
                    frames = hole.recv_multipart()
                    if frames[1] == P.HEARTBEAT:
                        hole.send_multipart([P.SIGNATURE, P.HEARTBEAT, pack({"sid": "hole"})])
            assert [f.result(timeout=1) for f in futures] == list(range(40))


def test_a_satellite_key_offers_only_the_kinds_its_file_allows(secured: Any, socket: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    cluster, keys = secured
    public, secret = generate_keys("echoer", tmp_path / "echoer", ["satellite"], kinds=["echo"])
    (keys.authorized / public.name).write_bytes(public.read_bytes())
    keys.secrets["echoer"] = secret
    cluster.orchestrator.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    narrow = dealer(socket, cluster.endpoint, keys, "echoer")
    assert ask(narrow, P.REGISTER, {"sid": "narrow", "slots": 1, "kinds": ["echo", "genx.fit"]})[0] == P.WELCOME
    other = dealer(socket, cluster.endpoint, keys, "echoer")
    cmd, hdr = ask(other, P.REGISTER, {"sid": "narrow2", "slots": 1, "kinds": ["genx.fit"]})
    assert cmd == P.ERROR and hdr["code"] == P.E_FORBIDDEN
    with Client(cluster.endpoint) as ops:
        kinds = {s["id"]: s["kinds"] for s in ops.status()["satellites"]}
        assert kinds["narrow"] == ["echo"] and "narrow2" not in kinds


# ------------------------------------------------------------------ finding 11
def test_progress_for_a_task_the_satellite_does_not_run_is_not_published(socket: Any) -> None:
    with LocalCluster(satellites=1, workers=1, heartbeat_interval=HB, env=TEST_ENV, log_level="ERROR") as cluster:
        sub = socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"progress:")
        sub.connect(cluster.pub_endpoint)
        time.sleep(0.5)
        with cluster.client() as client:
            fut = client.submit("sleep", 2.0)
            time.sleep(0.5)
            forger = dealer(socket, cluster.endpoint)
            assert ask(forger, P.REGISTER, {"sid": "forger", "slots": 1, "kinds": ["nothing"]})[0] == P.WELCOME
            for _ in range(20):
                forger.send_multipart([P.SIGNATURE, P.PROGRESS, pack({"id": fut.task_id, "a": 1, "fom": "boom",
                                                                      "msg": "\x1b[2J[bold red]x"})])
            fut.result(timeout=30)
            assert sub.poll(500) == 0
            assert client.status()["counters"]["progress_refused"] >= 20


# ------------------------------------------------------------------ finding 12
def test_revocation_ends_subscriptions_work_and_deliveries(secured: Any, socket: Any) -> None:  # noqa: F811
    cluster, keys = secured
    sub = socket(zmq.SUB)
    sub.curve_publickey, sub.curve_secretkey = load_keypair(keys.secrets["bob"])
    sub.curve_serverkey = load_public(keys.server_public)
    sub.setsockopt(zmq.SUBSCRIBE, b"task:")
    sub.connect(cluster.pub_endpoint)
    with keys.client(cluster.endpoint, "bob") as bob, Client(cluster.endpoint) as ops:
        queued = bob.submit("echo", "never", tags=["nobody-has-this"])
        time.sleep(0.5)
        ops.submit("echo", 1).result(timeout=30)
        assert sub.poll(5000)  # bob sees events while authorised
        (keys.authorized / "bob.key").unlink()
        cluster.orchestrator.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while ops.show(queued.task_id)["state"] != "cancelled":  # its queued task ends
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(TimeoutError):  # and nothing reaches a connection of the revoked key
            queued.result(timeout=2)
        while sub.poll(100):
            sub.recv_multipart()  # what was on its way before the revocation
        for i in range(5):
            ops.submit("echo", i).result(timeout=30)
        assert sub.poll(1500) == 0  # nothing after it
        assert ops.status()["counters"]["revoked_tasks"] == 1


# ------------------------------------------------------------------ finding 14
def test_peer_errors_cannot_flood_or_forge_the_log(tmp_path: Path, socket: Any) -> None:
    log = tmp_path / "serve.log"
    efile = tmp_path / "endpoints.json"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchester", "serve", "--bind", "tcp://127.0.0.1:*",
                                 "--pub", "tcp://127.0.0.1:*", "--endpoint-file", str(efile)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **TEST_ENV})
        try:
            deadline = time.monotonic() + 30
            while not efile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            import json

            endpoint = json.loads(efile.read_text())["bind"][0]
            s = dealer(socket, endpoint)
            for _ in range(2000):
                s.send_multipart([P.SIGNATURE, P.ERROR, pack({"code": "x", "msg": "a\nFORGED orchester: line" * 50})])
            assert status(s)["counters"]["peer_errors"] == 2000
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    text = log.read_text()
    assert log.stat().st_size < 200_000
    assert not any(line.startswith("FORGED") for line in text.splitlines())
