"""The asyncio client: the same protocol core as :class:`~orchester.Client`, on ``zmq.asyncio``.

Example::

    import asyncio
    from orchester import AsyncClient

    async def main():
        async with AsyncClient("tcp://127.0.0.1:5555") as client:
            print(await client.submit("echo", 42))
            print(await client.map("echo", range(10)))

    asyncio.run(main())

Use one instance from one event loop. Submitting returns an ``asyncio.Future`` (an
:class:`AsyncTaskFuture`, which knows its task id).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from typing import Any

import zmq
import zmq.asyncio

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
from orchester.client.sync import MAP_WINDOW, reachable_endpoint, unreachable_message
from orchester.client.uplink import Uplink, client_step
from orchester.config import check_endpoint
from orchester.errors import ClientClosed, RemoteError, Unreachable
from serializers import ProtocolError
from serializers import messages as M
from serializers import protocol as P

log = logging.getLogger("orchester.client")


class AsyncTaskFuture(asyncio.Future[Any]):
    """The ``asyncio.Future`` of a submitted task, which knows its task id and when it was accepted.

    The asyncio counterpart of :class:`~orchester.TaskFuture`: ``accepted`` (an
    :class:`asyncio.Event`) is set when the orchestrator acknowledged the task (with a journal,
    once the task is durable there).
    """

    task_id: str = ""

    def __init__(self, *, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.accepted = asyncio.Event()
        #: passed by reference to another task: its result is fetched when someone waits for it
        self._on_demand: Callable[[], None] | None = None
        self._wanted = False  #: someone waited for it (a reference to it made later fetches it at once)

    @property
    def __orchester_ref__(self) -> str:
        """Its task id: passed as an argument of another task, the future stands for its result."""
        return self.task_id

    def _ask(self) -> None:
        self._wanted = True
        ask, self._on_demand = self._on_demand, None
        if ask is not None and not self.done():
            ask()

    def __await__(self) -> Generator[Any, None, Any]:
        self._ask()
        return super().__await__()

    __iter__ = __await__

    def result(self) -> Any:
        """The task's result (see :class:`asyncio.Future`)."""
        self._ask()
        return super().result()

    def exception(self) -> BaseException | None:
        """The task's exception, if it failed (see :class:`asyncio.Future`)."""
        self._ask()
        return super().exception()

    def add_done_callback(self, fn: Callable[[Any], object], *, context: contextvars.Context | None = None) -> None:
        """Call ``fn`` with this future when it is done (see :class:`asyncio.Future`)."""
        self._ask()
        super().add_done_callback(fn, context=context)


def _accepted(fut: Any) -> None:
    if isinstance(fut, AsyncTaskFuture):
        fut.accepted.set()


class AsyncClient:
    """Submit tasks from asyncio code over one pipelined DEALER socket.

    It has every feature of :class:`~orchester.Client`, in async style: ``endpoints`` is one
    endpoint or a failover pair (``@FILE`` reads an endpoint file; a malformed one is a
    :class:`ValueError` here), and the client fails over to the next one when the current stays
    silent for ``liveness × heartbeat_interval`` seconds while requests are outstanding (or when
    a passive server refuses it), resending what is pending. ``pub`` names the event endpoint
    for :meth:`subscribe` (asked of the orchestrator when omitted).

    CurveZMQ: ``curve_secret`` and ``server_key`` as for :class:`~orchester.Client` (defaults:
    ``ORCHESTER_CURVE_SECRET`` and ``ORCHESTER_SERVER_KEY``). If the orchestrator refuses the key,
    every pending request fails with :class:`~orchester.errors.RemoteError` ``forbidden``, and so
    does every later one.

    Should the reading task stop on an error, every pending future and every later call fails
    with :class:`~orchester.errors.ClientClosed` naming that error (its ``__cause__``).
    """

    def __init__(self, endpoints: str | Sequence[str], *, pub: str | None = None, codec: str = "msgpack",
                 heartbeat_interval: float = 1.0, liveness: int = 3,
                 context: zmq.asyncio.Context | None = None, curve_secret: str | None = None,
                 server_key: str | None = None) -> None:
        #: the endpoints, the failover rule, the socket and its monitor
        self._uplink: Uplink[zmq.asyncio.Socket] = Uplink(
            endpoints, who="client", identity="a:", curve_secret=curve_secret, server_key=server_key,
            heartbeat_interval=heartbeat_interval, liveness=liveness)
        self.endpoints = self._uplink.endpoints
        self.pub = None if pub is None else check_endpoint(pub)
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.ctx = context or zmq.asyncio.Context.instance()
        #: CurveZMQ keys, as for :class:`~orchester.Client` (arguments or ORCHESTER_CURVE_SECRET/SERVER_KEY)
        self.curve = self._uplink.curve
        self.core = ClientCore(resolve_future, reject_future, codec=codec, accepted=_accepted,
                               on_demand=self._on_demand)
        self.core.alternatives = self._uplink.alternatives
        self._refused: str | None = None  #: why the orchestrator refused our key, once it did
        #: messages for the orchestrator made since the event loop last ran this client's flush: they go
        #: out together (a loop of ``submit_nowait`` as a few BATCHes), at the end of the loop's iteration
        self._out: list[list[Any]] = []
        self._connect()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        #: why the reading task stopped, if it stopped on an error: every call then fails with it
        self.failure: ClientClosed | None = None

    # ------------------------------------------------------------- public API
    @property
    def current(self) -> str:
        """The endpoint this client talks to now (the next one of a pair after a failover)."""
        return self._uplink.current

    async def submit(self, kind: str, *args: Any, priority: int = 0, tags: Sequence[str] = (),
                     timeout: float | None = None, codec: str | None = None, **kwargs: Any) -> Any:
        """Submit a task and wait for its result (see :meth:`orchester.Client.submit`)."""
        return await self.submit_nowait(kind, *args, priority=priority, tags=tags, timeout=timeout,
                                        codec=codec, **kwargs)

    def submit_nowait(self, kind: str, *args: Any, priority: int = 0, tags: Sequence[str] = (),
                      timeout: float | None = None, codec: str | None = None, ttl: float | None = None,
                      max_run: float | None = None, duration: float | None = None, task_id: str | None = None,
                      after: Any = (), on_failure: str = "fail", cores: int = 1, memory: int | None = None,
                      **kwargs: Any) -> AsyncTaskFuture:
        """Submit a task; return an :class:`AsyncTaskFuture` of its result at once (the options are those
        of :meth:`orchester.Client.submit`, dependencies and resources included; other keywords go to the task)."""
        options = task_options(after, on_failure, cores, memory)
        self._ensure_reader()
        fut = AsyncTaskFuture(loop=asyncio.get_running_loop())
        fut.task_id = tid = task_id or self.core.task_id()
        if self._refuse(fut):
            return fut
        _, frames = self.core.submit(fut, kind, args, kwargs, priority=priority, tags=tags,
                                     timeout=timeout, codec=codec, ttl=ttl, max_run=max_run, duration=duration,
                                     task_id=tid, **options)
        self._send(frames)
        return fut

    def _on_demand(self, fut: Any) -> None:
        """``fut``'s task is passed by reference: its result is fetched when someone waits for it."""
        if isinstance(fut, AsyncTaskFuture):
            fut._on_demand = lambda: self._send(self.core.fetch(fut, fut.task_id))
            if fut._wanted:  # someone waits for it already
                fut._ask()

    def submit_many(self, kind: str, args_list: Iterable[Sequence[Any]], **options: Any) -> list[AsyncTaskFuture]:
        """One task per argument tuple; return their futures at once (as :meth:`orchester.Client.submit_many`)."""
        return [self.submit_nowait(kind, *args, **options) for args in args_list]

    async def map(self, kind: str, iterable: Iterable[Any], *, window: int | None = MAP_WINDOW,
                  **options: Any) -> list[Any]:
        """Submit ``kind(item)`` for every item; return the results in order. ``window``: at most this
        many unfinished at once (as :meth:`orchester.Client.map`; ``None``: every item at once)."""
        if window is not None and window < 1:
            raise ValueError("window must be at least 1 (or None: every item at once)")
        results: list[Any] = []
        pending: collections.deque[AsyncTaskFuture] = collections.deque()
        for item in iterable:
            pending.append(self.submit_nowait(kind, item, **options))
            if window is not None and len(pending) >= window:
                results.append(await pending.popleft())
        while pending:
            results.append(await pending.popleft())
        return results

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the result of any task by id (also one submitted by another client)."""
        self._ensure_reader()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._refuse(fut):
            self._send(self.core.fetch(fut, task_id))
        return await asyncio.wait_for(fut, timeout)

    async def status(self, timeout: float | None = 10.0, *, satellites: int | None = None,
                     after: str | None = None) -> dict[str, Any]:
        """The orchestrator's status (see :meth:`orchester.Client.status`)."""
        return await self._call(M.Status(sats=satellites, after=after), timeout)

    async def satellites(self, page: int = M.MAX_SATELLITES_PAGE,
                         timeout: float | None = 10.0) -> AsyncIterator[dict[str, Any]]:
        """Every satellite, in id order, ``page`` at a time (see :meth:`orchester.Client.satellites`)."""
        after: str | None = None
        while True:
            st = await self.status(timeout, satellites=page, after=after)
            for sat in st["satellites"]:
                yield sat
            after = next_page(st, after)
            if after is None:
                return

    async def history(self, timeout: float | None = 60.0, **filters: Any) -> list[dict[str, Any]]:
        """The history of every task (see :meth:`orchester.Client.history` for the filters; another
        keyword is a :class:`TypeError`)."""
        unknown = sorted(set(filters) - set(M.History.FILTERS))
        if unknown:
            raise TypeError(f"history() got unknown filters {unknown}; the filters are {list(M.History.FILTERS)}")
        if filters.get("ids") is not None:
            filters["ids"] = tuple(filters["ids"])
        return list((await self._call(M.History(**filters), timeout))["rows"])

    async def rollup(self, since: float, until: float, step: float = 60.0, *, kind: str | None = None,
                     tag: str | None = None, timeout: float | None = 60.0) -> dict[str, Any]:
        """Roll-ups from the journal (see :meth:`orchester.Client.rollup`)."""
        query = M.History(since=float(since), until=float(until), kind=kind, tag=tag, rollup=float(step))
        reply = await self._call(query, timeout)
        return {"step": reply["step"], "buckets": list(reply["buckets"])}

    async def show(self, task_id: str, timeout: float | None = 10.0, *, journal: bool = False) -> dict[str, Any]:
        """One task's state, attempts and history of transitions (see :meth:`orchester.Client.show`
        for ``journal``)."""
        try:
            return (await self._call(M.Status(task=task_id), timeout))["task"]
        except RemoteError as exc:
            if not journal or exc.code != P.E_UNKNOWN_TASK:
                raise
            rows = await self.history(timeout, ids=[task_id], limit=1, timeline=True)
            if not rows:
                raise
            return task_of_row(rows[0])

    async def cancel(self, task_id: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Cancel a task."""
        return await self._call(M.Cancel(task_id), timeout)

    async def set_strategy(self, name: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Switch the routing strategy at run time."""
        return await self._call(M.Control("strategy", name=name), timeout)

    async def drain(self, satellite: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Send no more tasks to ``satellite`` (see :meth:`orchester.Client.drain`)."""
        return await self._call(M.Control("drain", sid=satellite), timeout)

    async def report_jobs(self, report: M.JobsReport, timeout: float | None = 10.0) -> dict[str, Any]:
        """Tell the orchestrator an autoscaler's batch jobs (see :meth:`orchester.Client.report_jobs`)."""
        return await self._call(M.Control("jobs", fields=report.header()), timeout)

    async def promote(self, force: bool = False, timeout: float | None = 10.0) -> dict[str, Any]:
        """Make the binary-star server this client talks to ACTIVE (see :meth:`orchester.Client.promote`)."""
        return await self._call(M.Control("promote", force=bool(force)), timeout)

    async def subscribe(self, topics: Sequence[str] = ("",), timeout: float | None = 10.0) -> Any:
        """An :class:`~orchester.client.events.EventStream` of the orchestrator's events under ``topics``
        (a blocking reader: run its ``recv`` in a thread, or poll it with ``timeout=0``)."""
        from orchester.client.events import EventStream

        pub = self.pub or (await self.status(timeout)).get("pub", [None])[0]
        if not pub:
            raise Unreachable("the orchestrator did not say where it publishes events")
        pub = reachable_endpoint(pub, self._uplink.current)
        return EventStream(pub, topics, curve=self.curve)

    async def close(self) -> None:
        """Stop reading, close the socket and fail what is still pending."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # it stops here, whatever it was doing
                await self._reader
        self.core.fail_all(ClientClosed("the client was closed"))
        self._uplink.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- internals
    def _connect(self) -> zmq.asyncio.Socket:
        """A new connection to the uplink's current endpoint (the previous socket closed)."""
        self.core.connected()
        return self._uplink.open(self.ctx)

    def _ensure_reader(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    def _refuse(self, fut: asyncio.Future[Any]) -> bool:
        """Fail ``fut`` at once if the orchestrator refused our key (as every later request of a
        :class:`~orchester.Client` fails); True if it did."""
        if self._refused is None:
            return False
        reject_future(fut, RemoteError(P.E_FORBIDDEN, self._refused))
        return True

    def _send(self, frames: list[Any]) -> None:
        """Queue ``frames`` (with their signature) for the orchestrator: sent, with the others made in the
        same turn of the event loop, as soon as the loop is free (:meth:`_flush`)."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(frames)

    def _flush(self) -> None:
        """Send the queued messages in order, several as one BATCH (the socket queues what the
        orchestrator cannot take yet: the event loop never blocks)."""
        out, self._out = self._out, []
        sock = self._uplink.sock
        if not out or sock is None or self._closed:
            return
        for frames in (M.batches([f[1:] for f in out]) if len(out) > 1 else out):
            sock.send_multipart(frames, copy=False)

    async def _call(self, message: Request, timeout: float | None) -> dict[str, Any]:
        """Send a request (:mod:`serializers.messages`) and wait for the body of its REPLY."""
        self._ensure_reader()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._refuse(fut):
            self._send(self.core.ask(fut, message))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.core.forget(fut)
            raise Unreachable(unreachable_message(self._uplink.current, timeout, keys=self.curve is not None)) from None

    async def _key_refused(self, monitor: zmq.asyncio.Socket) -> None:
        """The orchestrator refused our key: fail what is pending, and every later request."""
        try:
            await monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self._refused = self._uplink.refusal()
        log.error("%s", self._refused)
        self.core.fail_all(RemoteError(P.E_FORBIDDEN, self._refused))

    async def _read(self) -> None:
        """The reading task: :meth:`_serve`; if that stops on an error, fail everything pending with it."""
        try:
            await self._serve()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever it is, no future may be left waiting
            self.failure = stopped("reading task", exc)
            self.core.fail_all(self.failure)

    async def _serve(self) -> None:
        core = self.core
        uplink = self._uplink
        uplink.restart(time.monotonic())
        poller = zmq.asyncio.Poller()
        polled: tuple[Any, Any] = (None, None)
        while not self._closed:
            sock, monitor = uplink.sock, uplink.monitor
            assert sock is not None, "the uplink is open from __init__ until close"
            if polled != (sock, monitor):  # the first time, and after a failover: a new socket and monitor
                poller = zmq.asyncio.Poller()
                poller.register(sock, zmq.POLLIN)
                if monitor is not None:
                    poller.register(monitor, zmq.POLLIN)
                polled = (sock, monitor)
            ready = dict(await poller.poll(self.heartbeat_interval * 250))
            if monitor is not None and monitor in ready:
                await self._key_refused(monitor)
            if sock in ready:
                while True:
                    try:
                        frames = await sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    uplink.heard(time.monotonic())
                    try:
                        if core.handle(frames):
                            for f in core.pending_frames():
                                sock.send_multipart(f, copy=False)
                    except ProtocolError as exc:
                        log.warning("bad message from orchestrator: %s", exc)
            now = time.monotonic()
            move, ping = client_step(uplink, core, now)
            if move is not None:
                self._switch(move.vote)
            elif ping:
                sock.send_multipart(core.ping())
                uplink.sent(now)

    def _switch(self, vote: bool) -> None:
        """Connect to the uplink's (new) current endpoint, say the vote, resend what is pending."""
        self._out.clear()  # (everything pending is resent below)
        sock = self._connect()
        self.core.epoch = None  # the new server's epoch is news, not a restart: everything is resent here
        sock.send_multipart(self.core.ping(vote=vote))
        for f in self.core.pending_frames():
            sock.send_multipart(f, copy=False)
