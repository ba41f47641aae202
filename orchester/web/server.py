"""``orchester web``: the web process (tornado on asyncio), a client of the bus like any other.

:func:`serve_web` runs it until SIGTERM, SIGINT or SIGHUP: a :class:`~orchester.web.hub.Hub`
on the orchestrator (or the pair), the fits in ``data_dir``, the application on ``bind``. It
prints the link with the access token on standard output when it listens, as Jupyter does.
Without ``connect`` it starts a local cluster first (one satellite per core), which it stops
on the way out; with ``connect``, stopping or killing it costs the bus nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import signal
import ssl
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import tornado.httpserver

from orchester.errors import OrchesterError
from orchester.logutil import warn_limited

log = logging.getLogger("orchester.web")

#: Default largest upload, in bytes.
MAX_UPLOAD = 100 * 1024 * 1024
#: What the web process keeps in its data folder (made private with it).
DATA_NAMES = re.compile(r"fits|fleet\.jsonl|journal")


class WebConfigError(OrchesterError, ValueError):
    """A web option that cannot work (an address to bind, TLS files): one line, exit 2."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/orchester/web`` (``~/.local/share/orchester/web``): where fits are kept."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "orchester" / "web"


def data_dir(options: WebOptions) -> Path:
    """The web process's folder (made, this user's only): its fits, its fleet log, a local cluster's journal."""
    from orchester.journal.folder import JournalError, private_directory

    data = Path(options.data_dir) if options.data_dir else default_data_dir()
    try:
        data.parent.mkdir(parents=True, exist_ok=True)
        private_directory(data, "the web data folder", DATA_NAMES)
    except (JournalError, OSError) as exc:
        raise WebConfigError(str(exc) if isinstance(exc, JournalError) else
                             f"cannot use {data} as the data folder: {exc.strerror}") from None
    return data


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6; port 0: one the system chooses) as ``(host, port)``."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise WebConfigError(f"--bind {bind[:100]!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    if not host:
        raise WebConfigError(f"--bind {bind[:100]!r}: give a host (127.0.0.1 for this machine only)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: a loopback address as such, or
    ``localhost`` when every address it resolves to is one (no other name, no other spelling)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        if host != "localhost":
            return False
    import socket

    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


#: Seconds a connection may stay idle (or take to send its headers) before it is closed, by default; and the
#: range ``--idle-timeout`` may set (the command line's option says the same: it does not import tornado).
IDLE_TIMEOUT = 15.0
IDLE_TIMEOUT_RANGE = (0.1, 3600.0)


@dataclass
class WebOptions:
    """What ``orchester web`` is told (see :func:`serve_web`)."""

    connect: list[str] = field(default_factory=list)
    bind: str = "127.0.0.1:8080"
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False
    data_dir: str | None = None
    max_upload: int = MAX_UPLOAD
    token: str | None = None  #: the access token (a new random one when not given)
    local: int = 0  #: satellites of the local cluster (0: one per core) when ``connect`` is empty
    curve_secret: str | None = None
    server_key: str | None = None
    refresh: float = 1.0  #: seconds between two status requests
    local_tasks: Sequence[str] = ()  #: task modules the local cluster's satellites import
    #: seconds a connection may stay idle, or take to send a request's headers (``--idle-timeout``)
    idle_timeout: float = IDLE_TIMEOUT

    def check(self) -> tuple[str, int, ssl.SSLContext | None]:
        """The address to bind and the TLS context; :class:`WebConfigError` when they cannot work."""
        host, port = parse_bind(self.bind)
        if (self.certfile is None) != (self.keyfile is None):
            raise WebConfigError("TLS needs both --certfile and --keyfile")
        context = None
        if self.certfile is not None and self.keyfile is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(self.certfile, self.keyfile)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise WebConfigError(f"cannot use the TLS certificate and key: {exc}") from None
        elif not is_loopback(host) and not self.insecure:
            raise WebConfigError(f"--bind {self.bind}: another machine could read the token in clear: give "
                                 "--certfile and --keyfile (TLS), or --insecure on a network you trust")
        if self.max_upload < 1:
            raise WebConfigError("--max-upload must be at least 1 byte")
        if self.refresh <= 0:
            raise WebConfigError("the refresh interval must be positive")
        low, high = IDLE_TIMEOUT_RANGE
        if not low <= self.idle_timeout <= high:  # (NaN and inf fail it too)
            raise WebConfigError(f"--idle-timeout must be {low:g} to {high:g} seconds")
        return host, port, context


#: Seconds an upload may take to arrive.
BODY_TIMEOUT = 300.0
#: Open connections at most; a new one beyond is closed at once (nobody can hold them all).
MAX_CONNECTIONS = 512


class BoundedHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTP server that holds at most :data:`MAX_CONNECTIONS` connections: a new one beyond closes
    the oldest (idle connections cannot lock the owner out: theirs get through, and those held
    without a word are closed after :data:`IDLE_TIMEOUT` anyway)."""

    def handle_stream(self, stream: Any, address: Any) -> None:
        """A new connection: served; the oldest one closed when too many are open."""
        order: OrderedDict[Any, None] = self.__dict__.setdefault("_order", OrderedDict())
        while order and next(iter(order)).closed():
            order.popitem(last=False)
        if len(order) > 2 * MAX_CONNECTIONS:  # closed ones in the middle: forget them
            for s in [s for s in order if s.closed()]:
                del order[s]
        while len(order) >= MAX_CONNECTIONS:
            oldest, _ = order.popitem(last=False)
            if not oldest.closed():
                warn_limited(log, "%d connections open: the oldest closed for a new one", MAX_CONNECTIONS)
                oldest.close()
        order[stream] = None
        super().handle_stream(stream, address)


def _raise_file_limit() -> None:
    """Take the hard limit of open files as the soft one (connections and sockets are files)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):  # a container may refuse: the soft limit stays
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve_web(options: WebOptions, *, out: TextIO | None = None,
              ready: Callable[[str], None] | None = None) -> int:
    """Run the web process until a stop signal; return its exit code.

    ``out`` gets the line with the link (standard output by default); ``ready(url)`` is called
    once it listens (tests use it).
    """
    host, port, tls = options.check()
    out = out or sys.stdout
    cluster = None
    from orchester.signals import stop_on_signals

    with stop_on_signals():
        try:
            connect = list(options.connect)
            if not connect:
                from orchester.local.cluster import LocalCluster

                n = options.local or os.cpu_count() or 1
                journal = data_dir(options) / "journal"  # the history page's source, kept across restarts
                print(f"starting a local cluster: {n} satellite(s), journal in {journal}", file=sys.stderr, flush=True)
                cluster = LocalCluster(satellites=n, workers=1, tasks=options.local_tasks, log_level="WARNING",
                                       serve_args=["--journal", str(journal)]).start()
                connect = [cluster.endpoint]
            return asyncio.run(_main(options, connect, host, port, tls, out, ready,
                                     pub=cluster.pub_endpoint if cluster is not None else None))
        finally:
            if cluster is not None:
                cluster.close()


async def _main(options: WebOptions, connect: list[str], host: str, port: int, tls: ssl.SSLContext | None,
                out: TextIO, ready: Callable[[str], None] | None, pub: str | None) -> int:
    import tornado.netutil

    from orchester.client.aio import AsyncClient
    from orchester.web.app import Auth, make_app
    from orchester.web.fits import FitStore
    from orchester.web.hub import Hub
    from orchester.web.series import SeriesStore

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    data = data_dir(options)
    client = AsyncClient(connect, pub=pub, curve_secret=options.curve_secret, server_key=options.server_key)
    hub = Hub(client, refresh=options.refresh, fleet_log=data / "fleet.jsonl")
    fits = FitStore(data / "fits", client)
    hub.listeners.append(fits.on_event)
    hub.start()
    known = fits.load()
    series = SeriesStore(data / "series", fits)
    taken = series.load()
    if known or taken:
        log.info("%d fit(s) and %d series read back from %s", known, taken, data)
    token = options.token or secrets.token_hex(24)
    auth = Auth(token)
    app = make_app(hub, fits, auth, max_upload=options.max_upload, tls=tls is not None, series=series)
    _raise_file_limit()
    server = BoundedHTTPServer(app, ssl_options=tls, max_body_size=1024 * 1024, max_buffer_size=64 * 1024 * 1024,
                               idle_connection_timeout=options.idle_timeout, body_timeout=BODY_TIMEOUT)
    try:
        sockets = tornado.netutil.bind_sockets(port, host)
    except OSError as exc:
        await series.close()
        await fits.close()
        await hub.close()
        raise WebConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    server.add_sockets(sockets)
    bound = sockets[0].getsockname()[1]
    auth.port = bound  # the session cookie is named after it
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{bound}/"
    print(f"Orchester web: {url}?token={token}", file=out, flush=True)
    if not await hub.wait_ready(30):
        log.warning("the orchestrator has not answered yet (%s): the pages say so until it does",
                    hub.status_error or "no reply")
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        server.stop()
        await server.close_all_connections()
        await series.close()
        await fits.close()
        await hub.close()
    return 0

