"""``orchester journal compact``: maintain a journal folder (PyTables segments, retention)."""

from __future__ import annotations

import sys

import click

from orchester.cli.common import EXIT_USAGE


@click.group()
def journal() -> None:
    """Maintain a journal folder."""


@journal.command("compact")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--keep-results", type=float, default=None,
              help="Days to keep results and inputs of finished tasks (headers and history stay forever).")
def journal_compact(directory: str, keep_results: float | None) -> None:
    """Move closed log segments to PyTables (unless an orchestrator runs on the journal: it compacts its own),
    and apply the retention policy."""
    import fcntl
    import os
    import time
    from pathlib import Path

    from orchester.journal.folder import JournalError, open_lock, private_directory
    from orchester.journal.segments import apply_retention, compact_closed

    d = Path(directory)
    if not d.is_dir():
        click.echo(f"error: {d} is not a journal folder", err=True)
        sys.exit(EXIT_USAGE)
    try:
        private_directory(d)  # refuse a folder others can write; never widen the files' modes
        fd = open_lock(d)
    except (JournalError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        running = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # an orchestrator writes it, and compacts its own logs as they close
            running = True
        try:
            if running:
                click.echo("an orchestrator is running on this journal: it compacts its own log segments")
            else:
                done = compact_closed(d)
                click.echo(f"compacted {len(done)} log segment(s) to PyTables")
            if keep_results is not None:
                counts = apply_retention(d, time.time() - keep_results * 86400)
                click.echo(f"dropped {counts['results_dropped']} result(s) and {counts['inputs_dropped']} input(s) "
                           f"older than {keep_results:g} day(s) in {counts['segments_rewritten']} segment(s)")
        except JournalError as exc:  # a damaged manifest, say: nothing is changed
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
    finally:
        os.close(fd)
