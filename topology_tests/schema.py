"""Topologies as data: orchestrators, satellites, clients and faults, from TOML or Python.

A topology file::

    strategy = "least_loaded"
    heartbeat_interval = 0.5

    [[satellites]]
    count = 2
    workers = 2
    tags = ["fast"]

    [[satellites]]
    count = 1
    workers = 2
    speed = 0.25            # four times slower

    [[clients]]
    kind = "sleep"
    tasks = 200
    concurrency = 50
    duration = 0.02

    [[clients]]             # open loop: 50 tasks a second, however many are outstanding
    rate = 50.0
    tasks = 200

    [[faults]]
    at = 2.0
    action = "kill"         # kill | stop | cont | delay (satellite N) | kill_orchestrator | restart_orchestrator
    satellite = 0
    # ms = 50.0             # for "delay": the satellite's link delay from then on, each way

``orchestrators = 2`` runs a binary-star pair (``kill_orchestrator`` then kills the active
one: the other takes over); ``journal = true`` gives each orchestrator a journal.

An ``[elastic]`` table adds satellites that come and go with the load: the autoscaler of
``orchester autoscale`` (its policy and its loop) asks for jobs, here started on this machine
after a simulated scheduler's queue delay, and gives them back when idle::

    [elastic]
    max_jobs = 4
    satellites_per_job = 1
    workers = 1
    queue_delay = 1.0       # seconds a job waits in the scheduler's queue before its satellites start
    idle_timeout = 2.0

With ``[elastic]`` and no ``[[satellites]]``, there is no fixed satellite: every one comes from a job.

Every value is checked when loaded; a bad file gives a :class:`TopologyError`
naming the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


class TopologyError(ValueError):
    """A topology that cannot be built, with the reason (and, read from a file, where)."""

    def __init__(self, message: str, where: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.where = where  #: ``topology``, ``satellites[1]``, ...
        self.field = field  #: the field's name, when one is to blame


@dataclass
class SatelliteGroup:
    """``count`` identical satellites."""

    count: int = 1
    workers: int = 1
    tags: list[str] = field(default_factory=list)
    #: Relative speed (1.0 normal, 0.25 four times slower): task durations are divided by it.
    speed: float = 1.0
    prefetch: int = 1
    #: Milliseconds added each way on these satellites' links (a relay: see ``linkproxy``).
    delay_ms: float = 0.0


@dataclass
class ClientLoad:
    """One client's workload: closed loop with ``concurrency`` outstanding tasks, or open loop
    at ``rate`` tasks per second (``rate`` > 0: submissions do not wait for results)."""

    kind: str = "topo.work"
    tasks: int = 100
    concurrency: int = 10
    rate: float = 0.0
    #: Seconds each task takes at speed 1.0.
    duration: float = 0.01
    payload_bytes: int = 0
    tags: list[str] = field(default_factory=list)
    #: Seconds after the run starts before this client submits its first task (staggered loads, bursts).
    start: float = 0.0


@dataclass
class Fault:
    """Something done to a process at ``at`` seconds into the run."""

    at: float
    action: str  #: kill | stop | cont | delay (a satellite) | kill_orchestrator | restart_orchestrator
    satellite: int = 0  #: index among all satellites, in declaration order
    ms: float = 0.0  #: ``delay``: the satellite's link delay from then on, each way


SATELLITE_ACTIONS = ("kill", "stop", "cont", "delay")
ORCHESTRATOR_ACTIONS = ("kill_orchestrator", "restart_orchestrator")
ACTIONS = SATELLITE_ACTIONS + ORCHESTRATOR_ACTIONS


@dataclass
class Elastic:
    """Satellite jobs asked for by the autoscaler when work waits, given back when idle (see the module)."""

    max_jobs: int = 4
    min_jobs: int = 0
    satellites_per_job: int = 1
    workers: int = 1
    #: seconds a job waits in the (simulated) scheduler's queue before its satellites start
    queue_delay: float = 1.0
    idle_timeout: float = 2.0
    wait_bound: float = 0.0
    #: seconds between two looks of the autoscaler at the bus
    interval: float = 0.2


@dataclass
class Topology:
    """A whole topology."""

    strategy: str = "least_loaded"
    heartbeat_interval: float = 0.5
    liveness: int = 3
    #: 1: one orchestrator; 2: a binary-star pair (primary and backup)
    orchestrators: int = 1
    #: give each orchestrator a journal (acknowledgements wait for it)
    journal: bool = False
    satellites: list[SatelliteGroup] = field(default_factory=lambda: [SatelliteGroup(count=2)])
    clients: list[ClientLoad] = field(default_factory=lambda: [ClientLoad()])
    faults: list[Fault] = field(default_factory=list)
    elastic: Elastic | None = None

    @property
    def satellite_count(self) -> int:
        """Satellites in all groups."""
        return sum(g.count for g in self.satellites)

    def validate(self) -> Topology:
        """Check every value; raise :class:`TopologyError` naming the first bad field."""
        def need(ok: bool, where: str, name: str, rule: str, value: Any) -> None:
            if not ok:
                prefix = f"{where}." if where != "topology" else ""
                raise TopologyError(f"{prefix}{name} must be {rule}, not {value!r}", where, name)

        need(_num(self.heartbeat_interval) and self.heartbeat_interval > 0, "topology", "heartbeat_interval",
             "a number > 0", self.heartbeat_interval)
        need(_int(self.liveness) and self.liveness >= 1, "topology", "liveness", "an integer >= 1", self.liveness)
        need(isinstance(self.strategy, str), "topology", "strategy", "a string", self.strategy)
        need(self.orchestrators in (1, 2) and _int(self.orchestrators), "topology", "orchestrators",
             "1 or 2 (a binary-star pair)", self.orchestrators)
        need(isinstance(self.journal, bool), "topology", "journal", "true or false", self.journal)
        if not (self.satellites or self.elastic) or not self.clients:
            raise TopologyError("a topology needs at least one satellite group (or [elastic]) and one client")
        e = self.elastic
        if e is not None:
            for name in ("max_jobs", "satellites_per_job", "workers"):
                need(_int(getattr(e, name)) and getattr(e, name) >= 1, "elastic", name, "an integer >= 1",
                     getattr(e, name))
            need(_int(e.min_jobs) and 0 <= e.min_jobs <= e.max_jobs, "elastic", "min_jobs",
                 "an integer from 0 to max_jobs", e.min_jobs)
            for name in ("queue_delay", "idle_timeout", "wait_bound"):
                need(_num(getattr(e, name)) and getattr(e, name) >= 0, "elastic", name, "a number of seconds >= 0",
                     getattr(e, name))
            need(_num(e.interval) and e.interval > 0, "elastic", "interval", "a number of seconds > 0", e.interval)
        for i, g in enumerate(self.satellites):
            w = f"satellites[{i}]"
            need(_int(g.count) and g.count >= 1, w, "count", "an integer >= 1", g.count)
            need(_int(g.workers) and g.workers >= 1, w, "workers", "an integer >= 1", g.workers)
            need(_num(g.speed) and g.speed > 0, w, "speed", "a number > 0", g.speed)
            need(_int(g.prefetch) and g.prefetch >= 0, w, "prefetch", "an integer >= 0", g.prefetch)
            need(_num(g.delay_ms) and g.delay_ms >= 0, w, "delay_ms", "a number of milliseconds >= 0", g.delay_ms)
            need(isinstance(g.tags, list) and all(isinstance(t, str) for t in g.tags), w, "tags",
                 "a list of strings", g.tags)
        for i, c in enumerate(self.clients):
            w = f"clients[{i}]"
            need(_int(c.tasks) and c.tasks >= 1, w, "tasks", "an integer >= 1", c.tasks)
            need(_int(c.concurrency) and c.concurrency >= 1, w, "concurrency", "an integer >= 1", c.concurrency)
            need(_num(c.rate) and c.rate >= 0, w, "rate", "a number >= 0 (tasks per second; 0: closed loop)",
                 c.rate)
            need(_num(c.duration) and c.duration >= 0, w, "duration", "a number >= 0", c.duration)
            need(_num(c.start) and c.start >= 0, w, "start", "a number of seconds >= 0", c.start)
            need(_int(c.payload_bytes) and c.payload_bytes >= 0, w, "payload_bytes", "an integer >= 0",
                 c.payload_bytes)
            need(isinstance(c.tags, list) and all(isinstance(t, str) for t in c.tags), w, "tags",
                 "a list of strings", c.tags)
        for i, f in enumerate(self.faults):
            w = f"faults[{i}]"
            need(f.action in ACTIONS, w, "action", f"one of {ACTIONS}", f.action)
            need(_num(f.at) and f.at >= 0, w, "at", "a number of seconds >= 0", f.at)
            need(_num(f.ms) and f.ms >= 0, w, "ms", "a number of milliseconds >= 0", f.ms)
            if f.action in SATELLITE_ACTIONS:
                need(_int(f.satellite) and 0 <= f.satellite < self.satellite_count, w, "satellite",
                     f"a satellite index from 0 to {self.satellite_count - 1} (out of range)", f.satellite)
            elif self.orchestrators == 1 and f.action == "kill_orchestrator" and not self.journal:
                raise TopologyError(f"{w}: killing the only orchestrator without a journal loses every task: "
                                    "set journal = true or orchestrators = 2", w, "action")
        return self


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TopologyError(f"{where} must be a table")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise TopologyError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}", where,
                            sorted(unknown)[0])
    try:
        return cls(**data)
    except TypeError as exc:
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING
                   and f.default_factory is MISSING]
        raise TopologyError(f"{where}: {exc}", where, missing[0] if missing else None) from None


def from_dict(data: dict[str, Any]) -> Topology:
    """Build and validate a topology from a mapping (as read from TOML)."""
    data = dict(data)
    nested = {"satellites": SatelliteGroup, "clients": ClientLoad, "faults": Fault}
    parts: dict[str, Any] = {}
    if "elastic" in data:
        parts["elastic"] = _build(Elastic, data.pop("elastic"), "elastic")
        parts.setdefault("satellites", [])  # (no fixed group unless one is declared)
    for key, cls in nested.items():
        if key in data:
            items = data.pop(key)
            if not isinstance(items, list):
                raise TopologyError(f"{key} must be an array of tables ([[{key}]])")
            parts[key] = [_build(cls, item, f"{key}[{i}]") for i, item in enumerate(items)]
    topo: Topology = _build(Topology, {**data, **parts}, "topology")
    return topo.validate()


def load(path: str | Path) -> Topology:
    """Read a topology TOML file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"{path} is not valid TOML: {exc}") from None
    try:
        return from_dict(data)
    except TopologyError as exc:
        line = locate(Path(path).read_text(errors="replace"), exc.where, exc.field)
        at = f"{path}, line {line}" if line else str(path)
        raise TopologyError(f"{at}: {exc}", exc.where, exc.field) from None


def locate(text: str, where: str | None, name: str | None) -> int | None:
    """The line (1-based) of field ``name`` in table ``where`` (``satellites[1]``) of a TOML text."""
    lines = text.splitlines()
    start, end = 0, len(lines)
    if where and where != "topology":
        table, _, index = where.partition("[")
        n = int(index.rstrip("]") or 0)
        heads = [i for i, ln in enumerate(lines) if ln.strip().replace(" ", "") == f"[[{table}]]"]
        if n >= len(heads):
            return None
        start = heads[n] + 1
        end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
        if name is None:
            return heads[n] + 1
    else:
        end = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    if name is None:
        return None
    for i in range(start, end):
        key = lines[i].split("=", 1)[0].strip()
        if "=" in lines[i] and key == name:
            return i + 1
    return start if where and where != "topology" else None
