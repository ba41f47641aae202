"""The task and satellite state machines: declared with ``transitions``, run from compiled tables.

The declaration (:data:`TASK_TRANSITIONS`, :data:`SATELLITE_TRANSITIONS`) is
plain data, loaded into a :class:`transitions.Machine` to validate it and to
generate the tables in ``docs/tracker.rst``. The orchestrator's hot path does
not run a ``Machine`` per task (about 240 µs to create and 50 µs per
transition here): it looks the next state up in a table compiled once from
the same declaration (:class:`CompiledMachine`), a list index and a dict get.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Generic, TypeVar

from transitions import Machine

from .states import SatelliteState, TaskState


class TaskEvent(IntEnum):
    """What can happen to a task."""

    dispatch = 0  #: sent to a satellite under a new lease (attempt)
    start = 1  #: the satellite reports a worker started it
    finish = 2  #: a result came back
    fail = 3  #: the handler raised, or its maximum run time passed, or the client's timeout
    cancel = 4  #: a client cancelled it
    stall = 5  #: its satellite was lost, or it stopped reporting progress, or was never started
    retry = 6  #: back off before the next attempt (budget left)
    requeue = 7  #: the back-off is over: queue again
    quarantine = 8  #: it has stalled or killed its satellites too often: never run again
    expire = 9  #: it waited in the queue longer than its time-to-live
    release = 10  #: every dependency ended (succeeded, or may fail: ``on_failure="run"``): queue it


class SatelliteEvent(IntEnum):
    """What can happen to a satellite."""

    welcome = 0  #: its registration was accepted
    load = 1  #: it got its first task in flight
    unload = 2  #: its last task in flight finished
    miss = 3  #: no traffic from it for two heartbeat intervals
    hear = 4  #: traffic again after being silent
    lose = 5  #: no traffic for liveness × interval: its tasks are stalled
    demote = 6  #: its tasks keep failing: fewer credits
    drain = 7  #: no new tasks (failing on probation, or asked to leave)
    promote = 8  #: on probation, it completed tasks again
    leave = 9  #: it said goodbye
    recover = 10  #: drained for failing tasks, its cool-down is over: on probation again


T = TaskState
TASK_TRANSITIONS: list[tuple[TaskEvent, tuple[TaskState, ...], TaskState]] = [
    (TaskEvent.dispatch, (T.PENDING,), T.DISPATCHED),
    (TaskEvent.start, (T.DISPATCHED,), T.RUNNING),
    (TaskEvent.finish, (T.DISPATCHED, T.RUNNING), T.DONE),
    (TaskEvent.fail, (T.PENDING, T.DISPATCHED, T.RUNNING, T.STALLED, T.RETRY, T.WAITING), T.FAILED),
    (TaskEvent.cancel, (T.PENDING, T.DISPATCHED, T.RUNNING, T.STALLED, T.RETRY, T.WAITING), T.CANCELLED),
    (TaskEvent.stall, (T.DISPATCHED, T.RUNNING), T.STALLED),
    (TaskEvent.retry, (T.STALLED,), T.RETRY),
    (TaskEvent.requeue, (T.RETRY, T.STALLED), T.PENDING),
    (TaskEvent.quarantine, (T.STALLED,), T.QUARANTINED),
    (TaskEvent.expire, (T.PENDING,), T.EXPIRED),
    (TaskEvent.release, (T.WAITING,), T.PENDING),
]

S = SatelliteState
SATELLITE_TRANSITIONS: list[tuple[SatelliteEvent, tuple[SatelliteState, ...], SatelliteState]] = [
    (SatelliteEvent.welcome, (S.JOINING, S.LOST), S.IDLE),
    (SatelliteEvent.load, (S.IDLE,), S.BUSY),
    (SatelliteEvent.unload, (S.BUSY,), S.IDLE),
    (SatelliteEvent.miss, (S.IDLE, S.BUSY, S.PROBATION), S.SILENT),
    (SatelliteEvent.hear, (S.SILENT,), S.IDLE),
    (SatelliteEvent.lose, (S.JOINING, S.IDLE, S.BUSY, S.SILENT, S.PROBATION, S.DRAINING), S.LOST),
    (SatelliteEvent.demote, (S.IDLE, S.BUSY), S.PROBATION),
    (SatelliteEvent.drain, (S.IDLE, S.BUSY, S.PROBATION, S.SILENT), S.DRAINING),
    (SatelliteEvent.promote, (S.PROBATION,), S.IDLE),
    (SatelliteEvent.leave, (S.JOINING, S.IDLE, S.BUSY, S.SILENT, S.PROBATION, S.DRAINING), S.LEFT),
    (SatelliteEvent.recover, (S.DRAINING,), S.PROBATION),
]

E = TypeVar("E", bound=IntEnum)
St = TypeVar("St", bound=IntEnum)


class InvalidTransition(Exception):
    """An event that the machine does not allow in the current state."""


class CompiledMachine(Generic[St, E]):
    """A transition table compiled from a declaration: ``table[state][event] -> state``."""

    def __init__(self, name: str, states: type[St], events: type[E],
                 transitions: list[tuple[E, tuple[St, ...], St]], initial: St, entries: tuple[St, ...] = ()) -> None:
        self.name = name
        self.states = states
        self.events = events
        self.transitions = transitions
        self.initial = initial
        #: other states one may enter the machine in (a task submitted with dependencies starts WAITING)
        self.entries = entries
        self.machine = self.declare()
        self.table: list[list[St | None]] = [[None] * len(events) for _ in states]
        for event, sources, dest in transitions:
            for src in sources:
                if self.table[src][event] is not None:
                    raise ValueError(f"{name}: {src.name} has two transitions on {event.name}")
                self.table[src][event] = dest

    def declare(self) -> Machine:
        """The same machine as a :class:`transitions.Machine` (the readable spec; validates names)."""
        return Machine(
            model=None, states=[s.name for s in self.states], initial=self.initial.name, auto_transitions=False,
            transitions=[{"trigger": e.name, "source": [s.name for s in src], "dest": d.name}
                         for e, src, d in self.transitions],
        )

    def next(self, state: St, event: E) -> St:
        """The state after ``event`` in ``state``; :class:`InvalidTransition` if not allowed."""
        dest = self.table[state][event]
        if dest is None:
            raise InvalidTransition(f"{self.name}: no transition on {event.name} from {state.name}")
        return dest

    def allows(self, state: St, event: E) -> bool:
        """Whether ``event`` is allowed in ``state``."""
        return self.table[state][event] is not None

    def rst_table(self) -> str:
        """An RST list-table of the transitions: event, from, to."""
        lines = [".. list-table::", "   :header-rows: 1", "", "   * - event", "     - from", "     - to"]
        for event, sources, dest in self.transitions:
            lines += [f"   * - ``{event.name}``", f"     - {', '.join(s.name for s in sources)}",
                      f"     - {dest.name}"]
        return "\n".join(lines) + "\n"


TASK_MACHINE: CompiledMachine[TaskState, TaskEvent] = CompiledMachine(
    "task", TaskState, TaskEvent, TASK_TRANSITIONS, TaskState.PENDING, entries=(TaskState.WAITING,))
SATELLITE_MACHINE: CompiledMachine[SatelliteState, SatelliteEvent] = CompiledMachine(
    "satellite", SatelliteState, SatelliteEvent, SATELLITE_TRANSITIONS, SatelliteState.JOINING)
