"""The satellites the orchestrator knows: registration, credit and liveness (pure)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection
from typing import Any

from orchester.server.tasks import QueueKey, Task
from tracker import SatelliteState

#: Satellites with light credit free a light task's kind looks at for one with its tags, before it takes a slot.
LIGHT_SCAN = 64
#: Light kinds of one satellite the orchestrator indexes (the first, in order of their names; tasks of the others
#: take slots): each change of its light credit between none free and some costs one index update per kind.
MAX_INLINE = 64


class SatelliteRecord:
    """One registered satellite: its routing identity, credit and in-flight tasks."""

    __slots__ = (
        "recover_at", "sid", "ident", "sock", "slots", "credit", "tags", "kinds", "state", "inflight",
        "last_seen", "host", "pid", "registered", "done", "failed", "last_dispatch", "workers",
        "fail_streak", "ok_streak", "stall_timeouts", "versions", "deadline", "reported", "user",
        "cores", "capacity", "used", "memory", "mem_used", "reserved", "job", "inline", "light_credit", "light",
        "light_counted",
    )

    def __init__(self, sid: str, ident: bytes, sock: Any, slots: int, tags: frozenset[str],
                 kinds: frozenset[str], now: float, host: str = "", pid: int = 0,
                 workers: int = 0, cores: int = 0, memory: int = 0, job: str = "",
                 inline: frozenset[str] = frozenset(), light: int = 0) -> None:
        self.sid = sid
        self.job = job  #: the batch job it runs in ("" outside one)
        self.ident = ident
        self.sock = sock
        self.slots = slots  #: announced capacity
        self.credit = slots  #: at most this many tasks in flight (fewer on probation, none draining)
        #: cores its tasks may use together (announced; else one per worker, or per slot)
        self.cores = cores or workers or slots
        #: cores of the tasks it may hold: its cores, plus one per slot beyond its workers (prefetch)
        self.capacity = self.cores + (max(0, slots - workers) if workers else max(0, slots - self.cores))
        self.used = 0  #: cores of the tasks in flight on it
        self.memory = memory  #: bytes of memory its tasks may use together (0: not announced, not counted)
        self.mem_used = 0  #: memory asked for by the tasks in flight on it
        self.reserved: Task | None = None  #: a wide task it is kept for: it takes no other until that one fits
        #: its light kinds: a task of one of them, of one core and no memory said, runs in its own thread and takes
        #: a light credit (``light_credit`` of them, beside ``credit``), not a slot, a core or memory
        self.inline = frozenset(sorted(inline & kinds)[:MAX_INLINE])
        self.light_credit = light if self.inline else 0
        self.light: set[str] = set()  #: the ids of the light tasks in flight (in :attr:`inflight` too)
        self.light_counted = 0  #: (the free light credit the fleet counts for it: listed as ready while above 0)
        self.tags = tags
        self.kinds = kinds
        self.state = SatelliteState.JOINING
        self.inflight: dict[str, Task] = {}
        self.last_seen = now
        self.host = host
        self.pid = pid
        self.registered = now
        self.done = 0
        self.failed = 0
        self.last_dispatch = 0  #: dispatch sequence number of the last task sent here
        self.user: str | None = None  #: the name of the key it authenticated with (CurveZMQ)
        self.workers = workers
        self.fail_streak = 0  #: consecutive tasks that crashed here (worker died, stalled, never started)
        #: drained for failing: when it gets a task again, on probation (inf: never, or drained by hand)
        self.recover_at = float("inf")
        self.ok_streak = 0  #: consecutive tasks that succeeded here
        #: kinds that report progress, with their stall timeout (seconds)
        self.stall_timeouts: dict[str, float] = {}
        #: versions of what some kinds run (e.g. ``{"genx.fit": "3.8.13"}``)
        self.versions: dict[str, str] = {}
        #: when its allocation ends (monotonic; inf: unknown)
        self.deadline = float("inf")
        #: what it reports of itself (cpu_percent, rss_mb, task_seconds_avg, …)
        self.reported: dict[str, float] = {}

    @property
    def heavy(self) -> int:
        """Tasks in flight that take a slot (all but the light ones)."""
        return len(self.inflight) - len(self.light)

    @property
    def free(self) -> int:
        """Credit left (never negative; light tasks take none of it)."""
        return max(0, self.credit - self.heavy)

    def takes_light(self, task: Task) -> bool:
        """Whether ``task`` would be light here: a light kind of this satellite, one core, no memory said."""
        return self.light_credit > 0 and task.kind in self.inline and task.cores == 1 and not task.memory

    def fits(self, task: Task) -> bool:
        """Whether ``task`` fits now: a credit, its cores and its memory free."""
        return (self.heavy < self.credit and self.used + task.cores <= self.capacity
                and task.cores <= self.cores and (not task.memory or not self.memory
                                                  or self.mem_used + task.memory <= self.memory))

    def could_fit(self, task: Task) -> bool:
        """Whether ``task`` fits here when nothing else runs (its cores and memory are no more than this has)."""
        return task.cores <= self.cores and (not task.memory or not self.memory or task.memory <= self.memory)

    def take(self, task: Task, light: bool = False) -> None:
        """``task`` is in flight here: a light credit if ``light``, else a credit, its cores and its memory."""
        self.inflight[task.id] = task
        if light:
            self.light.add(task.id)
            return
        self.used += task.cores
        self.mem_used += task.memory

    def give_back(self, task: Task) -> bool:
        """``task`` is no longer in flight here; whether it was."""
        if self.inflight.pop(task.id, None) is None:
            return False
        if self.light and task.id in self.light:
            self.light.discard(task.id)
            return True
        self.used -= task.cores
        self.mem_used -= task.memory
        return True

    def drop_all(self) -> None:
        """Nothing is in flight here any more (it is lost)."""
        self.inflight.clear()
        self.light.clear()
        self.used = self.mem_used = 0

    @property
    def load(self) -> float:
        """In-flight tasks that take a slot, over slots (0 idle, 1 full)."""
        return self.heavy / self.slots if self.slots else 1.0

    def can_run(self, key: QueueKey) -> bool:
        """Whether this satellite offers the kind and has every required tag."""
        return key[0] in self.kinds and key[1] <= self.tags

    def describe(self, now: float) -> dict[str, Any]:
        """A msgpack-friendly summary for status replies and events."""
        return {
            "id": self.sid, "state": self.state.name.lower(), "slots": self.slots, "credit": self.credit,
            "workers": self.workers, "inflight": len(self.inflight), "tags": sorted(self.tags),
            "kinds": sorted(self.kinds), "host": self.host, "pid": self.pid,
            "heartbeat_age": round(now - self.last_seen, 3), "done": self.done,
            "failed": self.failed, "uptime": round(now - self.registered, 3),
            "fail_streak": self.fail_streak, "versions": self.versions,
            "walltime_left": None if self.deadline == float("inf") else round(self.deadline - now, 1),
            "reported": self.reported, "user": self.user, "cores": self.cores, "cores_used": self.used,
            "memory": self.memory, "memory_used": self.mem_used,
            "reserved_for": self.reserved.id if self.reserved is not None else None,
            "job": self.job or None, "inline": sorted(self.inline), "light": self.light_credit,
            "light_inflight": len(self.light),
        }


class Fleet:
    """Satellites by id and by routing identity, with an eligibility index per queue key.

    Everything here is kept up to date on each change of one satellite, never rebuilt by a scan of the
    fleet: the free credit of all satellites together (:attr:`free_slots`), the satellites able to run
    each queue key that was asked for (:meth:`eligible`), and the kinds offered. A registration, a
    loss or a change of state costs the same with 10 satellites as with 5,000.
    """

    #: Queue keys whose eligible satellites are indexed at once; past it the index starts again (a client
    #: asking for ever new tag sets must not make every change of a satellite cost more)
    MAX_KEYS = 1024
    #: Satellites from which a dispatch takes the ready one of least rank from a heap: a smaller fleet is
    #: scanned, which costs it less than keeping heaps up to date
    HEAP_FROM = 16

    def __init__(self) -> None:
        self.by_id: dict[str, SatelliteRecord] = {}
        self.by_ident: dict[bytes, SatelliteRecord] = {}
        #: per queue key: the satellites that may run it now (registered, taking work), in the order they
        #: became eligible (a dict as an ordered set)
        self._eligible: dict[QueueKey, dict[SatelliteRecord, None]] = {}
        self._kind_count: dict[str, int] = {}  #: kind -> registered satellites offering it
        self._kinds: frozenset[str] | None = None  #: every kind offered (cached until a satellite comes or goes)
        self.free_slots = 0  #: the free credit of every satellite, together
        #: every satellite, the one heard from longest ago first (liveness looks at the front only)
        self.by_silence: dict[SatelliteRecord, None] = {}
        self.draining: dict[SatelliteRecord, None] = {}  #: the satellites draining (a cool-down may end it)
        #: the routing strategy's rank (the least is chosen), when it has one: then, per queue key, a heap of
        #: ``(rank, order, satellite)`` of the eligible satellites with free credit; an entry whose rank is no
        #: longer the satellite's (it changes with each task given or taken back) is dropped when it comes up
        self.rank: Callable[[SatelliteRecord, QueueKey], tuple[Any, ...]] | None = None
        self.rank_reads_light = True  #: whether :attr:`rank` may change with a satellite's light tasks
        self._heaps: dict[QueueKey, list[tuple[tuple[Any, ...], int, SatelliteRecord]]] = {}
        self._order = itertools.count()
        self.heap_from = self.HEAP_FROM
        self.members = 0  #: counts the satellites that came and went (a list of them sorted once stays valid)
        self.free_light = 0  #: the free light credit of every satellite taking light tasks now, together
        #: per light kind: the satellites taking light tasks now with light credit free, the next one to take one
        #: first (each one taken goes to the back: light tasks go to them in turn)
        self._light_ready: dict[str, dict[SatelliteRecord, None]] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Any:
        return iter(list(self.by_id.values()))

    def add(self, sat: SatelliteRecord) -> None:
        """Add a satellite (one of the same id or routing identity is removed first)."""
        for old in (self.by_id.get(sat.sid), self.by_ident.get(sat.ident)):
            if old is not None and old is not sat:
                self.remove(old)
        self.by_id[sat.sid] = sat
        self.by_ident[sat.ident] = sat
        self.members += 1
        self.by_silence.pop(sat, None)
        self.by_silence[sat] = None
        self.free_slots += sat.free
        for kind in sat.kinds:
            self._kind_count[kind] = self._kind_count.get(kind, 0) + 1
        self._kinds = None
        self.changed(sat)

    def remove(self, sat: SatelliteRecord) -> None:
        """Forget a satellite (its tasks must already have been requeued)."""
        if self.by_id.get(sat.sid) is sat:
            del self.by_id[sat.sid]
            self.members += 1
            self.free_slots -= sat.free
            self.light_changed(sat)  # (no longer a member: its light credit goes)
            for kind in sat.kinds:
                n = self._kind_count.get(kind, 0) - 1
                if n > 0:
                    self._kind_count[kind] = n
                else:
                    self._kind_count.pop(kind, None)
            self._kinds = None
        if self.by_ident.get(sat.ident) is sat:
            del self.by_ident[sat.ident]
        if len(self.by_id) < self.heap_from:
            self._heaps.clear()  # (small again: scanned)
        self.by_silence.pop(sat, None)
        self.draining.pop(sat, None)
        for sats in self._eligible.values():
            sats.pop(sat, None)

    def changed(self, sat: SatelliteRecord) -> None:
        """``sat`` joined, or its state changed: it is eligible for the keys it can run while it takes work."""
        member = sat.state.accepts_work and self.by_id.get(sat.sid) is sat
        if sat.state is SatelliteState.DRAINING and self.by_id.get(sat.sid) is sat:
            self.draining[sat] = None
        else:
            self.draining.pop(sat, None)
        for key, sats in self._eligible.items():
            if member and sat.can_run(key):
                sats[sat] = None
            else:
                sats.pop(sat, None)
        self._ranked(sat)
        self.light_changed(sat)

    def light_changed(self, sat: SatelliteRecord) -> None:
        """``sat``'s light tasks, credit or state changed: its free light credit and its place in the light index.

        A satellite takes light tasks while it is a member that takes work, not on probation (a satellite whose
        tasks fail gets one at a time, as its credit says) and with credit (none while silent or draining)."""
        if not sat.light_credit and not sat.light_counted:
            return  # (no light kinds: the common case, nothing to do)
        takes = (sat.light_credit > 0 and sat.credit > 0 and sat.state.accepts_work
                 and sat.state is not SatelliteState.PROBATION and self.by_id.get(sat.sid) is sat)
        free = max(0, sat.light_credit - len(sat.light)) if takes else 0
        listed = sat.light_counted > 0
        self.free_light += free - sat.light_counted
        sat.light_counted = free
        if (free > 0) != listed:
            for kind in sat.inline:
                ready = self._light_ready.setdefault(kind, {})
                if free > 0:
                    ready[sat] = None
                else:
                    ready.pop(sat, None)
                    if not ready:
                        del self._light_ready[kind]

    def light_for(self, key: QueueKey) -> SatelliteRecord | None:
        """The satellite to take a light task of queue ``key`` now (each in turn), if one has light credit free:
        of those that offer its kind as light, the first with every tag it needs (among the first
        :data:`LIGHT_SCAN`: past them, the task takes a slot instead)."""
        ready = self._light_ready.get(key[0])
        if not ready:
            return None
        tags = key[1]
        for i, sat in enumerate(ready):
            if i >= LIGHT_SCAN:
                return None
            if tags <= sat.tags:
                return sat
        return None

    def offers_light(self, kind: str) -> bool:
        """Whether some satellite taking light tasks has light credit free for ``kind`` now."""
        return kind in self._light_ready

    def light_taken(self, sat: SatelliteRecord, kind: str) -> None:
        """``sat`` took a light task of ``kind``: it goes to the back of that kind's turn."""
        ready = self._light_ready.get(kind)
        if ready is not None and sat in ready:
            del ready[sat]
            ready[sat] = None
        self.light_moved(sat)

    def light_moved(self, sat: SatelliteRecord) -> None:
        """``sat``'s light tasks changed (one taken or given back): its light credit, and its rank (a strategy of
        one's own may read what it has in flight)."""
        self.light_changed(sat)
        if self._heaps and self.rank_reads_light and self.by_id.get(sat.sid) is sat:
            self._ranked(sat)

    def heard(self, sat: SatelliteRecord, now: float) -> None:
        """A message from ``sat``: it moves to the back of :attr:`by_silence`."""
        sat.last_seen = now
        order = self.by_silence
        if sat in order:
            del order[sat]
            order[sat] = None

    def credit_changed(self, sat: SatelliteRecord, free_before: int) -> None:
        """``sat``'s free credit was ``free_before`` before its credit or its tasks changed (and so, maybe, its
        rank: call this after a change of what the rank reads)."""
        if self.by_id.get(sat.sid) is sat:
            free = sat.credit - len(sat.inflight) + len(sat.light)  # (sat.free, inline: it runs twice a task)
            self.free_slots += (free if free > 0 else 0) - free_before
            if self._heaps:
                self._ranked(sat)

    def set_rank(self, rank: Callable[[SatelliteRecord, QueueKey], tuple[Any, ...]] | None,
                 reads_light: bool = True) -> None:
        """The routing strategy's rank (``None``: it has none; the heaps go); ``reads_light``: whether that rank
        may change when a light task comes or goes (then the satellite is ranked again each time)."""
        self.rank = rank
        self.rank_reads_light = reads_light
        self._heaps.clear()

    def _ranked(self, sat: SatelliteRecord) -> None:
        """A fresh heap entry for ``sat`` under each key it is eligible and ready for (its rank may have changed)."""
        rank = self.rank
        if rank is None or not self._heaps or sat.heavy >= sat.credit:
            return
        for key, heap in self._heaps.items():
            if sat in self._eligible[key]:
                heapq.heappush(heap, (rank(sat, key), next(self._order), sat))
                if len(heap) > 4 * len(self._eligible[key]) + 64:  # mostly stale entries: built again
                    self._heaps[key] = self._heap(key)

    def _heap(self, key: QueueKey) -> list[tuple[tuple[Any, ...], int, SatelliteRecord]]:
        assert self.rank is not None
        heap = [(self.rank(s, key), next(self._order), s) for s in self._eligible[key]
                if s.heavy < s.credit]
        heapq.heapify(heap)
        return heap

    @property
    def ranked(self) -> bool:
        """Whether a dispatch takes its satellite from the heaps (a rank, and a fleet large enough)."""
        return self.rank is not None and len(self.by_id) >= self.heap_from

    def best(self, key: QueueKey, accept: Callable[[SatelliteRecord], bool]) -> SatelliteRecord | None:
        """The eligible satellite of least rank with free credit that ``accept`` takes (only with a rank);
        ``None`` when there is none. What ``choose`` would pick of the same candidates, without a scan."""
        rank = self.rank
        assert rank is not None
        self.eligible(key)  # (indexed)
        heap = self._heaps.get(key)
        if heap is None:
            heap = self._heaps[key] = self._heap(key)
        sats = self._eligible[key]
        passed = []
        found = None
        while heap:
            r, _, sat = heap[0]
            if sat not in sats or sat.heavy >= sat.credit or rank(sat, key) != r:
                heapq.heappop(heap)  # stale: no longer eligible, ready, or of that rank
                continue
            if accept(sat):
                found = sat
                break
            passed.append(heapq.heappop(heap))  # ready but not for this task (cores, a reservation)
        for entry in passed:
            heapq.heappush(heap, entry)
        return found

    def eligible(self, key: QueueKey) -> Collection[SatelliteRecord]:
        """Satellites able to run tasks of queue ``key`` now (indexed from the first time ``key`` is asked)."""
        sats = self._eligible.get(key)
        if sats is None:
            if len(self._eligible) >= self.MAX_KEYS:
                self._eligible.clear()
                self._heaps.clear()
            sats = self._eligible[key] = {s: None for s in self.by_id.values()
                                          if s.can_run(key) and s.state.accepts_work}
        return sats.keys()

    def offers(self, kind: str) -> bool:
        """Whether any registered satellite offers ``kind``."""
        return kind in self._kind_count

    def kind_counts(self, most: int) -> dict[str, int]:
        """How many registered satellites offer each kind: the ``most`` kinds offered by most satellites."""
        counts = self._kind_count
        if len(counts) > most:
            return dict(heapq.nlargest(most, counts.items(), key=lambda kv: (kv[1], kv[0])))
        return dict(sorted(counts.items()))

    @property
    def kinds_offered(self) -> int:
        """How many kinds the satellites offer together."""
        return len(self._kind_count)

    def kinds(self) -> frozenset[str]:
        """Every kind offered by some satellite."""
        if self._kinds is None:
            self._kinds = frozenset(self._kind_count)
        return self._kinds
