"""Metrics for Graphite: collected from the orchestrator's state, sent to carbon off the hot path.

:func:`collect` turns the core's counters and state into ``(name, value)`` points (pure: it
reads, never writes, and takes the time as an argument). :class:`CarbonSender` is a thread
with a bounded buffer that sends points in batches over carbon's pickle protocol (or the
plaintext one); when carbon is slow or down, points beyond the buffer are dropped and counted,
the broker never waits, and the sender reconnects with exponential back-off.

Every name is listed in ``docs/metrics.rst``.
"""

from __future__ import annotations

import logging
import pickle
import re
import socket
import struct
import threading
from collections import Counter, deque
from typing import Any

log = logging.getLogger("orchester.metrics")
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe(part: str) -> str:
    """A name part Graphite keeps as one node (dots and odd characters become ``_``)."""
    return _SAFE.sub("_", part) or "_"


#: Counters sent from the first interval on, even before they move (a graph shows 0, not nothing);
#: every other counter is sent from the interval it first appears in.
ALWAYS_EXPORTED = frozenset({
    "adopt_refused", "adopted", "bad_messages", "bad_results", "bytes_in", "bytes_out", "cancelled", "dispatched",
    "done", "drains", "duplicate_submits", "events_dropped", "expired", "failed", "failovers", "forbidden",
    "ha_bad_messages", "ha_handed_back", "ha_link_dropped", "ha_orphans_taken", "ha_peer_lost", "ha_records_applied",
    "ha_refused", "ha_snapshot_errors", "ha_snapshots_received", "ha_snapshots_sent", "ha_stream_gaps",
    "handler_errors", "journal_backpressure", "journal_bad_records", "journal_damaged_segments", "journal_lost_bytes",
    "journal_restored", "key_reloads", "kinds_refused", "messages_in", "peer_errors", "progress", "progress_refused",
    "quarantined", "rate_limited", "reclaim_requeued", "registered_again", "requeued", "results_undeliverable",
    "results_waiting", "results_withheld", "retries", "revoked_tasks", "satellites_lost", "satellites_registered",
    "sid_refused", "spilled", "stale_results", "stalled", "strategy_switches", "submitted", "subscribers_muted",
    "subscription_floods", "subscriptions_refused", "timeouts", "timer_errors", "undeliverable", "unknown_satellite",
    "unspilled", "spill_lost", "wakeups", "dependency_failed", "dependency_results_lost", "reservations",
    "results_kept", "submitted_after", "unknown_dependency", "job_reports", "batches_in", "batches_out",
    "gc_freezes", "gc_full_passes", "gc_full_deferred", "gc_cycles_found", "ha_install_slices", "ha_deferred",
    "ha_peer_backlog",
})


def quantiles(values: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and count of ``values`` (seconds)."""
    if not values:
        return {}
    v = sorted(values)
    n = len(v)

    def q(p: float) -> float:
        return v[min(n - 1, int(p * n))]

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": v[-1], "count": float(n)}


class Collector:
    """Turns the orchestrator's state into points, one interval at a time."""

    def __init__(self, prefix: str = "orchester") -> None:
        self.prefix = prefix.rstrip(".")
        self._last: Counter[str] = Counter()

    def collect(self, core: Any, now: float, wall: float, journal: Any = None,
                extra: dict[str, float] | None = None) -> list[tuple[str, float, float]]:
        """``(name, timestamp, value)`` points for this interval (counters are per-interval deltas)."""
        p = self.prefix
        points: list[tuple[str, float, float]] = []

        def add(name: str, value: float) -> None:
            points.append((f"{p}.{name}", wall, float(value)))

        counters = core.state.counters
        # every counter the orchestrator keeps (those that have not moved yet as zeros, once known)
        for name in sorted(ALWAYS_EXPORTED.union(counters, self._last)):
            value = counters.get(name, 0)
            add(f"counters.{safe(name)}", value - self._last[name])
            self._last[name] = value
        ha = core.ports.ha_status(now) if core.ports.ha_status is not None else None
        if ha:  # binary star: this server's state (1 primary, 2 backup, 3 active, 4 passive) and its link
            from orchester.ha.star import HAState

            add("ha.state", HAState[ha["state"].upper()].value)
            add("ha.peer_alive", 1.0 if ha["peer_alive"] else 0.0)
            add("ha.replicating", 1.0 if ha["replication"] in ("sync", "async") else 0.0)
        from tracker import TaskState

        for kind, per_state in sorted(core.state.kind_counts.items()):
            for state, n in zip(TaskState, per_state, strict=True):
                if n:
                    add(f"tasks.{safe(kind)}.{state.name.lower()}", n)
        core.state.kind_counts.clear()
        depth: Counter[tuple[str, int]] = Counter()
        if len(core.state.queues) <= 100_000:  # beyond, per kind only (a full scan would cost too much)
            for task in core.state.queues:
                depth[(task.kind, task.priority)] += 1
            for (kind, prio), n in depth.items():
                add(f"queue.{safe(kind)}.priority_{prio}", n)
        for kind, n in core.state.pending_kinds.items():
            add(f"queue.{safe(kind)}.depth", n)
        add("queue.total", len(core.state.queues))
        states = Counter(s.state.name.lower() for s in core.state.fleet)
        for sat_state in ("joining", "idle", "busy", "silent", "probation", "draining"):
            add(f"satellites.{sat_state}", states.get(sat_state, 0))
        for sat in core.state.fleet:
            base = f"satellite.{safe(sat.sid)}"
            add(f"{base}.inflight", len(sat.inflight))
            add(f"{base}.busy_ratio", sat.load)
            for key, value in sat.reported.items():
                add(f"{base}.{safe(key)}", value)
        # the autoscalers' batch jobs (their last reports): in all, and per autoscaler's tag
        jobs: Counter[str] = Counter()
        for tag, (report, _) in sorted(core.state.job_reports.items()):
            mine = Counter(state for _, state, _ in report.jobs)
            for job_state in ("pending", "running", "ending"):
                add(f"jobs.{safe(tag)}.{job_state}", mine.get(job_state, 0))
            jobs.update(mine)
        if core.state.job_reports:
            for job_state in ("pending", "running", "ending"):
                add(f"jobs.{job_state}", jobs.get(job_state, 0))
            add("jobs.satellites", sum(1 for sat in core.state.fleet if sat.job))
        by_kind: dict[str, list[float]] = {}
        for kind, seconds in core.state.latencies:
            by_kind.setdefault(kind, []).append(seconds)
        core.state.latencies.clear()
        for kind, values in by_kind.items():
            for q, value in quantiles(values).items():
                add(f"latency.{safe(kind)}.{q}", value if q == "count" else value * 1000.0)
        add("tasks.in_memory", len(core.state.tasks))
        add("results.retained", len(core.state.results))
        if journal is not None:
            stats = journal.take_stats()
            add("journal.batches", stats["batches"])
            add("journal.records", stats["records"])
            add("journal.batch_records_avg", stats["records"] / stats["batches"] if stats["batches"] else 0)
            add("journal.flush_ms_max", stats["flush_max"] * 1000.0)
            add("journal.flush_ms_avg", stats["flush_sum"] / stats["batches"] * 1000.0 if stats["batches"] else 0)
            add("journal.backlog_bytes", journal.backlog)
            add("journal.direct_batches", stats["direct"])
            add("journal.direct_slow", stats["direct_slow"])
        for name, value in (extra or {}).items():
            add(name, value)
        return points


class CarbonSender:
    """A thread sending points to carbon; never blocks the caller."""

    def __init__(self, host: str, port: int, protocol: str = "pickle", max_points: int = 200_000,
                 batch: int = 1000, connect_timeout: float = 2.0) -> None:
        if protocol not in ("pickle", "plaintext"):
            raise ValueError("protocol must be pickle or plaintext")
        self.host, self.port, self.protocol = host, port, protocol
        self.max_points, self.batch, self.connect_timeout = max_points, batch, connect_timeout
        self._buf: deque[tuple[str, float, float]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self.connected = False
        self._thread = threading.Thread(target=self._run, name="orchester-metrics", daemon=True)
        self._thread.start()

    def send(self, points: list[tuple[str, float, float]]) -> None:
        """Queue points; past the buffer's bound they are dropped (and counted), never waited for."""
        with self._cond:
            room = self.max_points - len(self._buf)
            if room < len(points):
                self.dropped += len(points) - max(room, 0)
                points = points[:max(room, 0)]
            self._buf.extend(points)
            self._cond.notify()

    def _encode(self, points: list[tuple[str, float, float]]) -> bytes:
        if self.protocol == "pickle":
            payload = pickle.dumps([(name, (ts, value)) for name, ts, value in points], protocol=2)
            return struct.pack("!L", len(payload)) + payload
        return "".join(f"{name} {value} {int(ts)}\n" for name, ts, value in points).encode()

    def _run(self) -> None:
        sock: socket.socket | None = None
        backoff = 0.5
        while True:
            with self._cond:
                while not self._buf and not self._stop:
                    self._cond.wait(1.0)
                if self._stop and not self._buf:
                    break
                batch = [self._buf.popleft() for _ in range(min(self.batch, len(self._buf)))]
            try:
                if sock is None:
                    sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
                    self.connected = True
                    backoff = 0.5
                sock.sendall(self._encode(batch))
                self.sent += len(batch)
            except OSError as exc:
                self.errors += 1
                self.connected = False
                if sock is not None:
                    sock.close()
                    sock = None
                with self._cond:  # put the batch back if there is room; otherwise it is dropped
                    room = self.max_points - len(self._buf)
                    keep = batch[:max(room, 0)]
                    self.dropped += len(batch) - len(keep)
                    self._buf.extendleft(reversed(keep))
                log.warning("carbon at %s:%d: %s; retrying in %.1fs", self.host, self.port, exc, backoff)
                with self._cond:
                    self._cond.wait(backoff)
                    if self._stop:
                        break
                backoff = min(backoff * 2, 30.0)
        if sock is not None:
            sock.close()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (bounded by ``timeout``) and stop."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def stats(self) -> dict[str, float]:
        """Points sent, dropped, buffered; send errors; whether connected."""
        return {"metrics.sent": self.sent, "metrics.dropped": self.dropped, "metrics.buffered": len(self._buf),
                "metrics.errors": self.errors, "metrics.connected": 1.0 if self.connected else 0.0}


def parse_carbon(address: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"carbon address {address!r} is not HOST:PORT")
    return host, int(port)
