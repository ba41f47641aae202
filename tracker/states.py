"""States of tasks and satellites, as enums shared by the orchestrator and its tools."""

from __future__ import annotations

from enum import IntEnum


class TaskState(IntEnum):
    """Where a task is in its life. Terminal states: DONE, FAILED, CANCELLED."""

    PENDING = 0  #: accepted and queued, waiting for a satellite with credit
    DISPATCHED = 1  #: sent to a satellite under a lease (attempt number)
    RUNNING = 2  #: the satellite reported it started
    DONE = 3  #: finished with a result
    FAILED = 4  #: finished with an error (raised, worker died, timed out, no retries left)
    CANCELLED = 5  #: cancelled by a client

    @property
    def terminal(self) -> bool:
        """Whether the task will not change state again."""
        return self >= TaskState.DONE


class SatelliteState(IntEnum):
    """Where a satellite is in its life, as the orchestrator sees it."""

    IDLE = 0  #: registered, no task in flight
    BUSY = 1  #: at least one task in flight
    LOST = 2  #: silent for longer than its liveness; its tasks were requeued
    LEFT = 3  #: said goodbye


#: Lower-case names used on the wire and in the CLI.
TASK_STATE_NAMES = {s: s.name.lower() for s in TaskState}
SATELLITE_STATE_NAMES = {s: s.name.lower() for s in SatelliteState}
