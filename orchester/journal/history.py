"""The global task history: one row per task, folded from journal records, filtered on demand.

Pure functions: :func:`fields` extracts the indexed columns of one journal record (the
PyTables segments store exactly these), :class:`HistoryFold` folds them into one row per
task, and :func:`select` filters and orders the rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchester.journal.records import RESULT, SUBMITTED, TRANSITION, RecordError, Result, Submitted, Transition, view
from serializers import ProtocolError, unpack
from serializers.messages import MAX_TASK_HEADER
from tracker import TaskState

COLUMNS = ("id", "kind", "state", "attempts", "satellite", "submitted", "finished", "error", "owner", "tags",
           "after")


def fields(record: list[Any]) -> dict[str, Any] | None:
    """The indexed columns of a journal record, or ``None`` for a record that has none (or a bad one)."""
    try:
        v = view(record)
        if isinstance(v, Submitted):  # its "satellite" column holds who submitted it (the key name, CurveZMQ on)
            hdr = unpack(v.header, MAX_TASK_HEADER)
            return {"code": SUBMITTED, "task_id": v.task_id, "t": v.time, "kind": str(hdr.get("k", "")),
                    "state": int(TaskState.PENDING), "attempt": 0, "satellite": v.owner or "", "etype": ""}
        if isinstance(v, Transition):
            return {"code": TRANSITION, "task_id": v.task_id, "t": v.time or 0.0, "kind": "", "state": int(v.state),
                    "attempt": v.attempt, "satellite": v.satellite or "", "etype": ""}
        if isinstance(v, Result):
            hdr = unpack(v.header)
            err = hdr.get("err") if not hdr.get("ok") else None
            etype = str(err.get("type", "")) if isinstance(err, dict) else ""
            return {"code": RESULT, "task_id": v.task_id, "t": v.time or 0.0, "kind": "", "state": -1,
                    "attempt": int(hdr.get("a", 0)), "satellite": str(hdr.get("sat") or ""), "etype": etype}
    except (RecordError, TypeError, ValueError, OverflowError, RecursionError, ProtocolError):
        return None
    return None


@dataclass
class Row:
    """One task in the history."""

    id: str
    kind: str = ""
    state: str = "pending"
    attempts: int = 0
    satellite: str = ""
    submitted: float = 0.0
    finished: float = 0.0
    error: str = ""
    owner: str = ""  #: who submitted it: the key's name (CurveZMQ on), else empty
    tags: list[str] = field(default_factory=list)  #: the task's tags, sorted
    after: list[str] = field(default_factory=list)  #: the tasks it waited for (``after``), in order


class HistoryFold:
    """Rows by task id, built from the columns of journal records in journal order."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def add(self, f: dict[str, Any]) -> None:
        """Apply one record's columns."""
        code = f["code"]
        if code not in (SUBMITTED, TRANSITION, RESULT):  # not about a task (e.g. a satellite's key, "K")
            return
        tid = f["task_id"]
        row = self.rows.get(tid)
        if row is None:
            row = self.rows[tid] = Row(tid)
        if code == SUBMITTED:
            row.kind, row.submitted = f["kind"], f["t"]
            row.owner = f["satellite"]
        elif code == TRANSITION:
            state = TaskState(f["state"])
            row.state = state.name.lower()
            row.attempts = max(row.attempts, f["attempt"])
            if f["satellite"]:
                row.satellite = f["satellite"]
            if state.terminal:
                row.finished = f["t"]
        elif code == RESULT and f["etype"]:
            row.error = f["etype"]


def select(rows: dict[str, Row], *, state: str | None = None, kind: str | None = None,
           since: float | None = None, until: float | None = None, ids: list[str] | None = None,
           limit: int | None = None) -> list[dict[str, Any]]:
    """Rows matching every given filter, oldest submission first (at most ``limit``, the newest)."""
    wanted = set(ids) if ids else None
    out = [r for r in rows.values()
           if r.kind and (wanted is None or r.id in wanted) and (state is None or r.state == state)
           and (kind is None or r.kind == kind) and (since is None or r.submitted >= since)
           and (until is None or r.submitted < until)]
    out.sort(key=lambda r: r.submitted)
    if limit is not None and limit >= 0:
        out = out[-limit:] if limit else []
    return [asdict(r) for r in out]
