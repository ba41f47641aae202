"""``orchester top``: a live terminal view of a bus, from status requests and the event stream.

``q`` (or Ctrl-C) quits: keys are read from the terminal, unbuffered and not echoed, while the
view runs, and the terminal is restored afterwards. ``rich.live`` and the metrics collector are
imported when the view runs, not when the command line starts.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from orchester.cli.common import ask, connect_option, timeout_option
from orchester.render import Column, FittedTable, add_row, cell, clean_text, finite, fmt, jobs_lines

#: Most tasks tracked at once (submitted, or running on a satellite); events beyond are not kept.
MAX_TRACKED = 100_000


class TopModel:
    """What the view shows, updated from status replies and events (no I/O)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.current: dict[str, set[str]] = {}  #: satellite -> task ids it runs now
        self.started: dict[str, float] = {}  #: task id -> wall time it was submitted
        self.latencies: deque[float] = deque(maxlen=5000)
        self.done_marks: deque[tuple[float, int]] = deque(maxlen=120)  #: (monotonic, counters.done)

    def on_status(self, status: dict[str, Any], now: float) -> None:
        """A fresh status reply."""
        self.status = status
        counters = status.get("counters")
        done = finite(counters.get("done"), 0.0, 0.0) if isinstance(counters, dict) else 0.0
        self.done_marks.append((now, int(done or 0)))

    def on_event(self, topic: str, data: dict[str, Any]) -> None:
        """One event of the stream (a field of the wrong type or size makes it ignored, never fatal)."""
        if not topic.startswith("task:") or not isinstance(data, dict):
            return
        tid, state, sat = data.get("id"), data.get("state"), data.get("sat")
        if not isinstance(tid, str) or not 0 < len(tid) <= 256 or not isinstance(state, str):
            return
        t = finite(data.get("t"))
        if state == "pending" and data.get("attempt", 0) == 0:
            if t is not None and len(self.started) < MAX_TRACKED:
                self.started[tid] = t
        elif state in ("dispatched", "running") and isinstance(sat, str) and 0 < len(sat) <= 256:
            running = self.current.get(sat)
            if running is None and len(self.current) < MAX_TRACKED:
                running = self.current[sat] = set()
            if running is not None and len(running) < MAX_TRACKED:
                running.add(tid)
        elif state in ("done", "failed", "cancelled", "quarantined", "expired", "stalled"):
            for tasks in self.current.values():
                tasks.discard(tid)
            t0 = self.started.pop(tid, None)
            if t0 is not None and t is not None and state == "done":
                self.latencies.append(t - t0)

    def throughput(self) -> float:
        """Tasks done per second over the recent status replies."""
        if len(self.done_marks) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.done_marks[0], self.done_marks[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self, height: int | None = None) -> Group:
        """The whole screen, for a terminal of ``height`` lines (``None``: as tall as needed).

        When the satellites are more than the screen holds beside the rest (or more than the status listed),
        they are summed up instead: per state, and the busiest hosts."""
        from orchester.metrics.collector import quantiles

        st = self.status
        q = quantiles(list(self.latencies))
        head = Text.assemble(
            ("orchester top", "bold"),
            f"  orchestrator {clean_text(st.get('epoch', '?'), 40)}  strategy {clean_text(st.get('strategy', '?'), 80)}"
            f"  throughput {self.throughput():.1f} tasks/s",
            f"  latency p50 {q.get('p50', 0) * 1000:.1f} ms p99 {q.get('p99', 0) * 1000:.1f} ms" if q else "",
            ("  (q quits)", "dim"))
        cols = [Column("satellite", keep=True, whole=True), Column("state", keep=True),
                 Column("load", rank=1, justify="right"), Column("current task", whole=True, rank=0),
                 Column("heartbeat", rank=4, justify="right"), Column("done", rank=2, justify="right"),
                 Column("failed", rank=3, justify="right"), Column("cpu %", rank=5, justify="right"),
                 Column("rss MB", rank=6, justify="right"), Column("job", rank=7, whole=True)]
        satellites = st.get("satellites")
        listed = satellites if isinstance(satellites, list) else []
        fleet = st.get("fleet")
        total = finite(fleet.get("satellites"), 0, 0) if isinstance(fleet, dict) else None
        room = None if height is None else max(MIN_ROWS, height - OTHER_LINES)
        if isinstance(fleet, dict) and ((total or 0) > len(listed) or (room is not None and len(listed) > room)):
            return Group(head, fleet_table(fleet), self._queues(st), *jobs_lines(st))
        for s in listed:
            if not isinstance(s, dict):
                continue
            sid = s.get("id")
            current = sorted(self.current.get(sid, ())) if isinstance(sid, str) else []
            now_running = (current[0] + (f" +{len(current) - 1}" if len(current) > 1 else "")) if current else ""
            rep = s.get("reported")
            rep = rep if isinstance(rep, dict) else {}
            add_row(cols, cell(sid), cell(s.get("state")), load_cell(s),
                    cell(now_running), f"{fmt(s.get('heartbeat_age'), '.1f', '?')}s",
                    fmt(s.get("done", 0), ".0f", "?"), fmt(s.get("failed", 0), ".0f", "?"),
                    fmt(rep.get("cpu_percent"), ".0f"), fmt(rep.get("rss_mb"), ".0f"), cell(s.get("job") or ""))
        sats = FittedTable("satellites", cols, "a wider terminal shows more")
        return Group(head, sats, self._queues(st), *jobs_lines(st))

    @staticmethod
    def _queues(st: dict[str, Any]) -> Table:
        queues = Table(title="tasks", expand=True)
        queues.add_column("state or queue")
        queues.add_column("count", justify="right")
        for key, label in (("tasks", "{}"), ("queued", "queued {}")):
            counts = st.get(key)
            for name, n in sorted(counts.items(), key=lambda kv: clean_text(kv[0])) if isinstance(counts, dict) else []:
                queues.add_row(cell(label.format(clean_text(name))), fmt(n, ".0f", "?"))
        return queues


#: Lines of the screen that are not satellite rows (the head, the tables' frames, the tasks), and the fewest
#: satellite rows shown before the fleet is summed up instead.
OTHER_LINES = 16
MIN_ROWS = 5


def _on_slots(status: dict[str, Any]) -> tuple[str, float]:
    """Of a satellite's or the fleet's status: its tasks in flight that take a slot (all but the light ones),
    formatted, and its light tasks in flight."""
    light = finite(status.get("light_inflight"), 0, 0) or 0
    inflight = finite(status.get("inflight"))
    return fmt(None if inflight is None else inflight - light, ".0f", "?"), light


def load_cell(sat: dict[str, Any]) -> str:
    """A satellite's tasks in flight over its credit, and its light tasks beside (``+N light``) when it has some."""
    heavy, light = _on_slots(sat)
    return f"{heavy}/{fmt(sat.get('credit', sat.get('slots')), '.0f', '?')}" + (f" +{light:.0f} light" if light else "")


def fleet_table(fleet: dict[str, Any]) -> Table:
    """The whole fleet of a status, summed up: satellites per state, the slots and cores busy, and the busiest
    hosts with their satellites (``top`` shows it when the satellites do not fit on the screen)."""
    table = Table(title=f"satellites: {fmt(fleet.get('satellites'), '.0f', '?')} on "
                  f"{fmt(fleet.get('hosts'), '.0f', '?')} hosts (summed up: more than a screen)", expand=True)
    table.add_column("state or host")
    table.add_column("satellites", justify="right")
    states = fleet.get("states")
    for name, n in sorted(states.items(), key=lambda kv: -(finite(kv[1], 0) or 0))[:20] \
            if isinstance(states, dict) else []:
        table.add_row(cell(name), fmt(n, ".0f", "?"))
    heavy, light = _on_slots(fleet)
    table.add_row(Text("slots busy", "bold"), f"{heavy}/{fmt(fleet.get('credit'), '.0f', '?')}")
    if finite(fleet.get("light"), 0, 0):
        table.add_row(Text("light tasks", "bold"), f"{fmt(light, '.0f', '?')}/{fmt(fleet.get('light'), '.0f', '?')}")
    table.add_row(Text("cores used", "bold"), f"{fmt(fleet.get('cores_used'), '.0f', '?')}/"
                  f"{fmt(fleet.get('cores'), '.0f', '?')}")
    hosts = fleet.get("busiest_hosts")
    for name, n in sorted(hosts.items(), key=lambda kv: -(finite(kv[1], 0) or 0))[:16] \
            if isinstance(hosts, dict) else []:
        table.add_row(cell(f"host {clean_text(name, 64) or '?'}"), fmt(n, ".0f", "?"))
    return table


#: The keys that quit.
QUIT_KEYS = frozenset(b"qQ")


@contextlib.contextmanager
def keypresses(fd: int | None) -> Iterator[int | None]:
    """While inside, terminal ``fd`` hands over each key at once, without echo (``None``: no keys).

    Ctrl-C still interrupts (signals stay on); the terminal's settings are restored on the way
    out. A ``fd`` that is not a terminal (a pipe in tests) is read as it is.
    """
    if fd is None:
        yield None
        return
    import termios
    import tty

    try:
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError):  # not a terminal: read it as it comes
        yield fd
        return
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def quit_pressed(fd: int | None) -> bool:
    """Whether ``q`` was typed on ``fd`` since the last look (never waits; end of input is no ``q``)."""
    if fd is None:
        return False
    try:
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 64)
            if not data:
                return False
            if QUIT_KEYS & set(data):
                return True
    except OSError:
        return False
    return False


def run_top(client: Any, interval: float = 1.0, console: Console | None = None,
            iterations: int | None = None, keys: int | None = -1) -> TopModel:
    """Refresh the view every ``interval`` seconds (``iterations`` times, or until ``q`` or Ctrl-C).

    ``keys``: the file descriptor ``q`` is read from (default: standard input when it is a
    terminal; ``None``: no keys).
    """
    from rich.live import Live

    if keys == -1:
        keys = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    model = TopModel()
    stream = client.subscribe(["task:"])
    n = 0
    try:
        with keypresses(keys) as fd, Live(model.render(), console=console, refresh_per_second=4,
                                          transient=False) as live:
            while iterations is None or n < iterations:
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    ev = stream.recv(timeout=min(left, 0.1))
                    if ev is not None:
                        model.on_event(ev.topic, ev.data)
                    if quit_pressed(fd):
                        return model
                model.on_status(client.status(), time.monotonic())
                live.update(model.render(live.console.size.height))
                n += 1
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    return model


@click.command()
@connect_option
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=None, help="Stop after this many refreshes (default: Ctrl-C).")
@timeout_option
def top(connect: tuple[str, ...], interval: float, iterations: int | None, timeout: float) -> None:
    """A live view of satellites, queues, throughput and latency."""
    ask(connect, timeout, lambda c: (c.status(timeout=timeout), run_top(c, interval, iterations=iterations)))
