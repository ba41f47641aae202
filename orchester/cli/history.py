"""``orchester history`` and ``replay``: what happened to tasks, and running chosen ones again."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from orchester.cli.common import EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, ask, connect_option, timeout_option, wait_for
from orchester.render import clean_text


def parse_time(text: str | None) -> float | None:
    """Seconds since the epoch from ``1732460000``, ``2026-11-24T15:00``, or an age like ``30m``/``2h``/``7d``."""
    if text is None:
        return None
    import datetime
    import math
    import time as _time

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
            value = _time.time() - float(text[:-1]) * units[text[-1]]
        else:
            try:
                value = float(text)
            except ValueError:
                value = datetime.datetime.fromisoformat(text).timestamp()
        if not math.isfinite(value):  # "inf", "nan", an age of 1e308 days: no time at all
            raise ValueError(text)
        return value
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{text!r} is not a time (seconds since the epoch, ISO 8601, "
                                 "or an age such as 30m, 2h, 7d)") from None


@click.command()
@connect_option
@click.option("--state", default=None, help="Only tasks in this state (done, failed, quarantined, …).")
@click.option("--kind", default=None, help="Only tasks of this kind.")
@click.option("--since", default=None, help="Submitted at or after: epoch seconds, ISO 8601, or an age (2h).")
@click.option("--until", default=None, help="Submitted before (same forms).")
@click.option("--id", "ids", multiple=True, help="Only these task ids; repeatable.")
@click.option("--limit", type=int, default=None, help="Only the newest N rows (10,000 at most; older ones: --until).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="A table for the terminal (columns that do not fit are left out), or every column as CSV or JSON.")
@click.option("--timeout", type=click.FloatRange(0.0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the orchestrator before exit code 3.")
def history(connect: tuple[str, ...], state: str | None, kind: str | None, since: str | None, until: str | None,
            ids: tuple[str, ...], limit: int | None, fmt: str, timeout: float) -> None:
    """The history of every task: one row per task, filtered, as a table, CSV or JSON."""
    from orchester.journal.history import COLUMNS

    rows = ask(connect, timeout, lambda c: c.history(state=state, kind=kind, since=parse_time(since),
                                                      until=parse_time(until), ids=list(ids) or None,
                                                      limit=limit, timeout=timeout))
    if fmt == "json":
        click.echo(json.dumps(rows, indent=1))
    elif fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(COLUMNS), extrasaction="ignore")  # a newer server's columns
        w.writeheader()
        w.writerows({**r, "tags": " ".join(map(str, r.get("tags") or [])),
                     "after": " ".join(map(str, r.get("after") or []))} for r in rows)
    else:
        from orchester.render import render_history

        render_history(rows)


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "ids", multiple=True, help="A task id to resubmit; repeatable.")
@click.option("--since", default=None, help="Resubmit every task submitted since: epoch, ISO 8601 or an age (2h).")
@connect_option
@click.option("--wait", is_flag=True, help="Wait for the new tasks and print their results.")
@timeout_option
def replay(directory: str, ids: tuple[str, ...], since: str | None, connect: tuple[str, ...], wait: bool,
           timeout: float) -> None:
    """Resubmit chosen tasks of a journal (by id or by time) as new tasks; print old -> new ids."""
    from pathlib import Path

    from orchester.errors import TaskFailed
    from orchester.journal import records
    from orchester.journal.segments import read_journal
    from serializers import ProtocolError, codecs, unpack

    if not ids and since is None:
        raise click.UsageError("choose tasks with --task ID or --since TIME")
    from orchester.journal.folder import JournalError

    start = parse_time(since)
    chosen = []
    if not Path(directory).is_dir():
        click.echo(f"error: {directory} is not a journal folder", err=True)
        sys.exit(EXIT_USAGE)
    try:
        for rec in read_journal(Path(directory)):
            try:
                v = records.view(rec)
            except records.RecordError:
                continue  # (counted where the journal is served; a replay takes what it can read)
            if isinstance(v, records.Submitted) and (
                    (ids and v.task_id in ids) or (start is not None and v.time >= start)):
                chosen.append(v)
    except JournalError as exc:  # a damaged manifest, say: what is lost cannot be known
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    if not chosen:
        click.echo("no task of the journal matches", err=True)
        sys.exit(EXIT_TASK_FAILED)

    def resubmit(client: Any) -> list[tuple[Any, Any]]:
        """Submit each chosen task anew; with ``--wait`` collect results, else wait until accepted."""
        futures = []
        for sub in chosen:
            try:
                hdr = unpack(sub.header)
                args, kwargs = codecs.decode(hdr.get("c", "msgpack"), hdr.get("arr"), sub.payload)
            except (ProtocolError, ValueError) as exc:
                click.echo(f"{sub.task_id}: cannot resubmit: {exc}", err=True)
                continue
            fut = client.submit(str(hdr["k"]), *args, priority=int(hdr.get("p", 0) or 0),
                                tags=hdr.get("tg") or (), codec=hdr.get("c"), **kwargs)
            futures.append(fut)
            click.echo(f"{sub.task_id} -> {fut.task_id}")
        if not wait:
            for fut in futures:
                fut.accepted.wait(timeout)
            return [(fut, None) for fut in futures]
        return [(fut, _result(fut)) for fut in futures]

    outcomes = ask(connect, timeout, resubmit)
    failed = 0
    for fut, value in outcomes if wait else []:
        if isinstance(value, TaskFailed):
            failed += 1
            click.echo(f"{fut.task_id}: failed: {clean_text(value.type, 100)}: {clean_text(value.message, 1000)}")
        else:
            click.echo(f"{fut.task_id}: {json.dumps(value, default=repr)}")
    sys.exit(EXIT_TASK_FAILED if failed or len(outcomes) < len(chosen) else EXIT_OK)


def _result(fut: Any) -> Any:
    from orchester.errors import TaskFailed

    try:
        return wait_for(fut)
    except TaskFailed as exc:
        return exc
