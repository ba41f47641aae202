"""The asyncio client: the same protocol core as :class:`~orchester.Client`, on ``zmq.asyncio``.

Example::

    import asyncio
    from orchester import AsyncClient

    async def main():
        async with AsyncClient("tcp://127.0.0.1:5555") as client:
            print(await client.submit("echo", 42))
            print(await client.map("echo", range(10)))

    asyncio.run(main())

Use one instance from one event loop. Submitting returns an ``asyncio.Future``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from orchester.client.core import ClientCore, reject_future, resolve_future, stopped
from orchester.client.sync import resolve_endpoint, unreachable_message
from orchester.config import check_endpoint
from orchester.errors import ClientClosed, Unreachable
from orchester.security.auth import secure_client
from orchester.security.keys import client_curve
from serializers import ProtocolError
from serializers import protocol as P

log = logging.getLogger("orchester.client.sync")


class AsyncClient:
    """Submit tasks from asyncio code over one pipelined DEALER socket.

    ``endpoints`` as for :class:`~orchester.Client` (one, or a failover pair; ``@FILE`` reads an
    endpoint file): a malformed one is a :class:`ValueError` here. Should the reading task stop
    on an error, every pending future and every later call fails with
    :class:`~orchester.errors.ClientClosed` naming that error (its ``__cause__``).
    """

    def __init__(self, endpoints: str | Sequence[str], *, codec: str = "msgpack",
                 heartbeat_interval: float = 1.0, liveness: int = 3,
                 context: zmq.asyncio.Context | None = None, curve_secret: str | None = None,
                 server_key: str | None = None) -> None:
        self.endpoints = [check_endpoint(resolve_endpoint(e))
                          for e in ([endpoints] if isinstance(endpoints, str) else endpoints)]
        if not self.endpoints:
            raise ValueError("a client needs at least one orchestrator endpoint")
        self.heartbeat_interval = heartbeat_interval
        self.liveness = liveness
        self.ctx = context or zmq.asyncio.Context.instance()
        #: CurveZMQ keys, as for :class:`~orchester.Client` (arguments or ORCHESTER_CURVE_SECRET/SERVER_KEY)
        self.curve = client_curve(curve_secret, server_key)
        self.core = ClientCore(resolve_future, reject_future, codec=codec)
        self.core.alternatives = len(self.endpoints) > 1
        self._index = 0
        self._sock = self._connect()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        #: why the reading task stopped, if it stopped on an error: every call then fails with it
        self.failure: ClientClosed | None = None

    def _connect(self) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = f"a:{secrets.token_hex(16)}".encode()  # 128 random bits: not guessable
        self.core.connected()
        s.sndhwm = s.rcvhwm = 100_000
        if self.curve is not None:
            secure_client(s, *self.curve)
        s.connect(self.endpoints[self._index % len(self.endpoints)])
        return s

    def _ensure_reader(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def submit(self, kind: str, *args: Any, priority: int = 0, tags: Sequence[str] = (),
                     timeout: float | None = None, codec: str | None = None, **kwargs: Any) -> Any:
        """Submit a task and wait for its result (see :meth:`orchester.Client.submit`)."""
        return await self.submit_nowait(kind, *args, priority=priority, tags=tags, timeout=timeout,
                                        codec=codec, **kwargs)

    def submit_nowait(self, kind: str, *args: Any, priority: int = 0, tags: Sequence[str] = (),
                      timeout: float | None = None, codec: str | None = None, ttl: float | None = None,
                      max_run: float | None = None, duration: float | None = None, task_id: str | None = None,
                      **kwargs: Any) -> asyncio.Future[Any]:
        """Submit a task; return an ``asyncio.Future`` of its result at once (the options are those of
        :meth:`orchester.Client.submit`; other keywords go to the task)."""
        self._ensure_reader()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        _, frames = self.core.submit(fut, kind, args, kwargs, priority=priority, tags=tags,
                                     timeout=timeout, codec=codec, ttl=ttl, max_run=max_run, duration=duration,
                                     task_id=task_id)
        self._sock.send_multipart(frames, copy=False)
        return fut

    async def map(self, kind: str, iterable: Iterable[Any], **options: Any) -> list[Any]:
        """Submit ``kind(item)`` for every item; return the results in order."""
        futs = [self.submit_nowait(kind, item, **options) for item in iterable]
        return list(await asyncio.gather(*futs))

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait for the result of any task by id."""
        self._ensure_reader()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._sock.send_multipart(self.core.fetch(fut, task_id))
        return await asyncio.wait_for(fut, timeout)

    async def _ask(self, cmd: bytes, body: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        self._ensure_reader()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._sock.send_multipart(self.core.request(fut, cmd, body))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.core.forget(fut)
            raise Unreachable(unreachable_message(self.endpoints[self._index % len(self.endpoints)], timeout,
                                                  keys=self.curve is not None)) from None

    async def status(self, timeout: float | None = 10.0) -> dict[str, Any]:
        """The orchestrator's status (see :meth:`orchester.Client.status`)."""
        return await self._ask(P.STATUS, {}, timeout)

    async def history(self, timeout: float | None = 60.0, **filters: Any) -> list[dict[str, Any]]:
        """The history of every task (see :meth:`orchester.Client.history` for the filters)."""
        body = {k: (list(v) if k == "ids" else v) for k, v in filters.items() if v is not None}
        return list((await self._ask(P.HISTORY, body, timeout))["rows"])

    async def show(self, task_id: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """One task's state, attempts and history of transitions."""
        return (await self._ask(P.STATUS, {"task": task_id}, timeout))["task"]

    async def cancel(self, task_id: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Cancel a task."""
        return await self._ask(P.CANCEL, {"id": task_id}, timeout)

    async def set_strategy(self, name: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Switch the routing strategy at run time."""
        return await self._ask(P.CONTROL, {"op": "strategy", "name": name}, timeout)

    async def drain(self, satellite: str, timeout: float | None = 10.0) -> dict[str, Any]:
        """Send no more tasks to ``satellite`` (see :meth:`orchester.Client.drain`)."""
        return await self._ask(P.CONTROL, {"op": "drain", "sid": satellite}, timeout)

    async def promote(self, force: bool = False, timeout: float | None = 10.0) -> dict[str, Any]:
        """Make the binary-star server this client talks to ACTIVE (see :meth:`orchester.Client.promote`)."""
        return await self._ask(P.CONTROL, {"op": "promote", "force": bool(force)}, timeout)

    async def subscribe(self, topics: Sequence[str] = ("",), timeout: float | None = 10.0) -> Any:
        """An :class:`~orchester.client.events.EventStream` of the orchestrator's events under ``topics``
        (a blocking reader: run its ``recv`` in a thread, or poll it with ``timeout=0``)."""
        from orchester.client.events import EventStream
        from orchester.client.sync import reachable_endpoint

        pub = (await self.status(timeout)).get("pub", [None])[0]
        if not pub:
            raise Unreachable("the orchestrator did not say where it publishes events")
        pub = reachable_endpoint(pub, self.endpoints[self._index % len(self.endpoints)])
        return EventStream(pub, topics, curve=self.curve)

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
        last_heard = last_ping = redirect_after = time.monotonic()
        silent_after = self.heartbeat_interval * self.liveness
        while not self._closed:
            sock = self._sock
            if await sock.poll(self.heartbeat_interval * 250):
                while True:
                    try:
                        frames = await sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last_heard = time.monotonic()
                    try:
                        if core.handle(frames):
                            for f in core.pending_frames():
                                sock.send_multipart(f, copy=False)
                    except ProtocolError as exc:
                        log.warning("bad message from orchestrator: %s", exc)
            now = time.monotonic()
            if core.redirect and now >= redirect_after:  # a passive server refused us
                core.redirect = False
                redirect_after = now + self.heartbeat_interval / 2
                self._switch(vote=False)
                last_heard = last_ping = now
            busy = bool(core.tasks or core.requests)
            if (busy and now - last_ping >= self.heartbeat_interval) or core.ack_due:
                sock.send_multipart(core.ping())
                last_ping = now
            if not busy:
                last_heard = now
            elif now - last_heard > silent_after and len(self.endpoints) > 1:
                log.warning("orchestrator silent for %.1fs: failing over", now - last_heard)
                self._switch(vote=True)
                last_heard = last_ping = now

    def _switch(self, vote: bool) -> None:
        """Connect to the next endpoint, vote if we left on silence, resend what is pending."""
        self._sock.close(0)
        self._index += 1
        self._sock = self._connect()
        self.core.epoch = None
        self._sock.send_multipart(self.core.ping(vote=vote))
        for f in self.core.pending_frames():
            self._sock.send_multipart(f, copy=False)

    async def close(self) -> None:
        """Stop reading, close the socket and fail what is still pending."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self.core.fail_all(ClientClosed("the client was closed"))
        self._sock.close(0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
