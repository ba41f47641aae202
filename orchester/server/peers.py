"""What the orchestrator knows of its peers, and what each may cost (pure policy, no socket, no clock).

* :class:`ConnectionKeys` binds each routing identity to the key that first spoke on it
  (CurveZMQ on), refuses another key on that identity, and caps the connections of one key.
* :class:`RequestRate` is a token bucket per key (or per connection without keys) for requests
  that walk tables: status, history, show, fetch, cancel, control.
* :class:`UnreadResults` bounds the result bytes pushed to one connection and not yet
  acknowledged by it (clients report the results they received in their heartbeats).
* :class:`Subscriptions` keeps the event subscriptions incrementally: which event categories
  someone wants, in constant time per (un)subscription, with a cap on distinct topics.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Final

from serializers import protocol as P
from serializers.header import ProtocolError

#: A routing identity not heard from for this long no longer counts against its key (clients
#: heartbeat every second while they wait for something; satellites always do).
IDLE_AFTER: Final = 60.0


class ConnectionKeys:
    """Routing identity → the key that owns it (CurveZMQ on).

    An identity belongs to the first key heard on it. A message from another key on that
    identity is refused and the identity is marked *contested*: nothing of its owner's is
    delivered there until the owner speaks on it again. One key holds at most
    ``max_per_key`` identities heard within :data:`IDLE_AFTER` seconds.
    """

    def __init__(self, max_per_key: int) -> None:
        self.max_per_key = max_per_key
        self._owner: dict[bytes, str] = {}
        self._seen: dict[bytes, float] = {}
        self._contested: set[bytes] = set()
        self._per_key: Counter[str] = Counter()
        self._next_sweep = 0.0

    def __len__(self) -> int:
        """Number of identities bound."""
        return len(self._owner)

    def bind(self, ident: bytes, key: str, now: float) -> None:
        """Record that ``key`` spoke on ``ident``; raise ``forbidden`` or ``limit`` if it may not."""
        owner = self._owner.get(ident)
        if owner is None:
            if self._per_key[key] >= self.max_per_key:
                self.sweep(now, force=True)
                if self._per_key[key] >= self.max_per_key:
                    raise ProtocolError(P.E_LIMIT, f"key {key!r} already holds {self.max_per_key} connections "
                                        "(--max-key-connections)")
            self._owner[ident] = key
            self._per_key[key] += 1
        elif owner != key:
            self._contested.add(ident)
            raise ProtocolError(P.E_FORBIDDEN, "this connection's identity belongs to another key")
        else:
            self._contested.discard(ident)
        self._seen[ident] = now

    def owns(self, ident: bytes, key: str) -> bool:
        """Whether a message for ``key`` may be sent to ``ident`` (bound to it and not contested)."""
        return self._owner.get(ident) == key and ident not in self._contested

    def owner(self, ident: bytes) -> str | None:
        """The key ``ident`` is bound to, if any."""
        return self._owner.get(ident)

    def forget_key(self, key: str) -> int:
        """Drop every identity of ``key`` (its key was revoked); returns how many."""
        gone = [i for i, k in self._owner.items() if k == key]
        for ident in gone:
            self._drop(ident)
        return len(gone)

    def sweep(self, now: float, force: bool = False) -> None:
        """Forget identities idle for :data:`IDLE_AFTER` seconds (at most once a minute unless ``force``)."""
        if not force and now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        for ident in [i for i, t in self._seen.items() if now - t > IDLE_AFTER]:
            self._drop(ident)

    def _drop(self, ident: bytes) -> None:
        key = self._owner.pop(ident)
        self._seen.pop(ident, None)
        self._contested.discard(ident)
        self._per_key[key] -= 1
        if self._per_key[key] <= 0:
            del self._per_key[key]


class RequestRate:
    """A token bucket per caller: ``rate`` requests a second, bursts of ``max(rate, 1)``.

    ``rate`` 0 means no limit. Buckets that are full again are forgotten, so the table holds
    only callers that asked lately.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self._buckets: dict[str | bytes, tuple[float, float]] = {}  #: caller -> (tokens, when)

    def take(self, caller: str | bytes, now: float) -> bool:
        """Spend one token of ``caller``; ``False`` when its bucket is empty."""
        if self.rate <= 0:
            return True
        tokens, when = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - when) * self.rate)  # (a held message may be older)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return False
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > 4096:  # forget the callers whose bucket has refilled
            full = [c for c, (t, w) in self._buckets.items() if t + (now - w) * self.rate >= self.burst]
            for c in full:
                del self._buckets[c]
        return True


class Subscriptions:
    """Event subscriptions seen on the XPUB socket, kept so that events are built only when wanted.

    Each (un)subscription costs constant time: a topic's categories are worked out when it
    first appears and counted per category. At most ``max_topics`` distinct topics of at
    most ``max_topic`` bytes are kept; further ones are refused (counted, and the events
    they ask for are built only if another subscription wants them).

    libzmq keeps every subscription of a connected peer whatever we keep here (XPUB_VERBOSER
    tells us of each one, and of each one a leaving peer drops), so two bounds need the socket
    re-opened, which frees them (the adapter does it): :attr:`flooded` when all subscribers
    together hold more than ``max_live`` subscriptions or ``max_live_bytes`` bytes of topics;
    and with keys, each subscription counts against the
    key that made it while it lasts, and a key holding more than ``per_key`` is put in
    :attr:`over`, for the adapter to shut it out of the event stream for a while.
    """

    def __init__(self, categories: tuple[bytes, ...], max_topics: int, max_topic: int,
                 per_key: int | None = None, max_live: int | None = None, max_live_bytes: int | None = None) -> None:
        self.categories = categories
        self.max_topics = max_topics
        self.max_topic = max_topic
        self.per_key = per_key
        self.max_live = max_live if max_live is not None else max_topics * 16
        #: libzmq keeps a subscription as a trie with a node per byte: the bytes held are bounded too
        self.max_live_bytes = max_live_bytes if max_live_bytes is not None else max_topics * max_topic
        self.live_bytes = 0
        self.want: dict[bytes, bool] = dict.fromkeys(categories, False)
        self._topics: dict[bytes, int] = {}  #: topic -> subscribers
        self._per_category: Counter[bytes] = Counter()
        self._per_key: Counter[str] = Counter()
        self._holders: dict[bytes, Counter[str]] = {}  #: topic -> keys holding it (with keys)
        self.live = 0  #: subscriptions libzmq holds (every subscribe less every unsubscribe)
        #: keys that hold more than ``per_key``: the adapter mutes them and re-opens the socket
        self.over: set[str] = set()
        self.flooded = False  #: all together hold more than ``max_live``: the adapter re-opens the socket
        self.refused = 0

    def __len__(self) -> int:
        """Number of distinct topics kept."""
        return len(self._topics)

    def _matches(self, topic: bytes) -> list[bytes]:
        return [c for c in self.categories if topic.startswith(c) or c.startswith(topic)]

    def update(self, msg: bytes, key: str | None = None) -> bool:
        """Apply one XPUB message (``\\x01topic`` or ``\\x00topic``) sent by ``key`` (None: unknown,
        as for the unsubscriptions of a peer that left); ``False`` if it was refused."""
        if not msg or msg[0] not in (0, 1):
            return False
        topic = msg[1:]
        if msg[0] == 1:
            return self._subscribe(topic, key)
        self.live = max(0, self.live - 1)
        self.live_bytes = max(0, self.live_bytes - len(topic))
        holders = self._holders.get(topic)
        if holders:
            if key is None or holders.get(key, 0) <= 0:  # a leaving peer's: count it off one holder
                key = holders.most_common(1)[0][0]
            holders[key] -= 1
            if holders[key] <= 0:
                del holders[key]
            if not holders:
                del self._holders[topic]
            self._per_key[key] -= 1
            if self._per_key[key] <= 0:
                del self._per_key[key]
        count = self._topics.get(topic)
        if count is None:
            return True
        if count > 1:
            self._topics[topic] = count - 1
            return True
        del self._topics[topic]
        for cat in self._matches(topic):
            self._per_category[cat] -= 1
            if self._per_category[cat] <= 0:
                del self._per_category[cat]
                self.want[cat] = False
        return True

    def _subscribe(self, topic: bytes, key: str | None) -> bool:
        self.live += 1
        self.live_bytes += len(topic)
        if self.live > self.max_live or self.live_bytes > self.max_live_bytes:
            self.flooded = True
        if key is not None and self.per_key is not None:
            self._per_key[key] += 1
            self._holders.setdefault(topic, Counter())[key] += 1
            if self._per_key[key] > self.per_key:
                self.over.add(key)
                self.refused += 1
                return False
        count = self._topics.get(topic)
        if count is not None:
            self._topics[topic] = count + 1
            return True
        if len(topic) > self.max_topic or len(self._topics) >= self.max_topics:
            self.refused += 1
            return False
        self._topics[topic] = 1
        for cat in self._matches(topic):
            self._per_category[cat] += 1
            self.want[cat] = True
        return True


class _Unread:
    __slots__ = ("owner", "acked", "sizes", "bytes", "waiting", "seen")

    def __init__(self, owner: str | bytes, now: float) -> None:
        self.owner = owner  #: the key (without keys: the connection) whose budget this counts against
        self.acked = 0  #: results the connection said it received
        self.sizes: deque[int] = deque()  #: sizes of the results pushed and not acknowledged, oldest first
        self.bytes = 0
        self.waiting: dict[str, int] = {}  #: task ids whose results wait for room -> their sizes (in order)
        self.seen = now


class UnreadResults:
    """Result bytes pushed and not yet acknowledged, at most ``cap`` per key (per connection
    without keys).

    A client counts the results it receives on a connection and reports the count (``rx``) in
    its heartbeats; a result that would take its key past ``cap`` waits (in the result store,
    where it is not evicted) until an acknowledgement makes room. One result is always let
    through to an idle connection, however large. So a peer that stops reading holds at most
    ``cap`` bytes of results in the orchestrator's send queues, not ``--hwm`` whole results. The
    results waiting count against their key (:meth:`waiting_bytes`, which the orchestrator adds
    to ``--max-client-bytes``), so a key that never reads cannot have more waiting either.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._conns: dict[bytes, _Unread] = {}
        self._unread: Counter[str | bytes] = Counter()  #: per key: bytes pushed, not acknowledged
        self._waiting: Counter[str | bytes] = Counter()  #: per key: bytes of results waiting
        #: every task id whose result waits, somewhere (the result store must keep them)
        self.pinned: set[str] = set()
        self._next_sweep = 0.0

    def __len__(self) -> int:
        """Connections with results unacknowledged or waiting."""
        return len(self._conns)

    def admit(self, ident: bytes, owner: str | bytes, size: int, now: float) -> bool:
        """Whether a result of ``size`` bytes may go to ``ident`` (a connection of ``owner``) now;
        it is then counted."""
        c = self._conns.get(ident)
        if c is None:
            c = self._conns[ident] = _Unread(owner, now)
        elif c.waiting or (c.bytes and self._unread[c.owner] + size > self.cap):
            return False
        c.sizes.append(size)
        c.bytes += size
        self._unread[c.owner] += size
        c.seen = now
        return True

    def hold(self, ident: bytes, task_id: str, size: int) -> bool:
        """Keep ``task_id``'s result for ``ident`` until it has room (after :meth:`admit` said no);
        ``False`` when it already waits there."""
        c = self._conns[ident]
        if task_id in c.waiting:
            return False
        c.waiting[task_id] = size
        self._waiting[c.owner] += size
        self.pinned.add(task_id)
        return True

    def unread(self, ident: bytes) -> int:
        """Bytes pushed to ``ident`` and not acknowledged."""
        c = self._conns.get(ident)
        return c.bytes if c is not None else 0

    def waiting_bytes(self, owner: str | bytes) -> int:
        """Bytes of ``owner``'s results waiting for room."""
        return self._waiting.get(owner, 0)

    def ack(self, ident: bytes, received: int, now: float) -> list[str]:
        """``ident`` received ``received`` results so far: free their room; returns the task ids
        whose results may go now (the caller sends them and :meth:`admit` counts them again)."""
        c = self._conns.get(ident)
        if c is None:
            return []
        c.seen = now
        fresh = received - c.acked
        if fresh > 0:
            c.acked = received
            for _ in range(min(fresh, len(c.sizes))):
                size = c.sizes.popleft()
                c.bytes -= size
                self._unread[c.owner] -= size
        return self._release(ident, c)

    def forget(self, ident: bytes) -> list[str]:
        """A send to ``ident`` failed (it is gone, or not reading at all): stop counting what it was
        sent; returns the task ids that waited for it (kept for ``FETCH``)."""
        c = self._conns.get(ident)
        if c is None:
            return []
        self._unread[c.owner] -= c.bytes
        c.sizes.clear()
        c.bytes = 0
        waiting = self._release(ident, c)
        self._conns.pop(ident, None)
        return waiting

    def _release(self, ident: bytes, c: _Unread) -> list[str]:
        released = list(c.waiting)
        self._waiting[c.owner] -= sum(c.waiting.values())
        self.pinned.difference_update(released)
        c.waiting.clear()
        for counter in (self._unread, self._waiting):
            if counter.get(c.owner, 1) <= 0:
                del counter[c.owner]
        return released

    def sweep(self, now: float) -> None:
        """Forget connections silent for :data:`IDLE_AFTER` seconds (at most once a minute)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        for ident in [i for i, c in self._conns.items() if now - c.seen > IDLE_AFTER]:
            self.forget(ident)
