"""The active's replication out: stream the journal, answer ``SYNC``, track the passive's ``ACK``.

A :class:`Leader` is the role of the ACTIVE server (:class:`~orchester.ha.pair.Pair` makes one
when the server takes over). Once the passive asks for a snapshot (``SYNC``), the leader sends
the task table in slices (:class:`~orchester.ha.resync.OutgoingSnapshot`), holds the records
journaled meanwhile and streams them after the last chunk (``REC``), then every record as it is
journaled. It tracks the passive's acknowledgements (``ACK``, repeated in its ``STATE``) and
tells the release gate (:meth:`Leader.gate`) which records are on both servers. When the passive
goes silent or stops acknowledging, it falls back to local durability and says so
(``ha:replication``) — except while the passive takes a snapshot just sent: four heartbeats and
:data:`SNAPSHOT_PATIENCE` per record of it. It takes the tasks a rejoining server hands back (``ORPHANS``).

No socket and no clock of its own: ``now`` is passed in, and the work clock that slices a
snapshot is the caller's (:func:`time.perf_counter` in the pair, a fake one in tests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from orchester.ha import link
from orchester.ha.resync import OutgoingSnapshot
from orchester.ha.star import HAState
from orchester.server.restore import take_over
from serializers.header import pack

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator

log = logging.getLogger("orchester.ha")

#: Seconds a passive is given per record of a snapshot to fold and journal it and acknowledge, beside four
#: heartbeats: meanwhile its silence and its missing acknowledgement are expected, not a reason to give it
#: up (a passive given up asks for a snapshot again: one it could never take in time came round forever).
SNAPSHOT_PATIENCE = 100e-6


class Leader:
    """The active's side of replication, fed decoded peer messages (:mod:`orchester.ha.link`).

    ``core``: the orchestrator (snapshots are taken from it, handed-back tasks installed in it,
    ``ha:replication`` events published on it); ``router``: the socket key restored tasks answer
    their clients on; ``heartbeat``: the pair's (a passive that does not acknowledge for four is
    given up); ``sync``: ``--replication sync`` (the gate waits for the passive); ``last_seq``:
    the number of the last record journaled; ``send``: puts frames on the peer link; ``clock``: the
    work clock a snapshot's slices are measured with. Drive it with :meth:`receive` for every
    message, :meth:`replicate` and :meth:`flush` for the records journaled, :meth:`tick` on every
    wake-up.
    """

    #: The state in which the pair hands the link to this role.
    STATE: ClassVar[HAState] = HAState.ACTIVE

    def __init__(self, *, core: Orchestrator, router: Any, heartbeat: float, sync: bool,
                 last_seq: Callable[[], int], send: Callable[[list[bytes]], None], clock: Callable[[], float],
                 now: float) -> None:
        self.core = core
        self.router = router
        self.epoch = core.state.epoch
        self.heartbeat = heartbeat
        self.sync = sync
        self.last_seq = last_seq
        self.counters = core.state.counters
        self._send = send
        self._clock = clock
        self.streaming = False  #: the passive asked for the stream
        self.synced = False  #: ... and acknowledged the snapshot
        self.snap_seq = 0  #: the last record the current snapshot covers
        self.acked = 0  #: highest record the passive acknowledged
        self._ack_progress = now  #: when ``acked`` last moved
        #: until when the passive may be silent or not acknowledging, busy with the snapshot just sent
        self._settle_until = now
        self.sent_upto = 0  #: highest record streamed
        self._batch: list[bytes] = []
        self._batch_first = 0
        self.outgoing: OutgoingSnapshot | None = None  #: a snapshot being sent (the stream waits for it)

    # ------------------------------------------------------------- what the pair reports
    @property
    def sending(self) -> bool:
        """A snapshot is on its way (the loop should wake up at once for its next slice)."""
        return self.outgoing is not None

    def replicating(self, peer_alive: bool) -> bool:
        """A live passive follows the stream and has acknowledged its snapshot."""
        return self.streaming and self.synced and peer_alive

    def mode(self, peer_alive: bool) -> str:
        """``sync``/``async`` while the passive follows, ``local`` when it does not."""
        if self.replicating(peer_alive):
            return "sync" if self.sync else "async"
        return "local"

    def gate(self, peer_alive: bool) -> int | None:
        """Highest record whose dependants may be released, or ``None`` when replication does not gate."""
        return self.acked if self.sync and self.replicating(peer_alive) else None

    def status(self) -> dict[str, Any]:
        """This role's part of the pair's status."""
        return {"stream": None, "applied": 0, "acked": self.acked}

    # ------------------------------------------------------------- peer link in
    def receive(self, message: link.Message, now: float) -> None:
        """Act on a message of the passive (others are not for an active and are ignored)."""
        if isinstance(message, link.State):
            if message.stream == self.epoch and message.acked is not None:
                self._on_ack(message.acked, now)  # the passive repeats its acknowledgement every heartbeat
        elif isinstance(message, link.Ack):
            if message.stream == self.epoch:
                self._on_ack(message.seq, now)
        elif isinstance(message, link.Sync):
            self._send_snapshot(now)
        elif isinstance(message, link.Orphans):
            self._on_orphans(message, now)

    def _on_ack(self, q: int, now: float) -> None:
        q = min(q, self.sent_upto)  # the passive cannot hold what was never sent: never release past it
        if q > self.acked:
            self.acked = q
            self._ack_progress = now
        if not self.synced and self.streaming and self.acked >= self.snap_seq:
            self.synced = True
            self._publish("sync" if self.sync else "async", "the passive is in sync")
            log.info("the passive is in sync at record %d: replication %s", self.acked,
                     "synchronous" if self.sync else "asynchronous")

    def _on_orphans(self, message: link.Orphans, now: float) -> None:
        """Take the tasks a rejoining server accepted while it was alone."""
        wanted, counts = take_over(self.core, list(message.records), now, self.router)
        if not wanted:
            return
        self.counters["ha_orphans_taken"] += len(wanted)
        log.warning("took %d task(s) the other server accepted while it was alone: %d finished, %d to run",
                    len(wanted), counts.get("finished", 0), counts.get("requeued", 0))

    # ------------------------------------------------------------- peer link out
    def replicate(self, seq: int, record: list[Any]) -> None:
        """Stream record ``seq`` (sent on :meth:`flush`)."""
        if not self.streaming or seq <= self.snap_seq:
            return  # no one follows, or a record the snapshot already covers
        if not self._batch:
            self._batch_first = seq
        self._batch.append(link.pack_record(record))

    def flush(self) -> None:
        """Send the records streamed since the last flush (held while a snapshot is on its way)."""
        if self._batch and self.outgoing is None:
            batch, self._batch = self._batch, []
            self.sent_upto = self._batch_first + len(batch) - 1
            self._send(link.encode_records(self.epoch, self._batch_first, batch))

    def _send_snapshot(self, now: float) -> None:
        """Answer a SYNC: the whole task table as of the last record (sent over the next
        wake-ups by :meth:`_pump`), then the stream. A SYNC during a snapshot starts a new one."""
        # the snapshot covers every record journaled so far (a batch not sent yet, or held by a
        # snapshot this one replaces); and the table already shows what the records of this
        # wake-up say, numbered at its end: it covers those too (:meth:`replicate` skips them)
        self._batch = []
        q = self.last_seq() + len(self.core.outbox.records or ())
        self.outgoing = OutgoingSnapshot(self.core, q)
        self.streaming, self.synced, self.snap_seq = True, False, q
        self.sent_upto = q
        self._pump(now)

    def _pump(self, now: float) -> None:
        """Send the next slice of the outgoing snapshot; after its last chunk, the held stream."""
        out = self.outgoing
        if out is None:
            return
        try:
            for message in out.messages(self.epoch, self._clock):
                self._send(message)
        except Exception:  # never stop the loop: the passive, left without the rest, asks again
            log.exception("building the snapshot failed; the passive will ask for another one")
            self.counters["ha_snapshot_errors"] += 1
            self.outgoing, self._batch = None, []
            self.streaming = self.synced = False
            return
        if out.done:
            self.outgoing = None
            self._ack_progress = now
            self._settle_until = now + 4 * self.heartbeat + out.records * SNAPSHOT_PATIENCE
            self.counters["ha_snapshots_sent"] += 1
            log.info("sent a snapshot of %d tasks (%d records) to the passive at record %d", len(out.items),
                     out.records, out.q)
            self.flush()

    def tick(self, now: float, peer_alive: bool) -> None:
        """Housekeeping on every wake-up: give up a passive that went silent or stopped
        acknowledging (local durability from then on), send the next slice of a snapshot."""
        if not self.streaming:
            return
        why = self._failing(now, peer_alive)
        if why is not None:
            self.streaming = self.synced = False
            self._batch, self.outgoing = [], None
            self.counters["ha_peer_lost"] += 1
            log.warning("%s: acknowledging on local durability alone", why)
            self._publish("local", why)
        self._pump(now)

    def _failing(self, now: float, peer_alive: bool) -> str | None:
        """Why the passive must be given up now, if it must: silent, or no longer acknowledging. Never while
        it folds and journals a snapshot just sent (its silence and missing acknowledgement are expected)."""
        if not self.synced and self.outgoing is None and now < self._settle_until:
            return None
        if not peer_alive:
            return "the passive is silent"
        if self.outgoing is None and self.acked < self.sent_upto and now - self._ack_progress > 4 * self.heartbeat:
            return "the passive stopped acknowledging"
        return None

    def _publish(self, mode: str, why: str) -> None:
        self.core.outbox.publish([b"ha:replication", pack({"mode": mode, "why": why, "e": self.epoch,
                                                       "t": self.core.state.wall()})])
