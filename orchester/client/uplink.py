"""The uplink: one peer's connection to an orchestrator, or to either server of a binary-star pair.

:class:`~orchester.Client`, :class:`~orchester.AsyncClient` and :class:`~satellites.Satellite`
share it. It holds what they have in common:

* the endpoint list (``@FILE`` reads an endpoint file once, every endpoint is checked) and which
  endpoint is current;
* the rule that leaves the current one for the next: a silence of ``liveness ×
  heartbeat_interval`` seconds while an answer is awaited (with a vote: a passive server takes
  over on it), or a passive server's refusal (:meth:`Uplink.redirected`, no vote; at most one
  switch every half heartbeat, so two refusals do not ping-pong);
* when a heartbeat is due;
* the DEALER socket (``linger=0``, a random routing id, high-water marks, a message size
  limit), its CurveZMQ keys (:func:`~orchester.security.keys.client_curve`) and the monitor
  socket that tells when the orchestrator refused the key (``EVENT_HANDSHAKE_FAILED_AUTH``).

It decides and makes sockets; it never reads one, nor the clock. The caller's loop polls
:attr:`Uplink.sock` and :attr:`Uplink.monitor`, says what happened (:meth:`~Uplink.heard`,
:meth:`~Uplink.sent`, :meth:`~Uplink.redirected`) and asks :meth:`~Uplink.check` after every
wake-up. On a sync context it makes sync sockets, on a ``zmq.asyncio`` one asyncio sockets.

Example (a loop that only waits for its orchestrator)::

    uplink: Uplink[zmq.Socket[Any]] = Uplink(["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"])
    sock = uplink.open(zmq.Context.instance())
    uplink.restart(time.monotonic())
    while running:
        if sock.poll(250):
            frames = sock.recv_multipart()
            uplink.heard(time.monotonic())
        move = uplink.check(time.monotonic(), waiting=True)
        if move is not None:  # uplink.current is now move.endpoint: connect there
            sock = uplink.open(zmq.Context.instance())
    uplink.close()
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import zmq

from orchester.config import check_endpoint
from orchester.security.auth import secure_client
from orchester.security.keys import client_curve

log = logging.getLogger("orchester.client")

#: A sync socket or a ``zmq.asyncio`` one: whatever the context given to :meth:`Uplink.open` makes.
S = TypeVar("S", bound="zmq.Socket[Any]")

#: Who connects: named in the error for an empty endpoint list and in the refused-key message.
Who = Literal["client", "satellite"]

#: What follows "the orchestrator at X refused this <who>'s CurveZMQ key" for each kind of peer.
_REFUSED_TAIL: dict[str, str] = {
    "client": " (not authorised)",
    "satellite": ": it is not (or no longer) in its authorised keys",
}


#: The largest endpoint file read (``@FILE``).
MAX_ENDPOINT_FILE = 1 << 16


#: The share of :attr:`Uplink.silent_after` a connection may wait longer, drawn at each (re)connection.
PATIENCE_JITTER = 0.25
#: Back-off: after each whole round of the endpoints in silence (nothing heard from any), a connection waits
#: this many times longer before it gives up, up to :data:`MAX_BACKOFF` times :attr:`Uplink.silent_after`.
BACKOFF = 2
MAX_BACKOFF = 8


def resolve_endpoint(endpoint: str) -> str:
    """An endpoint, or ``@FILE``: the first client endpoint written in an endpoint file (JSON)."""
    if not endpoint.startswith("@"):
        return endpoint
    try:
        with open(endpoint[1:], "rb") as f:
            raw = f.read(MAX_ENDPOINT_FILE + 1)  # (an endpoint file is a few hundred bytes: a huge one is not one)
        if len(raw) > MAX_ENDPOINT_FILE:
            raise ValueError(f"larger than {MAX_ENDPOINT_FILE} bytes: not an endpoint file")
        return str(json.loads(raw)["bind"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
        raise ValueError(f"cannot read an endpoint from {endpoint[1:]}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Failover:
    """A decision of :meth:`Uplink.check`: leave the current orchestrator and connect to :attr:`endpoint`."""

    #: where to connect now (already :attr:`Uplink.current`)
    endpoint: str
    #: we left on silence: say so in the first message (a passive binary-star server takes over on a vote)
    vote: bool
    #: seconds the one we left had been silent (0.0 after a redirect)
    silent_for: float

    @property
    def reason(self) -> Literal["silent", "redirect"]:
        """``silent``: the orchestrator stopped answering; ``redirect``: a passive server refused us."""
        return "silent" if self.vote else "redirect"


class Uplink(Generic[S]):
    """The endpoints, the failover rule, the heartbeat clock and the socket of one peer of the bus.

    ``endpoints``: one endpoint or several (a binary-star pair), ``@FILE`` allowed; a malformed
    one is a :class:`ValueError` here, and so is none at all. ``who`` names the peer in messages.
    ``identity``: the prefix of the routing id (128 random bits follow: not guessable);
    ``hwm``: the send and receive high-water marks; ``max_message``: the largest message taken
    (``ZMQ_MAXMSGSIZE``; None: no limit). CurveZMQ: ``curve_secret`` and ``server_key`` as for
    :func:`~orchester.security.keys.client_curve` (the environment when omitted).

    ``reconnect_alone``: with a single endpoint, a silence reconnects to it (a satellite
    registers again) instead of leaving ZeroMQ to reconnect by itself.
    """

    def __init__(self, endpoints: str | Sequence[str], *, who: Who = "client", identity: str = "c:",
                 hwm: int = 100_000, max_message: int | None = None, curve_secret: str | None = None,
                 server_key: str | None = None, heartbeat_interval: float = 1.0, liveness: int = 3,
                 reconnect_alone: bool = False) -> None:
        #: every endpoint, in the order they are tried (``@FILE`` resolved)
        self.endpoints = [check_endpoint(resolve_endpoint(e))
                          for e in ([endpoints] if isinstance(endpoints, str) else endpoints)]
        if not self.endpoints:
            raise ValueError(f"a {who} needs at least one orchestrator endpoint")
        self.who = who
        self.identity = identity
        self.hwm = hwm
        self.max_message = max_message
        #: CurveZMQ keys ``(public, secret, server public)``, or None without CurveZMQ
        self.curve = client_curve(curve_secret, server_key)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        #: the silence after which this connection gives up (:attr:`silent_after`, and up to a quarter more)
        self.patience = self.silent_after
        self.reconnect_alone = reconnect_alone
        #: how many times the uplink moved on (the current endpoint is this, modulo their number)
        self.index = 0
        #: moves on silence since the orchestrator (any endpoint) was last heard from (the back-off's count)
        self.silent_moves = 0
        #: the DEALER to :attr:`current`, once :meth:`open` made it
        self.sock: S | None = None
        #: with CurveZMQ: a PAIR that receives one message each time the orchestrator refuses the key
        self.monitor: S | None = None
        #: when the orchestrator was last heard from, and when we last sent it a heartbeat (monotonic)
        self.last_heard = self.last_sent = 0.0
        self._redirect = False
        self._redirect_after = float("-inf")

    # ------------------------------------------------------------ endpoints
    @property
    def current(self) -> str:
        """The endpoint in use."""
        return self.endpoints[self.index % len(self.endpoints)]

    @property
    def alternatives(self) -> bool:
        """Whether there is another endpoint to turn to (a binary-star pair)."""
        return len(self.endpoints) > 1

    @property
    def silent_after(self) -> float:
        """Seconds of silence after which the orchestrator counts as gone (before back-off and jitter)."""
        return self.heartbeat_interval * self.liveness

    @property
    def backoff(self) -> int:
        """How many times :attr:`silent_after` this connection waits (before its jitter): 1 until a whole round
        of the endpoints went by in silence, then :data:`BACKOFF` times more each round, at most
        :data:`MAX_BACKOFF`."""
        return int(min(BACKOFF ** (self.silent_moves // len(self.endpoints)), MAX_BACKOFF))

    @property
    def longest_silence(self) -> float:
        """The longest silence this connection may wait out before it gives up (:attr:`patience` at its most)."""
        return self.silent_after * self.backoff * (1.0 + PATIENCE_JITTER)

    def refusal(self) -> str:
        """Why nothing gets through, in words, once :attr:`monitor` said the orchestrator refused the key."""
        return f"the orchestrator at {self.current} refused this {self.who}'s CurveZMQ key{_REFUSED_TAIL[self.who]}"

    # ------------------------------------------------------------ the rule
    def restart(self, now: float) -> None:
        """Count silence and heartbeats from ``now`` (a loop that starts, a new connection); the silence this
        connection is given (:attr:`patience`) is drawn again: peers that connected together (a fleet of
        satellites starting, a failover) do not all give up, reconnect and register in the same instant."""
        self.last_heard = self.last_sent = now
        self.patience = self.silent_after * self.backoff * (1.0 + random.uniform(0.0, PATIENCE_JITTER))

    def set_interval(self, seconds: float) -> None:
        """Beat every ``seconds`` from now on, and count silence in such intervals (a satellite takes the
        orchestrator's pace from its WELCOME)."""
        share = self.patience / self.silent_after
        self.heartbeat_interval = seconds
        self.patience = self.silent_after * share

    def heard(self, now: float) -> None:
        """A message came from the orchestrator at ``now`` (the back-off starts again from its first round)."""
        self.last_heard = now
        if self.silent_moves:  # back: a later silence is noticed as soon as on a first connection
            share = self.patience / (self.silent_after * self.backoff)
            self.silent_moves = 0
            self.patience = self.silent_after * share

    def sent(self, now: float) -> None:
        """A heartbeat (or, for a peer whose every message counts as one, any message) left at ``now``."""
        self.last_sent = now

    def redirected(self) -> None:
        """A passive server refused us (``not_active``): move to the next endpoint at the next :meth:`check`.

        Ignored with a single endpoint: there is nowhere else to go.
        """
        if self.alternatives:
            self._redirect = True

    def heartbeat_due(self, now: float, waiting: bool = True) -> bool:
        """Whether to send a heartbeat: one interval since the last, while ``waiting`` for the orchestrator."""
        return waiting and now - self.last_sent >= self.heartbeat_interval

    def check(self, now: float, waiting: bool = True) -> Failover | None:
        """Whether to leave the current orchestrator now; if so :attr:`current` already names the next one.

        ``waiting``: something is expected from the orchestrator (a client with requests
        pending; a satellite always): only then does a silence count. The caller connects to
        :attr:`current` with :meth:`open` and says the vote in its first message.
        """
        if not waiting:  # (nothing expected: no silence, and no back-off for the next request)
            self.heard(now)
        silent = now - self.last_heard
        if waiting and silent > self.patience and (self.alternatives or self.reconnect_alone):
            return self._move(now, vote=True, silent_for=silent)
        if self._redirect and now >= self._redirect_after:
            self._redirect = False
            self._redirect_after = now + self.heartbeat_interval / 2  # no ping-pong between two refusals
            return self._move(now, vote=False, silent_for=0.0)
        return None

    def _move(self, now: float, vote: bool, silent_for: float) -> Failover:
        self.index += 1
        if vote:
            self.silent_moves += 1
        self.restart(now)
        return Failover(self.current, vote, silent_for)

    # ------------------------------------------------------------ sockets
    def open(self, ctx: zmq.Context[S]) -> S:
        """Close the previous socket (and monitor), make a DEALER on ``ctx`` connected to :attr:`current`.

        Call it from the thread (or event loop) that will use the socket.
        """
        self.close()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = f"{self.identity}{secrets.token_hex(16)}".encode()  # 128 random bits: not guessable
        if self.max_message is not None:
            s.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        s.sndhwm = s.rcvhwm = self.hwm
        self.sock = s
        if self.curve is not None:
            secure_client(s, *self.curve)
            self.monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        s.connect(self.current)
        return s

    def close(self, linger: int = 0) -> None:
        """Close the socket (after ``linger`` ms for what it still sends) and its monitor."""
        if self.sock is not None:
            self.sock.close(linger)
            self.sock = None
        if self.monitor is not None:
            self.monitor.close(0)
            self.monitor = None


class _ClientState(Protocol):
    """What :func:`client_step` reads of a client's sans-I/O core (:class:`~orchester.client.core.ClientCore`)."""

    redirect: bool
    tasks: Any
    requests: Any

    @property
    def ack_due(self) -> bool:
        """Results came that the orchestrator should hear about (a heartbeat carries ``rx``)."""


def client_step(uplink: Uplink[Any], core: _ClientState, now: float) -> tuple[Failover | None, bool]:
    """What a client's I/O loop does after each wake-up, the same for ``Client`` and ``AsyncClient``.

    A redirect (a passive server said ``not_active``) is handed to the uplink; then either the
    uplink moves on (the :class:`Failover`, logged when it is a vote) or a heartbeat may be due
    (while something is awaited, or results need acknowledging). Returns ``(failover, ping)``.
    """
    if core.redirect:
        core.redirect = False
        uplink.redirected()
    busy = bool(core.tasks or core.requests)
    move = uplink.check(now, waiting=busy)
    if move is not None:
        if move.vote:
            log.warning("orchestrator silent for %.1fs: failing over to %s", move.silent_for, move.endpoint)
        return move, False
    return None, uplink.heartbeat_due(now, waiting=busy) or core.ack_due
