"""Terminal rendering of status replies (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_status(st: dict[str, Any], console: Console | None = None) -> None:
    """Print a status reply as tables: tasks per state, queues, satellites."""
    console = console or Console()
    console.print(f"[bold]orchestrator[/] {st.get('epoch')}  uptime {st.get('uptime', 0):.0f}s  "
                  f"strategy [cyan]{st.get('strategy')}[/]  results kept {st.get('results_retained', 0)}")
    ha = st.get("ha")
    if isinstance(ha, dict):
        alarms = ", ".join(f"{k} ×{v}" for k, v in ha.get("alarms", {}).items())
        console.print(f"[bold]binary star[/] {ha.get('role')} [cyan]{ha.get('state')}[/]  peer {ha.get('peer')} "
                      f"({'alive' if ha.get('peer_alive') else 'silent'})  replication {ha.get('replication')}"
                      + (f"  [red]alarms {alarms}[/]" if alarms else ""))
    tasks = Table(title="tasks")
    tasks.add_column("state")
    tasks.add_column("count", justify="right")
    for state, n in sorted(st.get("tasks", {}).items()):
        tasks.add_row(state, str(n))
    for state, n in sorted(st.get("satellite_states", {}).items()):
        tasks.add_row(f"satellites {state}", str(n))
    for kind, n in sorted(st.get("queued", {}).items()):
        tasks.add_row(f"queued {kind}", str(n))
    console.print(tasks)
    sats = Table(title="satellites")
    for col in ("id", "state", "host", "inflight/credit", "done", "failed", "heartbeat age", "tags"):
        sats.add_column(col)
    for s in st.get("satellites", []):
        sats.add_row(s["id"], s["state"], s.get("host", ""), f"{s['inflight']}/{s.get('credit', s['slots'])}",
                     str(s.get("done", 0)), str(s.get("failed", 0)), f"{s.get('heartbeat_age', 0):.1f}s",
                     ",".join(s.get("tags", [])))
    console.print(sats)


def render_task(task: dict[str, Any], console: Console | None = None) -> None:
    """Print one task's summary and its history of transitions."""
    import time

    console = console or Console()
    console.print(f"[bold]task[/] {task['id']}  kind {task['kind']}  state [cyan]{task['state']}[/]  "
                  f"attempt {task['attempt']}  crashes {task['crashes']}  satellite {task.get('satellite') or '-'}")
    hist = Table(title="history")
    for col in ("time", "state", "attempt", "satellite", "reason"):
        hist.add_column(col)
    for h in task.get("history", []):
        stamp = time.strftime("%H:%M:%S", time.localtime(h["t"])) + f".{int(h['t'] % 1 * 1000):03d}"
        hist.add_row(stamp, h["state"], str(h["attempt"]), h.get("sat") or "", h.get("reason") or "")
    console.print(hist)


def render_history(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print history rows as a table."""
    import time

    def stamp(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""

    console = console or Console()
    table = Table(title=f"{len(rows)} task(s)")
    for col in ("id", "kind", "state", "attempts", "satellite", "submitted", "finished", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["kind"], r["state"], str(r["attempts"]), r["satellite"], stamp(r["submitted"]),
                      stamp(r["finished"]), r["error"])
    console.print(table)
