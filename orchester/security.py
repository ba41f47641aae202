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

The policy half (:func:`allowed`, :func:`is_loopback`, :func:`check_binds`) does no I/O.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .errors import OrchesterError
from .logutil import warn_limited

log = logging.getLogger("orchester.security")

#: The roles a key may hold: ``satellite`` registers and runs tasks; ``submit`` submits,
#: fetches, watches and cancels its own tasks; ``admin`` switches routing, drains satellites
#: and cancels anyone's tasks. No role implies another.
ROLES = ("satellite", "submit", "admin")
#: Roles of a key file whose metadata names none (a key made by another tool, or by hand).
DEFAULT_ROLES = ("submit",)
#: The ZAP domain :func:`secure_server` sets and :class:`CurveAuthenticator` answers for.
ZAP_DOMAIN = "orchester"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class SecurityError(OrchesterError, ValueError):
    """A key file is unreadable or malformed, or a configuration would expose the bus."""


@dataclass(frozen=True)
class Identity:
    """Who an authorised key belongs to: its file name (without ``.key``) and its roles."""

    name: str
    roles: frozenset[str] = field(default_factory=frozenset)


# -- policy (no I/O) -------------------------------------------------------------------------


def allowed(identity: Identity | None, role: str, secure: bool) -> bool:
    """May ``identity`` act as ``role``? Without security everyone may; with it, only holders.

    ``identity`` is None for a peer without an authorised key (or a revoked one).
    Raises ValueError for a role not in :data:`ROLES`, so a typo cannot open a door.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not secure:
        return True
    return identity is not None and role in identity.roles


def is_loopback(endpoint: str) -> bool:
    """Is ``endpoint`` reachable from this machine only?

    ``ipc://`` and ``inproc://`` are; ``tcp://`` is when its host is ``localhost``, an address
    in 127.0.0.0/8 or ``[::1]``. Wildcards (``*``, ``0.0.0.0``, ``[::]``), other addresses,
    host and interface names (even ``lo``: no lookups are made) and other transports are not.
    """
    transport, sep, address = endpoint.partition("://")
    transport = transport.lower()
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp" or ";" in address:
        return False
    if address.startswith("["):
        host = address[1:address.find("]")] if "]" in address else ""
    else:
        host = address.rpartition(":")[0] if ":" in address else address
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_binds(endpoints: Iterable[str], secure: bool, insecure: bool) -> list[str]:
    """Return the endpoints that are not loopback; refuse them when neither keys nor ``--insecure``.

    Raises :class:`SecurityError` when some endpoint is reachable from other machines,
    ``secure`` is false (no server key) and ``insecure`` is false (the user did not accept it).
    """
    exposed = [e for e in endpoints if not is_loopback(e)]
    if exposed and not secure and not insecure:
        raise SecurityError(
            f"refusing to bind {', '.join(exposed)} without authentication: anyone who can reach it "
            "could submit tasks or pose as a satellite. Pass --curve-secret FILE and --authorized-keys DIR, "
            "bind to 127.0.0.1, or pass --insecure to accept the risk")
    return exposed


def _parse_roles(roles: str | Iterable[str]) -> frozenset[str]:
    """Roles from a comma-separated string or an iterable; ValueError on an unknown one."""
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    found = frozenset(r.strip() for r in items if r.strip())
    unknown = sorted(found - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(map(repr, unknown))}; roles are {', '.join(ROLES)}")
    return found


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"key name {name!r} must be a simple file name: 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")


# -- key files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cert:
    public: bytes
    secret: bytes | None
    metadata: Mapping[str, str]


def _read_cert(path: str | os.PathLike[str]) -> _Cert:
    """Parse a ZPL certificate (czmq's and pyzmq's format): a ``metadata`` and a ``curve`` section."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"cannot read key file {path}: {e}") from e
    section = ""
    values: dict[str, dict[str, str]] = {"metadata": {}, "curve": {}}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if raw[0] not in " \t":
            section = line
        elif section in values and "=" in line:
            key, _, value = line.partition("=")
            values[section][key.strip()] = value.strip().strip("'\"")
    public, secret = values["curve"].get("public-key"), values["curve"].get("secret-key")
    if not public:
        raise SecurityError(f"{path} is not a CURVE key file: no public-key")
    return _Cert(_z85_key(public, path, "public"), _z85_key(secret, path, "secret") if secret else None,
                 values["metadata"])


def _z85_key(text: str, path: str | os.PathLike[str], label: str) -> bytes:
    """``text`` as a Z85 key (40 characters decoding to 32 bytes); SecurityError otherwise."""
    key = text.encode("ascii", "replace")
    try:
        if len(key) == 40:
            z85.decode(key)
            return key
    except (ValueError, KeyError, struct.error):
        pass
    raise SecurityError(f"{path}: the {label} key is not 40 characters of Z85")


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key in a key file (a public ``.key`` or a ``.key_secret`` file)."""
    return _read_cert(path).public


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """The Z85 ``(public, secret)`` keys in a ``NAME.key_secret`` file.

    Raises :class:`SecurityError` when the file is unreadable, holds no secret key (a public
    ``.key`` file) or its keys do not belong together. Logs a warning when the file is
    readable by other users.
    """
    cert = _read_cert(path)
    if cert.secret is None:
        raise SecurityError(f"{path} holds no secret key (is it the public .key file? pass NAME.key_secret)")
    if zmq.curve_public(cert.secret) != cert.public:
        raise SecurityError(f"{path}: its public key does not belong to its secret key")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("secret key file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
    return cert.public, cert.secret


def generate_keys(name: str, directory: str | os.PathLike[str], roles: str | Iterable[str] = DEFAULT_ROLES,
                  *, force: bool = False) -> tuple[Path, Path]:
    """Write a new key pair as ``DIRECTORY/NAME.key`` and ``DIRECTORY/NAME.key_secret``.

    Both files are pyzmq certificates (:func:`zmq.auth.load_certificate` reads them) whose
    metadata holds ``roles = submit,admin``; unlike :func:`zmq.auth.create_certificates`
    alone, the *public* file carries the roles too, because that is the file the orchestrator
    reads from its authorised keys directory. The secret file is mode 0600 from the start; the
    directory is created (mode 0700) if missing. Raises ValueError for an unknown or empty
    role list or a name that is not a simple file name, FileExistsError when either file exists
    and ``force`` is false. Returns ``(public path, secret path)``.
    """
    _check_name(name)
    role_set = _parse_roles(roles)
    if not role_set:
        raise ValueError(f"a key needs at least one role; roles are {', '.join(ROLES)}")
    ordered = ",".join(r for r in ROLES if r in role_set)
    target = Path(directory)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = target / f"{name}.key", target / f"{name}.key_secret"
    existing = [str(p) for p in (public, secret) if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass force=True / --force)")
    # Written in a private (0700) directory next to the targets, then moved into place: a
    # reader never sees a half-written file, nobody else ever sees the secret.
    with tempfile.TemporaryDirectory(dir=target, prefix=".orchester-keys-") as tmp:
        tmp_public, tmp_secret = map(Path, zmq.auth.create_certificates(tmp, name, metadata={"roles": ordered}))
        text = tmp_public.read_text(encoding="utf-8")
        if f"roles = {ordered}" not in text:  # pyzmq writes metadata into the secret file only
            text = text.replace("metadata\n", f"metadata\n    roles = {ordered}\n", 1)
            tmp_public.write_text(text, encoding="utf-8")
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret)
        os.replace(tmp_public, public)
    return public, secret


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
            _check_name(path.stem)
            cert = _read_cert(path)
            roles = _parse_roles(cert.metadata["roles"]) if "roles" in cert.metadata else frozenset(DEFAULT_ROLES)
            if cert.public in by_key:
                raise SecurityError(f"same public key as {by_key[cert.public].name}.key")
        except ValueError as e:  # SecurityError is one
            errors.append(f"{path.name}: {e}")
            log.warning("skipping authorised key file %s: %s", path, e)
            continue
        if cert.secret is not None:
            log.warning("authorised key file %s contains a secret key: it should hold the public key only", path)
        identity = Identity(path.stem, roles)
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

        A name whose key changed counts as both removed and added; a change of roles only as
        neither. If the directory has gone, raises :class:`SecurityError` and keeps the
        previous keys.
        """
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
        entry = self._snap.by_name.get(name) if name is not None else None
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
        try:
            identity = self._owner.ring.by_key(key)
        except Exception:  # never let the ZAP thread die: every later handshake would hang
            log.exception("key ring lookup failed; denying %s", key[:8])
            identity = None
        self._last = (key, identity) if identity else None
        self._owner._count(identity, key)
        return identity is not None

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The ``User-Id`` of an allowed client: its key's name (called right after callback)."""
        key = z85.encode(client_public_key)
        if self._last is not None and self._last[0] == key:
            return self._last[1].name
        identity = self._owner.ring.by_key(key)
        return identity.name if identity else super().curve_user_id(client_public_key)


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

    def __init__(self, ring: KeyRing, context: zmq.Context[Any] | None = None, *, domain: str = ZAP_DOMAIN) -> None:
        self.ring = ring
        self.context: zmq.Context[Any] = context if context is not None else zmq.Context.instance()
        self.domain = domain
        self._agent: _ZapAgent | None = None
        self._allowed = 0
        self._denied = 0

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

        Closing an inproc endpoint completes in libzmq's background thread, so just after a
        ``stop()`` the endpoint may still be taken for a moment: the bind is retried for a second.
        """
        if self._agent is not None:
            raise RuntimeError("CurveAuthenticator already started")
        if self.context in _ZAP_CONTEXTS:
            raise SecurityError("another CurveAuthenticator already runs in this zmq context")
        deadline = time.monotonic() + 1.0
        while True:
            agent = _ZapAgent(self, self.context)
            agent.configure_curve_callback(self.domain, credentials_provider=agent)
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


def user_of(frame: zmq.Frame) -> str | None:
    """The ``User-Id`` of a frame received with ``copy=False``, or None when the peer has none.

    Behind :func:`secure_server` and a :class:`CurveAuthenticator` it is the sender's key name.
    """
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and user else None
