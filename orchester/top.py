"""``orchester top``: a live terminal view of a bus, from status requests and the event stream."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .metrics import quantiles


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
        self.done_marks.append((now, int(status.get("counters", {}).get("done", 0))))

    def on_event(self, topic: str, data: dict[str, Any]) -> None:
        """One event of the stream."""
        if not topic.startswith("task:"):
            return
        tid, state, sat = data.get("id"), data.get("state"), data.get("sat")
        if not isinstance(tid, str):
            return
        if state == "pending" and data.get("attempt", 0) == 0:
            self.started[tid] = float(data.get("t", 0))
        elif state in ("dispatched", "running") and sat:
            self.current.setdefault(sat, set()).add(tid)
        elif state in ("done", "failed", "cancelled", "quarantined", "expired", "stalled"):
            for tasks in self.current.values():
                tasks.discard(tid)
            t0 = self.started.pop(tid, None)
            if t0 is not None and state == "done":
                self.latencies.append(float(data.get("t", 0)) - t0)

    def throughput(self) -> float:
        """Tasks done per second over the recent status replies."""
        if len(self.done_marks) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.done_marks[0], self.done_marks[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self) -> Group:
        """The whole screen."""
        st = self.status
        q = quantiles(list(self.latencies))
        head = Text.assemble(
            ("orchester top", "bold"), f"  orchestrator {st.get('epoch', '?')}  strategy {st.get('strategy', '?')}"
            f"  throughput {self.throughput():.1f} tasks/s",
            f"  latency p50 {q.get('p50', 0) * 1000:.1f} ms p99 {q.get('p99', 0) * 1000:.1f} ms" if q else "")
        sats = Table(title="satellites", expand=True)
        for col in ("satellite", "state", "load", "current task", "heartbeat", "done", "failed", "cpu %", "rss MB"):
            sats.add_column(col)
        for s in st.get("satellites", []):
            current = sorted(self.current.get(s["id"], ()))
            now_running = (current[0] + (f" +{len(current) - 1}" if len(current) > 1 else "")) if current else ""
            rep = s.get("reported", {})
            cpu = f"{rep.get('cpu_percent', 0):.0f}" if rep else ""
            rss = f"{rep.get('rss_mb', 0):.0f}" if rep else ""
            sats.add_row(s["id"], s["state"], f"{s['inflight']}/{s.get('credit', s['slots'])}", now_running,
                         f"{s.get('heartbeat_age', 0):.1f}s", str(s.get("done", 0)), str(s.get("failed", 0)),
                         cpu, rss)
        queues = Table(title="tasks", expand=True)
        queues.add_column("state or queue")
        queues.add_column("count", justify="right")
        for state, n in sorted(st.get("tasks", {}).items()):
            queues.add_row(state, str(n))
        for kind, n in sorted(st.get("queued", {}).items()):
            queues.add_row(f"queued {kind}", str(n))
        return Group(head, sats, queues)


def run_top(client: Any, interval: float = 1.0, console: Console | None = None,
            iterations: int | None = None) -> TopModel:
    """Refresh the view every ``interval`` seconds (``iterations`` times, or until Ctrl-C)."""
    model = TopModel()
    stream = client.subscribe(["task:"])
    n = 0
    try:
        with Live(model.render(), console=console, refresh_per_second=4, transient=False) as live:
            while iterations is None or n < iterations:
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    ev = stream.recv(timeout=min(left, 0.1))
                    if ev is not None:
                        model.on_event(ev.topic, ev.data)
                model.on_status(client.status(), time.monotonic())
                live.update(model.render())
                n += 1
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    return model
