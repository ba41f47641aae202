"""Task and satellite states and the timer heap that drives their deadlines.

Nothing here touches a socket, a file or the wall clock: time is passed in.
"""

from .states import SATELLITE_STATE_NAMES, TASK_STATE_NAMES, SatelliteState, TaskState
from .timers import Timer, TimerHeap

__all__ = ["SATELLITE_STATE_NAMES", "TASK_STATE_NAMES", "SatelliteState", "TaskState", "Timer", "TimerHeap"]
