"""CurveZMQ authentication with roles: key files, the authorised key ring and a ZAP handler.

Every peer holds a CURVE key pair; the orchestrator keeps a directory of authorised public
key files (``NAME.key``), each naming the roles its holder may play (:data:`ROLES`). A
:class:`CurveAuthenticator` answers libzmq's ZAP requests in a background thread: a peer
whose public key is in the :class:`KeyRing` completes its handshake, and every message it
sends then carries the key's *name* as its ``User-Id`` (:func:`user_of`). The broker asks
:func:`allowed` whether that name may do what the message asks::

    ring = KeyRing("authorized_keys")
    public, secret = load_keypair("server.key_secret")
    with CurveAuthenticator(ring, ctx):
        sock = ctx.socket(zmq.ROUTER)
        secure_server(sock, public, secret)
        sock.bind("tcp://0.0.0.0:5555")
        frames = sock.recv_multipart(copy=False)
        if not allowed(ring.by_name(user_of(frames[-1])), "submit", secure=True):
            ...  # answer with a structured error

The policy half (:func:`allowed`, :func:`is_loopback`, :func:`check_binds`) does no I/O and lives in
:mod:`orchester.security.roles`, which the pure core imports.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from orchester.logutil import warn_limited
from orchester.security.keys import (
    ZAP_DOMAIN,
    check_name,
    generate_keys,
    load_keypair,
    load_public,
    parse_kinds,
    parse_roles,
    read_cert,
)
from orchester.security.roles import DEFAULT_ROLES, ROLES, Identity, SecurityError, allowed, check_binds, is_loopback

log = logging.getLogger("orchester.security")

__all__ = ["DEFAULT_ROLES", "EVENTS_DOMAIN", "ROLES", "ZAP_DOMAIN", "CurveAuthenticator", "Identity", "KeyRing",
           "SecurityError", "allowed", "check_binds", "generate_keys", "is_loopback", "load_keypair",
           "load_public", "secure_client", "secure_server", "user_of"]


#: The ZAP domain of the binary-star link: only the servers' own key gets in (not the key ring:
#: what travels there is every task's payload and result).
PEER_DOMAIN = "orchester-peer"
PEER_IDENTITY = Identity("orchestrator", frozenset(ROLES))
#: The ZAP domain of the event stream: the key ring, less the keys muted for subscribing too much.
EVENTS_DOMAIN = "orchester-events"


# -- the authorised key ring -----------------------------------------------------------------



# -- the authorised key ring -----------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    by_key: dict[bytes, Identity]
    by_name: dict[str, tuple[bytes, Identity]]
    errors: tuple[str, ...]


def _scan(directory: Path) -> _Snapshot:
    if not directory.is_dir():
        raise SecurityError(f"authorised keys directory {directory} does not exist or is not a directory")
    by_key: dict[bytes, Identity] = {}
    by_name: dict[str, tuple[bytes, Identity]] = {}
    errors: list[str] = []
    for path in sorted(directory.glob("*.key")):
        try:
            check_name(path.stem)
            cert = read_cert(path)
            roles = parse_roles(cert.metadata["roles"]) if "roles" in cert.metadata else frozenset(DEFAULT_ROLES)
            kinds = parse_kinds(cert.metadata["kinds"]) if "kinds" in cert.metadata else None
            if cert.public in by_key:
                raise SecurityError(f"same public key as {by_key[cert.public].name}.key")
        except ValueError as e:  # SecurityError is one
            errors.append(f"{path.name}: {e}")
            log.warning("skipping authorised key file %s: %s", path, e)
            continue
        if cert.secret is not None:
            log.warning("authorised key file %s contains a secret key: it should hold the public key only", path)
        identity = Identity(path.stem, roles, kinds)
        by_key[cert.public] = identity
        by_name[identity.name] = (cert.public, identity)
    return _Snapshot(by_key, by_name, tuple(errors))


class KeyRing:
    """The authorised public keys: every ``*.key`` file of a directory, by key and by name.

    A key's name is its file name without ``.key``; its roles come from the file's metadata
    (``roles = satellite`` / ``roles = submit,admin``). A file without ``roles`` metadata
    gets :data:`DEFAULT_ROLES` (``submit``), so a plain czmq or pyzmq certificate can submit
    tasks and nothing more; ``roles =`` with an empty value grants none. Files that cannot be
    used (unreadable, no public key, an unknown role, a name that is not a simple file name, a
    key already seen in an earlier file) are skipped with a warning and listed in
    :attr:`errors`.

    Lookups never block and are safe while another thread runs :meth:`reload`: a reload
    builds new tables and swaps them in with one assignment. Raises :class:`SecurityError`
    when the directory does not exist.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._snap = _scan(self.directory)

    def reload(self) -> tuple[set[str], set[str]]:
        """Re-read the directory; return the names ``(added, removed)``.

        A name whose key changed is in both; a change of roles only, in neither. If the
        directory has gone, raises :class:`SecurityError` and keeps the previous keys."""
        with self._lock:
            old, new = self._snap, _scan(self.directory)
            self._snap = new
        old_pairs = {(n, k) for n, (k, _) in old.by_name.items()}
        new_pairs = {(n, k) for n, (k, _) in new.by_name.items()}
        return {n for n, _ in new_pairs - old_pairs}, {n for n, _ in old_pairs - new_pairs}

    def by_key(self, public: bytes) -> Identity | None:
        """The identity of a Z85 public key, or None when it is not authorised."""
        return self._snap.by_key.get(public)

    def by_name(self, name: str | None) -> Identity | None:
        """The identity called ``name`` (a ``User-Id``), or None (also for ``name=None``)."""
        if name is None:
            return None
        entry = self._snap.by_name.get(name)
        return entry[1] if entry else None

    def names(self) -> list[str]:
        """The authorised names, sorted."""
        return sorted(self._snap.by_name)

    @property
    def errors(self) -> list[str]:
        """One line per key file the last (re)load skipped: ``"file.key: reason"``."""
        return list(self._snap.errors)

    def __len__(self) -> int:
        return len(self._snap.by_key)


# -- the ZAP handler -------------------------------------------------------------------------


#: Contexts in which a CurveAuthenticator of this process runs (libzmq allows one ZAP handler each).
_ZAP_CONTEXTS: weakref.WeakSet[zmq.Context[Any]] = weakref.WeakSet()


class _ZapAgent(ThreadAuthenticator):
    """pyzmq's threaded ZAP handler, asking the ring on every CURVE handshake."""

    def __init__(self, owner: CurveAuthenticator, context: zmq.Context[Any]) -> None:
        super().__init__(context=context, log=log)
        self._owner = owner
        self._last: tuple[bytes, Identity] | None = None

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by pyzmq (in the ZAP thread) with the client's Z85 key: is it authorised?"""
        if domain == PEER_DOMAIN:  # the binary-star link: the other server, and nobody else
            identity = PEER_IDENTITY if key in self._owner.peer_keys else None
            self._last = (key, identity) if identity else None
            self._owner._count(identity, key)
            return identity is not None
        try:
            identity = self._owner.ring.by_key(key)
        except Exception:  # never let the ZAP thread die: every later handshake would hang
            log.exception("key ring lookup failed; denying %s", key[:8])
            identity = None
        if identity is not None and domain == EVENTS_DOMAIN and self._owner.muted(identity.name):
            identity = None  # it subscribed beyond its share: no events for a while
        self._last = (key, identity) if identity else None
        self._owner._count(identity, key)
        return identity is not None

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The ``User-Id`` of an allowed client: ``NAME/KEY``, its key's name and the key itself
        (so that a name given a new key no longer covers connections made with the old one)."""
        key = z85.encode(client_public_key)
        if self._last is not None and self._last[0] == key:
            return f"{self._last[1].name}/{key.decode()}"
        identity = self._owner.ring.by_key(key)
        return f"{identity.name}/{key.decode()}" if identity else super().curve_user_id(client_public_key)


class CurveAuthenticator:
    """Answers ZAP requests for ``domain`` in ``context`` from a :class:`KeyRing`, in a thread.

    A CURVE client whose public key is in the ring is allowed and its messages carry the
    key's name as ``User-Id``; any other key is denied. The ring is consulted on every new
    handshake, so after ``ring.reload()`` added keys work and removed keys are refused at
    once, without a restart; connections already made stay up (check ``ring.by_name`` per
    message to cut them off). Only one ZAP handler may run per context. Use as a context
    manager, or :meth:`start` and :meth:`stop`; stop it only after the secured sockets are
    closed (:func:`secure_server` makes them refuse everyone while no handler runs).
    """

    def __init__(self, ring: KeyRing, context: zmq.Context[Any] | None = None, *, domain: str = ZAP_DOMAIN,
                 peer_keys: Iterable[bytes] = ()) -> None:
        self.ring = ring
        #: keys allowed on :data:`PEER_DOMAIN` sockets only (the binary-star link): the server's own
        self.peer_keys = frozenset(peer_keys)
        self.context: zmq.Context[Any] = context if context is not None else zmq.Context.instance()
        self.domain = domain
        self._agent: _ZapAgent | None = None
        self._muted: dict[str, float] = {}  #: key name -> until when (monotonic) it may not subscribe
        self._allowed = 0
        self._denied = 0

    def mute(self, name: str, seconds: float) -> None:
        """Refuse ``name``'s key on the event stream (:data:`EVENTS_DOMAIN`) for ``seconds``."""
        self._muted[name] = time.monotonic() + seconds

    def muted(self, name: str) -> bool:
        """Whether ``name``'s key is refused on the event stream now."""
        until = self._muted.get(name)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        self._muted.pop(name, None)
        return False

    @property
    def allowed(self) -> int:
        """Handshakes allowed since construction."""
        return self._allowed

    @property
    def denied(self) -> int:
        """CURVE handshakes denied (key not in the ring) since construction."""
        return self._denied

    @property
    def running(self) -> bool:
        """Is the ZAP thread alive?"""
        return self._agent is not None and self._agent.is_alive()

    def _count(self, identity: Identity | None, key: bytes) -> None:
        if identity is not None:
            self._allowed += 1
            log.debug("allowed CURVE key %s as %s", key.decode("ascii", "replace"), identity.name)
        else:
            self._denied += 1
            warn_limited(log, "denied CURVE key %s: not in %s", key.decode("ascii", "replace"), self.ring.directory)

    def start(self) -> None:
        """Bind the context's ZAP endpoint and start answering; SecurityError if one already runs.

        libzmq releases a closed inproc endpoint in its own thread, so just after a ``stop()``
        it may still be taken: the bind is retried for up to a second."""
        if self._agent is not None:
            raise RuntimeError("CurveAuthenticator already started")
        if self.context in _ZAP_CONTEXTS:
            raise SecurityError("another CurveAuthenticator already runs in this zmq context")
        deadline = time.monotonic() + 1.0
        while True:
            agent = _ZapAgent(self, self.context)
            agent.configure_curve_callback(self.domain, credentials_provider=agent)
            agent.configure_curve_callback(EVENTS_DOMAIN, credentials_provider=agent)
            if self.peer_keys:
                agent.configure_curve_callback(PEER_DOMAIN, credentials_provider=agent)
            try:
                agent.start()
                break
            except zmq.ZMQError as e:
                agent.stop()
                if e.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > deadline:
                    raise SecurityError("another ZAP handler already runs in this zmq context") from e
                time.sleep(0.01)
        self._agent = agent
        _ZAP_CONTEXTS.add(self.context)

    def stop(self) -> None:
        """Stop the thread and close its sockets; a no-op when not running."""
        agent, self._agent = self._agent, None
        if agent is not None:
            _ZAP_CONTEXTS.discard(self.context)
            agent.stop()

    def __enter__(self) -> CurveAuthenticator:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- socket options --------------------------------------------------------------------------


def secure_server(sock: zmq.Socket[Any], public: bytes, secret: bytes, *, domain: str = ZAP_DOMAIN) -> None:
    """Make ``sock`` a CURVE server in ZAP ``domain``; call before ``bind``.

    Also sets ``ZMQ_ZAP_ENFORCE_DOMAIN``: without it libzmq lets *any* CURVE key in when no
    ZAP handler is running (e.g. after :meth:`CurveAuthenticator.stop`); with it, nobody.
    """
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = domain.encode()
    try:
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError) as e:  # a libzmq without it (< 4.3)
        log.warning("this libzmq cannot enforce ZAP (%s): without a running CurveAuthenticator any key "
                    "would be accepted", e)


def secure_client(sock: zmq.Socket[Any], public: bytes, secret: bytes, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server whose public key is ``server_public``; before ``connect``."""
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def credentials_of(frame: zmq.Frame) -> tuple[str, bytes] | None:
    """``(key name, Z85 public key)`` of the sender of a frame received with ``copy=False``
    behind :func:`secure_server` and a :class:`CurveAuthenticator`; None without them."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    if not isinstance(user, str) or not user:
        return None
    name, _, key = user.partition("/")
    return name, key.encode()


def user_of(frame: zmq.Frame) -> str | None:
    """The sender's key name (see :func:`credentials_of`), or None when the peer has none."""
    creds = credentials_of(frame)
    return creds[0] if creds else None


def verified_user(ring: KeyRing, frame: zmq.Frame) -> str | None:
    """The sender's key name if its key is (still) the ring's key for that name; else a name that
    no ring holds (``!NAME``: refused as not authorised); None without authentication."""
    creds = credentials_of(frame)
    if creds is None:
        return None
    who = ring.by_key(creds[1])
    return creds[0] if who is not None and who.name == creds[0] else f"!{creds[0]}"
