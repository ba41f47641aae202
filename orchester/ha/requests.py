"""What clients and operators ask of a binary-star server: :class:`PairRequests`, held by the
:class:`~orchester.ha.pair.Pair`.

A request that reaches a server that is not ACTIVE goes through :meth:`PairRequests.gatekeep`
(served, a failover vote, or refused with ``not_active``); ``CONTROL`` operations of the pair
(``orchester promote`` and the ``peer_link`` test fault hook) through :meth:`PairRequests.control`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from orchester.ha.star import BinaryStar, Change, HAState
from serializers import protocol as P
from serializers.header import ProtocolError, error_frames, unpack

if TYPE_CHECKING:
    from orchester.server.core import Orchestrator

log = logging.getLogger("orchester.ha")


class PairRequests:
    """Requests to the pair from clients, satellites and operators.

    ``core``: the orchestrator (refusals go to its ``out``, counts to its counters); ``star``: the
    pair's table; ``apply``: acts on the state changes a request makes (:meth:`~orchester.ha.pair.Pair.apply`);
    ``set_link``: cuts (False) or restores (True) the peer link; ``fault_hooks``: ``CONTROL
    peer_link`` is honoured only with this set (``ORCHESTER_FAULT_HOOKS=1``); ``catch_up``: reads what the peer
    sent and this server has not read yet (:meth:`~orchester.ha.pair.Pair.catch_up`), before a decision that
    rests on the peer's silence.
    """

    def __init__(self, core: Orchestrator, star: BinaryStar, apply: Callable[[list[Change], float], None],
                 set_link: Callable[[bool], None], fault_hooks: bool,
                 catch_up: Callable[[float], None] | None = None) -> None:
        self.core = core
        self.star = star
        self.apply = apply
        self.set_link = set_link
        self.fault_hooks = fault_hooks
        self.catch_up = catch_up

    def gatekeep(self, sock: Any, frames: list[Any], now: float) -> bool:
        """A request reached a server that is not ACTIVE: serve it (True) or refuse it.

        ``STATUS`` is always answered (operators ask a passive server how it is); a
        ``CONTROL promote`` is an operator's manual recovery; anything else is a client
        request for the table (a vote when its header says ``vote: true``).
        """
        core = self.core
        cmd = bytes(frames[2]) if len(frames) > 2 else b""
        if cmd == P.ERROR:
            return False  # never answered
        try:
            hdr = unpack(bytes(frames[3])) if len(frames) > 3 else {}
        except ProtocolError:
            hdr = {}
        if cmd == P.STATUS:
            return True
        if cmd == P.CONTROL and hdr.get("op") in ("promote", "peer_link"):
            return True  # the core refers it back to control()
        vote = hdr.get("vote") is True
        if self.catch_up is not None and not self.star.peer_alive(now) \
                and (self.star.state is HAState.PRIMARY or (vote and self.star.state is HAState.PASSIVE)):
            # silent, as far as we read, and the silence would decide: first read what the peer may have
            # said meanwhile (a busy server that had not read it would take over from a peer that is alive,
            # or read its last words after)
            self.catch_up(now)
        serve, change = self.star.request(now, vote=vote)
        if change is not None:
            self.apply([change], now)
        if serve:
            return True
        core.state.counters["ha_refused"] += 1
        ids = {k: hdr[k] for k in ("id", "rid") if isinstance(hdr.get(k), (str, int))}
        state = self.star.state.name.lower()
        core.outbox.messages.append((sock, [bytes(frames[0]), *error_frames(
            P.E_NOT_ACTIVE, f"this orchestrator is {state} ({self.star.role}); ask its peer", **ids)], None))
        return False

    def control(self, hdr: dict[str, Any], now: float) -> dict[str, Any]:
        """``CONTROL`` operations of the pair: ``promote`` and the ``peer_link`` fault hook."""
        if hdr.get("op") == "promote":
            return self.promote(hdr.get("force") is True, now)
        if not self.fault_hooks:
            raise ProtocolError(P.E_BAD_REQUEST, "peer_link is a test fault hook: start the server with "
                                "ORCHESTER_FAULT_HOOKS=1 to allow it")
        up = hdr.get("up") is not False
        self.set_link(up)
        log.warning("fault hook: the peer link is %s", "up" if up else "cut")
        return {"peer_link": "up" if up else "cut"}

    def promote(self, force: bool, now: float) -> dict[str, Any]:
        """An operator's ``orchester promote``: become ACTIVE now (refused while the peer is active)."""
        star = self.star
        if star.state is HAState.ACTIVE:
            return {"state": "active", "changed": False}
        if not star.peer_alive(now) and self.catch_up is not None:
            self.catch_up(now)
            if star.state is HAState.ACTIVE:  # (what it read made it active)
                return {"state": "active", "changed": False}
        if star.peer is HAState.ACTIVE and star.peer_alive(now) and not force:
            raise ProtocolError(P.E_BAD_REQUEST, "the peer is active and alive: promoting would make two "
                                "actives (use --force only if you know the peer is cut off for good)")
        self.apply([star.promote()], now)
        return {"state": "active", "changed": True}
