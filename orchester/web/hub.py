"""The web process's side of the bus: one client, one event reader, and the fan-out to browsers.

A :class:`Hub` is a client of the bus like any other (its key, its roles). It keeps

* the orchestrator's last status, asked every ``refresh`` seconds (one request: the bus never
  works harder because more browsers are open);
* a bounded time series made from those statuses (tasks finished per second, queued tasks,
  satellites and busy slots), with the pair's failovers marked, for the overview's charts;
* one SUB socket on the orchestrator's events (both servers of a pair, as they become known),
  read in batches; every event goes to the hub's listeners (the fits follow their progress) and
  to every browser's :class:`Subscriber`.

A :class:`Subscriber` holds what one websocket has not been sent yet, at most
:data:`Subscriber.LIMIT` events (the oldest are dropped and counted), and is flushed at most
:data:`PUSHES_PER_SECOND` times a second, and only when its previous push went out: a slow
browser costs a bounded queue and never makes the hub, or the bus, buffer without bound.

Nothing here knows tornado: a subscriber is given a ``send`` function and a ``busy`` test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from orchester.client.aio import AsyncClient
from orchester.client.sync import reachable_endpoint
from orchester.errors import OrchesterError, RemoteError
from orchester.render import finite
from serializers import ProtocolError, unpack

log = logging.getLogger("orchester.web")

#: Pushes a second, at most, to one browser.
PUSHES_PER_SECOND = 10
#: Points of the overview's time series kept (one per status refresh: an hour at 1 s).
SERIES_POINTS = 3600
#: Longest topic taken from the event stream.
MAX_TOPIC = 300
#: Events read from the SUB socket per wake-up before the loop yields.
EVENT_BATCH = 2000
#: What the hub always follows: events that come a few at a time. Task events (``task:``), one per
#: transition of every task, are subscribed to only while a browser asks for them: an orchestrator
#: builds them only when someone subscribes, and they would cost the bus at full rate.
QUIET_TOPICS = ("sat:", "ha:", "control:", "progress:")

Listener = Callable[[str, dict[str, Any]], None]


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can carry it: non-finite floats become ``None``, bytes their length, keys strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if depth > 32:
        return None
    if isinstance(value, Mapping):
        return {str(k)[:200]: plain(v, depth + 1) for k, v in list(value.items())[:1000]}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value[:10_000]]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return str(value)[:200]


def dumps(value: Any) -> str:
    """JSON text of ``value`` (made :func:`plain` first): valid JSON for any browser."""
    return json.dumps(plain(value), separators=(",", ":"), allow_nan=False)


class Subscriber:
    """What one browser's websocket has still to be sent: a bounded queue of events.

    ``send(text)`` sends one message (it may return an awaitable that completes when the text
    has left); ``busy()`` says whether the previous one is still on its way.
    """

    #: Most events kept for one browser between pushes; older ones are dropped (and counted).
    LIMIT = 2000

    def __init__(self, send: Callable[[str], Awaitable[None] | None], busy: Callable[[], bool],
                 topics: tuple[str, ...] = ("",)) -> None:
        self.send = send
        self.busy = busy
        self.topics = topics
        self.events: deque[str] = deque(maxlen=self.LIMIT)  #: each event as JSON text (encoded once, for all)
        self.dropped = 0  #: events dropped since the last push
        self.pushes = 0
        self.closed = False

    def offer(self, topic: str, encoded: str) -> None:
        """Queue an event (``encoded``: its JSON text) if this browser asked for its topic."""
        if not topic.startswith(self.topics):
            return
        if len(self.events) == self.LIMIT:
            self.dropped += 1
        self.events.append(encoded)

    def batch(self, extra: dict[str, Any] | None = None) -> str | None:
        """The next push (events, drops and ``extra``), or ``None`` when there is nothing to say or
        the previous push is still on its way."""
        if self.closed or self.busy() or not (self.events or self.dropped or extra):
            return None
        tail = "".join(f",{json.dumps(k)}:{dumps(v)}" for k, v in (extra or {}).items())
        text = f'{{"events":[{",".join(self.events)}],"dropped":{self.dropped}{tail}}}'
        self.events.clear()
        self.dropped = 0
        self.pushes += 1
        return text


@dataclass
class Point:
    """One point of the overview's time series."""

    t: float  #: wall time
    done_per_s: float  #: tasks finished (done or failed) per second since the previous point
    queued: int
    running: int
    satellites: int
    slots: int  #: worker slots of the satellites that are not lost
    busy: int  #: of which busy
    latency_p50: float | None = None  #: seconds from submission to end, of the tasks that just ended
    latency_p95: float | None = None

    def json(self) -> dict[str, Any]:
        """The point as a JSON object."""
        return {"t": self.t, "done_per_s": round(self.done_per_s, 3), "queued": self.queued,
                "running": self.running, "satellites": self.satellites, "slots": self.slots, "busy": self.busy,
                "latency_p50": self.latency_p50, "latency_p95": self.latency_p95}


class FleetLog:
    """Satellites and worker slots available, per minute, kept in a file of the web process's own.

    The journal records tasks, not the fleet: what was available when is what this process saw in
    the orchestrator's statuses. One line per minute (JSON: ``t``, ``satellites``, ``slots``, the
    most seen in that minute) is appended to ``path``; a restarted process reads the file back
    (a damaged or torn line is skipped) and keeps at most :data:`FleetLog.KEEP` minutes in memory.
    """

    KEEP = 366 * 24 * 60

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self.minutes: dict[int, tuple[int, int]] = {}
        self._current: tuple[int, int, int] | None = None  #: (minute, satellites, slots) not written yet
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - self.KEEP * 64))
                lines = f.read().splitlines()
        except OSError as exc:
            log.warning("cannot read the fleet log %s: %s", self.path, exc.strerror)
            return
        for line in lines:
            try:
                rec = json.loads(line)
                t, sats, slots = int(rec["t"]), int(rec["satellites"]), int(rec["slots"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                continue
            if 0 <= sats <= 10**7 and 0 <= slots <= 10**9:
                self.minutes[t // 60] = (sats, slots)

    def add(self, t: float, satellites: int, slots: int) -> None:
        """One status: ``satellites`` and ``slots`` available at wall time ``t``."""
        minute = int(t // 60)
        cur = self._current
        if cur is not None and cur[0] != minute:
            self._flush(cur)
            cur = None
        if cur is None:
            cur = (minute, satellites, slots)
        self._current = (minute, max(cur[1], satellites), max(cur[2], slots))
        self.minutes[minute] = self._current[1:]

    def _flush(self, cur: tuple[int, int, int]) -> None:
        if len(self.minutes) > self.KEEP:
            for m in sorted(self.minutes)[:len(self.minutes) - self.KEEP]:
                del self.minutes[m]
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": cur[0] * 60, "satellites": cur[1], "slots": cur[2]}) + "\n")
        except OSError as exc:
            log.warning("cannot write the fleet log %s: %s", self.path, exc.strerror)

    def close(self) -> None:
        """Write the minute in progress."""
        if self._current is not None:
            self._flush(self._current)
            self._current = None

    def spans(self, start: float, step: float, count: int) -> list[tuple[int, int] | None]:
        """For each of ``count`` steps of ``step`` seconds from ``start``: the most satellites and slots
        seen, or ``None`` when none was seen (one pass over the minutes kept, whatever the range)."""
        out: list[tuple[int, int] | None] = [None] * max(0, count)
        for minute, (sats, slots) in self.minutes.items():
            i = int((minute * 60 - start) // step) if step > 0 else -1
            if 0 <= i < len(out):
                seen = out[i]
                out[i] = (sats, slots) if seen is None else (max(seen[0], sats), max(seen[1], slots))
        return out


class Hub:
    """The bus as the web process sees it (see the module's docstring).

    ``client``: an :class:`~orchester.client.aio.AsyncClient` on the orchestrator (or the pair);
    the hub closes it. ``refresh``: seconds between two status requests.
    """

    def __init__(self, client: AsyncClient, *, refresh: float = 1.0,
                 context: zmq.asyncio.Context | None = None, fleet_log: str | os.PathLike[str] | None = None) -> None:
        self.client = client
        #: satellites and slots available per minute (``fleet_log``: its file, kept across restarts)
        self.fleet = FleetLog(fleet_log)
        self.refresh = refresh
        self.ctx = context or zmq.asyncio.Context.instance()
        #: the last status the orchestrator gave (``{}`` until the first), and when (wall time)
        self.status: dict[str, Any] = {}
        self.status_at = 0.0
        #: why the last status request failed ("" when it did not)
        self.status_error = ""
        self.series: deque[Point] = deque(maxlen=SERIES_POINTS)
        #: ``(wall time, what)``: the pair changed hands, or the orchestrator restarted
        self.marks: deque[tuple[float, str]] = deque(maxlen=1000)
        self.subscribers: set[Subscriber] = set()
        self.listeners: list[Listener] = []
        self.stats: dict[str, int] = {"events": 0, "bad_events": 0, "pushes": 0, "status_failures": 0,
                                      "status_refused": 0}
        self._sub: zmq.asyncio.Socket | None = None
        self._pubs: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._epoch: str | None = None
        self._ha: str | None = None
        self._finished: int | None = None
        self._ready = asyncio.Event()
        self._task_followers = 0  #: browsers that asked for task events

    # ------------------------------------------------------------- life
    def start(self) -> None:
        """Start asking for status, reading events and pushing to browsers (on the running loop)."""
        self._sub = self.ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 100_000
        if self.client.curve is not None:
            from orchester.security.auth import secure_client

            secure_client(self._sub, *self.client.curve)
        for topic in QUIET_TOPICS:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(f(), name=f"orchester-web-{f.__name__}")
                       for f in (self._poll_status, self._read_events, self._pump)]

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until the first status came (``False`` after ``timeout`` seconds without one)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop the hub's tasks, close its socket and its client."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._sub is not None:
            self._sub.close(0)
            self._sub = None
        self.fleet.close()
        await self.client.close()

    # ------------------------------------------------------------- browsers
    def subscribe(self, send: Callable[[str], Awaitable[None] | None], busy: Callable[[], bool],
                  topics: tuple[str, ...] = ("",)) -> Subscriber:
        """A new browser; :meth:`unsubscribe` it when its socket closes."""
        sub = Subscriber(send, busy, topics)
        self.subscribers.add(sub)
        if _wants_tasks(topics):
            self._task_followers += 1
            if self._task_followers == 1 and self._sub is not None:
                self._sub.setsockopt(zmq.SUBSCRIBE, b"task:")
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """A browser went away."""
        if sub in self.subscribers and _wants_tasks(sub.topics):
            self._task_followers -= 1
            if self._task_followers == 0 and self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, b"task:")
        sub.closed = True
        self.subscribers.discard(sub)

    # ------------------------------------------------------------- loops
    async def _poll_status(self) -> None:
        while True:
            started = time.monotonic()
            try:
                st = await self.client.status(timeout=max(2.0, self.refresh * 3))
            except (OrchesterError, TimeoutError) as exc:
                self.stats["status_failures"] += 1
                if isinstance(exc, RemoteError):  # the orchestrator said no (its request budget, for one)
                    self.stats["status_refused"] += 1
                self.status_error = str(exc) or type(exc).__name__
            else:
                self._took(st, time.time())
                self._ready.set()
            await asyncio.sleep(max(0.05, self.refresh - (time.monotonic() - started)))

    def _took(self, st: dict[str, Any], now: float) -> None:
        """A new status: remember it, add a point to the series, mark a failover, follow new event endpoints."""
        self.status, self.status_at, self.status_error = st, now, ""
        epoch = st.get("epoch")
        ha = st.get("ha", {}).get("state") if isinstance(st.get("ha"), dict) else None
        if self._epoch is not None and epoch != self._epoch:
            self.marks.append((now, f"orchestrator changed (epoch {str(epoch)[:16]})"))
        elif self._ha is not None and ha != self._ha:
            self.marks.append((now, f"pair: {self._ha} → {ha}"))
        self._epoch, self._ha = epoch if isinstance(epoch, str) else None, ha
        counters: dict[str, Any] = st["counters"] if isinstance(st.get("counters"), dict) else {}
        finished = sum(int(counters.get(k, 0) or 0) for k in ("done", "failed"))
        previous = self.series[-1] if self.series else None
        rate = 0.0
        if previous is not None and self._finished is not None and finished >= self._finished and now > previous.t:
            rate = (finished - self._finished) / (now - previous.t)
        self._finished = finished
        fleet: dict[str, Any] = st["fleet"] if isinstance(st.get("fleet"), dict) else {}
        tasks: dict[str, Any] = st["tasks"] if isinstance(st.get("tasks"), dict) else {}
        queued: dict[str, Any] = st["queued"] if isinstance(st.get("queued"), dict) else {}
        latency: dict[str, Any] = st["latency"] if isinstance(st.get("latency"), dict) else {}
        point = Point(
            now, rate, sum(v for v in queued.values() if isinstance(v, int)),
            int(tasks.get("running", 0) or 0) + int(tasks.get("dispatched", 0) or 0),
            int(fleet.get("satellites", 0) or 0),
            int(fleet.get("workers", 0) or 0),
            int(fleet.get("inflight", 0) or 0) - int(finite(fleet.get("light_inflight"), 0, 0) or 0),  # (no slot)
            _seconds(latency.get("p50")), _seconds(latency.get("p95")))
        self.series.append(point)
        self.fleet.add(now, point.satellites, point.slots)
        for pub in st.get("pub", []) if isinstance(st.get("pub"), list) else []:
            if isinstance(pub, str) and pub not in self._pubs and self._sub is not None:
                try:
                    self._sub.connect(reachable_endpoint(pub, self.client.current))
                except (zmq.ZMQError, ValueError) as exc:
                    log.warning("cannot follow the events at %r: %s", pub[:200], exc)
                self._pubs.add(pub)

    async def _read_events(self) -> None:
        assert self._sub is not None
        sub = self._sub
        drain: zmq.Socket[Any] = zmq.Socket.shadow(sub.underlying)  # the same socket, read without a future per message
        while True:
            await sub.poll()
            for _ in range(EVENT_BATCH):
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._event(frames)
            await asyncio.sleep(0)

    def _event(self, frames: Any) -> None:
        """One event from the stream: checked, then to the listeners and the browsers."""
        try:
            if len(frames) != 2 or len(frames[0]) > MAX_TOPIC:
                raise ProtocolError("malformed", "an event is a topic and a header")
            topic = frames[0].decode("utf-8", "replace")
            data = plain(unpack(frames[1]))
        except (ProtocolError, UnicodeError) as exc:
            self.stats["bad_events"] += 1
            log.debug("bad event: %s", exc)
            return
        self.stats["events"] += 1
        for listener in self.listeners:
            try:
                listener(topic, data)
            except Exception:  # one listener's failure is logged, never the end of the stream
                log.exception("an event listener failed on %s", topic)
        if self.subscribers:
            encoded = json.dumps({"topic": topic, "t": time.time(), "data": data}, separators=(",", ":"),
                                 allow_nan=False)  # (data is plain already)
            for s in self.subscribers:
                s.offer(topic, encoded)

    async def _pump(self) -> None:
        interval = 1.0 / PUSHES_PER_SECOND
        while True:
            await asyncio.sleep(interval)
            for s in list(self.subscribers):
                text = s.batch()
                if text is None:
                    continue
                self.stats["pushes"] += 1
                try:
                    done = s.send(text)
                    if done is not None:
                        asyncio.ensure_future(done).add_done_callback(_quiet)
                except Exception:  # the browser went away between two pushes
                    self.unsubscribe(s)

    # ------------------------------------------------------------- views
    def overview(self) -> dict[str, Any]:
        """What the overview page shows: the last status, its age, the series and the marks."""
        return {"status": self.status, "status_at": self.status_at, "status_error": self.status_error,
                "series": [p.json() for p in self.series],
                "marks": [{"t": t, "what": what} for t, what in self.marks],
                "web": dict(self.stats, browsers=len(self.subscribers))}


def _wants_tasks(topics: tuple[str, ...]) -> bool:
    """Whether a browser's topics take task events (``task:…``, or a prefix of it such as ``""``)."""
    return any(t.startswith("task:") or "task:".startswith(t) for t in topics)


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0 else None


def _quiet(fut: asyncio.Future[Any]) -> None:
    """A push's completion: a browser that closed meanwhile is no error."""
    if not fut.cancelled():
        fut.exception()
