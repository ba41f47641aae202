"""The Binary Star state machine (ZeroMQ Guide, chapter 4): pure, clock passed in.

Two orchestrators, a *primary* and a *backup*, tell each other their state
every heartbeat. At any moment at most one of them is ACTIVE (serves clients
and satellites); the other is PASSIVE (follows the active's journal stream and
refuses requests). The passive takes over only when both hold:

* it has not heard its peer for two heartbeats (:attr:`BinaryStar.peer_expiry`), and
* a client or satellite that came to it *because the active went silent* asks it
  for something: the *client vote* (:attr:`HAEvent.CLIENT_VOTE`; clients and
  satellites mark the first message they send after a failover on silence).
  Clients and satellites that can still reach the active never vote, so a cut
  between the two servers alone does not make a second active, even when a new
  client happens to try the passive first.

The table :data:`TABLE` is the whole machine: one row per (state, event), the
next state, whether a request is served, and what is reported. ``docs/ha.rst``
prints it and ``tests/test_bstar.py`` checks every cell.

Differences from the Guide's ``bstar.c``: only an explicit vote makes a passive
take over (a plain request is refused); a PRIMARY serves a request only once its
peer has expired (so a restarted primary never serves beside an active backup
during its first heartbeat); two actives are resolved by the backup
stepping down and stopping (the Guide aborts both); two passives by the primary
taking over; a second primary or backup is reported as a misconfiguration.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class HAState(IntEnum):
    """States of one server of the pair (the numbers travel on the wire)."""

    PRIMARY = 1  #: primary, waiting to hear its peer
    BACKUP = 2  #: backup, waiting to hear its peer
    ACTIVE = 3  #: serving clients and satellites
    PASSIVE = 4  #: following the active; refusing requests


class HAEvent(IntEnum):
    """What a server can learn: its peer's state, or a request from a client or satellite."""

    PEER_PRIMARY = 1
    PEER_BACKUP = 2
    PEER_ACTIVE = 3
    PEER_PASSIVE = 4
    CLIENT_REQUEST = 5  #: a request from a client or satellite
    CLIENT_VOTE = 6  #: a request from one that failed over to us because our peer went silent


#: Verdicts on a client request.
SERVE, REFUSE = "serve", "refuse"
#: Alarms a row can raise (published as ``ha:`` events, logged and counted).
DUAL_ACTIVE, DUAL_PASSIVE, MISCONFIGURED = "dual_active", "dual_passive", "misconfigured"
#: A request arriving while the peer has (not) expired: client rows split on this guard.
EXPIRED, ALIVE = "peer expired", "peer alive"


@dataclass(frozen=True)
class Row:
    """One cell of the table: what ``event`` does in ``state`` (under ``guard``)."""

    state: HAState
    event: HAEvent
    guard: str | None  #: EXPIRED, ALIVE or None (always)
    next: HAState | None  #: the new state, or None to stay
    verdict: str | None  #: SERVE/REFUSE for client requests, None for peer events
    alarm: str | None  #: DUAL_ACTIVE, DUAL_PASSIVE, MISCONFIGURED or None
    why: str  #: logged and published when the row changes something


S, E = HAState, HAEvent
_PEER_ROWS: tuple[Row, ...] = (
    Row(S.PRIMARY, E.PEER_PRIMARY, None, None, None, MISCONFIGURED, "both servers are configured primary"),
    Row(S.PRIMARY, E.PEER_BACKUP, None, S.ACTIVE, None, None, "connected to backup (passive), ready active"),
    Row(S.PRIMARY, E.PEER_ACTIVE, None, S.PASSIVE, None, None, "connected to backup (active), ready passive"),
    Row(S.PRIMARY, E.PEER_PASSIVE, None, None, None, None, "backup is passive: waiting for it to take over"),
    Row(S.BACKUP, E.PEER_PRIMARY, None, None, None, None, "primary is starting: waiting for it to be active"),
    Row(S.BACKUP, E.PEER_BACKUP, None, None, None, MISCONFIGURED, "both servers are configured backup"),
    Row(S.BACKUP, E.PEER_ACTIVE, None, S.PASSIVE, None, None, "connected to primary (active), ready passive"),
    Row(S.BACKUP, E.PEER_PASSIVE, None, None, None, None, "primary is passive: waiting for it to take over"),
    Row(S.ACTIVE, E.PEER_PRIMARY, None, None, None, None, "primary restarting: it will be passive"),
    Row(S.ACTIVE, E.PEER_BACKUP, None, None, None, None, "backup restarting: it will be passive"),
    Row(S.ACTIVE, E.PEER_ACTIVE, None, None, None, DUAL_ACTIVE, "dual active: both servers serve"),
    Row(S.ACTIVE, E.PEER_PASSIVE, None, None, None, None, "peer passive"),
    Row(S.PASSIVE, E.PEER_PRIMARY, None, S.ACTIVE, None, None, "primary (passive) is restarting, ready active"),
    Row(S.PASSIVE, E.PEER_BACKUP, None, S.ACTIVE, None, None, "backup (passive) is restarting, ready active"),
    Row(S.PASSIVE, E.PEER_ACTIVE, None, None, None, None, "peer active"),
    Row(S.PASSIVE, E.PEER_PASSIVE, None, None, None, DUAL_PASSIVE, "dual passive: nobody serves"),
)
_CLIENT_ROWS: tuple[Row, ...] = tuple(
    Row(state, event, guard, nxt, verdict, None, why)
    for event in (E.CLIENT_REQUEST, E.CLIENT_VOTE)
    for state, guard, nxt, verdict, why in (
        (S.PRIMARY, EXPIRED, S.ACTIVE, SERVE, "no backup heard, ready active"),
        (S.PRIMARY, ALIVE, None, REFUSE, "peer heard: waiting for its state"),
        (S.BACKUP, EXPIRED, None, REFUSE, "a backup never starts active"),
        (S.BACKUP, ALIVE, None, REFUSE, "a backup never starts active"),
        (S.ACTIVE, EXPIRED, None, SERVE, "active"),
        (S.ACTIVE, ALIVE, None, SERVE, "active"),
        (S.PASSIVE, EXPIRED, *((S.ACTIVE, SERVE, "failover: peer silent and a client voted")
                               if event is E.CLIENT_VOTE else (None, REFUSE, "passive: only a failover vote counts"))),
        (S.PASSIVE, ALIVE, None, REFUSE, "peer alive: not taking over"),
    )
)
#: The whole machine, one row per (state, event, guard).
TABLE: tuple[Row, ...] = _PEER_ROWS + _CLIENT_ROWS
_CLIENT_EVENTS = (E.CLIENT_REQUEST, E.CLIENT_VOTE)


def compile_table(rows: tuple[Row, ...] = TABLE) -> dict[tuple[HAState, HAEvent, str | None], Row]:
    """Index the rows; refuse a table with a hole or two rows for one cell."""
    index: dict[tuple[HAState, HAEvent, str | None], Row] = {}
    for row in rows:
        key = (row.state, row.event, row.guard)
        if key in index:
            raise ValueError(f"two rows for {row.state.name} + {row.event.name} ({row.guard})")
        index[key] = row
    for state in HAState:
        for event in HAEvent:
            guards = (EXPIRED, ALIVE) if event in _CLIENT_EVENTS else (None,)
            for guard in guards:
                if (state, event, guard) not in index:
                    raise ValueError(f"no row for {state.name} + {event.name} ({guard})")
    return index


_INDEX = compile_table()


@dataclass
class Change:
    """What one event did: the row applied and the states around it."""

    row: Row
    before: HAState
    after: HAState


class BinaryStar:
    """One server's side of the pair.

    ``heartbeat``: seconds between state messages; the peer expires after two
    heartbeats without one. Feed it :meth:`peer_state` for every state message
    and :meth:`request` for every client or satellite message; read what
    changed from the returned :class:`Change` (or ``None``).
    """

    def __init__(self, primary: bool, heartbeat: float, now: float) -> None:
        self.primary = primary
        self.heartbeat = heartbeat
        self.state = HAState.PRIMARY if primary else HAState.BACKUP
        self.peer: HAState | None = None  #: the peer's last reported state
        self.peer_expiry = now + 2 * heartbeat  #: the peer is considered gone after this
        self.alarms: dict[str, int] = {}

    @property
    def role(self) -> str:
        """``primary`` or ``backup``: how this server was configured."""
        return "primary" if self.primary else "backup"

    @property
    def serving(self) -> bool:
        """Whether requests are served without asking the table."""
        return self.state is HAState.ACTIVE

    def peer_alive(self, now: float) -> bool:
        """Whether the peer was heard within the last two heartbeats."""
        return now < self.peer_expiry

    def heard(self, now: float) -> None:
        """The peer has more to say than was read yet: it is not silent (its expiry starts again)."""
        self.peer_expiry = max(self.peer_expiry, now + 2 * self.heartbeat)

    def peer_state(self, peer: HAState, now: float) -> Change | None:
        """The peer said it is in ``peer``; returns what changed (a state or an alarm)."""
        self.peer = peer
        self.peer_expiry = now + 2 * self.heartbeat
        return self._apply(_INDEX[(self.state, HAEvent(int(peer)), None)])

    def request(self, now: float, vote: bool = False) -> tuple[bool, Change | None]:
        """A client or satellite asks (``vote``: it failed over to us on silence): ``(serve it?, what changed)``."""
        guard = ALIVE if self.peer_alive(now) else EXPIRED
        row = _INDEX[(self.state, HAEvent.CLIENT_VOTE if vote else HAEvent.CLIENT_REQUEST, guard)]
        return row.verdict == SERVE, self._apply(row)

    def promote(self) -> Change:
        """An operator's order: become ACTIVE now (manual recovery)."""
        row = Row(self.state, HAEvent.CLIENT_REQUEST, None, HAState.ACTIVE, SERVE, None, "promoted by an operator")
        before = self.state
        self.state = HAState.ACTIVE
        return Change(row, before, self.state)

    def step_down(self) -> Change:
        """Leave ACTIVE for PASSIVE (the backup's answer to a dual active)."""
        row = Row(self.state, HAEvent.PEER_ACTIVE, None, HAState.PASSIVE, None, DUAL_ACTIVE,
                  "dual active: the backup steps down")
        before = self.state
        self.state = HAState.PASSIVE
        return Change(row, before, self.state)

    def _apply(self, row: Row) -> Change | None:
        if row.alarm is not None:
            self.alarms[row.alarm] = self.alarms.get(row.alarm, 0) + 1
        if row.next is None and row.alarm is None:
            return None
        before = self.state
        if row.next is not None:
            self.state = row.next
        if row.alarm == DUAL_PASSIVE and self.primary:
            self.state = HAState.ACTIVE  # someone must serve: the primary takes over
        return Change(row, before, self.state)


def table_rst() -> str:
    """:data:`TABLE` as a reStructuredText list-table (pasted in ``docs/ha.rst``; a test keeps them equal)."""
    lines = [".. list-table::", "   :header-rows: 1", "",
             "   * - state", "     - event", "     - guard", "     - next", "     - request", "     - alarm",
             "     - why"]
    for r in TABLE:
        lines += [f"   * - {r.state.name}", f"     - {r.event.name}", f"     - {r.guard or ''}",
                  f"     - {r.next.name if r.next else '(stays)'}", f"     - {r.verdict or ''}",
                  f"     - {r.alarm or ''}", f"     - {r.why}"]
    return "\n".join(line.rstrip() for line in lines) + "\n"
