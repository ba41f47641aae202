"""The thread-based client: futures over one pipelined DEALER socket.

Example::

    from orchester import Client

    with Client("tcp://127.0.0.1:5555") as client:
        fut = client.submit("echo", {"hello": "world"})
        print(fut.result(timeout=10))
        print(list(client.map("echo", range(5))))
        print(client.status()["satellites"])

The socket belongs to a background I/O thread; calling threads hand it
requests through a queue and a wake-up socket, so any number of threads may
share one client. Submitted tasks are kept until their result arrives and
are resent with their original ids when the orchestrator restarts or the
client fails over to another endpoint (the orchestrator deduplicates them).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import zmq

from orchester.client.core import (
    ClientCore,
    Request,
    reject_future,
    resolve_future,
    stopped,
    task_of_row,
    task_options,
)
from orchester.client.status import next_page
from orchester.client.uplink import Uplink, client_step
from orchester.config import check_endpoint
from orchester.errors import ClientClosed, RemoteError, Unreachable
from serializers import ProtocolError
from serializers import messages as M
from serializers import protocol as P
from serializers.zmqframes import NOBLOCK, readable, recv_frames, send_frames

log = logging.getLogger("orchester.client")


class TaskFuture(cf.Future):  # type: ignore[type-arg]
    """A :class:`concurrent.futures.Future` that knows its task id and when it was accepted.

    ``accepted`` is set when the orchestrator acknowledged the task: with a journal, once the
    task is durable there (it then survives a crash of the orchestrator).

    A future waiting in a ``map`` of a million items must stay small (under a kilobyte with its
    task's entry): its condition and its ``accepted`` event (about 800 bytes each) are made only
    when something uses them, under one lock shared by all futures.
    """

    task_id: str = ""

    def __init__(self) -> None:  # (cf.Future's, but for the condition, made when first used)
        self._state = cf._base.PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._acked = False  #: the orchestrator acknowledged it (``accepted`` is set once made)
        #: passed by reference to another task: its result stays with the orchestrator until someone
        #: waits for it here (:meth:`result`, :meth:`exception`, :meth:`add_done_callback` ask for it)
        self._on_demand: Callable[[], None] | None = None
        self._wanted = False  #: someone waited for it (a reference to it made later fetches it at once)

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond: threading.Condition | None = self.__dict__.get("_cond")
        if cond is None:
            with _MAKE:
                cond = self.__dict__.setdefault("_cond", threading.Condition())
        return cond

    def done(self) -> bool:
        """Whether the future is done (cancelled or finished); never waits, and makes no condition."""
        return self._state in _DONE_STATES

    def set_result(self, result: Any) -> None:
        """(The I/O thread) the task's result. Nobody waits on a future that has no condition yet (a waiter,
        ``concurrent.futures.wait`` and a done callback each make it first), so such a future is finished
        without making one: the window of a ``map`` costs no condition per future that nobody waited on."""
        if not self._finish_alone("_result", result):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        """(The I/O thread) the task's exception; as :meth:`set_result`, without a condition if none was made."""
        if not self._finish_alone("_exception", exception):
            super().set_exception(exception)

    def _finish_alone(self, field: str, value: Any) -> bool:
        """Finish with ``value`` in ``field`` if no condition was made (a condition is made under ``_MAKE``:
        none can appear meanwhile); False when one was, and the caller takes ``Future``'s own way."""
        if "_cond" in self.__dict__:
            return False
        with _MAKE:
            if "_cond" in self.__dict__:
                return False
            if self._state in _DONE_STATES:
                raise cf.InvalidStateError(f"{self._state}: {self!r}")
            setattr(self, field, value)
            self._state = cf._base.FINISHED
            return True

    @property
    def accepted(self) -> threading.Event:
        """Set once the orchestrator acknowledged the task (with a journal: once it is durable there)."""
        with _DEMAND:
            event: threading.Event | None = self.__dict__.get("_accepted")
            if event is None:
                event = self.__dict__["_accepted"] = threading.Event()
                if self._acked:
                    event.set()
        return event

    def _acknowledged(self) -> None:
        """(The I/O thread) the orchestrator acknowledged the task."""
        with _DEMAND:
            self._acked = True
            event = self.__dict__.get("_accepted")
        if event is not None:
            event.set()

    @property
    def __orchester_ref__(self) -> str:
        """Its task id: passed as an argument of another task, the future stands for its result."""
        return self.task_id

    def _ask(self) -> None:
        with _DEMAND:
            self._wanted = True
            ask, self._on_demand = self._on_demand, None
        if ask is not None and not self.done():
            ask()

    def _demand(self, ask: Callable[[], None]) -> None:
        """(The I/O thread) it was passed by reference: ``ask`` fetches it, now if someone waits already."""
        with _DEMAND:
            if not self._wanted:
                self._on_demand = ask
                return
        ask()

    def result(self, timeout: float | None = None) -> Any:
        """The task's result (see :class:`concurrent.futures.Future`)."""
        if self._state is _FINISHED and self._exception is None:  # (finished: no lock, no condition to make)
            self._wanted = True
            return self._result
        self._ask()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception, if it failed (see :class:`concurrent.futures.Future`)."""
        self._ask()
        return super().exception(timeout)

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn`` with this future when it is done (see :class:`concurrent.futures.Future`)."""
        self._ask()
        super().add_done_callback(fn)


#: Guards the hand-over of a future's on-demand fetch between the I/O thread and the waiting ones (and
#: a future's ``accepted`` event, made when first asked for).
_DEMAND = threading.Lock()
#: Tasks of one :meth:`Client.map` unfinished at once, by default (half the orchestrator's default
#: ``--max-client-tasks``: another client of the same key still has room).
MAP_WINDOW = 50_000
#: Guards the making of a future's condition, when first used.
_MAKE = threading.Lock()
#: The state of a future that has its result or its exception.
_FINISHED = cf._base.FINISHED
#: The states of a future that is done.
_DONE_STATES = frozenset({cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED, cf._base.FINISHED})
#: The keyword options of a task's dependencies and resources (checked by :func:`task_options`).
WORKFLOW_OPTIONS = ("after", "on_failure", "cores", "memory")


def _accepted(fut: Any) -> None:
    if isinstance(fut, TaskFuture):
        fut._acknowledged()


class Client:
    """Submit tasks and ask questions of an orchestrator.

    ``endpoints`` is one endpoint or a list (``@FILE`` reads an endpoint file; the client fails
    over to the next one when the current stays silent for ``liveness × heartbeat_interval``
    seconds while requests are outstanding, or when a passive server refuses it). ``pub`` names
    the event endpoint for :meth:`subscribe` (asked of the orchestrator when omitted).

    CurveZMQ: ``curve_secret`` is this client's secret key file and ``server_key`` the
    orchestrator's public key file (``orchester keys generate``; defaults:
    ``ORCHESTER_CURVE_SECRET`` and ``ORCHESTER_SERVER_KEY``). If the orchestrator refuses the
    key, every pending request fails with :class:`~orchester.errors.RemoteError` ``forbidden``.

    A malformed endpoint (``localhost:5555``, ``tcp://localhost``) is a :class:`ValueError`
    here, at once. Should the I/O thread ever stop on an error, every pending future and every
    later request fails with :class:`~orchester.errors.ClientClosed` naming that error (its
    ``__cause__``): nothing is left waiting.
    """

    def __init__(self, endpoints: str | Sequence[str], *, pub: str | None = None,
                 codec: str = "msgpack", heartbeat_interval: float = 1.0, liveness: int = 3,
                 context: zmq.Context[Any] | None = None, curve_secret: str | None = None,
                 server_key: str | None = None) -> None:
        #: the endpoints, the failover rule and (in the I/O thread) the socket and its monitor
        self._uplink: Uplink[zmq.Socket[Any]] = Uplink(
            endpoints, who="client", identity="c:", curve_secret=curve_secret, server_key=server_key,
            heartbeat_interval=heartbeat_interval, liveness=liveness)
        self.endpoints = self._uplink.endpoints
        self.pub = None if pub is None else check_endpoint(pub)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.ctx = context or zmq.Context.instance()
        #: CurveZMQ keys ``(public, secret, server public)`` or None: see :func:`~orchester.security.keys.client_curve`
        self.curve = self._uplink.curve
        self._refused: str | None = None  #: why the orchestrator refused our key, once it did
        self.sends_deferred = 0  #: requests the socket could not take at once (retried, in order)
        self._unsent: collections.deque[list[Any]] = collections.deque()
        self.core = ClientCore(resolve_future, reject_future, codec=codec, accepted=_accepted,
                               on_demand=self._on_demand)
        self.core.alternatives = self._uplink.alternatives
        self._outbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        #: why the I/O thread stopped, if it stopped on an error: every request then fails with it
        self.failure: ClientClosed | None = None
        self._fail_lock = threading.Lock()
        self._wake_addr = f"inproc://orchester-client-{self.core.name}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.linger = 0
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.linger = 0
        self._wake_tx.connect(self._wake_addr)
        self._signalled = False
        self._thread = threading.Thread(target=self._run, name=f"orchester-client-{self.core.name}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- public API
    def submit(self, kind: str, *args: Any, priority: int = 0, tags: Sequence[str] = (),
               timeout: float | None = None, codec: str | None = None, task_id: str | None = None,
               ttl: float | None = None, max_run: float | None = None, duration: float | None = None,
               after: Any = (), on_failure: str = "fail", cores: int = 1, memory: int | None = None,
               **kwargs: Any) -> TaskFuture:
        """Submit a task of ``kind`` with ``args``/``kwargs``; return a future of its result.

        ``priority``: higher runs first; ``tags``: a satellite must have all of them;
        ``timeout``: seconds after which the orchestrator fails the task (``TaskTimeout``)
        and kills its worker; ``ttl``: seconds it may wait in the queue (``Expired``);
        ``max_run``: seconds it may run once started (``MaxRunTime``); ``duration``: the seconds
        it is expected to run (only satellites whose allocation lasts that long get it). ``task_id``: your own
        unique id (submitting the same id twice runs the task once, while the orchestrator still holds
        the task: after its result left ``--result-retention``, the id is new again). The future's exception is
        :class:`~orchester.TaskFailed` when the task fails, :class:`~orchester.RemoteError` when
        it is refused.

        Workflows: ``after``: tasks (futures, :func:`orchester.ref` references, task ids) it waits for
        (``WAITING``); a future or reference among the arguments is one too, and the satellite
        replaces it by that task's result (which then reaches this client only if asked for). When
        one does not succeed, the task fails with ``DependencyFailed``, unless ``on_failure="run"``
        (a reference to a failed task is then its :class:`~orchester.TaskFailed`). ``cores``: cores it
        needs (its worker's thread pools get as many); ``memory``: bytes it needs.
        """
        options = task_options(after, on_failure, cores, memory)
        fut = TaskFuture()
        fut.task_id = tid = task_id or self.core.task_id()
        self._post(lambda: self.core.submit(fut, kind, args, kwargs, priority=priority, tags=tags,
                                            timeout=timeout, codec=codec, task_id=tid, ttl=ttl,
                                            max_run=max_run, duration=duration, **options)[1], fut)
        return fut

    def map(self, kind: str, iterable: Iterable[Any], *, timeout: float | None = None,
            window: int | None = MAP_WINDOW, **options: Any) -> Iterator[Any]:
        """Submit ``kind(item)`` for every item (pipelined); yield the results in order.

        ``window``: at most this many tasks of the map unfinished at once (the next items are submitted
        as results are yielded): a map of millions stays within the orchestrator's limit per client
        (``--max-client-tasks``, 100,000 by default) and its memory here within the window; ``None``:
        every item at once. ``timeout`` bounds the whole map (seconds). Other keyword arguments are
        passed to :meth:`submit`.
        """
        if window is not None and window < 1:
            raise ValueError("window must be at least 1 (or None: every item at once)")
        items = iter(iterable)
        futures: collections.deque[TaskFuture] = collections.deque()
        # (each future let go once its result is yielded: a long map holds only what waits)
        for item in items if window is None else itertools.islice(items, window):
            futures.append(self._prepare(kind, (item,), options))
        self._wake()
        deadline = None if timeout is None else time.monotonic() + timeout
        while futures:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            fut = futures.popleft()
            if window is not None:  # the next item takes its place
                for item in itertools.islice(items, 1):
                    futures.append(self._prepare(kind, (item,), options))
                    self._wake()
            yield fut.result(remaining)

    def submit_many(self, kind: str, args_list: Iterable[Sequence[Any]], **options: Any) -> list[TaskFuture]:
        """Submit one task per argument tuple with a single wake-up of the I/O thread."""
        futures = [self._prepare(kind, tuple(args), options) for args in args_list]
        self._wake()
        return futures

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the result of any task by id (also one submitted by another client)."""
        fut: cf.Future[Any] = cf.Future()
        self._post(lambda: self.core.fetch(fut, task_id), fut)
        return fut.result(timeout)

    def status(self, timeout: float | None = 10.0, *, satellites: int | None = None,
               after: str | None = None) -> dict[str, Any]:
        """Tasks per state, queue depths, satellites and counters of the orchestrator.

        ``fleet`` sums up every satellite; ``satellites`` lists the first ``satellites`` of them by id (100 when
        not given, at most 1,000), after the id ``after``; ``satellites_next`` is the ``after`` of the next page
        (``None`` on the last). :meth:`satellites` pages through the whole fleet."""
        return self._call(M.Status(sats=satellites, after=after), timeout)

    def satellites(self, page: int = M.MAX_SATELLITES_PAGE, timeout: float | None = 10.0) -> Iterator[dict[str, Any]]:
        """Every satellite the orchestrator knows, in id order, fetched ``page`` at a time (a satellite that
        registers or goes meanwhile may be missed or listed on its new page)."""
        after: str | None = None
        while True:
            st = self.status(timeout, satellites=page, after=after)
            yield from st["satellites"]
            after = next_page(st, after)
            if after is None:
                return

    def history(self, *, state: str | None = None, kind: str | None = None, since: float | None = None,
                until: float | None = None, ids: Sequence[str] | None = None, limit: int | None = None,
                owner: str | None = None, tag: str | None = None, timeline: bool = False,
                timeout: float | None = 60.0) -> list[dict[str, Any]]:
        """The history of every task (from the journal when the orchestrator keeps one).

        One row per task: id, kind, state, attempts, satellite, submitted and finished (wall
        time), error type, owner, tags. Filters: ``state`` (``"failed"``…), ``kind``, submitted in
        ``[since, until)`` (seconds since the epoch), ``ids``, ``owner`` (the name of the key
        that submitted it), ``tag``; ``limit`` keeps the newest rows. With ``timeline`` (and at
        most ten ``ids``), each row also has its ``history``: every transition (time, state,
        attempt, satellite, reason), read back from the journal for tasks the orchestrator no
        longer holds.
        """
        query = M.History(state=state, kind=kind, since=since, until=until, limit=limit,
                          ids=None if ids is None else tuple(ids), owner=owner, tag=tag, timeline=timeline)
        return list(self._call(query, timeout)["rows"])

    def rollup(self, since: float, until: float, step: float = 60.0, *, kind: str | None = None,
               tag: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
        """Tasks ended, seconds of work and satellites that worked, per ``step`` seconds (whole minutes)
        from ``since`` to ``until`` (seconds since the epoch), for ``kind`` and ``tag`` if given.

        From the journal's roll-ups (an orchestrator without a journal refuses it): ``{"step",
        "buckets": [{"t", "done", "failed", "ended", "busy_seconds", "satellites"}, ...]}``.
        """
        query = M.History(since=float(since), until=float(until), kind=kind, tag=tag, rollup=float(step))
        reply = self._call(query, timeout)
        return {"step": reply["step"], "buckets": list(reply["buckets"])}

    def show(self, task_id: str, timeout: float | None = 10.0, *, journal: bool = False) -> dict[str, Any]:
        """One task's state, attempts and history of transitions.

        With ``journal``, a task the orchestrator no longer holds in memory (it keeps
        ``--result-retention`` finished ones) is read from its history instead: its row and its
        transitions, with ``source`` ``"history"`` (an orchestrator without a journal has none:
        the ``unknown_task`` error stays).
        """
        try:
            return self._call(M.Status(task=task_id), timeout)["task"]
        except RemoteError as exc:
            if not journal or exc.code != P.E_UNKNOWN_TASK:
                raise
            rows = self.history(ids=[task_id], limit=1, timeline=True, timeout=timeout)
            if not rows:
                raise
            return task_of_row(rows[0])

    def cancel(self, task_id: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Cancel a task (its worker is killed if it is running)."""
        return self._call(M.Cancel(task_id), timeout)

    def set_strategy(self, name: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Switch the orchestrator's routing strategy at run time (published as an event)."""
        return self._call(M.Control("strategy", name=name), timeout)

    def drain(self, satellite: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Send no more tasks to ``satellite``; what it runs finishes (then stop it). Needs ``admin`` with keys."""
        return self._call(M.Control("drain", sid=satellite), timeout)

    def report_jobs(self, report: M.JobsReport, timeout: float | None = 10.0) -> dict[str, Any]:
        """Tell the orchestrator an autoscaler's batch jobs (shown by ``status``, ``top``, the web page and carbon).
        Needs ``admin`` with keys; ``orchester autoscale`` sends it at every step."""
        return self._call(M.Control("jobs", fields=report.header()), timeout)

    def promote(self, force: bool = False, timeout: float | None = 10.0) -> dict[str, Any]:
        """Make the binary-star server this client talks to ACTIVE (manual recovery, see ``docs/ha.rst``).

        Refused while its peer is active and alive, unless ``force``.
        """
        return self._call(M.Control("promote", force=bool(force)), timeout)

    def subscribe(self, topics: Sequence[str] = ("",), timeout: float | None = 10.0) -> Any:
        """An :class:`~orchester.client.events.EventStream` of the orchestrator's events under ``topics``."""
        from orchester.client.events import EventStream

        pub = self.pub or self.status(timeout).get("pub", [None])[0]
        if not pub:
            raise Unreachable("the orchestrator did not say where it publishes events")
        pub = reachable_endpoint(pub, self._uplink.current)
        return EventStream(pub, topics, context=self.ctx, curve=self.curve)

    def close(self) -> None:
        """Stop the I/O thread, close the sockets and fail what is still pending."""
        if self._closed:
            return
        self._closed = True
        self._wake(force=True)
        self._thread.join(10)
        with self._lock:
            self._wake_tx.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- internals
    def _on_demand(self, fut: Any) -> None:
        """(The I/O thread) ``fut``'s task is passed by reference: its result is fetched when asked for."""
        if isinstance(fut, TaskFuture):
            fut._demand(lambda: self._post(lambda: self.core.fetch(fut, fut.task_id), fut))

    def _prepare(self, kind: str, args: tuple[Any, ...], options: dict[str, Any]) -> TaskFuture:
        if self._closed:
            raise ClientClosed("the client is closed")
        fut = TaskFuture()
        fut.task_id = self.core.task_id()
        kwargs = dict(options)
        opts: dict[str, Any] = {k: kwargs.pop(k) for k in ("priority", "tags", "timeout", "codec", "ttl",
                                                           "max_run", "duration") if k in kwargs}
        opts.update(task_options(**{k: kwargs.pop(k) for k in WORKFLOW_OPTIONS if k in kwargs}))
        opts["task_id"] = fut.task_id
        self._outbox.append(("submit", fut, kind, args, kwargs, opts))
        if self.failure is not None:
            self._fail_outbox()
        return fut

    def _call(self, message: Request, timeout: float | None) -> dict[str, Any]:
        """Send a request (:mod:`serializers.messages`) and wait for the body of its REPLY."""
        fut: cf.Future[Any] = cf.Future()
        self._post(lambda: self.core.ask(fut, message), fut)
        return self._answer(fut, timeout)

    def _ask(self, cmd: bytes, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send command ``cmd`` with header ``body`` as given (:meth:`ClientCore.request`: a test's
        fault hook) and wait for the body of its REPLY."""
        fut: cf.Future[Any] = cf.Future()
        self._post(lambda: self.core.request(fut, cmd, body), fut)
        return self._answer(fut, timeout)

    def _answer(self, fut: cf.Future[Any], timeout: float | None) -> dict[str, Any]:
        try:
            return fut.result(timeout)
        except cf.TimeoutError:
            self._outbox.append(("forget", fut))
            raise Unreachable(unreachable_message(self._uplink.current, timeout, keys=self.curve is not None)) from None

    def _post(self, build: Any, fut: cf.Future[Any]) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        self._outbox.append(("build", build, fut))
        if self.failure is not None:
            self._fail_outbox()
        else:
            self._wake()

    def _wake(self, force: bool = False) -> None:
        with self._lock:
            if (not self._signalled or force) and not self._wake_tx.closed and self.failure is None:
                self._signalled = True
                # one wake-up is outstanding at most: the pipe never fills while the thread runs; Again: the
                # I/O thread is gone (it stopped on an error, and failed what was pending)
                with contextlib.suppress(zmq.Again):
                    self._wake_tx.send(b"", zmq.NOBLOCK)

    def _fail_outbox(self) -> None:
        """The I/O thread stopped on an error: fail every request still in the outbox with it."""
        failure = self.failure
        if failure is None:
            return
        with self._fail_lock:
            while self._outbox:
                item = self._outbox.popleft()
                if item[0] != "forget":
                    reject_future(item[2] if item[0] == "build" else item[1], failure)

    @property
    def _index(self) -> int:
        """How many times this client moved to another endpoint (``bench/failover.py`` reads it)."""
        return self._uplink.index

    def _connect(self) -> zmq.Socket[Any]:
        """A new connection to the uplink's current endpoint (the previous socket closed); in the I/O thread."""
        self.core.connected()
        return self._uplink.open(self.ctx)

    def _key_refused(self, monitor: zmq.Socket[Any]) -> None:
        """The orchestrator refused our key: fail what is pending, and every later request."""
        try:
            monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self._refused = self._uplink.refusal()
        log.error("%s", self._refused)
        self.core.fail_all(RemoteError(P.E_FORBIDDEN, self._refused))

    def _run(self) -> None:
        """The I/O thread: serve the socket until closed; if it stops on an error, fail everything with it."""
        try:
            self._loop()
        except BaseException as exc:  # whatever it is, no future may be left waiting
            failure = self.failure = stopped("I/O thread", exc)
            with self._fail_lock:
                self.core.fail_all(failure)
            self._fail_outbox()
        finally:
            self.core.fail_all(ClientClosed("the client was closed"))
            self._uplink.close()
            self._wake_rx.close(0)

    def _loop(self) -> None:
        uplink = self._uplink
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        monitor = uplink.monitor
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        core = self.core
        uplink.restart(time.monotonic())
        while True:
            # (the socket full: retry soon; requests still in the outbox: a slice of them went out last time,
            # the rest go on at once)
            wait = 10 if self._unsent else 0 if self._outbox else int(self.heartbeat_interval * 250)
            ready = dict(poller.poll(wait))
            now = time.monotonic()
            if self._wake_rx in ready:
                with self._lock:
                    while readable(self._wake_rx):
                        self._wake_rx.recv(zmq.NOBLOCK)
                    self._signalled = False
                if self._closed:
                    break
            if monitor is not None and monitor in ready:
                self._key_refused(monitor)
            self._drain_outbox(sock)
            if sock in ready:
                for i in range(1024):
                    if i and not readable(sock):  # (cheaper than a receive that fails)
                        break
                    try:
                        frames = recv_frames(sock, NOBLOCK, 3)
                    except zmq.Again:
                        break
                    uplink.heard(now)
                    try:
                        restarted = core.handle(frames)
                    except ProtocolError as exc:
                        log.warning("bad message from orchestrator: %s", exc)
                        continue
                    if restarted:
                        log.warning("orchestrator changed (epoch %s): resending %d request(s)",
                                    core.epoch, len(core.tasks) + len(core.requests))
                        for f in core.pending_frames():
                            self._send_or_defer(sock, f)
            move, ping = client_step(uplink, core, now)
            if move is not None:
                poller.unregister(sock)
                if monitor is not None:
                    poller.unregister(monitor)
                sock = self._switch(move.vote)
                poller.register(sock, zmq.POLLIN)
                monitor = uplink.monitor  # a new socket has its own monitor
                if monitor is not None:
                    poller.register(monitor, zmq.POLLIN)
            elif ping:
                _offer(sock, core.ping())
                uplink.sent(now)

    def _switch(self, vote: bool) -> zmq.Socket[Any]:
        """Connect to the uplink's (new) current endpoint, say the vote, resend what is pending."""
        self._unsent.clear()  # everything pending is resent below
        sock = self._connect()
        self.core.epoch = None  # the new server's epoch is news, not a restart: everything is resent here
        _offer(sock, self.core.ping(vote=vote))
        for f in self.core.pending_frames():
            self._send_or_defer(sock, f)
        return sock

    def _send_or_defer(self, sock: zmq.Socket[Any], frames: list[Any]) -> None:
        """Send now if nothing waits before it and the socket takes it; else queue it, in order."""
        if self._unsent or not _offer(sock, frames):
            self.sends_deferred += 1
            self._unsent.append(frames)

    def _drain_outbox(self, sock: zmq.Socket[Any]) -> None:
        outbox = self._outbox
        core = self.core
        unsent = self._unsent
        while unsent:  # what the socket could not take last time goes first, in order
            if not _offer(sock, unsent[0]):
                return
            unsent.popleft()
        ready: list[list[Any]] = []  # built, to go out together: a run of them as one BATCH
        # a slice at a time: a map of a million items never keeps the results that come meanwhile unread
        for _ in range(OUTBOX_SLICE):
            if not outbox:
                break
            item = outbox.popleft()
            if self._refused is not None and item[0] != "forget":
                fut = item[2] if item[0] == "build" else item[1]
                reject_future(fut, RemoteError(P.E_FORBIDDEN, self._refused))
                continue
            if item[0] == "build":
                try:
                    frames = item[1]()
                except Exception as exc:  # an argument the codec cannot encode, for example
                    reject_future(item[2], exc)
                    continue
            elif item[0] == "forget":
                core.forget(item[1])
                continue
            else:
                _, fut, kind, args, kwargs, opts = item
                try:
                    frames = core.submit(fut, kind, args, kwargs, **opts)[1]
                except Exception as exc:
                    reject_future(fut, exc)
                    continue
            ready.append(frames)
            if len(ready) >= P.BATCH_MESSAGES and not self._send_ready(sock, ready):
                return
        if ready:
            self._send_ready(sock, ready)

    def _send_ready(self, sock: zmq.Socket[Any], ready: list[list[Any]]) -> bool:
        """Send the messages built (each with its signature), in order, several as one BATCH; what the
        socket does not take waits in order (False)."""
        out = M.batches([frames[1:] for frames in ready]) if len(ready) > 1 else ready[:]
        ready.clear()
        for i, frames in enumerate(out):
            if not _offer(sock, frames):  # the queue to the orchestrator is full: keep the rest, retry soon
                self.sends_deferred += 1
                self._unsent.extend(out[i:])
                return False
        return True


#: Requests the I/O thread builds and sends per turn of its loop, before it reads what came.
OUTBOX_SLICE = 1024


def _offer(sock: zmq.Socket[Any], frames: list[Any]) -> bool:
    """Send without blocking: a socket with no peer (a refused key, a full queue) must not hang the I/O thread."""
    try:
        send_frames(sock, frames, NOBLOCK)
        return True
    except zmq.Again:
        return False


def unreachable_message(endpoint: str, timeout: float | None, *, keys: bool) -> str:
    """Why a request to ``endpoint`` got no answer in ``timeout`` seconds, and what to check.

    An orchestrator that wants CurveZMQ keys never answers a client without them (nor one
    that names another server's public key): it looks exactly like no orchestrator at all,
    so the message says so. ``keys``: whether the client had keys.
    """
    hint = ("with CurveZMQ keys, check that --server-key (server_key) is that orchestrator's public key"
            if keys else "one that wants CurveZMQ keys does not answer without them: give --curve-secret and "
            "--server-key (curve_secret/server_key, or ORCHESTER_CURVE_SECRET/ORCHESTER_SERVER_KEY)")
    return f"no orchestrator answered at {endpoint} within {timeout}s: is one running there? {hint}"


def reachable_endpoint(endpoint: str, via: str) -> str:
    """Replace a wildcard host (``0.0.0.0``, ``*``, ``[::]``) in ``endpoint`` by the host of ``via``.

    The orchestrator reports the endpoints it bound; a wildcard bind is reached at the
    address the client already uses.
    """
    scheme, _, rest = endpoint.partition("://")
    host, sep, port = rest.rpartition(":")
    if scheme == "tcp" and sep and host in ("0.0.0.0", "*", "[::]", "::"):
        via_host = via.partition("://")[2].rpartition(":")[0]
        if via_host:
            return f"tcp://{via_host}:{port}"
    return endpoint
