"""The binary-star adapter: the link between the two servers of a pair.

Each server binds a PUB socket on its state endpoint (``--state-bind``) and subscribes to its
peer's (``--peer``). Over that link (every message and field: :mod:`orchester.ha.link`):

* ``STATE`` every heartbeat: the sender's :class:`~orchester.ha.star.HAState`.
* The active streams its journal records (``REC``), numbered in its journal order.
* The passive asks for a snapshot with ``SYNC`` when it has none or sees a gap; the active
  answers with ``SNAP`` chunks (:mod:`orchester.ha.resync`, a few per wake-up), the state as of
  a record, then streams from the next one.
* The passive acknowledges with ``ACK`` once records are in its journal (durable, per its
  ``--durability``), or at once without a journal; it hands back with ``ORPHANS`` the tasks it
  knew that the active's snapshot does not.

The :class:`Pair` is the adapter: it owns the two sockets, the pair's table
(:class:`~orchester.ha.star.BinaryStar`) and the current role — a
:class:`~orchester.ha.follower.Follower` (replication in) until the server becomes active, a
:class:`~orchester.ha.leader.Leader` (replication out) from then on — and hands each decoded
message to the role and the table. With ``--replication sync`` the active releases an
acknowledgement or a result only once the passive has acknowledged the records it depends on —
while the peer is alive and in sync; when the peer goes silent the active falls back to local
durability and says so. Requests reaching a server that is not active are
:class:`~orchester.ha.requests.PairRequests`'.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from orchester.config import OrchestratorConfig
from orchester.ha import link
from orchester.ha.follower import Follower
from orchester.ha.leader import Leader
from orchester.ha.requests import PairRequests
from orchester.ha.star import DUAL_ACTIVE, BinaryStar, Change, HAState
from orchester.security.auth import PEER_DOMAIN, secure_client, secure_server
from orchester.server.restore import Installation, RestoreFold
from serializers import messages as M
from serializers import protocol as P
from serializers.header import pack
from serializers.zmqframes import frames_size

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator

log = logging.getLogger("orchester.ha")

#: Seconds of peer messages handled per wake-up (a passive folding a large snapshot still beats).
DRAIN_SLICE = 0.05
#: Seconds of a takeover's installation per wake-up (the table of a million tasks takes seconds: meanwhile the
#: loop goes round, and the peers that wait hear from this server).
INSTALL_SLICE = 0.1
#: Messages, and bytes, held back while a takeover installs its table; past either the routers are not read
#: (ZeroMQ's high-water marks push back) until the held messages are handled.
MAX_DEFERRED = 200_000
MAX_DEFERRED_BYTES = 256 << 20
#: A fold of at most this many tasks is let go of at once when its takeover ends (a larger one, in slices).
RETIRE_AT_ONCE = 65_536


class Pair:
    """This server's half of the pair: the state link, and replication out (active) or in (passive).

    The broker makes one with its configuration, ZeroMQ context, core and client router, the
    current monotonic time, ``append`` (writes a replicated record to the local journal and
    returns its number; None without a journal), ``last_seq`` (the number of the last record this
    server journaled) and ``curve`` (the shared server key pair, when CurveZMQ is on). It then
    polls :attr:`sub` and calls :meth:`drain` and :meth:`apply` when it is readable, :meth:`tick`
    on every wake-up, :meth:`replicate` and :meth:`flush` for every record it journals,
    :meth:`durable` when its journal reports progress, :meth:`gatekeep` for requests while not
    serving, and :meth:`gate` for its release gate.
    """

    def __init__(self, config: OrchestratorConfig, ctx: zmq.Context[Any], core: Orchestrator, router: Any,
                 now: float, append: Callable[[list[Any]], int] | None, last_seq: Callable[[], int],
                 curve: tuple[bytes, bytes] | None = None) -> None:
        assert config.state_bind and config.peer
        self.cfg = config
        self.core = core  #: the orchestrator core (snapshots are taken from it; a takeover fills it)
        self.router = router  #: the socket key restored tasks answer their clients on
        self.exit_code = 0  #: set when this server must stop (a backup stepping down from a dual active)
        self.epoch: str = core.state.epoch
        self.last_seq = last_seq  #: the number of the last record this server journaled
        self.star = BinaryStar(config.ha == "primary", config.ha_heartbeat, now)
        self.sync = config.replication == "sync"
        self.counters = core.state.counters
        self.link_up = True  #: a test fault hook: False drops everything on the peer link
        self.requests = PairRequests(core, self.star, self.apply, self._set_link,
                                     fault_hooks=os.environ.get("ORCHESTER_FAULT_HOOKS") == "1",
                                     catch_up=self.catch_up)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.pub.sndhwm = 100_000
        self.sub = ctx.socket(zmq.SUB)
        self.sub.linger = 0
        self.sub.rcvhwm = 100_000
        if curve is not None:  # both servers share the server key pair
            secure_server(self.pub, *curve, domain=PEER_DOMAIN)
            secure_client(self.sub, curve[0], curve[1], curve[0])
        try:
            self.pub.bind(config.state_bind)
            self.endpoint = self.pub.last_endpoint.decode()
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.sub.connect(config.peer)
        except Exception:
            self.close()
            raise
        self._next_state = now
        #: a takeover's table being installed, a slice per wake-up (None: none, or done)
        self.installing: Installation | None = None
        #: the messages that came while it was (and while those were handled): ``(socket, frames, user, when)``,
        #: handled in order, a slice per wake-up, once it is done
        self.deferred: collections.deque[tuple[Any, list[Any], str | None, float]] = collections.deque()
        self.deferred_bytes = 0
        #: (socket, routing id) of each peer whose message is held -> when it last heard a HEARTBEAT from here
        self._waiting: dict[tuple[Any, bytes], float] = {}
        self._next_keep_alive = 0.0
        #: the fold a takeover installed, let go of a slice per wake-up (freeing a million entries at once
        #: holds the loop for a third of a second)
        self.retiring: RestoreFold | None = None
        self._activated_from = HAState.PASSIVE
        #: the current role: replication in until this server is active, replication out from then on
        self.role: Follower | Leader = Follower(
            epoch=self.epoch, heartbeat=config.ha_heartbeat, keep_finished=config.result_retention,
            counters=self.counters, append=append, send=self._send, now=now)

    # ------------------------------------------------------------- status
    @property
    def state(self) -> HAState:
        """This server's current state."""
        return self.star.state

    @property
    def leader(self) -> Leader | None:
        """The role of an active server (None before it takes over)."""
        return self.role if isinstance(self.role, Leader) else None

    @property
    def follower(self) -> Follower | None:
        """The role of a server that is not active (None once it has taken over)."""
        return self.role if isinstance(self.role, Follower) else None

    @property
    def fold(self) -> RestoreFold:
        """What this server would install if it became active: its journal's, then the active's stream."""
        follower = self.follower
        if follower is None:
            raise RuntimeError("an active server follows no one: it has no fold")
        return follower.fold

    def describe(self, now: float) -> dict[str, Any]:
        """The pair as seen from here (status replies, ``orchester status``)."""
        return {"state": self.star.state.name.lower(), "role": self.star.role,
                "peer": self.star.peer.name.lower() if self.star.peer else None,
                "peer_alive": self.star.peer_alive(now), "replication": self.replication_mode(now),
                "seq": self.last_seq(), **self.role.status(), "alarms": dict(self.star.alarms)}

    def replication_mode(self, now: float) -> str:
        """``sync``/``async`` while the passive follows, ``local`` when it does not, ``follower`` on a passive."""
        return self.role.mode(self.star.peer_alive(now))

    def gate(self, now: float) -> int | None:
        """Highest record whose dependants may be released, or ``None`` when replication does not gate."""
        leader = self.leader
        return leader.gate(self.star.peer_alive(now)) if leader is not None else None

    # ------------------------------------------------------------- requests (PairRequests)
    def gatekeep(self, sock: Any, frames: list[Any], now: float) -> bool:
        """A request reached a server that is not ACTIVE: serve it (True) or refuse it
        (:meth:`PairRequests.gatekeep`)."""
        return self.requests.gatekeep(sock, frames, now)

    def control(self, hdr: dict[str, Any], now: float) -> dict[str, Any]:
        """``CONTROL`` operations of the pair: ``promote`` and the ``peer_link`` fault hook."""
        return self.requests.control(hdr, now)

    def promote(self, force: bool, now: float) -> dict[str, Any]:
        """An operator's ``orchester promote``: become ACTIVE now (refused while the peer is active)."""
        return self.requests.promote(force, now)

    def _set_link(self, up: bool) -> None:
        self.link_up = up

    # --------------------------------------------------------- peer link in
    def drain(self, now: float) -> list[Change]:
        """Read what the peer sent, for at most :data:`DRAIN_SLICE` seconds (the rest waits for the
        next wake-up, which comes at once: the heartbeats go out in between); return the state
        changes it caused."""
        changes: list[Change] = []
        start = time.perf_counter()
        emptied = False
        for _ in range(10_000):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                emptied = True
                break
            if not self.link_up:
                continue
            change = self.receive(frames, now)
            if change is not None:
                changes.append(change)
            if time.perf_counter() - start > DRAIN_SLICE:
                break
        if not emptied and self.link_up:
            # more waits unread: the peer is not silent, this server is behind (its silence is counted from
            # the moment everything it sent was read, as a satellite's is)
            self.star.heard(now)
            self.counters["ha_peer_backlog"] += 1
        return changes

    def catch_up(self, now: float) -> None:
        """Read what the peer sent that waits unread (a slice), and act on it: before this server decides on the
        peer's silence (a vote, a promotion), so that it never decides on it while the peer's words wait."""
        if self.sub.get(zmq.EVENTS) & zmq.POLLIN:
            self.apply(self.drain(now), now)

    def receive(self, frames: list[bytes], now: float) -> Change | None:
        """One message of the peer: to the role (in its state), then a ``STATE`` to the table.

        A malformed message is counted (``ha_bad_messages``) and dropped (:func:`~orchester.ha.link.read`);
        a failure in handling one that decoded is ours: logged with its traceback and counted
        (``handler_errors``), raised with ``ORCHESTER_STRICT=1``; the peer link never stops the loop.
        """
        message = link.read(frames, self.counters)  # (never raises: anything malformed is counted and dropped)
        if message is None:
            return None
        try:
            if self.star.state is self.role.STATE:
                self.role.receive(message, now)
            return self.star.peer_state(message.state, now) if isinstance(message, link.State) else None
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("a %s message on the peer link could not be handled", type(message).__name__)
            if self.core.strict:  # (the core's: one switch for the whole server)
                raise
            return None

    def durable(self, local_seq: int) -> None:
        """The local journal made records up to ``local_seq`` durable (passive side)."""
        follower = self.follower
        if follower is not None:
            follower.durable(local_seq)

    # -------------------------------------------------------- peer link out
    def replicate(self, seq: int, record: list[Any]) -> None:
        """Stream one record (active side; sent on :meth:`flush`)."""
        leader = self.leader
        if leader is not None:
            leader.replicate(seq, record)

    def flush(self) -> None:
        """Send the records streamed since the last flush (held while a snapshot is on its way)."""
        leader = self.leader
        if leader is not None:
            leader.flush()

    def _send(self, frames: list[bytes]) -> None:
        if not self.link_up:
            return
        try:
            self.pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.counters["ha_link_dropped"] += 1

    def tick(self, now: float) -> None:
        """Housekeeping on every wake-up: state heartbeat, then the role's (acks, sync requests,
        snapshot slices, a passive given up)."""
        star = self.star
        if now >= self._next_state:
            self._next_state = now + star.heartbeat
            leader, follower = self.leader, self.follower
            self._send(link.encode_state(
                star.state, star.role, self.epoch, self.last_seq(), leader is not None and leader.streaming,
                stream=follower.stream if follower is not None else None,
                acked=follower.ack_sent if follower is not None else 0))
        if star.state is self.role.STATE:
            self.role.tick(now, star.peer_alive(now))

    def apply(self, changes: list[Change], now: float) -> None:
        """Act on state changes: take over, report alarms, step down."""
        core = self.core
        for change in changes:
            row = change.row
            wall = core.state.wall()
            if change.before is not change.after:
                log.warning("binary star: %s -> %s: %s", change.before.name, change.after.name, row.why)
                core.outbox.publish([b"ha:state", pack({
                    "state": change.after.name.lower(), "was": change.before.name.lower(),
                    "role": self.star.role, "why": row.why, "e": self.epoch, "t": wall})])
                core.state.counters[f"ha_to_{change.after.name.lower()}"] += 1
                if change.after is HAState.ACTIVE:
                    self._activate(change.before, now)
            if row.alarm is not None:
                log.error("binary star alarm (%s): %s", row.alarm, row.why)
                core.state.counters[f"ha_{row.alarm}"] += 1
                core.outbox.publish([b"ha:alarm", pack({"alarm": row.alarm, "why": row.why, "role": self.star.role,
                                                    "state": self.star.state.name.lower(), "e": self.epoch,
                                                    "t": wall})])
                if row.alarm == DUAL_ACTIVE and not self.star.primary and self.star.state is HAState.ACTIVE:
                    log.critical("dual active: this backup stops serving and exits; the tasks it accepted "
                                 "while cut off stay in its journal")
                    core.outbox.publish([b"ha:state", pack({"state": "stopped", "was": "active", "role": "backup",
                                                        "why": "dual active: the backup steps down",
                                                        "e": self.epoch, "t": wall})])
                    self._next_state = now  # one last state message, so that the primary learns it too
                    self.tick(now)
                    # serving no more at once: what comes later in this wake-up (a catch-up can find the dual
                    # active in the middle of a batch of requests) is refused, and goes to the primary
                    self.star.step_down()
                    self.exit_code = 3

    def _activate(self, before: HAState, now: float) -> None:
        """Install what the journal and the stream said (a snapshot cut short by the takeover is of
        no use any more), then serve: the role becomes a :class:`~orchester.ha.leader.Leader`.

        A large table is installed a slice per wake-up (:meth:`install_step`); meanwhile the broker hands
        every request to :meth:`defer` and this server sends each peer that waits a ``HEARTBEAT`` every
        interval, so that none gives up on it."""
        follower = self.role
        assert isinstance(follower, Follower), "only a server that is not active takes over"
        self._activated_from = before
        self.installing = follower.fold.installation(self.core, self.router, reclaim=self.core.cfg.lost_after)
        self.install_step(now)

    def install_step(self, now: float) -> None:
        """One slice of a takeover's installation (:data:`INSTALL_SLICE` seconds); when it ends, serve: the
        Leader role; the messages held meanwhile are handled from the next wake-up (:meth:`replay_step`)."""
        installing, core = self.installing, self.core
        assert installing is not None
        if not installing.step(now, time.monotonic() + INSTALL_SLICE):
            self._keep_alive(now)
            return
        self.installing = None
        counts = installing.counts
        core.state.counters["ha_install_slices"] += installing.slices
        if len(installing.fold.tasks) > RETIRE_AT_ONCE:  # (the follower goes with its role, a large fold in slices)
            self.retiring = installing.fold
        self.role = Leader(core=core, router=self.router, heartbeat=self.star.heartbeat, sync=self.sync,
                           last_seq=self.last_seq, send=self._send, clock=time.perf_counter, now=now)
        if self._activated_from is HAState.PASSIVE:
            core.state.counters["failovers"] += 1
        log.warning("active with %d task(s): %d finished, %d to run (%d awaiting their satellite)%s",
                    len(core.state.tasks), counts.get("finished", 0), counts.get("requeued", 0),
                    counts.get("reclaimable", 0),
                    f"; installed in {installing.slices} slices, {len(self.deferred)} message(s) held meanwhile"
                    if installing.slices > 1 else "")
        if not self.deferred:  # (a small table, installed at once: nothing was held)
            self._waiting.clear()

    def retire_step(self) -> None:
        """Let go of the installed fold's entries for at most :data:`INSTALL_SLICE` seconds (what it shares with
        the table stays: its own records go)."""
        fold = self.retiring
        assert fold is not None
        until = time.monotonic() + INSTALL_SLICE
        for table in (fold.tasks, fold.history, fold.results):
            while table:
                for _ in range(min(4096, len(table))):
                    table.popitem()
                if time.monotonic() >= until:
                    return
        self.retiring = None

    @property
    def holding(self) -> bool:
        """Whether requests are held back: a takeover installs its table, or the messages held meanwhile are
        still being handled (a newer one waits behind them, in order)."""
        return self.installing is not None or bool(self.deferred)

    def replay_step(self, now: float) -> None:
        """Handle held messages, in the order they came, for at most :data:`INSTALL_SLICE` seconds (each with
        its time of arrival for its sender's request rate); keep the peers whose messages still wait."""
        deferred, handle = self.deferred, self.core.handle
        until = time.monotonic() + INSTALL_SLICE
        n = 0
        while deferred:
            sock, frames, user, when = deferred.popleft()
            self.deferred_bytes -= frames_size(frames)
            handle(sock, frames, now, user, when)
            n += 1
            if n % 64 == 0 and time.monotonic() >= until:
                break
        if deferred:
            self._keep_alive(now)
        else:
            self._waiting.clear()

    def defer(self, sock: Any, frames: list[Any], user: str | None, now: float) -> None:
        """A message that came while requests are held back (:attr:`holding`): handled later, in order."""
        self.deferred.append((sock, frames, user, now))
        self.deferred_bytes += frames_size(frames)
        self.counters["ha_deferred"] += 1
        self._waiting.setdefault((sock, bytes(frames[0])), float("-inf"))

    @property
    def deferring_full(self) -> bool:
        """Whether :data:`MAX_DEFERRED` messages or :data:`MAX_DEFERRED_BYTES` bytes are held already (the routers
        are left unread meanwhile)."""
        return len(self.deferred) >= MAX_DEFERRED or self.deferred_bytes >= MAX_DEFERRED_BYTES

    def _keep_alive(self, now: float) -> None:
        """A ``HEARTBEAT`` to each peer whose message is held, once an interval: it hears from this server (a
        satellite waiting for its ``WELCOME``, a client for its answer) and does not give up on it."""
        if now < self._next_keep_alive:
            return
        every = self.core.cfg.heartbeat_interval
        self._next_keep_alive = now + every / 2
        beat = M.beat(P.HEARTBEAT, self.core.state.epoch)
        out = self.core.outbox.messages
        for key, last in self._waiting.items():
            if now - last >= every:
                self._waiting[key] = now
                out.append((key[0], [key[1], *beat], None))

    def next_wakeup(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to do."""
        leader = self.leader
        if self.holding or self.retiring is not None or (leader is not None and leader.sending):
            return 0.0  # the rest of a takeover (its table, what it held, its fold to let go), or of a snapshot
        due = self._next_state
        if leader is not None and leader.streaming:
            due = min(due, self.star.peer_expiry)
        return max(0.0, due - now)

    def close(self) -> None:
        """Close both sockets (idempotent)."""
        for s in (self.pub, self.sub):
            if not s.closed:
                s.close(linger=1000 if self.exit_code and s is self.pub else 0)
