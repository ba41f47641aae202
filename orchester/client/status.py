"""Reading a status reply: the fleet summed up, also from an orchestrator that lists every satellite instead."""

from __future__ import annotations

from typing import Any


def next_page(status: dict[str, Any], after: str | None) -> str | None:
    """Where the satellites' next page starts after ``status`` (a page that started after ``after``): its
    ``satellites_next``, or ``None`` on the last page, or when the orchestrator gave a cursor that is not a
    string or does not move forward (paging through the fleet always ends)."""
    cursor = status.get("satellites_next")
    if not isinstance(cursor, str) or not cursor or (after is not None and cursor <= after):
        return None
    return cursor


def fleet_of(status: dict[str, Any]) -> dict[str, Any]:
    """The ``fleet`` of a status reply: how many satellites, per state, the satellites offering each kind and the
    versions they run. An orchestrator older than the summary lists every satellite and sums up none: the same
    keys are then counted from its list."""
    fleet = status.get("fleet")
    if isinstance(fleet, dict):
        return fleet
    sats = [s for s in status.get("satellites") or [] if isinstance(s, dict)]
    states: dict[str, int] = {}
    kinds: dict[str, int] = {}
    versions: dict[str, set[str]] = {}
    for s in sats:
        states[str(s.get("state"))] = states.get(str(s.get("state")), 0) + 1
        for kind in s.get("kinds") or []:
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, version in (s.get("versions") or {}).items():
            versions.setdefault(kind, set()).add(version)
    return {"satellites": len(sats), "states": states, "kinds": kinds,
            "versions": {kind: sorted(v) for kind, v in versions.items()}}
