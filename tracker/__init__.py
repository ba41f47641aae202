"""Task and satellite state machines, their timer wheel and the retry and probation policies.

Nothing here touches a socket, a file or the wall clock: time is passed in.
"""

from .machines import (
    SATELLITE_MACHINE,
    TASK_MACHINE,
    CompiledMachine,
    InvalidTransition,
    SatelliteEvent,
    TaskEvent,
)
from .policy import ProbationPolicy, RetryPolicy
from .states import SATELLITE_STATE_NAMES, TASK_STATE_NAMES, SatelliteState, TaskState
from .timers import Timer, TimerWheel

__all__ = [
    "SATELLITE_MACHINE",
    "SATELLITE_STATE_NAMES",
    "TASK_MACHINE",
    "TASK_STATE_NAMES",
    "CompiledMachine",
    "InvalidTransition",
    "ProbationPolicy",
    "RetryPolicy",
    "SatelliteEvent",
    "SatelliteState",
    "TaskEvent",
    "TaskState",
    "Timer",
    "TimerWheel",
]
