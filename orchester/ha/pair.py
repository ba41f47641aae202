"""The binary-star adapter: the link between the two servers of a pair.

Each server binds a PUB socket on its state endpoint (``--state-bind``) and
subscribes to its peer's (``--peer``). Over that link:

* ``STATE {s, role, e, q}`` every heartbeat: the sender's :class:`~orchester.ha.star.HAState`.
* The active streams its journal records: ``REC {e, q}`` followed by one frame per record
  (msgpack, as in the journal), numbered ``q, q+1, ...`` in the active's journal order.
* The passive asks for a snapshot with ``SYNC`` when it has none or sees a gap; the active
  answers with ``SNAP {e, q, i, last}`` chunks (:mod:`orchester.ha.resync`, a few per wake-up),
  the state as of record ``q``, then streams from ``q + 1``.
* The passive acknowledges with ``ACK {e, q}`` once the records up to ``q`` are in its
  journal (durable, per its ``--durability``), or at once without a journal.

With ``--replication sync`` the active releases an acknowledgement or a result only once
the passive has acknowledged the records it depends on — while the peer is alive and in
sync; when the peer goes silent the active falls back to local durability and says so.
This module owns the sockets and the replication bookkeeping; the decisions of the pair are
:class:`~orchester.ha.star.BinaryStar`'s, and the broker applies what they change.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from orchester.config import OrchestratorConfig
from orchester.ha.requests import PairRequests
from orchester.ha.resync import SNAP, IncomingSnapshot, OutgoingSnapshot
from orchester.ha.star import DUAL_ACTIVE, BinaryStar, Change, HAState
from orchester.security.auth import PEER_DOMAIN, secure_client, secure_server
from orchester.server.restore import RestoreFold, take_over, unknown_to
from serializers.header import pack

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator

log = logging.getLogger("orchester.ha")

STATE, REC, SYNC, ACK, ORPHANS = b"STATE", b"REC", b"SYNC", b"ACK", b"ORPHANS"  # and SNAP (resync)
#: Seconds of peer messages handled per wake-up (a passive folding a large snapshot still beats).
DRAIN_SLICE = 0.05


def _int(body: dict[str, Any], key: str) -> int:
    """An integer field of a peer message (ValueError otherwise: the message is dropped)."""
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, not {value!r}")
    return value


class Pair(PairRequests):
    """This server's half of the pair: state link, replication out (active) or in (passive)."""

    def __init__(self, config: OrchestratorConfig, ctx: zmq.Context[Any], core: Orchestrator, router: Any,
                 now: float, append: Callable[[list[Any]], int] | None, last_seq: Callable[[], int],
                 curve: tuple[bytes, bytes] | None = None) -> None:
        assert config.state_bind and config.peer
        self.cfg = config
        self.core = core  #: the orchestrator core (snapshots are taken from it; a takeover fills it)
        self.router = router  #: the socket key restored tasks answer their clients on
        self.exit_code = 0  #: set when this server must stop (a backup stepping down from a dual active)
        #: ``CONTROL peer_link`` (cut or restore the peer link) is honoured only with this set
        self.fault_hooks = os.environ.get("ORCHESTER_FAULT_HOOKS") == "1"
        self.epoch: str = core.state.epoch
        self.last_seq = last_seq  #: the number of the last record this server journaled
        self.star = BinaryStar(config.ha == "primary", config.ha_heartbeat, now)
        self.sync = config.replication == "sync"
        self.counters = core.state.counters
        self._append = append  #: writes a replicated record to the local journal, returns its seq
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
        #: what this server would install if it became active
        self.fold = RestoreFold(keep_finished=config.result_retention)
        self.link_up = True  #: a test fault hook: False drops everything on the peer link
        self._next_state = now
        # active side
        self.follower = False  #: the passive asked for the stream
        self.synced = False  #: ... and acknowledged the snapshot
        self.snap_seq = 0
        self.acked = 0  #: highest record the passive acknowledged
        self._ack_progress = now  #: when ``acked`` last moved
        self._sent_upto = 0  #: highest record streamed
        self._batch: list[bytes] = []
        self._batch_first = 0
        self.outgoing: OutgoingSnapshot | None = None  #: a snapshot being sent (the stream waits for it)
        # passive side
        self.stream: str | None = None  #: the active's epoch whose stream we follow
        self.applied = 0  #: last record applied from that stream
        self.incoming: IncomingSnapshot | None = None  #: a snapshot being received
        #: the fold came from this server's own journal (not yet replaced by a snapshot)
        self._fold_is_own = True
        self._pending_acks: deque[tuple[int, int]] = deque()  #: (local journal seq, stream seq)
        self._ack_due = 0
        self._ack_sent = 0
        self._next_sync = now

    # ------------------------------------------------------------- status
    @property
    def state(self) -> HAState:
        """This server's current state."""
        return self.star.state

    def describe(self, now: float) -> dict[str, Any]:
        """The pair as seen from here (status replies, ``orchester status``)."""
        return {"state": self.star.state.name.lower(), "role": self.star.role,
                "peer": self.star.peer.name.lower() if self.star.peer else None,
                "peer_alive": self.star.peer_alive(now), "replication": self.replication_mode(now),
                "stream": self.stream, "applied": self.applied, "acked": self.acked,
                "alarms": dict(self.star.alarms)}

    def replication_mode(self, now: float) -> str:
        """``sync``/``async`` while the passive follows, ``local`` when it does not, ``follower`` on a passive."""
        if self.star.state is not HAState.ACTIVE:
            return "follower" if self.stream else "none"
        if self._replicating(now):
            return "sync" if self.sync else "async"
        return "local"

    def _replicating(self, now: float) -> bool:
        """A live passive follows the stream and has acknowledged its snapshot."""
        return self.follower and self.synced and self.star.peer_alive(now)

    def gate(self, now: float) -> int | None:
        """Highest record whose dependants may be released, or ``None`` when replication does not gate."""
        return self.acked if self.sync and self._replicating(now) else None

    # --------------------------------------------------------- peer link in
    def drain(self, now: float) -> list[Change]:
        """Read what the peer sent, for at most :data:`DRAIN_SLICE` seconds (the rest waits for the
        next wake-up, which comes at once: the heartbeats go out in between); return the state
        changes it caused."""
        changes: list[Change] = []
        start = time.perf_counter()
        for _ in range(10_000):
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not self.link_up:
                continue
            try:
                change = self._on_peer(frames, now)
            except Exception as exc:  # the peer link never stops the loop: count, log, drop the message
                self.counters["ha_bad_messages"] += 1
                log.warning("bad message on the peer link: %s: %s", type(exc).__name__, exc)
                change = None
            if change is not None:
                changes.append(change)
            if time.perf_counter() - start > DRAIN_SLICE:
                break
        return changes

    def _on_peer(self, frames: list[bytes], now: float) -> Change | None:
        kind = frames[0]
        body = msgpack.unpackb(frames[1], raw=False) if len(frames) > 1 else {}
        if not isinstance(body, dict):
            raise ValueError("peer message header is not a map")
        if kind == STATE:
            if self.star.state is HAState.PASSIVE and self.stream is not None and body.get("e") == self.stream:
                # every record up to q was sent before this message: one not applied was lost
                if body.get("f") is False or _int(body, "q") > self.applied:
                    self.stream = None  # resynchronise
                    self.counters["ha_stream_gaps"] += 1
            if self.star.state is HAState.ACTIVE and body.get("st") == self.epoch and "a" in body:
                self._on_ack(_int(body, "a"), now)  # the passive repeats its acknowledgement every heartbeat
            return self.star.peer_state(HAState(_int(body, "s")), now)
        if kind == REC and self.star.state is HAState.PASSIVE:
            self._on_records(str(body["e"]), _int(body, "q"), frames[2:])
        elif kind == SNAP and self.star.state is HAState.PASSIVE:
            self._on_snapshot(body, frames[2:], now)
        elif kind == SYNC and self.star.state is HAState.ACTIVE:
            self._send_snapshot()
        elif kind == ORPHANS and self.star.state is HAState.ACTIVE:
            self._on_orphans(frames[2:], now)
        elif kind == ACK and self.star.state is HAState.ACTIVE and body.get("e") == self.epoch:
            self._on_ack(_int(body, "q"), now)
        return None

    def _on_ack(self, q: int, now: float) -> None:
        if q > self.acked:
            self.acked = q
            self._ack_progress = now
        if not self.synced and self.follower and self.acked >= self.snap_seq:
            self.synced = True
            self.core.outbox.publish([b"ha:replication", pack({"mode": "sync" if self.sync else "async",
                                                           "why": "the passive is in sync", "e": self.epoch,
                                                           "t": self.core.state.wall()})])
            log.info("the passive is in sync at record %d: replication %s", self.acked,
                     "synchronous" if self.sync else "asynchronous")

    def _on_records(self, epoch: str, first: int, records: list[bytes]) -> None:
        if epoch != self.stream or first != self.applied + 1:
            if self.stream is not None:
                self.counters["ha_stream_gaps"] += 1
            self.stream = None  # out of sync: ask for a snapshot (records before one are covered by it)
            return
        for data in records:
            self.applied += 1
            self._apply(msgpack.unpackb(data, raw=False, strict_map_key=False), self.applied)

    def _on_snapshot(self, body: dict[str, Any], records: list[bytes], now: float) -> None:
        """Gather the chunks; only a complete snapshot replaces what this server follows (a
        partial one, cut by the active's death, is dropped: the previous fold stays)."""
        index = _int(body, "i")
        if index == 0:
            self.stream = None
            self.incoming = IncomingSnapshot(now, self.cfg.result_retention)
        if self.incoming is None or not self.incoming.add(index, records, now):
            if self.incoming is not None:
                self.counters["ha_stream_gaps"] += 1
            self.incoming = self.stream = None  # a broken snapshot: ask for another one
            return
        if not body.get("last"):
            return
        q = _int(body, "q")
        snap, self.incoming = self.incoming, None
        previous, self.fold = self.fold, snap.fold  # folded chunk by chunk as they came
        self._ack_due = self._ack_sent = 0
        self._pending_acks.clear()
        for n, record in enumerate(snap.records, 1):
            self._journal(record, q if n == len(snap.records) else 0)
        self.stream = str(body["e"])
        self.applied = q
        self.counters["ha_snapshots_received"] += 1
        log.info("in sync with the active %s at record %d (%d tasks)", self.stream, self.applied,
                 len(self.fold.tasks))
        self._hand_back(previous, own=self._fold_is_own)
        self._fold_is_own = False

    def _hand_back(self, previous: RestoreFold, own: bool) -> None:
        """Send the active the tasks this server knew and it does not (:func:`~orchester.server.restore.unknown_to`)."""
        out = [msgpack.packb(rec, use_bin_type=True) for rec in unknown_to(previous, self.fold, own)]
        if out:
            log.warning("handing %d record(s) of tasks the active does not know back to it", len(out))
            self.counters["ha_handed_back"] += len(out)
            self._send([ORPHANS, pack({"e": self.stream}), *out])

    def _on_orphans(self, records: list[bytes], now: float) -> None:
        """Take the tasks a rejoining server accepted while it was alone (active side)."""
        wanted, counts = take_over(self.core, [msgpack.unpackb(d, raw=False, strict_map_key=False) for d in records],
                                   now, self.router)
        if not wanted:
            return
        self.counters["ha_orphans_taken"] += len(wanted)
        log.warning("took %d task(s) the other server accepted while it was alone: %d finished, %d to run",
                    len(wanted), counts.get("finished", 0), counts.get("requeued", 0))

    def _apply(self, record: list[Any], stream_seq: int) -> None:
        """Fold one record and journal it; ``stream_seq`` (0: none) is acknowledged once durable."""
        self.fold.add(record)
        self._journal(record, stream_seq)

    def _journal(self, record: list[Any], stream_seq: int) -> None:
        """Journal one folded record; ``stream_seq`` (0: none) is acknowledged once durable."""
        self.counters["ha_records_applied"] += 1
        if self._append is None:
            self._ack_due = max(self._ack_due, stream_seq)
            return
        local = self._append(record)
        if stream_seq:
            self._pending_acks.append((local, stream_seq))

    def durable(self, local_seq: int) -> None:
        """The local journal made records up to ``local_seq`` durable (passive side)."""
        acks = self._pending_acks
        while acks and acks[0][0] <= local_seq:
            self._ack_due = max(self._ack_due, acks.popleft()[1])

    # -------------------------------------------------------- peer link out
    def replicate(self, seq: int, record: list[Any]) -> None:
        """Stream one record (active side; sent on :meth:`flush`)."""
        if not self.follower or seq <= self.snap_seq:
            return  # a record the snapshot already covers
        if not self._batch:
            self._batch_first = seq
        self._batch.append(msgpack.packb(record, use_bin_type=True))

    def flush(self) -> None:
        """Send the records streamed since the last flush (held while a snapshot is on its way)."""
        if self._batch and self.outgoing is None:
            batch, self._batch = self._batch, []
            self._sent_upto = self._batch_first + len(batch) - 1
            self._send([REC, pack({"e": self.epoch, "q": self._batch_first}), *batch])

    def _send_snapshot(self) -> None:
        """Answer a SYNC: the whole task table as of the last record (sent over the next
        wake-ups by :meth:`_pump`), then the stream. A SYNC during a snapshot starts a new one."""
        # the snapshot covers every record journaled so far (a batch not sent yet, or held by a
        # snapshot this one replaces); and the table already shows what the records of this
        # wake-up say, numbered at its end: it covers those too (:meth:`replicate` skips them)
        self._batch = []
        q = self.last_seq() + len(self.core.outbox.records or ())
        self.outgoing = OutgoingSnapshot(self.core, q)
        self.follower, self.synced, self.snap_seq = True, False, q
        self._sent_upto = q
        self._pump()

    def _pump(self) -> None:
        """Send the next slice of the outgoing snapshot; after its last chunk, the held stream."""
        out = self.outgoing
        if out is None:
            return
        try:
            for message in out.messages(self.epoch):
                self._send(message)
        except Exception:  # never stop the loop: the passive, left without the rest, asks again
            log.exception("building the snapshot failed; the passive will ask for another one")
            self.counters["ha_snapshot_errors"] += 1
            self.outgoing, self._batch = None, []
            self.follower = self.synced = False
            return
        if out.done:
            self.outgoing = None
            self._ack_progress = time.monotonic()
            self.counters["ha_snapshots_sent"] += 1
            log.info("sent a snapshot of %d tasks (%d records) to the passive at record %d", len(out.items),
                     out.records, out.q)
            self.flush()

    def _send(self, frames: list[bytes]) -> None:
        if not self.link_up:
            return
        try:
            self.pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.counters["ha_link_dropped"] += 1

    def tick(self, now: float) -> None:
        """Housekeeping on every wake-up: state heartbeat, acks, sync requests, peer expiry."""
        star = self.star
        if now >= self._next_state:
            self._next_state = now + star.heartbeat
            self._send([STATE, pack({"s": int(star.state), "role": star.role, "e": self.epoch,
                                      "q": self.last_seq(), "f": self.follower,
                                      **({"st": self.stream, "a": self._ack_sent} if self.stream else {})})])
        if star.state is HAState.PASSIVE:
            if self._ack_due > self._ack_sent and self.stream is not None:
                self._ack_sent = self._ack_due
                self._send([ACK, pack({"e": self.stream, "q": self._ack_due})])
            if self.incoming is not None and self.incoming.stalled(now, 4 * star.heartbeat):
                self.incoming = None  # a snapshot that stalled: ask again
            if self.stream is None and self.incoming is None and now >= self._next_sync and star.peer_alive(now):
                self._next_sync = now + 2 * star.heartbeat
                self._send([SYNC, pack({"e": self.epoch})])
        elif star.state is HAState.ACTIVE and self.follower:
            why = None
            if not star.peer_alive(now):
                why = "the passive is silent"
            elif self.outgoing is None and self.acked < self._sent_upto \
                    and now - self._ack_progress > 4 * star.heartbeat:
                why = "the passive stopped acknowledging"
            if why is not None:
                self.follower = self.synced = False
                self._batch, self.outgoing = [], None
                self.counters["ha_peer_lost"] += 1
                log.warning("%s: acknowledging on local durability alone", why)
                self.core.outbox.publish([b"ha:replication", pack({"mode": "local", "why": why, "e": self.epoch,
                                                               "t": self.core.state.wall()})])
            self._pump()

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
                    self.exit_code = 3

    def _activate(self, before: HAState, now: float) -> None:
        """Install what the journal and the stream said, then serve."""
        core = self.core
        self.incoming = None  # a snapshot cut short by the takeover is of no use any more
        fold, self.fold = self.fold, RestoreFold(keep_finished=core.cfg.result_retention)
        counts = fold.finish(core, now, self.router, reclaim=core.cfg.lost_after)
        if before is HAState.PASSIVE:
            core.state.counters["failovers"] += 1
        self.stream = None
        log.warning("active with %d task(s): %d finished, %d to run (%d awaiting their satellite)",
                    len(core.state.tasks), counts.get("finished", 0), counts.get("requeued", 0),
                    counts.get("reclaimable", 0))

    def next_wakeup(self, now: float) -> float:
        """Seconds until :meth:`tick` has something to do."""
        if self.outgoing is not None:
            return 0.0  # the rest of a snapshot to send
        return max(0.0, min(self._next_state, self.star.peer_expiry if self.follower else self._next_state) - now)

    def close(self) -> None:
        """Close both sockets (idempotent)."""
        for s in (self.pub, self.sub):
            if not s.closed:
                s.close(linger=1000 if self.exit_code and s is self.pub else 0)
