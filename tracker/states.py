"""States of tasks and satellites, as enums shared by the orchestrator and its tools."""

from __future__ import annotations

from enum import IntEnum


class TaskState(IntEnum):
    """Where a task is in its life. Terminal: DONE, FAILED, CANCELLED, QUARANTINED, EXPIRED."""

    PENDING = 0  #: accepted and queued, waiting for a satellite with credit
    DISPATCHED = 1  #: sent to a satellite under a lease (attempt number), not yet started
    RUNNING = 2  #: a worker of the satellite started it
    DONE = 3  #: finished with a result
    FAILED = 4  #: finished with an error (raised, worker died, timed out)
    CANCELLED = 5  #: cancelled by a client
    STALLED = 6  #: its satellite was lost or it stopped making progress; about to be rerouted
    RETRY = 7  #: waiting out a back-off before its next attempt
    QUARANTINED = 8  #: it stalled or killed its satellites too often; never run again
    EXPIRED = 9  #: no satellite took it within its time-to-live
    WAITING = 10  #: accepted with dependencies (``after``): waits for them to end, then PENDING

    @property
    def terminal(self) -> bool:
        """Whether the task will not change state again."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.QUARANTINED,
                       TaskState.EXPIRED})


class SatelliteState(IntEnum):
    """Where a satellite is in its life, as the orchestrator sees it."""

    JOINING = 0  #: registration received, not yet welcomed
    IDLE = 1  #: registered, nothing in flight
    BUSY = 2  #: at least one task in flight
    SILENT = 3  #: no traffic for two heartbeat intervals: gets no new tasks until heard again
    LOST = 4  #: silent for longer than its liveness; its tasks were stalled and rerouted
    PROBATION = 5  #: its tasks keep failing: it runs with fewer credits
    DRAINING = 6  #: gets no new tasks; leaves once empty
    LEFT = 7  #: said goodbye

    @property
    def accepts_work(self) -> bool:
        """Whether new tasks may be dispatched to it."""
        return self in (SatelliteState.IDLE, SatelliteState.BUSY, SatelliteState.PROBATION)


#: Lower-case names used on the wire and in the CLI.
TASK_STATE_NAMES = {s: s.name.lower() for s in TaskState}
SATELLITE_STATE_NAMES = {s: s.name.lower() for s in SatelliteState}
