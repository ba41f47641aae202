"""The passive's replication in: follow the active's stream, journal it, acknowledge it.

A :class:`Follower` is the role of a server that is not active (:class:`~orchester.ha.pair.Pair`
holds one from the start, and hands the link to it while the server is PASSIVE). It keeps
:attr:`Follower.fold`, what the server would install if it took over: first what its own journal
said, then the active's snapshot and the records streamed after it. It asks for a snapshot
(``SYNC``) when it follows nothing, folds the chunks as they come (:class:`~orchester.ha.resync.IncomingSnapshot`),
journals every record and acknowledges (``ACK``) the records once durable, notices a gap (a
record number skipped, or a ``STATE`` of the active numbering a record it did not get) and asks
again. It hands back (``ORPHANS``) the tasks it knew that a new snapshot does not.

No socket, no clock: time is passed in, and what it sends goes through the ``send`` it is given.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any, ClassVar

from orchester.ha import link
from orchester.ha.resync import IncomingSnapshot
from orchester.ha.star import HAState
from orchester.server.restore import RestoreFold, unknown_to

log = logging.getLogger("orchester.ha")


class Follower:
    """The passive's side of replication, fed decoded peer messages (:mod:`orchester.ha.link`).

    ``epoch``: this server's own; ``heartbeat``: the pair's (a ``SYNC`` is repeated every two,
    a snapshot that stalls for four is given up); ``keep_finished``: finished tasks a fold keeps
    (``--result-retention``); ``append``: writes a record to the local journal and returns its
    local number (None: no journal, records are acknowledged at once); ``send``: puts frames on
    the peer link. Drive it with :meth:`receive` for every message, :meth:`tick` on every
    wake-up and :meth:`durable` when the journal reports progress.
    """

    #: The state in which the pair hands the link to this role.
    STATE: ClassVar[HAState] = HAState.PASSIVE

    def __init__(self, *, epoch: str, heartbeat: float, keep_finished: int | None,
                 counters: MutableMapping[str, int], append: Callable[[list[Any]], int] | None,
                 send: Callable[[list[bytes]], None], now: float) -> None:
        self.epoch = epoch
        self.heartbeat = heartbeat
        self.keep_finished = keep_finished
        self.counters = counters
        self._append = append
        self._send = send
        #: what this server would install if it became active
        self.fold = RestoreFold(keep_finished=keep_finished)
        self.stream: str | None = None  #: the active's epoch whose stream we follow
        self.applied = 0  #: last record applied from that stream
        self.incoming: IncomingSnapshot | None = None  #: a snapshot being received
        #: the fold came from this server's own journal (not yet replaced by a snapshot)
        self.fold_is_own = True
        self._pending_acks: deque[tuple[int, int]] = deque()  #: (local journal seq, stream seq)
        self.ack_due = 0  #: the highest record of the stream durable here
        self.ack_sent = 0  #: the highest record acknowledged to the active (repeated in ``STATE``)
        self._next_sync = now

    def mode(self, peer_alive: bool) -> str:
        """The replication mode status reports: ``follower`` while following a stream, else ``none``
        (whether the active is alive or not)."""
        return "follower" if self.stream else "none"

    def status(self) -> dict[str, Any]:
        """This role's part of the pair's status."""
        return {"stream": self.stream, "applied": self.applied, "acked": 0}

    # ------------------------------------------------------------- peer link in
    def receive(self, message: link.Message, now: float) -> None:
        """Act on a message of the active (others are not for a passive and are ignored)."""
        if isinstance(message, link.State):
            self._on_state(message)
        elif isinstance(message, link.Records):
            self._on_records(message)
        elif isinstance(message, link.SnapChunk):
            self._on_snapshot(message, now)

    def _on_state(self, message: link.State) -> None:
        """Every record up to ``message.last`` was sent before it: one not applied was lost."""
        if self.stream is not None and message.epoch == self.stream \
                and (not message.streaming or message.last > self.applied):
            self.stream = None  # resynchronise
            self.counters["ha_stream_gaps"] += 1

    def _on_records(self, message: link.Records) -> None:
        if message.epoch != self.stream or message.first != self.applied + 1:
            if self.stream is not None:
                self.counters["ha_stream_gaps"] += 1
            self.stream = None  # out of sync: ask for a snapshot (records before one are covered by it)
            return
        for record in message.records:
            self.applied += 1
            self.fold.add(record)
            self._journal(record, self.applied)

    def _on_snapshot(self, chunk: link.SnapChunk, now: float) -> None:
        """Gather the chunks; only a complete snapshot replaces what this server follows (a
        partial one, cut by the active's death, is dropped: the previous fold stays)."""
        if chunk.index == 0:
            self.stream = None
            self.incoming = IncomingSnapshot(now, self.keep_finished)
        if self.incoming is None or not self.incoming.add(chunk.index, chunk.records, now):
            if self.incoming is not None:
                self.counters["ha_stream_gaps"] += 1
            self.incoming = self.stream = None  # a broken snapshot: ask for another one
            return
        if not chunk.last:
            return
        snap, self.incoming = self.incoming, None
        previous, self.fold = self.fold, snap.fold  # folded chunk by chunk as they came
        self.ack_due = self.ack_sent = 0
        self._pending_acks.clear()
        for n, record in enumerate(snap.records, 1):
            self._journal(record, chunk.seq if n == len(snap.records) else 0)
        self.stream = chunk.epoch
        self.applied = chunk.seq
        self.counters["ha_snapshots_received"] += 1
        log.info("in sync with the active %s at record %d (%d tasks)", self.stream, self.applied,
                 len(self.fold.tasks))
        self._hand_back(previous, own=self.fold_is_own)
        self.fold_is_own = False

    def _hand_back(self, previous: RestoreFold, own: bool) -> None:
        """Send the active the tasks this server knew and it does not (:func:`~orchester.server.restore.unknown_to`)."""
        out = [link.pack_record(rec) for rec in unknown_to(previous, self.fold, own)]
        if out and self.stream is not None:
            log.warning("handing %d record(s) of tasks the active does not know back to it", len(out))
            self.counters["ha_handed_back"] += len(out)
            self._send(link.encode_orphans(self.stream, out))

    def _journal(self, record: list[Any], stream_seq: int) -> None:
        """Journal one folded record; ``stream_seq`` (0: none) is acknowledged once durable."""
        self.counters["ha_records_applied"] += 1
        if self._append is None:
            self.ack_due = max(self.ack_due, stream_seq)
            return
        local = self._append(record)
        if stream_seq:
            self._pending_acks.append((local, stream_seq))

    def durable(self, local_seq: int) -> None:
        """The local journal made records up to ``local_seq`` durable."""
        acks = self._pending_acks
        while acks and acks[0][0] <= local_seq:
            self.ack_due = max(self.ack_due, acks.popleft()[1])

    # ------------------------------------------------------------- peer link out
    def tick(self, now: float, peer_alive: bool) -> None:
        """Housekeeping on every wake-up: acknowledge, give up a stalled snapshot, ask for one."""
        if self.ack_due > self.ack_sent and self.stream is not None:
            self.ack_sent = self.ack_due
            self._send(link.encode_ack(self.stream, self.ack_due))
        if self.incoming is not None and self.incoming.stalled(now, 4 * self.heartbeat):
            self.incoming = None  # a snapshot that stalled: ask again
        if self.stream is None and self.incoming is None and now >= self._next_sync and peer_alive:
            self._next_sync = now + 2 * self.heartbeat
            self._send(link.encode_sync(self.epoch))
