"""Reading the orchestrator's event stream (PUB/SUB).

Events are two frames: a topic and a msgpack map. Topics:

* ``task:<id>``: a task changed state (``state``, ``attempt``, ``sat``, ``reason``)
* ``progress:<id>``: progress reported by a running task (its handler's keywords)
* ``sat:<id>``: a satellite joined, was lost or left
* ``control:strategy``: the routing strategy was switched
* ``ha:state``, ``ha:alarm``, ``ha:replication``: the binary-star pair (see ``docs/ha.rst``)

Subscribe to a prefix (``"task:"``, or ``""`` for everything).

Event fields come from peers (a satellite reports progress with whatever keywords its task
passes): treat them as untrusted. :meth:`Event.number` and :meth:`Event.text` read a field
checked (a finite number; text without control characters, bounded) instead of trusting it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from serializers import ProtocolError, unpack


@dataclass(frozen=True)
class Event:
    """One published event."""

    topic: str
    data: dict[str, Any]

    @property
    def category(self) -> str:
        """``task``, ``progress``, ``sat`` or ``control``."""
        return self.topic.split(":", 1)[0]

    def number(self, key: str, default: float | None = None) -> float | None:
        """Field ``key`` if it is a finite number (not a bool, not a string), else ``default``."""
        from orchester.render import finite

        return finite(self.data.get(key), default)

    def text(self, key: str, limit: int = 200) -> str:
        """Field ``key`` as text safe to print: control characters replaced, at most ``limit`` characters."""
        from orchester.render import clean_text

        return clean_text(self.data.get(key), limit)


class EventStream:
    """A SUB socket on the orchestrator's event endpoint (or several: both servers of a pair);
    iterate or call :meth:`recv`.

    Use it from one thread; close it (or use ``with``) when done.
    """

    def __init__(self, endpoint: str | Sequence[str], topics: Sequence[str] = ("",),
                 context: zmq.Context[Any] | None = None, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        from orchester.security.auth import secure_client

        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        if curve is not None:  # (public, secret, server public): see orchester.security.keys.client_curve
            secure_client(self.sock, *curve)
        self.sock.rcvhwm = 100_000
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        for ep in [endpoint] if isinstance(endpoint, str) else endpoint:
            self.sock.connect(ep)

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` after ``timeout`` seconds without one (malformed messages are skipped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                if not self.sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    return None
            frames = self.sock.recv_multipart()
            if len(frames) != 2:
                continue
            try:
                data = unpack(frames[1])
            except ProtocolError:
                continue
            return Event(frames[0].decode(errors="replace"), data)

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self.recv()
            if ev is not None:
                yield ev

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(0)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventRecorder:
    """Every event under ``topics`` from ``endpoints``, kept in :attr:`received` by a thread
    until :meth:`close` (for measurements and tests: a run's whole event history)."""

    def __init__(self, endpoints: str | Sequence[str], topics: Sequence[str] = ("",),
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._stream = EventStream(endpoints, topics, self._ctx, curve)  # used by the thread only from here on
        self.received: list[Event] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchester-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self._stream.recv(timeout=0.05)
            if event is not None:
                self.received.append(event)

    def close(self) -> None:
        """Stop reading; close the socket."""
        self._stop.set()
        self._thread.join(5)
        self._stream.close()
        self._ctx.term()
