"""Terminal rendering of status replies (rich), and the helpers that make peer-supplied values safe to print.

Whatever a peer sends (a satellite's progress, task errors and ids, a forged event) is data,
never terminal control or rich markup, and never a reason for a client to crash. Before a
client prints a peer's value it passes it through :func:`clean_text` (control characters out,
length bounded), :func:`markup` when the text goes inside rich markup, and :func:`finite`
for numbers; :func:`cell` makes a table cell that rich never parses as markup.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markup import escape
from rich.table import Table
from rich.text import Text

#: Longest peer-supplied text printed in one place (a longer one is cut, "…" marks the cut).
MAX_TEXT = 200
#: Longest error printed in a history row ("Type: message"; it wraps, it is not cut to a line).
MAX_ERROR = 2000
#: Most fields of one event printed (the rest are counted, not shown).
MAX_FIELDS = 16
#: Characters never printed as they come: C0 (with ESC, tab and newline), DEL and C1 controls,
#: zero-width and bidirectional formatting, line and paragraph separators, lone surrogates.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")
#: What an unsafe character is shown as.
REPLACEMENT = "\ufffd"


def clean_text(value: Any, limit: int = MAX_TEXT) -> str:
    """A peer-supplied value as text safe for a terminal.

    Strings are taken as they are, numbers and booleans by ``str``, ``None`` as ``""``, anything
    else by ``repr``; the text is cut to ``limit`` characters and every :data:`UNSAFE`
    character (ESC included: no escape sequence survives) becomes :data:`REPLACEMENT`.
    """
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif isinstance(value, (bool, int, float)):
        text = str(value) if not isinstance(value, int) or abs(value) < 1 << 64 else f"{value:.3e}"
    else:
        text = repr(value)
    limit = max(1, limit)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return UNSAFE.sub(REPLACEMENT, text)


def clean_block(value: Any, limit: int = 500, max_lines: int = 200) -> str:
    """Peer-supplied multi-line text (a remote traceback): each line cleaned and cut, at most ``max_lines``."""
    lines = (value if isinstance(value, str) else clean_text(value, limit * max_lines)).splitlines()
    out = [clean_text(line, limit) for line in lines[:max_lines]]
    if len(lines) > max_lines:
        out.append(f"… {len(lines) - max_lines} more line(s)")
    return "\n".join(out)


def markup(value: Any, limit: int = MAX_TEXT) -> str:
    """:func:`clean_text`, with rich markup escaped: for peer text placed inside a markup string."""
    return escape(clean_text(value, limit))


def cell(value: Any, limit: int = MAX_TEXT) -> Text:
    """A rich table cell of a peer-supplied value: cleaned, and never parsed as markup."""
    return Text(clean_text(value, limit))


def finite(value: Any, default: float | None = None, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    """``value`` as a float if it is a real, finite number within ``[lo, hi]``; otherwise ``default``.

    Booleans, strings, containers, NaN, infinities and integers too large for a float are
    not numbers here.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    try:
        number = float(value)
    except OverflowError:
        return default
    return number if math.isfinite(number) and lo <= number <= hi else default


def fmt(value: Any, spec: str = ".1f", missing: str = "") -> str:
    """A peer-supplied number formatted with ``spec``, or ``missing`` when it is not a finite number."""
    number = finite(value)
    return missing if number is None else format(number, spec)


def clock(value: Any, pattern: str = "%H:%M:%S") -> str:
    """A peer-supplied UNIX time as local time, or ``--:--:--`` when it is not a plausible time."""
    t = finite(value, None, 0.0, 1e11)
    if t is None:
        return "--:--:--"
    try:
        return time.strftime(pattern, time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return "--:--:--"


def event_fields(data: Mapping[str, Any], skip: Iterable[str] = ("t",), limit: int = 80,
                 max_fields: int = MAX_FIELDS) -> str:
    """An event's fields as ``key=value`` pairs for a terminal: keys and values cleaned, at most ``max_fields``."""
    skipped = set(skip)
    items = [(k, v) for k, v in data.items() if k not in skipped]
    text = " ".join(f"{clean_text(k, 40)}={clean_text(v, limit)}" for k, v in items[:max_fields])
    if len(items) > max_fields:
        text += f" (+{len(items) - max_fields} more)"
    return text


def progress_bar(data: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(done, total)`` of a progress event (``done``/``step`` of ``total``/``of``), each ``None``
    unless both are finite numbers with ``0 <= done <= total`` and ``total > 0``."""
    done = finite(data.get("done", data.get("step")), None, 0.0)
    total = finite(data.get("total", data.get("of")), None, 0.0)
    if done is None or total is None or total <= 0 or done > total:
        return None, None
    return done, total


def fit_progress(data: Mapping[str, Any], generations: int) -> tuple[str, float, str] | None:
    """A ``genx.fit`` progress event as ``(task id, generation, info)`` for ``orchester fit``'s bars.

    ``None`` when the task id is not a string of sensible length; the generation is clamped
    to ``[0, generations]``, the info is markup-safe text (``fom ... ev/s``).
    """
    tid = data.get("id")
    if not isinstance(tid, str) or not 0 < len(tid) <= 256:
        return None
    generation = finite(data.get("generation"), 0.0, 0.0) or 0.0
    return tid, min(generation, float(generations)), markup(
        f"fom {fmt(data.get('fom'), '.4g', '?')}  {fmt(data.get('evals_per_s'), '.0f', '?')} ev/s", 60)


def csv_text(value: Any) -> str:
    """A cell of a CSV file from text a peer or a model chose: never a spreadsheet formula (a cell that
    starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, and is not a number, gets a
    leading ``'``)."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(text)
        except ValueError:
            return "'" + text
    return text


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with every non-finite float replaced by ``None``, so ``json.dumps`` writes valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 64:
        return None
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else clean_text(k, 100): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return value


def _items(value: Any, limit: int = 10_000) -> list[tuple[Any, Any]]:
    """The items of a mapping a peer sent (sorted by cleaned key), or none if it is not one."""
    if not isinstance(value, Mapping):
        return []
    return sorted(value.items(), key=lambda kv: clean_text(kv[0]))[:limit]


def _rows(value: Any, limit: int = 100_000) -> list[Mapping[str, Any]]:
    """The maps of a list a peer sent (anything else in it is skipped)."""
    return [r for r in value[:limit] if isinstance(r, Mapping)] if isinstance(value, list) else []


def _count(value: Any) -> str:
    return fmt(value, ".0f", "?")


#: Narrowest a wrapping column (an error message) is made before other columns are dropped.
WRAP_MIN = 24
#: What one column costs beyond its text: a space either side and a border.
COLUMN_EXTRA = 3
#: Narrowest an id or a wrapping column is folded to on a terminal too narrow for the kept columns.
NARROWEST = 8


@dataclass
class Column:
    """One column of a :func:`fitted_table`: its header, its cells, and how it may give way.

    ``whole``: an id, never cut (it must be copied whole into ``show`` or ``drain``); ``keep``:
    never dropped; ``wrap``: long text that wraps onto more lines (it takes the room left, at
    least :data:`WRAP_MIN`); ``rank``: the order in which optional columns get room (lower
    first). Columns that do not fit are left out whole, and the caption names them.
    """

    header: str
    cells: list[Text | str] = field(default_factory=list)
    keep: bool = False
    whole: bool = False
    wrap: bool = False
    rank: int = 0
    justify: Literal["default", "left", "center", "right", "full"] = "left"

    @property
    def natural(self) -> int:
        """The width of the widest cell (or the header)."""
        return max([cell_len(self.header), *(c.cell_len if isinstance(c, Text) else cell_len(c) for c in self.cells)])

    @property
    def least(self) -> int:
        """The narrowest this column may be."""
        return min(self.natural, max(WRAP_MIN, cell_len(self.header))) if self.wrap else self.natural


def fitted_table(title: str, columns: Sequence[Column], width: int, hint: str = "") -> Table:
    """A table of ``columns`` that fits ``width`` terminal columns without ever cutting a ``whole`` cell.

    The ``keep`` columns are always there; the others join, by ``rank``, while they fit; the
    table keeps the given order. A ``whole`` cell wider than the terminal itself is folded onto
    more lines, never shortened. The caption names the columns left out (and ``hint``).
    """
    chosen = [c for c in columns if c.keep]
    used = 1 + sum(c.least + COLUMN_EXTRA for c in chosen)
    for c in sorted((c for c in columns if not c.keep), key=lambda c: c.rank):
        if used + c.least + COLUMN_EXTRA <= width:
            chosen.append(c)
            used += c.least + COLUMN_EXTRA
    shown = [c for c in columns if c in chosen]
    left_out = [c.header for c in columns if c not in chosen]
    table = Table(title=title, caption=(f"not shown at {width} columns: {', '.join(left_out)}"
                                        + (f" ({hint})" if hint else "")) if left_out else None)
    squeezed: dict[int, int] = {}  # the kept columns do not fit: wrapping text gives way first, then ids fold
    excess = used - width
    for c in [*(c for c in shown if c.wrap), *(c for c in shown if c.whole)]:
        give = min(excess, c.least - NARROWEST)
        if give > 0:
            squeezed[id(c)] = c.least - give
            excess -= give
    for c in shown:
        if id(c) in squeezed:  # folded onto more lines, every character kept
            table.add_column(c.header, justify=c.justify, overflow="fold", width=squeezed[id(c)])
        elif c.whole:  # never cut, never wrapped: copied whole into show or drain
            table.add_column(c.header, justify=c.justify, no_wrap=True, min_width=c.natural)
        else:
            table.add_column(c.header, justify=c.justify, overflow="fold", no_wrap=not c.wrap)
    for row in zip(*(c.cells for c in shown), strict=True):
        table.add_row(*row)
    return table


def add_row(columns: Sequence[Column], *values: Text | str) -> None:
    """Append one row: a value per column, in order."""
    for col, value in zip(columns, values, strict=True):
        col.cells.append(value)


class FittedTable:
    """A :func:`fitted_table` made when it is printed, for the width it is printed at (a live view's too)."""

    def __init__(self, title: str, columns: Sequence[Column], hint: str = "") -> None:
        self.title = title
        self.columns = list(columns)
        self.hint = hint

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Rich's rendering protocol: the table for ``options.max_width``."""
        yield fitted_table(self.title, self.columns, max(20, options.max_width), self.hint)


def render_status(st: dict[str, Any], console: Console | None = None) -> None:
    """Print a status reply as tables: tasks per state, queues, satellites."""
    console = console or Console()
    console.print(f"[bold]orchestrator[/] {markup(st.get('epoch'))}  uptime {fmt(st.get('uptime'), '.0f', '?')}s  "
                  f"strategy [cyan]{markup(st.get('strategy'))}[/]  "
                  f"results kept {_count(st.get('results_retained', 0))}")
    ha = st.get("ha")
    if isinstance(ha, Mapping):
        alarms = ", ".join(f"{clean_text(k, 40)} ×{_count(v)}" for k, v in _items(ha.get("alarms"), 20))
        console.print(f"[bold]binary star[/] {markup(ha.get('role'))} [cyan]{markup(ha.get('state'))}[/]  "
                      f"peer {markup(ha.get('peer'))} ({'alive' if ha.get('peer_alive') is True else 'silent'})  "
                      f"replication {markup(ha.get('replication'))}"
                      + (f"  [red]alarms {escape(alarms)}[/]" if alarms else ""))
    tasks = Table(title="tasks")
    tasks.add_column("state")
    tasks.add_column("count", justify="right")
    for state, n in _items(st.get("tasks")):
        tasks.add_row(cell(state), _count(n))
    for state, n in _items(st.get("satellite_states")):
        tasks.add_row(cell(f"satellites {clean_text(state)}"), _count(n))
    for kind, n in _items(st.get("queued")):
        tasks.add_row(cell(f"queued {clean_text(kind)}"), _count(n))
    console.print(tasks)
    cols = [Column("id", keep=True, whole=True), Column("state", keep=True), Column("host", rank=5, wrap=True),
            Column("inflight/credit", rank=0, justify="right"), Column("done", rank=1, justify="right"),
            Column("failed", rank=2, justify="right"), Column("heartbeat age", rank=3, justify="right"),
            Column("tags", rank=4, wrap=True), Column("cores used", rank=1, justify="right"),
            Column("job", rank=6, whole=True)]
    for s in _rows(st.get("satellites")):
        tags = s.get("tags")
        cores = f"{_count(s.get('cores_used'))}/{_count(s.get('cores'))}" if "cores" in s else ""
        add_row(cols, cell(s.get("id")), cell(s.get("state")), cell(s.get("host")),
                f"{_count(s.get('inflight'))}/{_count(s.get('credit', s.get('slots')))}",
                _count(s.get("done", 0)), _count(s.get("failed", 0)), f"{fmt(s.get('heartbeat_age'), '.1f', '?')}s",
                cell(",".join(map(clean_text, tags[:50])) if isinstance(tags, list) else ""), cores,
                cell(s.get("job") or ""))
    console.print(FittedTable("satellites", cols, "status --json shows everything"))
    for line in fleet_lines(st):
        console.print(line)
    for line in jobs_lines(st):
        console.print(line)


def fleet_lines(st: Mapping[str, Any]) -> list[Text]:
    """What a status sums up of the whole fleet, when it lists fewer satellites than it has: how many, their
    slots and cores, per state and on the busiest hosts. Nothing when every satellite is listed."""
    fleet = st.get("fleet")
    listed = _rows(st.get("satellites"))
    if not isinstance(fleet, Mapping) or (finite(fleet.get("satellites"), 0, 0) or 0) <= len(listed):
        return []
    total = _count(fleet.get("satellites"))
    states = ", ".join(f"{_count(n)} {clean_text(s, 20)}" for s, n in _items(fleet.get("states"), 20))
    hosts = ", ".join(f"{clean_text(h, 64) or '?'} ({_count(n)})" for h, n in sorted(
        _items(fleet.get("busiest_hosts"), 16), key=lambda hn: -(finite(hn[1], 0) or 0)))
    return [Text.assemble(("fleet ", "bold"), f"{len(listed)} of {total} satellites listed "
                          "(orchester status --satellites all lists them): ", states),
            Text(f"  slots {_count(fleet.get('inflight'))}/{_count(fleet.get('credit'))} busy, "
                 f"cores {_count(fleet.get('cores_used'))}/{_count(fleet.get('cores'))} used, "
                 f"{_count(fleet.get('hosts'))} hosts"),
            Text(f"  busiest hosts: {hosts}")]


def jobs_lines(st: Mapping[str, Any]) -> list[Text]:
    """A line per autoscaler of a status (``jobs``): its tag and scheduler, its jobs by state with the
    satellites of each, and the scheduler's last error. Nothing when no autoscaler reports."""
    out = []
    for r in _rows(st.get("jobs"), 64):
        jobs = _rows(r.get("jobs"), 10_000)
        counts = {state: sum(1 for j in jobs if j.get("state") == state) for state in ("pending", "running", "ending")}
        line = Text.assemble(("autoscaler ", "bold"), (clean_text(r.get("tag"), 40), "cyan"),
                             f" ({clean_text(r.get('scheduler'), 16)}, {_count(r.get('min'))} to "
                             f"{_count(r.get('max'))} jobs): ",
                             ", ".join(f"{n} {state}" for state, n in counts.items()))
        listed = [f"{clean_text(j.get('id'), 64)} {clean_text(j.get('state'), 10)}"
                  + (f" [{', '.join(clean_text(s, 64) for s in j['satellites'][:8])}]"
                     if isinstance(j.get("satellites"), list) and j["satellites"] else "")
                  for j in jobs[:MAX_JOBS_LISTED]]
        if listed:
            line.append("  " + "; ".join(listed) + (" …" if len(jobs) > MAX_JOBS_LISTED else ""))
        if r.get("error"):
            line.append(f"  scheduler: {clean_text(r.get('error'), 300)}", "red")
        out.append(line)
    return out


#: Jobs a status line lists by id (``status --json`` has them all).
MAX_JOBS_LISTED = 12


#: Task ids ``show`` lists of a task's dependencies or dependents (``show --json`` has them all).
MAX_LISTED = 20


def render_task(task: dict[str, Any], console: Console | None = None) -> None:
    """Print one task's summary and its history of transitions."""
    console = console or Console()
    crashes = f"crashes {_count(task.get('crashes'))}  " if "crashes" in task else ""
    console.print(f"[bold]task[/] {markup(task.get('id'))}  kind {markup(task.get('kind'))}  "
                  f"state [cyan]{markup(task.get('state'))}[/]  attempt {_count(task.get('attempt'))}  "
                  f"{crashes}satellite {markup(task.get('satellite') or '-')}")
    if task.get("source") == "history":  # no longer in the orchestrator's memory: from its journal
        error = f"  error {markup(task.get('error_type'), MAX_ERROR)}" if task.get("error_type") else ""
        console.print(f"from the journal (the orchestrator no longer holds it){error}")
    cores = _count(task.get("cores")) if isinstance(task.get("cores"), int) and task.get("cores") != 1 else ""
    if cores or task.get("memory"):
        console.print(f"needs {cores or 1} core(s)" + (f", {_count(task.get('memory'))} bytes of memory"
                                                      if task.get("memory") else ""))
    for label, key in (("waits for", "after"), ("dependents", "dependents")):
        ids = [markup(i, 64) for i in (task.get(key) or [])[:MAX_LISTED] if isinstance(i, str)]
        if ids:
            more = len(task.get(key) or []) - len(ids)
            extra = f" (+{more})" if more > 0 else ""
            if key == "after" and task.get("on_failure") == "run":
                extra += "  (runs even if one fails)"
            console.print(f"{label}: {', '.join(ids)}{extra}")
    cols = [Column("time", keep=True), Column("state", keep=True), Column("attempt", rank=1, justify="right"),
            Column("satellite", whole=True, rank=0), Column("reason", keep=True, wrap=True)]
    for h in _rows(task.get("history")):
        t = finite(h.get("t"), None, 0.0, 1e11)
        stamp = clock(t) + (f".{int(t % 1 * 1000):03d}" if t is not None else "")
        add_row(cols, stamp, cell(h.get("state")), _count(h.get("attempt")), cell(h.get("sat") or ""),
                cell(h.get("reason") or ""))
    console.print(FittedTable("history", cols, "show --json shows everything"))


def render_history(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print history rows as a table; a failed task's error is its type and message, in full (wrapped)."""

    def stamp(t: Any) -> str:
        return clock(t, "%Y-%m-%d %H:%M:%S") if t else ""

    console = console or Console()
    usable = _rows(rows)
    cols = [Column("id", keep=True, whole=True), Column("kind", rank=0), Column("state", keep=True),
            Column("attempts", rank=2, justify="right"), Column("satellite", whole=True, rank=3),
            Column("submitted", rank=4), Column("finished", rank=1), Column("error", keep=True, wrap=True)]
    waits = any(isinstance(r.get("after"), list) and r.get("after") for r in usable)
    if waits:  # (a column of its own only when some task waited for others)
        cols.insert(-1, Column("after", rank=5))
    for r in usable:
        after = [a for a in r.get("after") or [] if isinstance(a, str)] if isinstance(r.get("after"), list) else []
        shown = cell(after[0][:8] + (f" +{len(after) - 1}" if len(after) > 1 else "")) if after else ""
        add_row(cols, cell(r.get("id")), cell(r.get("kind")), cell(r.get("state")), _count(r.get("attempts")),
                cell(r.get("satellite")), stamp(r.get("submitted")), stamp(r.get("finished")),
                *([shown] if waits else []), cell(r.get("error"), MAX_ERROR))
    console.print(FittedTable(f"{len(usable)} task(s)", cols, "--format csv shows every column"))
