"""A TCP relay that delays every byte by a set time each way: a slow link for one satellite.

The kernel's ``tc netem`` needs root, network namespaces and the ``sch_netem`` module, which
many machines (containers, CI runners) do not have; this relay needs nothing. A satellite
connects to the relay's loopback port instead of the orchestrator; the relay opens its own
connection to the orchestrator (``tcp://`` or ``ipc://``) and forwards both directions, each
chunk released ``delay`` seconds after it arrived, in order. :attr:`LinkProxy.delay` may be
changed at any time (the ``delay`` fault). Packet loss cannot be imitated above TCP (TCP would
retransmit); it is not offered.

    proxy = LinkProxy("tcp://127.0.0.1:5555", delay=0.05)
    proxy.start()
    ... satellite run --connect proxy.endpoint ...
    proxy.close()
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any


class LinkProxy:
    """Relay loopback connections to ``upstream`` with ``delay`` seconds each way."""

    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        if not upstream.startswith(("tcp://", "ipc://")):
            raise ValueError(f"a link proxy relays tcp:// or ipc:// endpoints, not {upstream!r}")
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.upstream = upstream
        self.delay = delay  #: seconds added to each direction (may be changed while running)
        self.endpoint = ""  #: where satellites connect (set by :meth:`start`)
        self.bytes = 0  #: bytes relayed, both directions
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> LinkProxy:
        """Listen on a loopback port chosen by the system; return self."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        port = fut.result(10)
        self.endpoint = f"tcp://127.0.0.1:{port}"
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream.startswith("ipc://"):
            return await asyncio.open_unix_connection(self.upstream[len("ipc://"):])
        host, _, port = self.upstream[len("tcp://"):].rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Read chunks as they come; write each one ``delay`` after it arrived (order kept)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(chunk)
                await dst.drain()
                self.bytes += len(chunk)

        writer_task = asyncio.ensure_future(release())
        try:
            while True:
                chunk = await src.read(65536)
                await queue.put((time.monotonic() + self.delay, chunk))
                if not chunk:
                    break
            await writer_task
        except (ConnectionError, asyncio.CancelledError):
            writer_task.cancel()
        finally:
            dst.close()

    def close(self) -> None:
        """Stop relaying and close every connection."""
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
