"""The uplink shared by Client, AsyncClient and Satellite: its failover rule on a fake clock, its
endpoint list, and the sockets it makes (on loopback, closed by the test that made them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from orchester.client.uplink import PATIENCE_JITTER, Failover, Uplink, resolve_endpoint
from orchester.security.keys import generate_keys

A, B = "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"
HB = 1.0


def pair(**kw: Any) -> Uplink[zmq.Socket[Any]]:
    """An uplink to two servers (a binary-star pair), heartbeats every second, liveness 3."""
    up: Uplink[zmq.Socket[Any]] = Uplink([A, B], heartbeat_interval=HB, liveness=3, **kw)
    up.restart(100.0)
    return up


# ------------------------------------------------------------------ the failover rule


def test_a_silence_while_waiting_moves_to_the_next_endpoint_with_a_vote() -> None:
    up = pair()
    assert up.current == A and up.silent_after == 3.0 and 3.0 <= up.patience <= 3.75
    assert up.check(102.0, waiting=True) is None
    assert up.check(103.0, waiting=True) is None  # exactly liveness × interval: not yet
    t = 100.0 + up.patience + 0.1
    move = up.check(t, waiting=True)
    assert move == Failover(B, vote=True, silent_for=pytest.approx(t - 100.0)) and move.reason == "silent"
    assert up.current == B and up.index == 1
    assert up.last_heard == up.last_sent == t  # the new server's silence counts from the move
    assert up.check(t + 3.0, waiting=True) is None
    again = up.check(t + up.patience + 0.1, waiting=True)
    assert again is not None and again.endpoint == A  # and back to the first: it may be active again


def test_a_silence_counts_only_while_waiting_for_an_answer() -> None:
    up = pair()
    assert up.check(150.0, waiting=False) is None  # nothing asked: nothing expected
    assert up.check(152.0, waiting=True) is None  # the silence counts from the last idle check
    assert up.check(150.0 + up.patience + 0.1, waiting=True) is not None


def test_peers_that_connected_together_do_not_give_up_together() -> None:
    """Each (re)connection draws its patience: from liveness × interval to a quarter more."""
    draws = set()
    for _ in range(200):
        up = pair()
        assert 3.0 <= up.patience <= 3.75
        draws.add(round(up.patience, 3))
    assert len(draws) > 50


def test_hearing_from_the_orchestrator_resets_the_silence() -> None:
    up = pair()
    for t in (102.0, 104.0, 106.0, 108.0):
        up.heard(t)
        assert up.check(t + 2.9, waiting=True) is None
    assert up.current == A


def test_one_endpoint_a_client_waits_a_satellite_reconnects_to_it() -> None:
    client: Uplink[zmq.Socket[Any]] = Uplink(A, heartbeat_interval=HB, liveness=3)
    client.restart(0.0)
    assert not client.alternatives
    assert client.check(60.0, waiting=True) is None and client.current == A  # ZeroMQ reconnects by itself
    sat: Uplink[zmq.Socket[Any]] = Uplink(A, who="satellite", heartbeat_interval=HB, liveness=3,
                                          reconnect_alone=True)
    sat.restart(0.0)
    assert sat.check(sat.patience - 0.05) is None
    t = sat.patience + 0.1  # drawn per connection: from liveness × interval to a quarter more
    move = sat.check(t)
    assert move == Failover(A, vote=True, silent_for=t)  # a new socket to the same one: it registers again


def test_a_redirect_moves_without_a_vote_and_two_refusals_do_not_ping_pong() -> None:
    up = pair()
    up.redirected()
    move = up.check(100.1, waiting=True)
    assert move == Failover(B, vote=False, silent_for=0.0) and move.reason == "redirect"
    up.redirected()  # the other one refuses too (neither is active yet)
    assert up.check(100.3, waiting=True) is None  # within half a heartbeat of the last switch: wait
    assert up.current == B
    move = up.check(100.6, waiting=False)  # the redirect waits, whatever is pending
    assert move is not None and move.endpoint == A
    assert up.check(101.5, waiting=True) is None  # one redirect, one move


def test_a_redirect_with_a_single_endpoint_is_ignored() -> None:
    up: Uplink[zmq.Socket[Any]] = Uplink(A)
    up.restart(0.0)
    up.redirected()
    assert up.check(10.0, waiting=False) is None and up.index == 0


def test_heartbeats_are_due_one_interval_after_the_last_while_waiting() -> None:
    up = pair()
    assert not up.heartbeat_due(100.5)
    assert up.heartbeat_due(101.0)
    assert not up.heartbeat_due(101.0, waiting=False)
    up.sent(101.0)
    assert not up.heartbeat_due(101.9) and up.heartbeat_due(102.0)


# ------------------------------------------------------------------ endpoints


def test_endpoints_are_checked_and_read_from_endpoint_files(tmp_path: Path) -> None:
    efile = tmp_path / "endpoints.json"
    efile.write_text(json.dumps({"bind": ["tcp://127.0.0.1:7001"], "pub": ["tcp://127.0.0.1:7002"]}))
    up: Uplink[zmq.Socket[Any]] = Uplink([f"@{efile}", B])
    assert up.endpoints == ["tcp://127.0.0.1:7001", B] and up.alternatives
    assert resolve_endpoint(A) == A
    with pytest.raises(ValueError, match="cannot read an endpoint from"):
        Uplink(f"@{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text('{"bind": []}')
    with pytest.raises(ValueError, match="cannot read an endpoint from"):
        Uplink(f"@{tmp_path / 'bad.json'}")
    with pytest.raises(ValueError, match="is not a ZeroMQ endpoint"):
        Uplink([A, "localhost:5555"])
    with pytest.raises(ValueError, match="a satellite needs at least one orchestrator endpoint"):
        Uplink([], who="satellite")


def test_a_satellite_reads_an_endpoint_file_too(tmp_path: Path) -> None:
    from satellites.satellite import Satellite

    efile = tmp_path / "endpoints.json"
    efile.write_text(json.dumps({"bind": ["tcp://127.0.0.1:7001"]}))
    assert Satellite([f"@{efile}", B]).endpoints == ["tcp://127.0.0.1:7001", B]


def test_the_refusal_names_the_endpoint_and_who_was_refused() -> None:
    up: Uplink[zmq.Socket[Any]] = Uplink([A, B])
    assert up.refusal() == f"the orchestrator at {A} refused this client's CurveZMQ key (not authorised)"
    sat: Uplink[zmq.Socket[Any]] = Uplink([A, B], who="satellite")
    sat.index = 1
    assert sat.refusal() == (f"the orchestrator at {B} refused this satellite's CurveZMQ key: it is not "
                             "(or no longer) in its authorised keys")


# ------------------------------------------------------------------ sockets


@pytest.fixture
def keys(tmp_path: Path) -> tuple[str, str]:
    """A client's secret key file and a server's public key file."""
    _, secret = generate_keys("me", tmp_path / "own")
    server_public, _ = generate_keys("server", tmp_path / "server", server=True)
    return str(secret), str(server_public)


@pytest.fixture
def router(socket: Any) -> Iterator[tuple[zmq.Socket[Any], str]]:
    """A plain ROUTER on an OS-chosen loopback port (closed by the socket fixture)."""
    r = socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    yield r, f"tcp://127.0.0.1:{port}"


def test_open_makes_a_dealer_with_the_options_and_reaches_the_current_endpoint(
        ctx: zmq.Context[Any], router: tuple[zmq.Socket[Any], str]) -> None:
    r, endpoint = router
    up: Uplink[zmq.Socket[Any]] = Uplink([endpoint, B], who="satellite", identity="s:sat-1:", hwm=10_000,
                                         max_message=1 << 20)
    try:
        s = up.open(ctx)
        assert up.sock is s and up.monitor is None  # no keys: no monitor
        assert s.type == zmq.DEALER and s.linger == 0
        assert s.sndhwm == s.rcvhwm == 10_000 and s.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
        assert s.routing_id.startswith(b"s:sat-1:") and len(s.routing_id) == len(b"s:sat-1:") + 32
        s.send_multipart([b"hello"])
        assert r.poll(5000)
        ident, body = r.recv_multipart()
        assert ident == s.routing_id and body == b"hello"
        second = up.open(ctx)  # a new connection: the old socket is closed, a new random id
        assert s.closed and up.sock is second and second.routing_id != ident
    finally:
        up.close()
    assert up.sock is None


def test_with_keys_the_socket_is_a_curve_client_with_a_monitor(ctx: zmq.Context[Any], keys: tuple[str, str],
                                                               router: tuple[zmq.Socket[Any], str]) -> None:
    _, endpoint = router
    up: Uplink[zmq.Socket[Any]] = Uplink(endpoint, curve_secret=keys[0], server_key=keys[1])
    assert up.curve is not None
    try:
        s = up.open(ctx)
        assert s.mechanism == zmq.CURVE and not s.curve_server
        monitor = up.monitor
        assert monitor is not None and monitor.type == zmq.PAIR
        up.open(ctx)
        assert monitor.closed and up.monitor is not None and up.monitor is not monitor  # one per socket
        monitor = up.monitor
    finally:
        up.close()
    assert monitor.closed and up.monitor is None


def test_on_an_asyncio_context_it_makes_asyncio_sockets(keys: tuple[str, str],
                                                        router: tuple[zmq.Socket[Any], str]) -> None:
    _, endpoint = router
    actx = zmq.asyncio.Context()
    up: Uplink[zmq.asyncio.Socket] = Uplink(endpoint, curve_secret=keys[0], server_key=keys[1])
    try:
        s = up.open(actx)
        assert isinstance(s, zmq.asyncio.Socket) and isinstance(up.monitor, zmq.asyncio.Socket)
    finally:
        up.close()
        actx.term()


def test_rounds_of_silence_back_off_and_an_answer_ends_the_back_off() -> None:
    """The first round of the endpoints at the usual patience; each further round in silence waits twice as
    long, at most 8 times; a message from the orchestrator brings the usual patience back."""
    up = pair()
    t, waits, factors = 100.0, [], []
    for _ in range(10):
        waits.append(up.patience / up.silent_after)
        factors.append(up.backoff)
        t += up.patience + 0.01
        move = up.check(t, waiting=True)
        assert move is not None and move.vote
    assert factors == [1, 1, 2, 2, 4, 4, 8, 8, 8, 8], waits
    assert all(1.0 <= w / f <= 1.0 + PATIENCE_JITTER for w, f in zip(waits, factors, strict=True))  # jittered
    assert up.longest_silence == pytest.approx(up.silent_after * 8 * (1.0 + PATIENCE_JITTER))
    up.heard(t + 1.0)
    assert up.backoff == 1 and 3.0 <= up.patience <= 3.75
    assert up.check(t + 1.0 + up.patience + 0.01, waiting=True) is not None  # noticed as soon as before


def test_a_satellite_alone_backs_off_from_its_second_silence() -> None:
    sat: Uplink[zmq.Socket[Any]] = Uplink(A, who="satellite", heartbeat_interval=HB, liveness=3,
                                          reconnect_alone=True)
    sat.restart(0.0)
    t, factors = 0.0, []
    for _ in range(5):
        factors.append(sat.backoff)
        assert sat.backoff <= sat.patience / sat.silent_after <= sat.backoff * (1.0 + PATIENCE_JITTER)
        t += sat.patience + 0.01
        assert sat.check(t) is not None and sat.current == A
    assert factors == [1, 2, 4, 8, 8]


def test_a_peer_that_waits_for_nothing_ends_its_back_off() -> None:
    up = pair()
    t = 100.0
    for _ in range(4):
        t += up.patience + 0.01
        assert up.check(t, waiting=True) is not None
    assert up.backoff == 4
    assert up.check(t + 1.0, waiting=False) is None  # idle: its next request is patient as a first one
    assert up.backoff == 1 and 3.0 <= up.patience <= 3.75
