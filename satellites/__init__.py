"""Satellites: the worker side of Orchester.

A satellite's I/O loop owns its orchestrator socket and heartbeats; its tasks
run in a pool of worker processes. Register task kinds with :func:`task`.
"""

from .context import TaskContext, current, progress
from .registry import TaskKind, TaskRegistry, UnknownKind, load_task_modules, registry, task
from .satellite import Satellite

__all__ = [
    "Satellite",
    "TaskContext",
    "TaskKind",
    "TaskRegistry",
    "UnknownKind",
    "current",
    "load_task_modules",
    "progress",
    "registry",
    "task",
]
