"""orchester.security.auth: key files, the key ring, the ZAP handler over real loopback sockets, and the policy."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from orchester.security.auth import (
    ROLES,
    CurveAuthenticator,
    Identity,
    KeyRing,
    SecurityError,
    allowed,
    check_binds,
    generate_keys,
    is_loopback,
    load_keypair,
    load_public,
    secure_client,
    secure_server,
    user_of,
)

WAIT_MS = 5000  # an expected message arrives well within this
QUIET_MS = 1000  # a refused one has had this long to arrive and did not

SocketFactory = Callable[[int], zmq.Socket[Any]]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- key files -------------------------------------------------------------------------------


def test_generate_keys_round_trip(tmp_path: Path) -> None:
    pub, sec = generate_keys("alice", tmp_path / "new" / "keys", roles=["admin", "submit"])
    assert (pub, sec) == (tmp_path / "new/keys/alice.key", tmp_path / "new/keys/alice.key_secret")
    public, secret = zmq.auth.load_certificate(sec)
    assert zmq.auth.load_certificate(pub) == (public, None)
    assert secret is not None and zmq.curve_public(secret) == public
    assert load_keypair(sec) == (public, secret)
    assert load_public(pub) == load_public(sec) == public
    assert stat.S_IMODE(os.stat(sec).st_mode) == 0o600
    assert "secret-key" not in pub.read_text()
    assert "roles = submit,admin" in pub.read_text() and "roles = submit,admin" in sec.read_text()
    assert sorted(p.name for p in (tmp_path / "new/keys").iterdir()) == ["alice.key", "alice.key_secret"]


def test_generate_keys_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    pub, sec = generate_keys("bob", tmp_path)
    before = load_keypair(sec)
    with pytest.raises(FileExistsError, match="bob.key"):
        generate_keys("bob", tmp_path)
    assert load_keypair(sec) == before
    generate_keys("bob", tmp_path, roles="satellite", force=True)
    assert load_keypair(sec) != before
    assert KeyRing(tmp_path).by_name("bob") == Identity("bob", frozenset({"satellite"}))


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "a b", "x" * 65, "-dash"])
def test_generate_keys_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="simple file name"):
        generate_keys(name, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("roles", [["root"], ["submit", "superuser"], "submit,oops", [], ""])
def test_generate_keys_refuses_bad_roles(tmp_path: Path, roles: Any) -> None:
    with pytest.raises(ValueError, match="role"):
        generate_keys("carol", tmp_path, roles=roles)
    assert list(tmp_path.iterdir()) == []


def test_load_keypair_errors(tmp_path: Path) -> None:
    pub, sec = generate_keys("dave", tmp_path)
    with pytest.raises(SecurityError, match="no secret key"):
        load_keypair(pub)
    with pytest.raises(SecurityError, match="cannot read"):
        load_keypair(tmp_path / "missing.key_secret")
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("hello\n")
    with pytest.raises(ValueError, match="no public-key"):  # SecurityError is a ValueError
        load_keypair(garbage)
    short = tmp_path / "short.key_secret"
    short.write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    with pytest.raises(SecurityError, match="Z85"):
        load_keypair(short)
    swapped = tmp_path / "swapped.key_secret"
    other_public = load_public(generate_keys("erin", tmp_path)[0]).decode()
    swapped.write_text(sec.read_text().replace(load_public(sec).decode(), other_public))
    with pytest.raises(SecurityError, match="does not belong"):
        load_keypair(swapped)


# -- the key ring ----------------------------------------------------------------------------


def test_keyring_roles_defaults_and_bad_files(tmp_path: Path) -> None:
    generate_keys("sat1", tmp_path, roles=["satellite"])
    generate_keys("ops", tmp_path, roles=["submit", "admin"])
    zmq.auth.create_certificates(tmp_path, "plain")  # pyzmq's own: no roles in the public file
    (tmp_path / "garbage.key").write_text("not a key\n")
    bad_role = tmp_path / "root.key"
    bad_role.write_text((tmp_path / "ops.key").read_text().replace("submit,admin", "root"))
    ring = KeyRing(tmp_path)
    assert ring.names() == ["ops", "plain", "sat1"]
    assert ring.by_name("sat1") == Identity("sat1", frozenset({"satellite"}))
    assert ring.by_name("ops") == Identity("ops", frozenset({"submit", "admin"}))
    assert ring.by_name("plain") == Identity("plain", frozenset({"submit"}))
    assert ring.by_key(load_public(tmp_path / "ops.key")) == ring.by_name("ops")
    assert ring.by_key(zmq.curve_keypair()[0]) is None
    assert ring.by_name("garbage") is None and ring.by_name(None) is None
    assert len(ring.errors) == 2 and ring.errors[0].startswith("garbage.key") and "root" in ring.errors[1]


def test_keyring_reload_reports_changes_and_missing_dir(tmp_path: Path) -> None:
    generate_keys("a", tmp_path)
    generate_keys("b", tmp_path)
    ring = KeyRing(tmp_path)
    (tmp_path / "a.key").unlink()
    generate_keys("b", tmp_path, force=True)  # a new key under an old name: revoked and added
    generate_keys("c", tmp_path)
    assert ring.reload() == ({"b", "c"}, {"a", "b"})
    assert ring.reload() == (set(), set())
    shutil.rmtree(tmp_path)
    with pytest.raises(SecurityError, match="does not exist"):
        ring.reload()
    assert ring.names() == ["b", "c"]  # a failed reload keeps the previous keys
    with pytest.raises(SecurityError):
        KeyRing(tmp_path)


def test_keyring_lookups_while_another_thread_reloads(tmp_path: Path) -> None:
    ring_dir, spare = tmp_path / "ring", tmp_path / "spare"
    stable = load_public(generate_keys("stable", ring_dir)[0])
    extra = [generate_keys(f"k{i}", spare)[0] for i in range(10)]
    ring = KeyRing(ring_dir)
    done = threading.Event()

    def churn() -> None:
        for _ in range(5):
            for pub in extra:
                shutil.copy(pub, ring_dir)
            ring.reload()
            for pub in extra:
                (ring_dir / pub.name).unlink()
            ring.reload()
        done.set()

    t = threading.Thread(target=churn)
    t.start()
    try:
        lookups = misses = 0
        while not done.is_set() or lookups < 100:
            lookups += 1
            misses += ring.by_key(stable) is None or ring.by_name("stable") is None
            time.sleep(0)
        assert misses == 0
    finally:
        t.join(10)
    assert ring.names() == ["stable"]


# -- the ZAP handler over real sockets -------------------------------------------------------


@dataclass
class Bus:
    """A CURVE ROUTER on loopback behind a CurveAuthenticator."""

    router: zmq.Socket[Any]
    endpoint: str
    server_public: bytes
    ring: KeyRing
    auth: CurveAuthenticator
    keys: Path  # client key pairs (not authorised by themselves)
    authorized: Path


def authorize(bus: Bus, name: str, roles: Any = ("submit",)) -> Path:
    """Make a key pair for ``name``, authorise its public file, reload; return the secret file."""
    pub, sec = generate_keys(name, bus.keys, roles=roles)
    shutil.copy(pub, bus.authorized / pub.name)
    assert bus.ring.reload() == ({name}, set())
    return sec


def dealer(bus: Bus, socket: SocketFactory, secret_file: Path | None) -> zmq.Socket[Any]:
    """A DEALER connected to the bus, with the key pair in ``secret_file`` (plain if None)."""
    s = socket(zmq.DEALER)
    if secret_file is not None:
        secure_client(s, *load_keypair(secret_file), server_public=bus.server_public)
    s.connect(bus.endpoint)
    return s


def offer(sock: zmq.Socket[Any], *frames: bytes) -> bool:
    """Queue a message without blocking; False if the socket has no peer to queue it for.

    A DEALER whose key the server refused has no peer left (libzmq does not reconnect after
    an authentication failure), so a blocking send would wait forever.
    """
    try:
        sock.send_multipart(list(frames), zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def receive(sock: zmq.Socket[Any], timeout_ms: int) -> list[zmq.Frame] | None:
    """One multipart message (copy=False), or None if nothing came within ``timeout_ms``."""
    if not sock.poll(timeout_ms):
        return None
    return sock.recv_multipart(copy=False)


@pytest.fixture
def bus(ctx: zmq.Context[Any], tmp_path: Path) -> Iterator[Bus]:
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    server_public, server_secret = load_keypair(generate_keys("server", tmp_path / "server")[1])
    ring = KeyRing(authorized)
    auth = CurveAuthenticator(ring, ctx)
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    try:
        auth.start()
        secure_server(router, server_public, server_secret)
        router.bind("tcp://127.0.0.1:*")
        yield Bus(router, router.last_endpoint.decode(), server_public, ring, auth, tmp_path / "clients", authorized)
    finally:
        router.close(0)
        auth.stop()


def test_authorised_dealer_gets_through_with_its_name(bus: Bus, socket: SocketFactory) -> None:
    d = dealer(bus, socket, authorize(bus, "alice"))
    assert offer(d, b"hello", b"world")
    frames = receive(bus.router, WAIT_MS)
    assert frames is not None and [f.bytes for f in frames[1:]] == [b"hello", b"world"]
    assert [user_of(f) for f in frames] == ["alice"] * 3
    assert bus.auth.allowed == 1 and bus.auth.denied == 0 and bus.auth.running


def test_unknown_key_never_gets_through(bus: Bus, socket: SocketFactory) -> None:
    mallory = generate_keys("mallory", bus.keys)[1]  # a valid key pair, not authorised
    offer(dealer(bus, socket, mallory), b"let me in")
    assert receive(bus.router, QUIET_MS) is None
    assert wait_until(lambda: bus.auth.denied >= 1)
    assert bus.auth.allowed == 0


def test_plain_dealer_gets_nothing_through(bus: Bus, socket: SocketFactory) -> None:
    offer(dealer(bus, socket, None), b"no curve")
    assert receive(bus.router, QUIET_MS) is None
    assert bus.auth.allowed == 0


def test_reload_revokes_and_adds_without_restart(bus: Bus, socket: SocketFactory) -> None:
    alice = authorize(bus, "alice")
    old = dealer(bus, socket, alice)
    assert offer(old, b"before")
    frames = receive(bus.router, WAIT_MS)
    assert frames is not None and user_of(frames[-1]) == "alice"

    (bus.authorized / "alice.key").unlink()
    pub, bob = generate_keys("bob", bus.keys)
    shutil.copy(pub, bus.authorized)
    assert bus.ring.reload() == ({"bob"}, {"alice"})

    denied_before = bus.auth.denied
    offer(dealer(bus, socket, alice), b"revoked")
    assert receive(bus.router, QUIET_MS) is None
    assert wait_until(lambda: bus.auth.denied > denied_before)

    assert offer(dealer(bus, socket, bob), b"new key")
    frames = receive(bus.router, WAIT_MS)
    assert frames is not None and frames[-1].bytes == b"new key" and user_of(frames[-1]) == "bob"

    # A connection made before the reload stays up; per-message checks shut it out.
    assert offer(old, b"after")
    frames = receive(bus.router, WAIT_MS)
    assert frames is not None and user_of(frames[-1]) == "alice"
    assert not allowed(bus.ring.by_name(user_of(frames[-1])), "submit", secure=True)


def test_secure_server_fails_closed_without_an_authenticator(ctx: zmq.Context[Any], socket: SocketFactory,
                                                             tmp_path: Path) -> None:
    server_public, server_secret = zmq.curve_keypair()
    router = socket(zmq.ROUTER)
    secure_server(router, server_public, server_secret)
    router.bind("tcp://127.0.0.1:*")
    d = socket(zmq.DEALER)
    secure_client(d, *zmq.curve_keypair(), server_public=server_public)
    d.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    offer(d, b"anyone?")
    assert receive(router, QUIET_MS) is None


def test_one_authenticator_per_context(bus: Bus, ctx: zmq.Context[Any]) -> None:
    with pytest.raises(SecurityError, match="already runs"):
        CurveAuthenticator(bus.ring, ctx).start()
    assert bus.auth.running
    bus.auth.stop()
    bus.auth.stop()  # idempotent
    assert not bus.auth.running
    for _ in range(3):  # restarts at once, even while libzmq still releases the endpoint
        with CurveAuthenticator(bus.ring, ctx) as again:
            assert again.running


def test_user_of_is_none_without_authentication(socket: SocketFactory) -> None:
    a, b = socket(zmq.PAIR), socket(zmq.PAIR)
    a.bind("inproc://plain")
    b.connect("inproc://plain")
    assert offer(b, b"x")
    frames = receive(a, WAIT_MS)
    assert frames is not None and user_of(frames[0]) is None


# -- policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.1.2.3:*", True), ("tcp://localhost:5555", True),
    ("tcp://LOCALHOST:1", True), ("tcp://[::1]:5555", True), ("tcp://[::ffff:127.0.0.1]:5555", True),
    ("ipc:///tmp/orchester.sock", True), ("inproc://bus", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://[::]:5555", False),
    ("tcp://192.168.1.10:5555", False), ("tcp://head:5555", False), ("tcp://lo:5555", False),
    ("tcp://127.0.0.1;10.0.0.1:5555", False), ("ws://127.0.0.1:80", False), ("pgm://eth0;239.1.1.1:5555", False),
    ("127.0.0.1:5555", False), ("", False),
])
def test_is_loopback(endpoint: str, local: bool) -> None:
    assert is_loopback(endpoint) is local


def test_check_binds() -> None:
    local = ["tcp://127.0.0.1:*", "ipc:///tmp/x"]
    assert check_binds(local, secure=False, insecure=False) == []
    exposed = local + ["tcp://0.0.0.0:5555", "tcp://*:5556"]
    with pytest.raises(SecurityError, match="--insecure") as err:
        check_binds(exposed, secure=False, insecure=False)
    assert "tcp://0.0.0.0:5555, tcp://*:5556" in str(err.value) and "--curve-secret" in str(err.value)
    assert check_binds(exposed, secure=True, insecure=False) == ["tcp://0.0.0.0:5555", "tcp://*:5556"]
    assert check_binds(exposed, secure=False, insecure=True) == ["tcp://0.0.0.0:5555", "tcp://*:5556"]


SAT = Identity("sat", frozenset({"satellite"}))
OPS = Identity("ops", frozenset({"submit", "admin"}))


@pytest.mark.parametrize("identity, role, secure, expected", [
    (None, "admin", False, True), (SAT, "admin", False, True), (None, "satellite", False, True),
    (None, "submit", True, False), (SAT, "satellite", True, True), (SAT, "submit", True, False),
    (SAT, "admin", True, False), (OPS, "submit", True, True), (OPS, "admin", True, True),
    (OPS, "satellite", True, False), (Identity("none"), "submit", True, False),
])
def test_allowed(identity: Identity | None, role: str, secure: bool, expected: bool) -> None:
    assert allowed(identity, role, secure) is expected


def test_allowed_refuses_unknown_roles() -> None:
    assert ROLES == ("satellite", "submit", "admin", "pickle")
    for secure in (False, True):
        with pytest.raises(ValueError, match="unknown role"):
            allowed(OPS, "root", secure)
