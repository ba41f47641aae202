"""Exceptions raised to users of the client API."""

from __future__ import annotations


def shown(value: object, limit: int = 40) -> str:
    """A short, safe description of a value that came from a peer or a file, for an error message.

    A scalar's ``repr``, cut to ``limit`` characters; for anything else its type and length only:
    the ``repr`` of a list nested a thousand deep raises ``RecursionError``, and a long one costs.
    """
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:limit])
    else:
        try:
            size = f" of {len(value)}"  # type: ignore[arg-type]
        except TypeError:
            size = ""
        return f"a {type(value).__name__}{size}"
    return text if len(text) <= limit else text[:limit] + "..."


class OrchesterError(Exception):
    """The root of every Orchester exception: client errors (below), and
    :class:`~orchester.config.ConfigError`, :class:`~orchester.local.cluster.ClusterError`,
    :class:`~orchester.journal.folder.JournalError`, :class:`~orchester.security.keys.SecurityError`. (The wire
    format's :class:`~serializers.ProtocolError` and the tracker's ``InvalidTransition`` live in
    packages that import nothing of Orchester.)"""


class RemoteError(OrchesterError):
    """The orchestrator refused a request with a structured error (``code`` and message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class TaskFailed(OrchesterError):
    """A task ended with an error: its handler raised, its worker died, it timed out or was cancelled.

    ``type`` is the remote exception type name (or an Orchester reason such as
    ``WorkerDied``, ``TaskTimeout``, ``Cancelled``), ``remote_traceback`` the formatted
    traceback from the satellite when there is one.
    """

    def __init__(self, task_id: str, type: str, message: str, remote_traceback: str = "",
                 satellite: str | None = None) -> None:
        super().__init__(f"task {task_id} failed: {type}: {message}")
        self.task_id = task_id
        self.type = type
        self.message = message
        self.remote_traceback = remote_traceback
        self.satellite = satellite


class Unreachable(OrchesterError):
    """No orchestrator answered within the timeout."""


class ClientClosed(OrchesterError):
    """The client was closed before the request completed."""
