"""The task record and the pending queues: plain data, no sockets, no clock."""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterator
from typing import Any

from tracker import TaskState
from tracker.history import History
from tracker.timers import Timer

#: The queue a task waits in: its kind, its required tags, the cores and the memory it needs (tasks of
#: one shape queue together, so a narrow task is never stuck behind a wide one that does not fit).
QueueKey = tuple[str, frozenset[str], int, int]


class Task:
    """One task as the orchestrator holds it. Payload frames are kept opaque.

    A task submitted with dependencies is a :class:`LinkedTask`, which holds them; a plain one reads the
    class's defaults below (none, nothing failed), which keeps each of a million queued tasks 40 bytes
    smaller."""

    __slots__ = (
        "id", "kind", "priority", "tags", "client", "csock", "header", "payload",
        "state", "attempt", "satellite", "submitted", "seq", "timer", "run_timer", "deadline",
        "size", "crashes", "ttl", "max_run", "history", "progress_at", "spilled", "duration", "owner", "counted",
        "quiet", "cores", "memory", "queued_at", "reserved_on", "codec",
    )
    #: the tasks it waits for (a :class:`LinkedTask`'s own; none here)
    after: tuple[str, ...] = ()
    #: those of them whose results its payload takes
    refs: tuple[str, ...] = ()
    #: it runs even when a dependency did not succeed
    run_on_failure: bool = False
    #: dependencies that have not ended yet (WAITING while above zero)
    blockers: int = 0
    #: failed for a dependency: the task whose failure started it
    cause: str | None = None

    def __init__(self, task_id: str, kind: str, priority: int, tags: frozenset[str],
                 client: bytes, csock: Any, header: Any, payload: list[Any],
                 submitted: float, seq: int, size: int) -> None:
        self.id = task_id
        self.kind = kind
        self.priority = priority
        self.tags = tags
        self.client = client  #: routing identity of the client to answer
        self.csock = csock  #: socket key the client is reached on
        self.header = header  #: the client's header frame, forwarded as is
        self.payload = payload  #: opaque payload frames, forwarded as is
        self.state = TaskState.PENDING
        self.attempt = 0
        self.satellite: str | None = None
        self.submitted = submitted
        self.seq = seq
        self.timer: Timer[Any] | None = None  #: the current state's timeout
        self.run_timer: Timer[Any] | None = None  #: maximum run time
        self.deadline: Timer[Any] | None = None  #: the client's overall timeout
        self.size = size
        self.crashes = 0  #: times it was stalled or killed its worker (the retry budget counts these)
        self.ttl = 0.0  #: queue time-to-live (0: the orchestrator's default)
        self.max_run = 0.0  #: maximum run time (0: the orchestrator's default)
        self.history = History()  #: every transition, compactly
        self.progress_at = 0.0  #: when it last showed progress (monotonic; the stall timer checks it)
        self.spilled: Any = None  #: where its payload is on disk while it is not in memory
        self.duration = 0.0  #: expected run time declared by the client (0: unknown)
        #: who submitted it: the authenticated key's name, or the client's routing identity
        self.owner: str | bytes | None = None
        self.counted = False  #: whether it counts against its owner's limits (unfinished, not restored)
        #: its result goes to its client only when asked for (a task of the same owner takes it by reference)
        self.quiet = False
        self.cores = 1  #: cores it needs
        self.memory = 0  #: bytes of memory it needs (0: not said)
        self.queued_at = submitted  #: when it last entered PENDING (monotonic; a wide task's wait counts from it)
        self.reserved_on: Any = None  #: the satellite reserved for it (a wide task that waited too long)
        self.codec = "msgpack"  #: how its payload is encoded (its result must be encoded the same way)

    @property
    def queue_key(self) -> QueueKey:
        """The queue this task waits in: its kind, required tags, cores and memory."""
        return (self.kind, self.tags, self.cores, self.memory)

    def __repr__(self) -> str:
        return f"Task({self.id!r}, {self.kind!r}, {self.state.name}, attempt={self.attempt})"


class LinkedTask(Task):
    """A task submitted with dependencies (``after``): it holds them, the results it takes by reference, what it
    does when one fails, how many are still running, and the failure that ended it."""

    __slots__ = ("after", "refs", "run_on_failure", "blockers", "cause")

    def __init__(self, task_id: str, kind: str, priority: int, tags: frozenset[str],
                 client: bytes, csock: Any, header: Any, payload: list[Any],
                 submitted: float, seq: int, size: int, *, after: tuple[str, ...], refs: tuple[str, ...],
                 run_on_failure: bool) -> None:
        super().__init__(task_id, kind, priority, tags, client, csock, header, payload, submitted, seq, size)
        self.after = after
        self.refs = refs
        self.run_on_failure = run_on_failure
        self.blockers = 0
        self.cause = None


def new_task(task_id: str, kind: str, priority: int, tags: frozenset[str], client: bytes, csock: Any,
             header: Any, payload: list[Any], submitted: float, seq: int, size: int, after: tuple[str, ...] = (),
             refs: tuple[str, ...] = (), run_on_failure: bool = False) -> Task:
    """A :class:`Task`, or a :class:`LinkedTask` when it waits for others (``after``)."""
    if not after:
        return Task(task_id, kind, priority, tags, client, csock, header, payload, submitted, seq, size)
    return LinkedTask(task_id, kind, priority, tags, client, csock, header, payload, submitted, seq, size,
                      after=after, refs=refs, run_on_failure=run_on_failure)


class TaskQueues:
    """Pending tasks per (kind, tags): higher priority first, FIFO within a priority.

    Entries of tasks that left PENDING (cancelled, expired) are dropped lazily
    when they reach the head of their queue.
    """

    def __init__(self) -> None:
        self._queues: dict[QueueKey, list[tuple[int, int, Task]]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Number of entries queued (including not-yet-dropped stale ones)."""
        return self._count

    def push(self, task: Task) -> None:
        """Queue ``task``; a requeued task keeps its original place (its ``seq``)."""
        q = self._queues.get(task.queue_key)
        if q is None:
            q = self._queues[task.queue_key] = []
        heapq.heappush(q, (-task.priority, task.seq, task))
        self._count += 1

    def head(self, key: QueueKey) -> Task | None:
        """The next pending task of queue ``key`` without removing it."""
        q = self._queues.get(key)
        while q:
            task = q[0][2]
            if task.state is TaskState.PENDING:
                return task
            heapq.heappop(q)
            self._count -= 1
        if q is not None:
            del self._queues[key]
        return None

    def pop(self, key: QueueKey) -> Task:
        """Remove and return the head of queue ``key`` (call :meth:`head` first)."""
        self._count -= 1
        return heapq.heappop(self._queues[key])[2]

    def best_key(self, skip: Collection[QueueKey] = ()) -> QueueKey | None:
        """The queue whose head comes first overall (priority, then age), but for those in ``skip`` (a set: each
        key is looked up once)."""
        best: QueueKey | None = None
        best_rank: tuple[int, int] | None = None
        for key in list(self._queues):
            if skip and key in skip:
                continue
            task = self.head(key)
            if task is None:
                continue
            rank = (-task.priority, task.seq)
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        return best

    def drop_stale(self) -> int:
        """Drop the entries of tasks that left PENDING (cancelled, expired while queued) everywhere,
        not only at the heads; returns how many. O(entries): call it when they outnumber the live ones."""
        dropped = 0
        for key, q in list(self._queues.items()):
            live = [e for e in q if e[2].state is TaskState.PENDING]
            if len(live) != len(q):
                dropped += len(q) - len(live)
                if live:
                    heapq.heapify(live)
                    self._queues[key] = live
                else:
                    del self._queues[key]
        self._count -= dropped
        return dropped

    def keys(self) -> list[QueueKey]:
        """Keys of the non-empty queues."""
        return [k for k, q in self._queues.items() if q]

    def depth(self) -> dict[str, int]:
        """Pending tasks per kind (stale entries excluded)."""
        out: dict[str, int] = {}
        for (kind, *_), q in self._queues.items():
            n = sum(1 for _, _, t in q if t.state is TaskState.PENDING)
            if n:
                out[kind] = out.get(kind, 0) + n
        return out

    def __iter__(self) -> Iterator[Task]:
        for q in self._queues.values():
            for _, _, t in q:
                if t.state is TaskState.PENDING:
                    yield t
