"""Orchester: a ZeroMQ message bus that runs scientific tasks on satellites.

The client API::

    from orchester import Client, LocalCluster

    with LocalCluster(satellites=2, workers=2) as cluster, cluster.client() as client:
        print(client.submit("echo", [1, 2, 3]).result(timeout=30))
"""

from orchester.client.aio import AsyncClient, AsyncTaskFuture
from orchester.client.events import Event, EventStream
from orchester.client.sync import Client, TaskFuture
from orchester.errors import ClientClosed, OrchesterError, RemoteError, TaskFailed, Unreachable
from orchester.local.cluster import ClusterError, LocalCluster

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
    "RemoteError",
    "TaskFailed",
    "TaskFuture",
    "Unreachable",
    "__version__",
]
