"""CurveZMQ on a real orchester process: who gets in, what each role may do, revocation on SIGHUP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import TEST_ENV, Unbatched

from orchester import Client, LocalCluster
from orchester.errors import RemoteError, TaskFailed
from orchester.security.keys import generate_keys, load_keypair, load_public
from serializers import pack, unpack
from serializers import protocol as P

HB = 0.2


class Keys:
    """A server key pair, an authorised-keys directory and the clients' key pairs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.authorized = root / "authorized"
        self.authorized.mkdir()
        self.server_public, self.server_secret = generate_keys("server", root / "server", ["admin"])
        self.secrets: dict[str, Path] = {}
        for name, roles in (("ops", ["submit", "admin"]), ("alice", ["submit"]), ("bob", ["submit"]),
                            ("sat", ["satellite"]), ("mallory", ["submit", "admin", "satellite"])):
            public, secret = generate_keys(name, root / "own", roles)
            self.secrets[name] = secret
            if name != "mallory":  # never authorised
                (self.authorized / public.name).write_bytes(public.read_bytes())

    def env(self, name: str) -> dict[str, str]:
        return {"ORCHESTER_CURVE_SECRET": str(self.secrets[name]), "ORCHESTER_SERVER_KEY": str(self.server_public)}

    def client(self, endpoint: str, name: str, **kw: Any) -> Client:
        return Client(endpoint, curve_secret=str(self.secrets[name]), server_key=str(self.server_public), **kw)


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalCluster, Keys]]:
    """An orchestrator requiring keys, one authorised satellite; this process talks as 'ops'."""
    keys = Keys(tmp_path)
    for k, v in keys.env("ops").items():
        monkeypatch.setenv(k, v)
    cluster = LocalCluster(satellites=0, workers=1, tasks=["orchester_test_tasks"], heartbeat_interval=HB,
                           env=TEST_ENV, log_level="WARNING",
                           serve_args=["--curve-secret", str(keys.server_secret),
                                       "--authorized-keys", str(keys.authorized)])
    with cluster:
        cluster.add_satellite("good", env=keys.env("sat"))
        cluster.wait_for_satellites(1)
        yield cluster, keys


def test_an_authorised_client_and_satellite_work_and_tasks_carry_the_owner(secured: Any) -> None:
    cluster, keys = secured
    with keys.client(cluster.endpoint, "alice") as alice:
        stream = alice.subscribe(["task:"])
        time.sleep(0.3)  # let the subscription reach the orchestrator
        fut = alice.submit("echo", "hello")
        assert fut.result(timeout=30) == "hello"
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not any(e.get("state") == "done" for e in seen) and time.monotonic() < deadline:
            ev = stream.recv(timeout=0.5)
            if ev is not None:
                seen.append(ev.data)
        stream.close()
        done = next(e for e in seen if e.get("state") == "done")
        assert done["by"] == "alice" and done["ran_by"] == "sat"
        shown = alice.show(fut.task_id)
        assert shown["owner"] == "alice"
        assert [r["owner"] for r in alice.history(ids=[fut.task_id])] == ["alice"]
        st = alice.status()
        assert [s["user"] for s in st["satellites"]] == ["sat"]


def test_unauthorised_satellite_and_client_are_refused_and_see_nothing(secured: Any, socket: Any) -> None:
    cluster, keys = secured
    bad_sat = cluster.add_satellite("bad", env=keys.env("mallory"))
    sub = socket(zmq.SUB)  # mallory listens to the event stream (the fixture closes every socket)
    public, secret = load_keypair(keys.secrets["mallory"])
    sub.curve_publickey, sub.curve_secretkey = public, secret
    sub.curve_serverkey = load_public(keys.server_public)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(cluster.pub_endpoint)
    plain = socket(zmq.SUB)  # and so does someone without any key
    plain.setsockopt(zmq.SUBSCRIBE, b"")
    plain.connect(cluster.pub_endpoint)
    with keys.client(cluster.endpoint, "mallory") as mallory:
        with pytest.raises(RemoteError) as err:
            mallory.submit("echo", 1).result(timeout=30)
        assert err.value.code == P.E_FORBIDDEN and "refused" in err.value.message
    anonymous = socket(zmq.DEALER)  # no key at all: its handshake fails, nothing comes back
    anonymous.connect(cluster.endpoint)
    anonymous.send_multipart([P.SIGNATURE, P.STATUS, pack({"rid": 1})], zmq.NOBLOCK)
    assert anonymous.poll(1000) == 0
    with Client(cluster.endpoint) as ops:  # the fixture's key: traffic flows meanwhile
        assert [f.result(timeout=30) for f in [ops.submit("echo", i) for i in range(20)]] == list(range(20))
        assert [s["id"] for s in ops.status()["satellites"]] == ["good"]  # 'bad' never registered
    assert sub.poll(500) == 0 and plain.poll(100) == 0  # neither saw a single event
    assert bad_sat.poll() is None  # the refused satellite keeps running (and retrying), harmlessly


def test_roles_are_enforced(secured: Any) -> None:
    cluster, keys = secured
    with keys.client(cluster.endpoint, "alice") as alice, keys.client(cluster.endpoint, "bob") as bob:
        with pytest.raises(RemoteError) as err:
            alice.set_strategy("round_robin")
        assert err.value.code == P.E_FORBIDDEN and "admin" in err.value.message
        fut = alice.submit("sleep", 30)  # alice's task: bob may not cancel it, ops may
        assert fut.accepted.wait(30)  # known to the orchestrator before bob asks (another connection)
        with pytest.raises(RemoteError, match="belongs to another key"):
            bob.cancel(fut.task_id)
        with pytest.raises(RemoteError, match="admin"):
            alice.drain("good")
        with Client(cluster.endpoint) as ops:
            assert ops.set_strategy("round_robin")["strategy"] == "round_robin"
            assert ops.cancel(fut.task_id)["cancelled"] is True
    ctx = zmq.Context()
    try:  # a submit-only key cannot pose as a satellite
        s = ctx.socket(zmq.DEALER)
        s = Unbatched(s)  # (a BATCH read message by message)
        s.linger = 0
        public, secret = load_keypair(keys.secrets["alice"])
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = load_public(keys.server_public)
        s.connect(cluster.endpoint)
        s.send_multipart([P.SIGNATURE, P.REGISTER, pack({"sid": "fake", "slots": 4, "kinds": ["echo"]})])
        assert s.poll(10_000)
        reply = s.recv_multipart()
        assert reply[1] == P.ERROR and unpack(reply[2])["code"] == P.E_FORBIDDEN
        s.close(0)
    finally:
        ctx.term()


def test_a_revoked_key_is_refused_after_sighup(secured: Any) -> None:
    cluster, keys = secured
    with keys.client(cluster.endpoint, "bob") as bob:
        assert bob.submit("echo", 1).result(timeout=30) == 1
        (keys.authorized / "bob.key").unlink()
        assert cluster.orchestrator is not None
        cluster.orchestrator.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:  # the signal is handled within a poll interval
            try:
                bob.submit("echo", 2).result(timeout=10)
            except RemoteError as exc:
                assert exc.code == P.E_FORBIDDEN and "no longer" in exc.message
                break
            assert time.monotonic() < deadline, "bob is still allowed after SIGHUP"
            time.sleep(0.1)
    with keys.client(cluster.endpoint, "bob") as again:  # a new connection: refused at the handshake
        with pytest.raises(RemoteError, match="refused"):
            again.submit("echo", 3).result(timeout=30)
    with keys.client(cluster.endpoint, "alice") as alice:  # the others are unaffected
        assert alice.submit("echo", 4).result(timeout=30) == 4


def test_non_loopback_binds_need_keys_or_insecure(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "orchester", "serve", "--bind", "tcp://0.0.0.0:0", "--pub", "tcp://127.0.0.1:*",
           "--endpoint-file", str(tmp_path / "ep.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--insecure" in r.stderr and "0.0.0.0" in r.stderr
    proc = subprocess.Popen([*cmd[:5], "tcp://0.0.0.0:*", *cmd[6:], "--insecure"], stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ep.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "without authentication" in err


def test_a_binary_star_pair_shares_the_server_key_and_fails_over_with_keys(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from orchester.local.pair import LocalPair

    keys = Keys(tmp_path)
    for k, v in keys.env("ops").items():
        monkeypatch.setenv(k, v)
    with LocalPair(satellites=0, workers=1, heartbeat_interval=HB, ha_heartbeat=HB, env=TEST_ENV,
                   log_level="WARNING", serve_args=["--curve-secret", str(keys.server_secret),
                                                    "--authorized-keys", str(keys.authorized)]) as pair:
        pair.wait_state("backup", "passive")  # the peer link itself is CurveZMQ, with the shared key
        pair.add_satellite("good", env=keys.env("sat"))
        pair.wait_for_satellites(1)
        ctx = zmq.Context()
        spy = ctx.socket(zmq.SUB)  # an authorised satellite key on the peer link: it carries every payload
        spy.linger = 0
        public, secret = load_keypair(keys.secrets["sat"])
        spy.curve_publickey, spy.curve_secretkey = public, secret
        spy.curve_serverkey = load_public(keys.server_public)
        spy.setsockopt(zmq.SUBSCRIBE, b"")
        spy.connect(pair.state_endpoints["primary"])
        with pair.client(heartbeat_interval=HB, liveness=3) as ops:
            first = [ops.submit("echo", i) for i in range(20)]
            assert [f.result(timeout=30) for f in first] == list(range(20))
            assert spy.poll(500) == 0  # only the other server's key gets in there
            spy.close(0)
            ctx.term()
            pair.kill("primary")
            assert ops.submit("echo", "after").result(timeout=60) == "after"
            assert ops.show(first[0].task_id)["owner"] == "ops"  # replicated with its owner


def test_a_name_given_a_new_key_no_longer_covers_the_old_key(secured: Any) -> None:
    cluster, keys = secured
    with keys.client(cluster.endpoint, "bob") as bob:
        assert bob.submit("echo", 1).result(timeout=30) == 1
        new_public, _ = generate_keys("bob", keys.root / "new", ["submit"])  # bob's key was stolen: replaced
        (keys.authorized / "bob.key").write_bytes(new_public.read_bytes())
        assert cluster.orchestrator is not None
        cluster.orchestrator.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:  # the old key's connection is refused from the reload on, although the name stays
            try:
                bob.submit("echo", 2).result(timeout=10)
            except RemoteError as exc:
                assert exc.code == P.E_FORBIDDEN
                break
            assert time.monotonic() < deadline, "the old key still works"
            time.sleep(0.1)


def test_another_keys_task_shows_its_transitions_without_their_reasons(secured: Any) -> None:
    """A failure's reason is its message: only the task's owner (or an admin) reads it, live or from history."""
    cluster, keys = secured
    with keys.client(cluster.endpoint, "alice") as alice, keys.client(cluster.endpoint, "bob") as bob:
        fut = alice.submit("sleep", 30, timeout=0.5)
        with pytest.raises(TaskFailed, match="timeout"):
            fut.result(timeout=30)
        own = alice.show(fut.task_id)
        assert own["state"] == "failed" and any(h["reason"] for h in own["history"])
        other = bob.show(fut.task_id)
        assert [h["state"] for h in other["history"]] == [h["state"] for h in own["history"]]
        assert all(h["reason"] is None for h in other["history"]) and "error" not in other
        (row,) = bob.history(ids=[fut.task_id], timeline=True)
        assert row["history"] and all(h["reason"] is None for h in row["history"])
        (row,) = alice.history(ids=[fut.task_id], timeline=True)
        assert any(h["reason"] for h in row["history"])
