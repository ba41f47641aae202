"""The orchestrator's socket adapter: one poll loop around :class:`~orchester.server.core.Orchestrator`.

Sockets are created in the thread that runs :meth:`Broker.run` (or in the
constructor when the caller runs the loop in its own thread) and closed in
``finally`` with ``linger=0``. Each wake-up drains every readable socket in
batches, then runs the core's housekeeping and flushes what it produced.

Example::

    from orchester.server.broker import Broker
    from orchester.config import OrchestratorConfig

    broker = Broker(OrchestratorConfig(bind=["tcp://127.0.0.1:*"], pub=["tcp://127.0.0.1:*"]))
    print(broker.endpoints)      # the endpoints actually bound
    broker.run()                 # until broker.stop() from another thread, or SIGTERM in the CLI
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from orchester.config import OrchestratorConfig
from orchester.ha.pair import Pair
from orchester.ha.star import HAState
from orchester.journal import records
from orchester.journal.writer import HistoryReader, Journal, load_spilled, replay
from orchester.metrics.collector import CarbonSender, Collector, parse_carbon
from orchester.security.auth import (
    EVENTS_DOMAIN,
    CurveAuthenticator,
    KeyRing,
    load_keypair,
    secure_server,
    verified_user,
)
from orchester.server.core import Orchestrator
from orchester.server.gate import ReleaseGate, gate_bound
from orchester.server.heap import HeapKeeper
from orchester.server.ports import Ports
from orchester.server.restore import restore
from serializers import protocol as P
from serializers.header import ProtocolError
from serializers.messages import grouped, unbatch
from serializers.zmqframes import NOBLOCK, readable, recv_frames, send_frames

log = logging.getLogger("orchester")

#: Payload bytes the journal may have queued before the broker stops reading new messages.
JOURNAL_BACKLOG = 32 << 20
#: While a takeover holds requests back, a wake-up reads this many times ``batch`` messages per router.
HOLDING_READS = 64
#: (Un)subscriptions read from the event socket per wake-up: a flood of them cannot hold the loop.
SUBSCRIPTION_READS = 1024
#: Seconds a key that subscribed beyond ``--max-subscriptions`` is kept off the event stream.
MUTE_SECONDS = 60.0
#: What the orchestrator sends batched to one peer: what a task's course produces, bounded by what the peer
#: was allowed (its credit, its unfinished tasks, its unread results). An ERROR or a REPLY, which a peer can
#: provoke without such a bound, goes alone: a peer that never reads holds at most ``--hwm`` of them queued.
BATCHED = frozenset({P.DISPATCH, P.ABORT, P.ACK, P.RESULT})
#: errnos that mean "this peer cannot take the message now"; anything else propagates.
_UNDELIVERABLE = (zmq.EAGAIN, zmq.EHOSTUNREACH)


class Broker:
    """Bind the orchestrator's sockets and run its poll loop."""

    def __init__(self, config: OrchestratorConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config.validate()
        self.ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._routers: list[zmq.Socket[Any]] = []
        self.endpoints: dict[str, list[str]] = {"bind": [], "satellite_bind": [], "pub": []}
        self.auth: CurveAuthenticator | None = None
        #: this server's CURVE key pair (public, secret), when CurveZMQ is on
        self.curve: tuple[bytes, bytes] | None = None
        self.ring: KeyRing | None = None
        if config.secure:
            assert config.curve_secret and config.authorized_keys
            self.curve = load_keypair(config.curve_secret)
            self.ring = KeyRing(config.authorized_keys)
            # the pair's peer link has its own ZAP domain, where only the server key gets in
            self.auth = CurveAuthenticator(self.ring, self.ctx, peer_keys=[self.curve[0]])
            self.auth.start()
            log.info("CurveZMQ on: %d authorised key(s) in %s", len(self.ring), config.authorized_keys)
            for err in self.ring.errors:
                log.warning("authorised keys: skipped %s", err)
        exposed = config.exposed_endpoints  # validate() refused them unless keys or --insecure
        if exposed and not config.secure:
            log.warning("--insecure: %s reachable beyond this machine without authentication or encryption",
                        ", ".join(exposed))
        self.pair: Pair | None = None
        # the core's connections, declared once: records go to a journal and/or a passive peer; the pair's
        # view and operations are looked up when asked (the pair is made after the core, around it)
        self.core = Orchestrator(config, time.monotonic(), ports=Ports(
            identify=self.ring.by_name if self.ring is not None else None,
            journal=bool(config.ha or config.journal), history_reader=bool(config.journal),
            metrics=bool(config.carbon), load_spilled=load_spilled,
            pub_endpoints=lambda: self.endpoints["pub"],
            ha_status=self._ha_status if config.ha else None, ha_control=self._ha_control if config.ha else None))
        try:
            self.router = self._router(config.bind, "bind")
            self.sat_router = self._router(config.satellite_bind, "satellite_bind") \
                if config.satellite_bind else self.router
            self._events_unbound: list[str] = []  #: event endpoints a re-open could not bind again
            self._events_reopened = False  #: the event socket was re-opened: its endpoints are watched
            self.xpub = self._event_socket(config.pub)
        except Exception:
            self.close()
            raise
        self.journal: Journal | None = None
        self.history: HistoryReader | None = None
        self._spilling: dict[int, Any] = {}
        self.metrics: CarbonSender | None = None
        self._collector: Collector | None = None
        if config.carbon:
            host, port = parse_carbon(config.carbon)
            self.metrics = CarbonSender(host, port, config.carbon_protocol)
            self._collector = Collector(config.metrics_prefix)
        self._rseq = 0  #: number of the last record journaled (and streamed to a passive peer)
        #: what waits for the records it depends on: acknowledgements and results; in a pair with
        #: synchronous replication, dispatches too (a task never runs before the passive knows it is
        #: dispatched, so that after a failover it is claimed back, not run a second time)
        # with synchronous replication, and with keys and a journal, a dispatch waits for its record too:
        # after a failover or a restart, only the satellite the records name may claim a task back
        dispatches = (config.ha and config.replication == "sync") or \
            (config.secure and bool(config.journal) and config.durability != "off")
        self.gate = ReleaseGate((P.ACK, P.RESULT, P.DISPATCH) if dispatches else (P.ACK, P.RESULT))
        #: set when the process must end with this exit code (a backup stepping down from a dual active)
        self.exit_code = 0
        #: key names removed by a reload, whose work and subscriptions the loop ends
        self._revoked: set[str] = set()
        self._poller = zmq.Poller()  #: every socket the loop polls ...
        #: ... and the handler of each (the Guide's ``mediate()`` table)
        self._handlers: dict[zmq.Socket[Any], Callable[[zmq.Socket[Any], float], None]] = {}
        self._journal_full = False  #: this wake-up: the journal is behind, clients and satellites wait
        self._unread = False  #: this wake-up: messages may wait unread (a full batch, or the journal behind)
        self._next_report = 0.0  #: when metrics go to carbon next
        self._next_events_retry = 0.0  #: when event endpoints that could not be bound again are tried
        #: the task tables kept out of the cyclic collector's way (frozen as they age)
        self.heap = HeapKeeper(time.monotonic(), self.core.state.counters)
        if config.ha:
            try:
                self.pair = Pair(config, self.ctx, self.core, self.router, time.monotonic(),
                                 self._journal_append if config.journal else None, lambda: self._rseq,
                                 curve=self.curve)
            except Exception:
                self.close()
                raise
            self.endpoints["state"] = [self.pair.endpoint]
        if config.journal:
            self._open_journal(config.journal, config.durability)
        if config.endpoint_file:
            write_endpoint_file(config.endpoint_file, self.endpoints)

    def _ha_status(self, now: float) -> dict[str, Any]:
        """The pair's view of itself, for the core's status replies and metrics."""
        if self.pair is None:  # (only while the broker is being built)
            return {"state": "starting"}
        return self.pair.describe(now)

    def _ha_control(self, hdr: dict[str, Any], now: float) -> dict[str, Any]:
        """The pair's operations (``promote``, the ``peer_link`` fault hook), asked through the core."""
        if self.pair is None:
            raise ProtocolError(P.E_BAD_REQUEST, "the binary-star pair is still starting")
        return self.pair.control(hdr, now)

    def _open_journal(self, directory: str, durability: str) -> None:
        """Take the journal (one writer only), replay it into the core, then journal from here on."""
        try:
            self.journal = Journal(directory, durability, context=self.ctx)
        except Exception:
            self.close()
            raise
        records, report = replay(directory, live=self.journal.writer.path)
        self.history = HistoryReader(Path(directory), self.ctx)
        if self.pair is not None:  # installed only if and when this server becomes active
            for record in records:
                self.pair.fold.add(record)
            log.info("journal %s: %d records in %d segment(s), %d task(s), kept until this server is active",
                     directory, report.records, report.segments, len(self.pair.fold.tasks))
        else:
            counts = restore(self.core, records, time.monotonic(), self.router, self.config.lost_after)
            self.heap.settled(time.monotonic())
            log.info("journal %s: %d records in %d segment(s); %d task(s) finished, %d requeued", directory,
                     report.records, report.segments, counts.get("finished", 0), counts.get("requeued", 0))
        for name, offset, lost in report.damaged:
            log.error("journal segment %s is damaged at byte %d: the %d bytes after it (the records written "
                      "last before a crash) are lost", name, offset, lost)
        self.core.state.counters.update(report.counters())  # (damaged segments were logged where they were found)

    def _event_socket(self, endpoints: list[str], must: bool = True) -> zmq.Socket[Any]:
        """The XPUB socket, bound to ``endpoints`` (their resolved names go to :attr:`endpoints`).

        ``must``: an endpoint that cannot be bound is an error (at start); otherwise (a re-open)
        the socket serves the others and the loop tries that one again every second."""
        xpub = self.ctx.socket(zmq.XPUB)
        xpub.linger = 0
        if self.curve is not None:
            secure_server(xpub, *self.curve, domain=EVENTS_DOMAIN)
        xpub.sndhwm = self.config.hwm * 10
        xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
        # a subscription longer than a topic may be is refused by libzmq itself (the peer is dropped). ZMTP
        # 3.1 sends one as a SUBSCRIBE command: the topic and 10 bytes; the limit also applies to the
        # CurveZMQ handshake, whose INITIATE command takes up to about 300 bytes: with keys, at least 512
        limit = self.config.max_topic + 10
        xpub.setsockopt(zmq.MAXMSGSIZE, max(limit, 512) if self.curve else limit)
        xpub.rcvhwm = 256  # (libzmq still files all it has read at once: see docs/security.rst, what remains)
        bound = []
        try:
            for ep in endpoints:
                if not self._bind_events(xpub, ep, attempts=50 if must else 5):
                    if must:
                        raise zmq.ZMQError(zmq.EADDRINUSE, f"cannot bind {ep}")
                    self._events_unbound.append(ep)  # someone took it meanwhile: tried again later
                    log.error("the event endpoint %s cannot be bound again (taken?): retrying every second", ep)
                    continue
                bound.append(xpub.last_endpoint.decode())
        except Exception:
            xpub.close(0)
            raise
        self.endpoints["pub"] = bound + self._events_unbound
        return xpub

    @staticmethod
    def _bind_events(xpub: zmq.Socket[Any], endpoint: str, attempts: int) -> bool:
        """Bind ``endpoint``; re-binding a port right after a close may need a moment (``attempts``
        of 20 ms). Any error but "address in use" propagates."""
        for attempt in range(attempts):
            try:
                xpub.bind(endpoint)
                return True
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or endpoint.endswith(":*"):
                    raise
                if attempt < attempts - 1:
                    time.sleep(0.02)
        return False

    def _retry_events(self) -> None:
        """Bind the event endpoints that could not be bound again after a re-open (and an ``ipc://``
        one whose socket file went away: a closed socket's listener may remove it late)."""
        for ep in self.endpoints["pub"]:
            if ep.startswith("ipc://") and ep not in self._events_unbound and not os.path.exists(ep[6:]):
                with contextlib.suppress(zmq.ZMQError):  # its listener may already be gone with the file
                    self.xpub.unbind(ep)
                self._events_unbound.append(ep)
        for ep in list(self._events_unbound):
            try:
                ok = self._bind_events(self.xpub, ep, attempts=1)
            except zmq.ZMQError as exc:
                log.error("the event endpoint %s cannot be bound: %s", ep, exc)
                ok = False
            if ok:
                self._events_unbound.remove(ep)
                log.warning("the event endpoint %s is bound again", ep)

    def _revoke(self, names: set[str]) -> None:
        """Revoked keys: their work ends in the core, and their event subscriptions with the XPUB
        socket (:meth:`_reopen_events`)."""
        counts = self.core.revoke(names, time.monotonic())
        log.warning("revoked %s: %d unfinished task(s) cancelled, %d satellite(s) dropped, %d connection(s) "
                    "forgotten; event stream re-opened", sorted(names), counts["tasks"], counts["satellites"],
                    counts["connections"])
        self._reopen_events()

    def _mute(self, names: set[str]) -> None:
        """Keys that hold more than ``--max-subscriptions`` subscriptions: shut out of the event
        stream for :data:`MUTE_SECONDS`; and with them (or when all subscribers together hold
        more than libzmq should keep), the event socket is re-opened, which frees what libzmq
        kept (it cannot drop one peer's subscriptions)."""
        if names and self.auth is not None:
            for name in names:
                self.auth.mute(name, MUTE_SECONDS)
            self.core.state.counters["subscribers_muted"] += len(names)
            log.warning("key(s) %s hold more than %d subscriptions: no events for them for %gs; event stream "
                        "re-opened", sorted(names), self.config.max_subscriptions, MUTE_SECONDS)
        else:
            self.core.state.counters["subscription_floods"] += 1
            log.warning("subscribers hold more than %d subscriptions together: event stream re-opened (they "
                        "subscribe again by themselves)", self.core.state.subs.max_live)
        self._reopen_events()

    def _reopen_events(self) -> None:
        """Close the XPUB socket and bind a new one on the same endpoints: every subscription it
        held is gone (libzmq cannot drop one peer's); subscribers whose key may still subscribe
        reconnect and subscribe again by themselves, the others fail the handshake."""
        self._unwatch(self.xpub)
        endpoints = list(self.endpoints["pub"])
        self.xpub.close(0)
        self.core.use_subscriptions(self.core.state.subscriptions(keys=self.curve is not None))
        self._events_unbound.clear()
        self._events_reopened = True
        self.xpub = self._event_socket(endpoints, must=False)
        self._watch(self.xpub, self._on_subscriptions)

    def _router(self, endpoints: list[str], name: str) -> zmq.Socket[Any]:
        s = self.ctx.socket(zmq.ROUTER)
        self._routers.append(s)
        s.linger = 0
        s.router_mandatory = 1
        s.sndhwm = self.config.hwm
        s.rcvhwm = self.config.hwm
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_message)
        if self.curve is not None:
            secure_server(s, *self.curve)
        for ep in endpoints:
            s.bind(ep)
            self.endpoints[name].append(s.last_endpoint.decode())
        return s

    @property
    def client_endpoint(self) -> str:
        """The first bound client endpoint."""
        return self.endpoints["bind"][0]

    @property
    def pub_endpoint(self) -> str:
        """The first bound event endpoint."""
        return self.endpoints["pub"][0]

    def stop(self) -> None:
        """Ask the loop to end (thread-safe); it returns within one poll timeout."""
        self._stop.set()

    def reload_keys(self) -> tuple[set[str], set[str]]:
        """Re-read the authorised keys (SIGHUP): new keys work, removed ones are refused at once."""
        if self.ring is None:
            return set(), set()
        added, removed = self.ring.reload()
        self.core.state.counters["key_reloads"] += 1
        self._revoked |= removed  # applied by the loop at its next wake-up
        log.warning("authorised keys re-read: %d key(s); added %s, removed %s", len(self.ring),
                    sorted(added) or "none", sorted(removed) or "none")
        for err in self.ring.errors:
            log.warning("authorised keys: skipped %s", err)
        return added, removed

    def run(self) -> None:
        """Run the poll loop until :meth:`stop`; closes the sockets on the way out.

        The shape of the ZeroMQ Guide's ``mediate()``: a table from each polled socket to its
        handler, one poll, the handlers of the sockets that are ready, then the housekeeping that
        follows every wake-up (:meth:`_after_wakeup`)."""
        core, cfg = self.core, self.config
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(self.close)
            for s in self._routers:
                self._watch(s, self._on_router)
            self._watch(self.xpub, self._on_subscriptions)
            if self.journal is not None:
                self._watch(self.journal.notify, self._on_journal)
            if self.history is not None:
                self._watch(self.history.results, self._on_history)
            if self.pair is not None:
                self._watch(self.pair.sub, self._on_peer)
            monotonic, counters, pair = time.monotonic, core.state.counters, self.pair
            self._next_report = monotonic() + cfg.metrics_interval
            log.info("orchestrator %s listening on %s, events on %s", core.state.epoch,
                     self.endpoints["bind"] + self.endpoints["satellite_bind"], self.endpoints["pub"])
            while not self._stop.is_set():
                timeout = min(core.next_wakeup(monotonic()), 0.25)
                if pair is not None:
                    timeout = min(timeout, pair.next_wakeup(monotonic()))
                ready = self._poller.poll(int(timeout * 1000))
                now = monotonic()
                counters["wakeups"] += 1
                journal = self.journal
                self._journal_full = journal is not None and journal.backlog > JOURNAL_BACKLOG
                if self._journal_full:
                    assert journal is not None
                    journal.notify.poll(5)  # wait for the writer rather than spin
                self._unread = self._journal_full  # (backpressure: the routers are not read this time)
                for sock, _ in ready:
                    self._handlers[sock](sock, now)
                if not self._unread and not (pair is not None and pair.holding):
                    core.state.read_until = now  # every message that had come was handled: silences count to now
                if not self._after_wakeup(now):
                    break

    # ------------------------------------------------------------- the socket table
    def _watch(self, sock: zmq.Socket[Any], handler: Callable[[zmq.Socket[Any], float], None]) -> None:
        """Poll ``sock``; when it is readable, call ``handler(sock, now)``."""
        self._poller.register(sock, zmq.POLLIN)
        self._handlers[sock] = handler

    def _unwatch(self, sock: zmq.Socket[Any]) -> None:
        self._poller.unregister(sock)
        del self._handlers[sock]

    def _on_router(self, sock: zmq.Socket[Any], now: float) -> None:
        """Up to a batch of messages from clients or satellites, into the core."""
        counters, pair, ring = self.core.state.counters, self.pair, self.ring
        if self._journal_full:
            counters["journal_backpressure"] += 1
            return  # let ZeroMQ's high-water marks push back until the journal catches up
        secure, metrics_on, handle = self.curve is not None, self.metrics is not None, self.core.handle
        frames: list[Any]
        drained = False
        budget = self.config.batch  # messages per wake-up, those a BATCH carries counted one by one
        holding = pair is not None and pair.holding
        if holding:
            budget *= HOLDING_READS  # (held back, a message costs an append: the senders' ids are known sooner)
        first = True
        while budget > 0:
            if holding and pair is not None and pair.deferring_full:
                break  # a takeover holds requests: enough wait already (the high-water marks push back)
            if not first and not readable(sock):
                drained = True  # (most wake-ups bring one message: asking is cheaper than a receive that fails)
                break
            first = False
            user = None
            try:
                if secure:
                    received: list[Any] = sock.recv_multipart(NOBLOCK, copy=False)
                    user = verified_user(ring, received[0]) if ring is not None else None
                    received[:4] = [f.bytes for f in received[:4]]
                    frames = received
                else:
                    frames = recv_frames(sock, NOBLOCK, 4)
            except zmq.Again:
                drained = True
                break
            if metrics_on:
                counters["bytes_in"] += sum(map(len, frames))
            messages = [frames]
            if len(frames) > 3 and frames[2] == P.BATCH:
                with contextlib.suppress(ProtocolError):  # (the core refuses it whole: malformed, version)
                    messages = unbatch(frames, 2)
                    counters["batches_in"] += 1
            budget -= len(messages)
            counters["messages_in"] += len(messages)
            for message in messages:  # a passive server of a pair looks at each (a vote may be any of them)
                if pair is not None and not pair.star.serving and not pair.gatekeep(sock, message, now):
                    continue
                if pair is not None and pair.holding:  # (a vote above may have started it)
                    pair.defer(sock, message, user, now)
                    continue
                handle(sock, message, now, user)
        if not drained:  # a whole batch: more may wait (silences are not counted past the last full read)
            self._unread = True

    def _on_journal(self, sock: zmq.Socket[Any], now: float) -> None:
        """The journal writer made records durable: release what waited for them; spill payloads."""
        journal = self.journal
        assert journal is not None
        self._durable(journal, journal.drain_notifications())

    def _durable(self, journal: Journal, durable: int) -> None:
        """Records up to ``durable`` are in the journal: a passive acknowledges them; payloads spill."""
        pair = self.pair
        if pair is not None and pair.state is HAState.PASSIVE:
            pair.durable(durable)
        self._spill(journal)

    def _on_history(self, sock: zmq.Socket[Any], now: float) -> None:
        """The journal reader answered history queries."""
        assert self.history is not None
        for qsock, frames in self.history.replies():
            self._send(qsock, frames, None)

    def _on_peer(self, sock: zmq.Socket[Any], now: float) -> None:
        """Messages from the other server of the pair."""
        assert self.pair is not None
        self.pair.apply(self.pair.drain(now), now)

    def _after_wakeup(self, now: float) -> bool:
        """What follows every wake-up: the pair's clock, revoked and muted keys, the event endpoints,
        the core's housekeeping, the outbox, metrics. ``False``: the loop must end."""
        core, journal, pair = self.core, self.journal, self.pair
        if journal is not None and journal.error is not None:  # never acknowledge, or follow, blind
            raise RuntimeError(f"the journal failed: {journal.error}")
        if pair is not None:
            pair.tick(now)
            if pair.exit_code:  # stepping down: say why on the event stream, then stop
                self.exit_code = pair.exit_code
                self._flush(now)
                self._xpub_linger = 1000
                return False
            if pair.installing is not None:  # a takeover: its table a slice at a time, the waiting peers kept
                pair.install_step(now)
            elif pair.deferred:  # then what came meanwhile, a slice at a time, in order
                pair.replay_step(now)
            elif pair.retiring is not None:  # then the fold it installed, let go of a slice at a time
                pair.retire_step()
        if self._revoked:
            revoked, self._revoked = self._revoked, set()
            self._revoke(revoked)
        subs = core.state.subs
        if subs.over or subs.flooded:
            self._mute(set(subs.over))
        if self._events_reopened and now >= self._next_events_retry:
            self._next_events_retry = now + 1.0
            self._retry_events()
        installing = pair is not None and pair.installing is not None
        if not installing:  # (while a takeover installs its table, its timers and satellites wait for it)
            core.housekeeping(now)
        self._flush(now)
        if not installing:
            self.heap.tick(now)
        if self.metrics is not None and now >= self._next_report:
            self._next_report = now + self.config.metrics_interval
            self._report(now)
        return True

    def _on_subscriptions(self, sock: zmq.Socket[Any], now: float) -> None:
        """At most :data:`SUBSCRIPTION_READS` (un)subscriptions per wake-up: a flood of them cannot hold the loop.

        With keys, each one is counted against the key that sent it (its ``User-Id``)."""
        ring = self.ring
        for _ in range(SUBSCRIPTION_READS):
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            user = verified_user(ring, frame) if ring is not None else None
            self.core.subscription(frame.bytes, user)

    def _gate(self, now: float) -> int | None:
        """Highest record whose gated messages may go out (``None``: all of them)."""
        journal = self.journal
        durable = journal.durable if journal is not None and journal.waits else None
        return gate_bound(durable, self.pair.gate(now) if self.pair is not None else None)

    def _journal_append(self, record: list[Any]) -> int:
        """Journal a record replicated from the active (passive side); returns its local number."""
        assert self.journal is not None
        return self.journal.append(record)

    def _flush(self, now: float) -> None:
        core = self.core
        journal = self.journal
        pair = self.pair
        written = core.outbox.take_records()
        gating = bool(written or len(self.gate))
        if written:
            if journal is not None:
                to_spill = core.state.to_spill
                spilling: list[tuple[int, Any]] = []
                if to_spill:
                    for i, record in enumerate(written):
                        code, tid = records.head(record)
                        task = to_spill.pop(tid, None) if code == records.SUBMITTED else None
                        if task is not None:
                            spilling.append((i, task))
                self._rseq = journal.extend(written, [i for i, _ in spilling])
                first = self._rseq - len(written) + 1  # (the journal numbers them; without one, we do)
                for i, task in spilling:
                    self._spilling[first + i] = task
                if journal.durable == self._rseq:  # written at once (a batch journal's small batch)
                    self._durable(journal, self._rseq)
            else:
                self._rseq += len(written)
                first = self._rseq - len(written) + 1
            if pair is not None:
                for seq, record in enumerate(written, first):
                    pair.replicate(seq, record)
                pair.flush()
        bound = self._gate(now) if gating else None  # once per wake-up: what may go out
        if core.outbox.queries and self.history is not None:
            self.history.ask_all(core.outbox.take_queries())
        going: list[tuple[Any, list[Any], str | None]] = []
        if core.outbox.messages:
            going.extend(self.gate.route(core.outbox.take_messages(), self._rseq, bound))
        if len(self.gate):
            going.extend(self.gate.release(bound))
        if going:
            self._send_all(going)
        if core.outbox.events:
            pub = core.outbox.take_events()  # (to an event socket with no endpoint bound: dropped by libzmq)
            for frames in pub:
                try:
                    self.xpub.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    core.state.counters["events_dropped"] += 1

    def _report(self, now: float) -> None:
        """Collect this interval's points and hand them to the sender (never waits)."""
        assert self.metrics is not None and self._collector is not None
        points = self._collector.collect(self.core, now, time.time(), self.journal, extra=self.metrics.stats())
        self.metrics.send(points)

    def _spill(self, journal: Journal) -> None:
        """Durable payloads of tasks still queued leave memory; they are read back when dispatched."""
        while journal.locations:
            seq, path, offset = journal.locations.popleft()
            journal.spillable.discard(seq)
            task = self._spilling.pop(seq, None)
            if task is not None:
                self.core.life.spilled(task, (path, offset))

    def _send_all(self, going: list[tuple[Any, list[Any], str | None]]) -> None:
        """Send what may go out now, each peer's messages in their order: a run of them that may be batched
        (:data:`BATCHED`: a satellite's dispatches, a client's results) as one BATCH, one send and one
        wake-up of each side; any other message alone, where it stands."""
        if len(going) == 1:
            self._send(*going[0])
            return
        peers: dict[tuple[Any, bytes], list[tuple[Any, list[Any], str | None]]] = {}
        for item in going:
            peers.setdefault((item[0], item[1][0]), []).append(item)
        for (sock, ident), queued in peers.items():
            run: list[tuple[Any, list[Any], str | None]] = []
            for item in queued:
                if item[1][2] in BATCHED:
                    run.append(item)
                    continue
                self._send_run(sock, ident, run)  # (what came before it goes first)
                run = []
                self._send(*item)
            self._send_run(sock, ident, run)

    def _send_run(self, sock: Any, ident: bytes, run: list[tuple[Any, list[Any], str | None]]) -> None:
        """Messages to one peer that may be batched, in order, cut where one BATCH would be too large."""
        if len(run) == 1:
            self._send(*run[0])
        elif run:
            for part, batched in grouped([f[2:] for _, f, _ in run]):
                group = run[part]
                if len(group) == 1:
                    self._send(*group[0])
                else:
                    self._send_batch(sock, [ident, *batched], group)

    def _send_batch(self, sock: Any, frames: list[Any], group: list[tuple[Any, list[Any], str | None]]) -> None:
        """One BATCH (``frames``, its peer's routing id first) to one peer; each message it carries is delivered
        (or not) as if sent alone."""
        core = self.core
        try:
            send_frames(sock, frames, NOBLOCK)
        except zmq.ZMQError as exc:
            if exc.errno not in _UNDELIVERABLE:
                raise
            for _, _, task_id in group:
                if task_id is not None:
                    core.undeliverable(task_id)
                else:
                    core.state.counters["undeliverable"] += 1
            return
        core.state.counters["batches_out"] += 1
        if self.metrics is not None:
            core.state.counters["bytes_out"] += sum(map(len, frames))
        for _, _, task_id in group:
            if task_id is not None:
                core.delivered(task_id)

    def _send(self, sock: Any, frames: list[Any], task_id: str | None) -> None:
        core = self.core
        try:
            send_frames(sock, frames, NOBLOCK)
            if self.metrics is not None:
                core.state.counters["bytes_out"] += sum(map(len, frames))
            if task_id is not None:
                core.delivered(task_id)
        except zmq.ZMQError as exc:
            if exc.errno not in _UNDELIVERABLE:
                raise
            if task_id is not None:
                core.undeliverable(task_id)
            else:
                core.state.counters["undeliverable"] += 1

    def close(self) -> None:
        """Close the journal (after writing what is queued) and every socket (idempotent)."""
        if getattr(self, "heap", None) is not None:
            self.heap.release()
        if getattr(self, "journal", None) is not None:
            assert self.journal is not None
            self.journal.close()
            self.journal = None
        if getattr(self, "metrics", None) is not None:
            assert self.metrics is not None
            self.metrics.close()
            self.metrics = None
        if getattr(self, "history", None) is not None:
            assert self.history is not None
            self.history.close()
            self.history = None
        if getattr(self, "pair", None) is not None:
            assert self.pair is not None
            self.pair.close()
        for s in self._routers:
            if not s.closed:
                s.close(linger=0)
        xpub = getattr(self, "xpub", None)
        if xpub is not None and not xpub.closed:
            xpub.close(linger=getattr(self, "_xpub_linger", 0))
        if getattr(self, "auth", None) is not None:
            assert self.auth is not None
            self.auth.stop()
            self.auth = None


def write_endpoint_file(path: str, endpoints: dict[str, list[str]]) -> None:
    """Atomically write the bound endpoints as JSON (readers never see a partial file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({**endpoints, "pid": os.getpid()}, f)
    os.replace(tmp, path)


class BrokerThread:
    """Run a :class:`Broker` in a background thread (for tests and embedding)."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.broker = Broker(config)
        self._thread = threading.Thread(target=self.broker.run, name="orchester-broker", daemon=True)

    def __enter__(self) -> Broker:
        self._thread.start()
        return self.broker

    def __exit__(self, *exc: object) -> None:
        self.broker.stop()
        self._thread.join(10)
