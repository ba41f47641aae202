"""Rebuilding an orchestrator's task table from its journal, at start."""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from serializers import protocol as P
from serializers.header import ProtocolError, unpack
from tracker import TaskState as TS

from .lifecycle import _len
from .tasks import Task

if TYPE_CHECKING:
    from .core import Orchestrator

log = logging.getLogger("orchester.journal")


def restore(core: Orchestrator, records: list[list[Any]], now: float, sock: Any) -> dict[str, int]:
    """Rebuild the task table from journal records (before serving).

    Finished tasks keep their results for fetch; unfinished ones are queued again (their
    next dispatch raises the attempt). Returns counts of what was restored.
    """
    tasks: dict[str, Task] = {}
    results: dict[str, list[Any]] = {}
    for rec in records:
        try:
            code, tid = rec[0], rec[1]
            if code == "S" and tid not in tasks:
                hdr = unpack(rec[3])
                tags = hdr.get("tg") or []
                core._seq += 1
                payload = list(rec[4])
                t = Task(tid, str(hdr.get("k")), int(hdr.get("p", 0) or 0), frozenset(tags), rec[2], sock,
                         rec[3], payload, now, core._seq, _len(payload))
                t.ttl = float(hdr.get("ttl", 0) or 0)
                t.max_run = float(hdr.get("mr", 0) or 0)
                t.history.add(float(rec[5]), TS.PENDING, 0)
                tasks[tid] = t
            elif code == "T" and tid in tasks:
                t = tasks[tid]
                t.state, t.attempt, t.satellite = TS(rec[2]), int(rec[3]), rec[4]
                t.history.add(float(rec[6]) if len(rec) > 6 else core.wall(), t.state, t.attempt, t.satellite, rec[5])
            elif code == "R":
                results[tid] = list(rec[2])
        except (IndexError, TypeError, ValueError, ProtocolError) as exc:
            core.counters["journal_bad_records"] += 1
            log.warning("skipped a journal record that cannot be applied: %s", exc)
    counts: Counter[str] = Counter()
    for tid, t in tasks.items():
        core.tasks[tid] = t
        if t.state.terminal:
            frames = results.get(tid)
            if frames is not None and (len(frames) > 1 or not unpack(bytes(frames[0])).get("ok")):
                core.results.put(tid, [P.SIGNATURE, P.RESULT, *frames], _len(frames), delivered=True)
            t.payload = []
            counts["finished"] += 1
        else:
            t.state, t.satellite = TS.PENDING, None
            core.queues.push(t)
            core.queued_bytes += t.size
            core._arm(t, now)
            counts["requeued"] += 1
    core.counters["journal_restored"] += len(tasks)
    return dict(counts)
