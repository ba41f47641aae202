"""Orchester: a ZeroMQ message bus that runs scientific tasks on satellites.

The client API::

    from orchester import Client, LocalCluster

    with LocalCluster(satellites=2, workers=2) as cluster, cluster.client() as client:
        print(client.submit("echo", [1, 2, 3]).result(timeout=30))

Workflows: a task may wait for others (``after=``) and take their results by reference (pass
the future, or :func:`ref` of a task id, as an argument)::

        fit = client.submit("genx.fit", model)
        report = client.submit("analyse", fit)      # runs once the fit is done, on its result
"""

from orchester.client.aio import AsyncClient, AsyncTaskFuture
from orchester.client.events import Event, EventStream
from orchester.client.sync import Client, TaskFuture
from orchester.errors import ClientClosed, OrchesterError, RemoteError, TaskFailed, Unreachable
from orchester.local.cluster import ClusterError, LocalCluster
from serializers.codecs import Ref


def ref(task_id: str) -> Ref:
    """A reference to the result of task ``task_id``, to pass as an argument of another task: that
    task waits for ``task_id`` and gets its result in place of the reference (on the satellite: the
    result never travels through the client). A future of this client works the same way."""
    return Ref(task_id)


__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncTaskFuture",
    "Client",
    "ClientClosed",
    "ClusterError",
    "Event",
    "EventStream",
    "LocalCluster",
    "OrchesterError",
    "Ref",
    "RemoteError",
    "TaskFailed",
    "TaskFuture",
    "Unreachable",
    "__version__",
    "ref",
]
