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

    [[faults]]
    at = 2.0
    action = "kill"         # kill | stop | cont
    satellite = 0

Every value is checked when loaded; a bad file gives a :class:`TopologyError`
naming the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class TopologyError(ValueError):
    """A topology that cannot be built, with the reason."""


@dataclass
class SatelliteGroup:
    """``count`` identical satellites."""

    count: int = 1
    workers: int = 1
    tags: list[str] = field(default_factory=list)
    #: Relative speed (1.0 normal, 0.25 four times slower): task durations are divided by it.
    speed: float = 1.0
    prefetch: int = 1


@dataclass
class ClientLoad:
    """One client's workload: closed loop with ``concurrency`` outstanding tasks."""

    kind: str = "topo.work"
    tasks: int = 100
    concurrency: int = 10
    #: Seconds each task takes at speed 1.0.
    duration: float = 0.01
    payload_bytes: int = 0
    tags: list[str] = field(default_factory=list)


@dataclass
class Fault:
    """Something done to a process at ``at`` seconds into the run."""

    at: float
    action: str  #: kill | stop | cont
    satellite: int = 0  #: index among all satellites, in declaration order


ACTIONS = ("kill", "stop", "cont")


@dataclass
class Topology:
    """A whole topology."""

    strategy: str = "least_loaded"
    heartbeat_interval: float = 0.5
    liveness: int = 3
    satellites: list[SatelliteGroup] = field(default_factory=lambda: [SatelliteGroup(count=2)])
    clients: list[ClientLoad] = field(default_factory=lambda: [ClientLoad()])
    faults: list[Fault] = field(default_factory=list)

    @property
    def satellite_count(self) -> int:
        """Satellites in all groups."""
        return sum(g.count for g in self.satellites)

    def validate(self) -> Topology:
        """Check every value; raise :class:`TopologyError` naming the first bad one."""
        if self.heartbeat_interval <= 0 or self.liveness < 1:
            raise TopologyError("heartbeat_interval must be > 0 and liveness >= 1")
        if not self.satellites or not self.clients:
            raise TopologyError("a topology needs at least one satellite group and one client")
        for i, g in enumerate(self.satellites):
            if g.count < 1 or g.workers < 1 or g.speed <= 0 or g.prefetch < 0:
                raise TopologyError(f"satellites[{i}]: count and workers >= 1, speed > 0, prefetch >= 0")
        for i, c in enumerate(self.clients):
            if c.tasks < 1 or c.concurrency < 1 or c.duration < 0 or c.payload_bytes < 0:
                raise TopologyError(f"clients[{i}]: tasks and concurrency >= 1, duration and payload >= 0")
        for i, f in enumerate(self.faults):
            if f.action not in ACTIONS:
                raise TopologyError(f"faults[{i}].action must be one of {ACTIONS}, not {f.action!r}")
            if not 0 <= f.satellite < self.satellite_count or f.at < 0:
                raise TopologyError(f"faults[{i}]: satellite index out of range or negative time")
        return self


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TopologyError(f"{where} must be a table")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise TopologyError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise TopologyError(f"{where}: {exc}") from None


def from_dict(data: dict[str, Any]) -> Topology:
    """Build and validate a topology from a mapping (as read from TOML)."""
    data = dict(data)
    nested = {"satellites": SatelliteGroup, "clients": ClientLoad, "faults": Fault}
    parts: dict[str, Any] = {}
    for key, cls in nested.items():
        if key in data:
            items = data.pop(key)
            if not isinstance(items, list):
                raise TopologyError(f"{key} must be an array of tables ([[{key}]])")
            parts[key] = [_build(cls, item, f"{key}[{i}]") for i, item in enumerate(items)]
    topo: Topology = _build(Topology, {**data, **parts}, "topology")
    for name, kind in (("heartbeat_interval", (int, float)), ("liveness", int), ("strategy", str)):
        if not isinstance(getattr(topo, name), kind):
            raise TopologyError(f"topology: {name} has the wrong type")
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
    return from_dict(data)
