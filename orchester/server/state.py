"""What one orchestrator knows: the task table, queues, fleet, results, timers and counts.

One :class:`ServerState` is shared by the core and its collaborators (the lifecycle, the
requests, restore): each of them holds it instead of being a mixin that expects its host to
have the right attributes. Plain data and the counts kept with it; no policy, no I/O.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from orchester.config import OrchestratorConfig
from orchester.server.fleet import Fleet
from orchester.server.graph import TaskGraph
from orchester.server.peers import ConnectionKeys, RequestRate, Subscriptions, UnreadResults
from orchester.server.results import ResultStore
from orchester.server.routing import RoutingStrategy, make_strategy
from orchester.server.tasks import Task, TaskQueues
from serializers.messages import JobsReport
from tracker import TaskState, TimerWheel

#: Task latencies kept for the status (the last ones that ended, over :data:`LATENCY_WINDOW` seconds at most).
RECENT_LATENCIES = 2048
#: Seconds of ended tasks the status's latency covers.
LATENCY_WINDOW = 10.0

#: What the event stream publishes, by topic prefix.
EVENT_CATEGORIES = (b"task:", b"progress:", b"sat:", b"control:")


class ServerState:
    """The orchestrator's tables (see the module docstring)."""

    def __init__(self, config: OrchestratorConfig, now: float, epoch: str, wall: Callable[[], float],
                 keys: bool = False) -> None:
        self.cfg = config
        self.epoch = epoch  #: this server's run (clients and satellites notice a restart by it)
        self.wall = wall  #: the wall clock (history rows, journal records, events)
        self.started = now
        #: the monotonic time of the current wake-up (set on every message and housekeeping)
        self.clock = now
        #: the last time the server read every message that had come (its adapter says so after each
        #: wake-up); silences are counted up to it. None: no adapter says (a test driving the core): now
        self.read_until: float | None = None
        self.tasks: dict[str, Task] = {}
        #: tasks in the table per state (indexed by :class:`~tracker.TaskState`): status costs nothing
        self.state_counts = [0] * len(TaskState)
        #: pending tasks per kind (the queue depths of status replies and metrics)
        self.pending_kinds: Counter[str] = Counter()
        self.pending_cores = 0  #: cores the pending tasks ask for together (what an autoscaler sizes by)
        #: core-seconds of work the pending tasks declare together (their ``duration`` times their cores)
        self.pending_work = 0.0
        self.queues = TaskQueues()
        self.fleet = Fleet()
        self.results = ResultStore(config.result_retention, config.result_retention_bytes)
        self.graph = TaskGraph(self.results, self.tasks)  #: dependencies, seen from the tasks depended on
        self.timers: TimerWheel[str] = TimerWheel()
        self._strategy: RoutingStrategy = make_strategy(config.strategy, allowed=config.allowed_strategies)
        self.fleet.set_rank(getattr(self._strategy, "rank", None), getattr(self._strategy, "reads_light", True))
        self.counters: Counter[str] = Counter()
        #: payload bytes of queued tasks held in memory (changed only by :meth:`queued`, :meth:`unqueued`)
        self.queued_bytes = 0
        self.kind_counts: dict[str, list[int]] = {}  #: kind -> transitions into each TaskState (metrics on)
        self.latencies: list[tuple[str, float]] = []  #: (kind, seconds from submit to end) (metrics on)
        #: (monotonic end, seconds from submit to end) of the tasks that ended last (status: latency)
        self.recent_latency: deque[tuple[float, float]] = deque(maxlen=RECENT_LATENCIES)
        #: tasks whose payload should leave memory once their journal record is durable
        self.to_spill: dict[str, Task] = {}
        #: restored tasks that were in flight, waiting for their satellite to re-announce them
        self.reclaim: dict[str, Task] = {}
        self.reclaim_until = 0.0  #: until when satellites may claim restored tasks (after a restart)
        #: per client (key name or routing identity): [unfinished tasks, their payload bytes]
        self.client_load: dict[str | bytes, list[int]] = {}
        #: CurveZMQ on: the key each satellite id belongs to (the first that registered it; journaled)
        self.sat_keys: dict[str, str] = {}
        #: the same, by key: each key's satellite ids in the order they were bound (kept with ``sat_keys``
        #: by :meth:`bind_sid` and :meth:`unbind_sid`)
        self.key_sids: dict[str, dict[str, None]] = {}
        #: the last report of each autoscaler (by tag), and when it came (monotonic): shown, not journaled
        self.job_reports: dict[str, tuple[JobsReport, float]] = {}
        #: CurveZMQ on: which key owns each routing identity (results go only to their owner's)
        self.conns = ConnectionKeys(config.max_key_connections)
        self.unread = UnreadResults(config.max_unread_bytes)
        self.rate = RequestRate(config.request_rate)
        self.subs = self.subscriptions(keys)
        self.user: str | None = None  #: the key name of the message being handled (CurveZMQ)
        self.seq = 0  #: the submission order of the last task
        self.dispatch_seq = 0  #: the order of the last dispatch (least recently used satellites first)

    @property
    def want(self) -> dict[bytes, bool]:
        """Per event category: whether anyone subscribed to it (events nobody wants are not built)."""
        return self.subs.want

    def subscriptions(self, keys: bool) -> Subscriptions:
        """A fresh subscription table (for a new event socket). With ``keys``, each key may hold
        ``max_subscriptions`` subscriptions and all of them together 16 times as many distinct
        topics; without, everyone together ``max_subscriptions`` distinct topics. Either way, all
        subscribers together hold at most 16 × ``max_subscriptions`` subscriptions, and
        ``max_subscriptions`` × ``max_topic`` bytes of topics (libzmq's trie costs per byte)."""
        cfg = self.cfg
        live = cfg.max_subscriptions * 16
        return Subscriptions(EVENT_CATEGORIES, live if keys else cfg.max_subscriptions, cfg.max_topic,
                             cfg.max_subscriptions if keys else None, max_live=live,
                             max_live_bytes=cfg.max_subscriptions * cfg.max_topic)

    def next_seq(self) -> int:
        """The submission order of a new (or restored) task."""
        self.seq += 1
        return self.seq

    def bind_sid(self, sid: str, user: str) -> None:
        """Satellite id ``sid`` belongs to key ``user``."""
        old = self.sat_keys.get(sid)
        if old is not None:
            self.key_sids.get(old, {}).pop(sid, None)
        self.sat_keys[sid] = user
        self.key_sids.setdefault(user, {})[sid] = None

    def unbind_sid(self, sid: str) -> None:
        """Satellite id ``sid`` belongs to no key any more."""
        user = self.sat_keys.pop(sid, None)
        if user is not None:
            sids = self.key_sids.get(user)
            if sids is not None:
                sids.pop(sid, None)
                if not sids:
                    del self.key_sids[user]

    @property
    def strategy(self) -> RoutingStrategy:
        """The routing strategy (a switch gives the fleet the new one's rank, if it has one)."""
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: RoutingStrategy) -> None:
        self._strategy = strategy
        self.fleet.set_rank(getattr(strategy, "rank", None), getattr(strategy, "reads_light", True))

    def add_pending(self, task: Task) -> None:
        """A pending (or, with dependencies, waiting) task enters the table (submitted, or rebuilt from the
        journal): counted, its payload held in memory. Queuing it (or waiting for its dependencies, or for
        its satellite to claim it back) is the caller's."""
        self.tasks[task.id] = task
        self.state_counts[task.state] += 1
        if task.state is TaskState.PENDING:
            self.pending_entered(task)
        self.queued(task)

    def queued(self, task: Task) -> None:
        """``task`` joined the queue with its payload in memory (:attr:`queued_bytes` counts it)."""
        self.queued_bytes += task.size

    def unqueued(self, task: Task) -> None:
        """``task``'s payload no longer waits in memory: it was dispatched, taken back by its satellite,
        ended while queued, or written to disk (a payload already on disk was no longer counted)."""
        if task.spilled is None:
            self.queued_bytes -= task.size

    def pending_entered(self, task: Task) -> None:
        """``task`` became pending: counted by kind, cores and declared work."""
        self.pending_kinds[task.kind] += 1
        self.pending_cores += task.cores
        if task.duration:
            self.pending_work += task.duration * task.cores

    def pending_left(self, task: Task) -> None:
        """A pending task left the queue (dispatched, expired, cancelled)."""
        self.pending_cores -= task.cores
        if task.duration:
            self.pending_work = max(0.0, self.pending_work - task.duration * task.cores)
        kind = task.kind
        n = self.pending_kinds[kind] - 1
        if n > 0:
            self.pending_kinds[kind] = n
        else:
            del self.pending_kinds[kind]
