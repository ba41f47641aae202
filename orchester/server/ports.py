"""How the policy core meets the world: the ports it is given and the outbox it fills.

The core (:class:`~orchester.server.core.Orchestrator`) never touches a socket, a file or a clock.
What it may ask of the world is given once, at construction, as :class:`Ports` (a frozen set of
callables and flags the socket adapter binds); what it wants sent, published, journaled or looked
up in the journal goes into its :class:`Outbox`, which the broker (and the binary-star pair)
drain after every wake-up. Tests give the core the ports they need and read the outbox.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: One message to send: ``(socket key, frames, task id of a result or None)``.
Out = tuple[Any, list[Any], "str | None"]
#: One history query for the journal reader: ``(socket key, identity, request id, filters)``.
Query = tuple[Any, bytes, Any, dict[str, Any]]


def _no_endpoints() -> list[str]:
    return []


@dataclass(frozen=True)
class Ports:
    """What the core may ask of the world (all optional: a bare core needs none of them)."""

    #: CurveZMQ on: the identity (name, roles, kinds) of a key name, ``None`` if not authorised
    identify: Callable[[str | None], Any] | None = None
    #: records are wanted (a journal, or a passive peer they are streamed to)
    journal: bool = False
    #: a journal reader answers history queries (the core queues them in :attr:`Outbox.queries`)
    history_reader: bool = False
    #: count transitions per kind and latencies, for the metrics collector
    metrics: bool = False
    #: reads a spilled task's payload back from the journal
    load_spilled: Callable[[Any], list[Any]] | None = None
    #: the event endpoints, as bound now (told to clients in status replies)
    pub_endpoints: Callable[[], list[str]] = _no_endpoints
    #: the binary-star pair's view of itself, for status replies and metrics
    ha_status: Callable[[float], dict[str, Any]] | None = None
    #: the pair's operations (``promote``; ``peer_link`` as a test fault hook)
    ha_control: Callable[[dict[str, Any], float], dict[str, Any]] | None = None


class Outbox:
    """What the core produced since the adapters last drained it.

    :attr:`messages` go to sockets, :attr:`events` to the event socket, :attr:`records` to the
    journal and the passive peer (``None``: nobody wants records), :attr:`queries` to the journal
    reader. The adapters take them with the ``take_*`` methods; the core only appends.
    """

    __slots__ = ("messages", "events", "records", "queries")

    def __init__(self, records: bool = False) -> None:
        self.messages: list[Out] = []
        self.events: list[list[bytes]] = []
        self.records: list[list[Any]] | None = [] if records else None
        self.queries: list[Query] = []

    def send(self, sock: Any, frames: list[Any], task_id: str | None = None) -> None:
        """Send ``frames`` on ``sock`` (``task_id``: the frames are that task's result)."""
        self.messages.append((sock, frames, task_id))

    def publish(self, frames: list[bytes]) -> None:
        """Publish one event (topic frame first)."""
        self.events.append(frames)

    def record(self, record: list[Any]) -> None:
        """Journal ``record`` (and stream it to a passive peer), if anyone wants records."""
        if self.records is not None:
            self.records.append(record)

    @property
    def journaling(self) -> bool:
        """Whether records are wanted."""
        return self.records is not None

    def take_messages(self) -> list[Out]:
        """The messages to send, oldest first; the outbox keeps none."""
        out, self.messages = self.messages, []
        return out

    def take_events(self) -> list[list[bytes]]:
        """The events to publish, oldest first."""
        out, self.events = self.events, []
        return out

    def take_records(self) -> list[list[Any]]:
        """The records to journal, oldest first (none when nobody wants records)."""
        if not self.records:
            return []
        out, self.records = self.records, []
        return out

    def take_queries(self) -> list[Query]:
        """The history queries for the journal reader."""
        out, self.queries = self.queries, []
        return out
