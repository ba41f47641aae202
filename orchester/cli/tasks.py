"""``orchester`` commands on tasks and the bus: submit, status, show, watch."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from orchester.cli.common import (
    EXIT_TASK_FAILED,
    ByteSize,
    ask,
    check_connect,
    connect_option,
    open_client,
    timeout_option,
    unreachable,
    wait_for,
)
from orchester.client.status import fleet_of
from serializers.codecs import Ref
from serializers.messages import MAX_CORES, MAX_SATELLITES_PAGE


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@click.command()
@click.argument("kind")
@click.argument("args", nargs=-1)
@connect_option
@click.option("--priority", type=int, default=0, show_default=True,
              help="Higher runs first among queued tasks of the same kind (negative: later).")
@click.option("--tags", default="", help="Comma-separated tags a satellite must have.")
@click.option("--task-timeout", type=float, default=None, help="Fail the task after this many seconds.")
@click.option("--after", "after", multiple=True, metavar="ID",
              help="Run once task ID has ended (repeatable); if it did not succeed, fail (see --on-failure).")
@click.option("--ref", "refs", multiple=True, metavar="ID",
              help="Pass the result of task ID as one more argument, after ARGS (repeatable): the task waits "
              "for ID, and the result goes from satellite to satellite.")
@click.option("--on-failure", type=click.Choice(["fail", "run"]), default="fail", show_default=True,
              help="When a task it waits for does not succeed: fail with DependencyFailed, or run anyway.")
@click.option("--cores", type=click.IntRange(1, MAX_CORES), default=1, show_default=True,
              help="Cores the task needs (a satellite's credit is counted in cores).")
@click.option("--memory", type=ByteSize(), default=None, help="Memory the task needs, e.g. 8G.")
@timeout_option
@click.option("--no-wait", is_flag=True, help="Print the task id and exit once accepted.")
def submit(kind: str, args: tuple[str, ...], connect: tuple[str, ...], priority: int, tags: str,
           task_timeout: float | None, after: tuple[str, ...], refs: tuple[str, ...], on_failure: str, cores: int,
           memory: int | None, timeout: float, no_wait: bool) -> None:
    """Submit one task; print its result as JSON. ARGS are JSON values (or plain strings)."""
    from orchester.errors import RemoteError, TaskFailed, Unreachable
    from orchester.render import clean_block, clean_text

    with open_client(connect) as client:
        try:
            st = client.status(timeout=timeout)
        except Unreachable:
            unreachable(connect, timeout)
        if not fleet_of(st)["satellites"]:  # said once; the task waits in the queue for the first one
            click.echo(f"warning: no satellite is connected to the orchestrator at {', '.join(connect)}: the task "
                       + ("waits in its queue until one connects" if no_wait else
                          "waits until one connects (Ctrl-C stops waiting; the task stays queued)"), err=True)
        tid = client.core.task_id()
        show = not no_wait and sys.stderr.isatty()
        stream = client.subscribe([f"progress:{tid}", f"task:{tid}"], timeout=timeout) if show else None
        values = [_parse_arg(a) for a in args] + [Ref(r) for r in refs]
        fut = client.submit(kind, *values, priority=priority, tags=[t for t in tags.split(",") if t],
                            timeout=task_timeout, task_id=tid, after=list(after), on_failure=on_failure,
                            cores=cores, memory=memory)
        try:
            if no_wait:
                # requests on one socket are handled in order: once this status is answered the
                # orchestrator has accepted (or refused) the submit
                client.status(timeout=timeout)
                if fut.done():
                    fut.result()
                click.echo(fut.task_id)
                return
            if stream is not None:
                with stream:
                    _show_progress(fut, stream)
            value = wait_for(fut)
        except TaskFailed as exc:  # type, message and traceback come from the satellite: cleaned
            click.echo(f"task failed: {clean_text(exc.type, 100)}: {clean_text(exc.message, 1000)}", err=True)
            if exc.remote_traceback:
                click.echo(clean_block(exc.remote_traceback), err=True)
            sys.exit(EXIT_TASK_FAILED)
        except RemoteError as exc:
            click.echo(f"refused: {clean_text(str(exc), 1000)}", err=True)
            sys.exit(EXIT_TASK_FAILED)
        click.echo(json.dumps(value, default=_jsonable))


def _show_progress(fut: Any, stream: Any) -> None:
    """A live bar on stderr from the task's events until its future is done.

    Only the events of this task (the exact topic, not a prefix) are shown; every field is
    checked and cleaned (:mod:`orchester.render`) before it reaches the bar.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from orchester.render import event_fields, markup, progress_bar

    mine = {f"progress:{fut.task_id}", f"task:{fut.task_id}"}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        row = bar.add_task(markup(fut.task_id), total=None, info="pending")
        while not fut.done():
            ev = stream.recv(timeout=0.2)
            if ev is None or ev.topic not in mine:
                continue
            if ev.category == "task":
                bar.update(row, info=markup(ev.data.get("state"), 40))
                continue
            done, total = progress_bar(ev.data)
            if done is not None:
                bar.update(row, completed=done, total=total)
            bar.update(row, info=markup(event_fields(ev.data, ("id", "a", "sat", "t"), 40, 8), 160))


def _jsonable(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)
    if tolist is not None:
        return tolist()
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    return repr(o)


#: ``status --satellites all``.
ALL = -1


class SatelliteCount(click.ParamType):
    """``--satellites``: a number of satellites from 0 to 1,000, or ``all``."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """The number, or :data:`ALL`."""
        if isinstance(value, int):
            return value
        if str(value).strip().lower() == "all":
            return ALL
        try:
            n = int(str(value))
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'all'", param, ctx)
        if not 0 <= n <= MAX_SATELLITES_PAGE:
            self.fail(f"{n} is not from 0 to {MAX_SATELLITES_PAGE:,} (or 'all')", param, ctx)
        return n


@click.command()
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--satellites", "satellites", type=SatelliteCount(), default=None,
              help="Satellites listed one by one: a number (0 to 1000; default 100) or 'all' (fetched a page "
                   "at a time). The whole fleet is always summed up.")
def status(connect: tuple[str, ...], timeout: float, as_json: bool, satellites: int | None) -> None:
    """Show tasks per state, queues and satellites."""
    def fetch(c: Any) -> dict[str, Any]:
        if satellites != ALL:
            return c.status(timeout=timeout, satellites=satellites)
        st: dict[str, Any] = c.status(timeout=timeout, satellites=0)
        st["satellites"], st["satellites_next"] = list(c.satellites(timeout=timeout)), None
        return st

    st = ask(connect, timeout, fetch)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    from orchester.render import render_status

    render_status(st)


@click.command()
@click.argument("task_id")
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw answer as JSON.")
def show(task_id: str, connect: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Show one task: its state, attempts and history of transitions."""
    task = ask(connect, timeout, lambda c: c.show(task_id, timeout=timeout, journal=True))
    if as_json:
        click.echo(json.dumps(task, indent=2, sort_keys=True))
        return
    from orchester.render import render_task

    render_task(task)


@click.command()
@connect_option
@click.option("--pub", default=None, callback=check_connect,
              help="Event endpoint (asked of the orchestrator if omitted).")
@click.option("--topic", "topics", multiple=True, default=("",), help="Topic prefix; repeatable.")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: never).")
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def watch(connect: tuple[str, ...], pub: str | None, topics: tuple[str, ...], count: int,
          timeout: float, as_json: bool) -> None:
    """Print the event stream (peers' text cleaned of control characters)."""
    from orchester.render import clean_text, clock, event_fields, json_safe

    stream = ask(connect, timeout, lambda c: c.subscribe(topics, timeout=timeout), pub=pub)
    n = 0
    with stream, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the watch
        for ev in stream:
            if as_json:  # json.dumps escapes control characters; NaN and infinities become null
                click.echo(json.dumps(json_safe({**ev.data, "topic": ev.topic}), default=_jsonable))
            else:  # peers' text, cleaned of control characters (no escape sequence reaches the terminal)
                click.echo(f"{clock(ev.data.get('t'))} {clean_text(ev.topic)} {event_fields(ev.data)}")
            n += 1
            if count and n >= count:
                break
