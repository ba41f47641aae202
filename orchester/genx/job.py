"""The main job: many GenX fits pushed out to satellites, with a bar per fit and one overall.

Used by ``orchester fit``; callable as a library::

    from orchester import LocalCluster
    from orchester.genx.job import run_fits
    from orchester.genx.fits import FitSettings

    with LocalCluster(satellites=2, workers=1) as cluster, cluster.client() as client:
        rows = run_fits(client, ["a.hgx", "b.hgx"], FitSettings(generations=50), out="fits")
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from orchester.client.status import fleet_of
from orchester.client.sync import Client
from orchester.errors import OrchesterError, RemoteError, TaskFailed
from orchester.genx.fits import FitCache, FitSettings, fit_key, provenance, settings_from, write_outputs, write_summary
from orchester.render import fit_progress
from orchester.signals import Interrupted, interrupt_exit_code, shielded, signal_name


def genx_version(client: Client) -> str | None:
    """The GenX version the satellites report for ``genx.fit`` (``None``: none, or several differ)."""
    versions = fleet_of(client.status())["versions"].get("genx.fit", [])
    return versions[0] if len(versions) == 1 else None


class FitsInterrupted(Interrupted):
    """A stop signal ended :func:`run_fits`: ``summary.csv`` is written, with the unfinished fits marked.

    :attr:`rows` are the summary's rows (status ``"interrupted"`` for every fit that did not
    finish); :attr:`exit_code` is 128 + the signal number (130 for Ctrl-C).
    """

    def __init__(self, signum: int, rows: list[dict[str, Any]], summary: Path) -> None:
        super().__init__(signum)
        self.rows = rows
        self.summary = summary


def run_fits(client: Client, files: Sequence[str | os.PathLike[str]], settings: FitSettings,
             out: str | os.PathLike[str], cache: FitCache | None = None, console: Console | None = None,
             timeout: float | None = None, figures: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Fit every model file on the satellites; write each fit's files and ``summary.csv`` into ``out``.

    A model that fails (unreadable, bad script, NaN figure of merit) gets a summary row with
    its error while the others complete. Returns the summary rows.

    Each fit's files are written all or nothing (:func:`~orchester.genx.fits.write_outputs`). A
    :class:`KeyboardInterrupt` (Ctrl-C, or SIGTERM/SIGHUP under
    :func:`~orchester.signals.stop_on_signals`) keeps the finished fits, asks the orchestrator to
    cancel the unfinished ones, writes ``summary.csv`` with those marked ``interrupted`` and
    raises :class:`FitsInterrupted`.
    """
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pending: dict[str, tuple[str, Path, Any, str | None, float, int, bytes]] = {}
    seen = [0]  # files that have a row or a pending fit (the rest were never submitted)
    try:
        _run_fits(client, files, settings, out, cache, console, timeout, rows, pending, seen, figures)
    except KeyboardInterrupt as exc:
        signum = interrupt_exit_code(exc) - 128
        for _, path, _, _, _, order, _ in pending.values():
            rows += interrupted_rows([path], signum, "before the fit finished", first=order)
        rows += interrupted_rows(files[seen[0]:], signum, first=seen[0])
        _cancel(client, list(pending))
        raise FitsInterrupted(signum, rows, write_summary(rows, out)) from exc
    write_summary(rows, out)
    return rows


def interrupted_rows(files: Sequence[str | os.PathLike[str]], signum: int,
                     when: str = "before it was submitted", first: int = 0) -> list[dict[str, Any]]:
    """Summary rows (status ``"interrupted"``) for fits that signal ``signum`` stopped ``when`` (``first``:
    the first one's place among the models given)."""
    why = f"interrupted by {signal_name(signum)} {when}"
    return [{"file": str(Path(f)), "status": "interrupted", "error": why, "order": first + i}
            for i, f in enumerate(files)]


def _run_fits(client: Client, files: Sequence[str | os.PathLike[str]], settings: FitSettings, out: Path,
              cache: FitCache | None, console: Console, timeout: float | None, rows: list[dict[str, Any]],
              pending: dict[str, tuple[str, Path, Any, str | None, float, int, bytes]], seen: list[int],
              figures: Sequence[str] = ()) -> None:
    """The work of :func:`run_fits`, filling ``rows`` and ``pending`` as it goes (``seen[0]``: files dealt with).

    Each step that changes them is :func:`~orchester.signals.shielded`, so that a stop signal
    never falls between a fit's files and its row.
    """
    version = genx_version(client)
    if version is None:
        if not fleet_of(client.status())["kinds"].get("genx.fit"):
            raise OrchesterError("no satellite offers genx.fit: install GenX on the satellites "
                                 "(pip install --no-deps genx3 and the 'genx' extra)")
        cache = None  # satellites disagree on the GenX version: a cached result could be another's
    names: set[str] = set()
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bars:
        overall = bars.add_task("all fits", total=len(files), info="")
        per_fit: dict[str, TaskID] = {}
        totals: dict[str, int] = {}  #: generations of each fit, once known (from its progress)
        stream = client.subscribe(["progress:"])
        try:
            for index, file in enumerate(files):
                path = Path(file)
                name = path.stem
                while name in names:
                    name += "_"
                names.add(name)
                try:
                    model = path.read_bytes()
                except OSError as exc:
                    with shielded():
                        rows.append({"file": str(path), "status": "failed", "order": index,
                                     "error": f"cannot read: {exc.strerror}"})
                        seen[0] = index + 1
                    bars.advance(overall)
                    continue
                key = fit_key(model, settings, version) if version else None
                hit = cache.get(key) if cache is not None and key else None
                if hit is not None:
                    with shielded():
                        write_outputs(name, hit, out, figures)
                        rows.append({**_row(path, hit, "done", cached=True), "order": index,
                                     "provenance": {**provenance(model, hit), "cached": True}})
                        seen[0] = index + 1
                    bars.advance(overall)
                    continue
                with shielded():
                    fut = client.submit("genx.fit", model, **settings.kwargs())
                    pending[fut.task_id] = (name, path, fut, key, time.monotonic(), index, model)
                    seen[0] = index + 1
                per_fit[fut.task_id] = bars.add_task(escape(name[:28]), total=settings.generations, info="queued")
                if settings.generations:
                    totals[fut.task_id] = settings.generations
            deadline = None if timeout is None else time.monotonic() + timeout
            while pending:
                ev = stream.recv(timeout=0.1)
                if ev is not None and ev.category == "progress":
                    total = settings.generations or _total(ev.data)  # the file's: each fit says how many
                    checked = fit_progress(ev.data, total or MAX_BAR)  # forged fields never crash the bars
                    if checked is not None and checked[0] in per_fit:
                        if total:
                            totals[checked[0]] = total
                        bars.update(per_fit[checked[0]], completed=checked[1], total=total, info=checked[2])
                for tid in [t for t, p in pending.items() if p[2].done()]:
                    name, path, fut, key, _, order, model = pending[tid]
                    satellite = _satellite(client, tid) if fut.exception() is None else ""
                    with shielded():  # the fit's files, its row and its removal from pending: all or none
                        rows.append({**_finish(tid, name, path, fut, key, cache, out, satellite, model, figures),
                                     "order": order})
                        del pending[tid]
                    done_at = totals.get(tid) or 1
                    bars.update(per_fit[tid], completed=done_at, total=done_at, info=rows[-1]["status"])
                    bars.advance(overall)
                if deadline is not None and time.monotonic() > deadline:
                    for _, path, _, _, _, order, _ in pending.values():
                        rows.append({"file": str(path), "status": "failed", "error": "timed out", "order": order})
                    pending.clear()
                    break
        finally:
            stream.close()


#: Most generations a progress bar takes from a fit's own events.
MAX_BAR = 2**31 - 1


def _cancel(client: Client, task_ids: list[str], timeout: float = 2.0) -> None:
    """Ask the orchestrator to cancel unfinished fits (best effort: stop at the first that gets no answer)."""
    for tid in task_ids:
        try:
            client.cancel(tid, timeout=timeout)
        except (OrchesterError, TimeoutError):
            return


def _satellite(client: Client, tid: str) -> str:
    """The satellite that ran task ``tid`` ("" when the orchestrator does not say)."""
    try:
        return str(client.show(tid).get("satellite") or "")
    except OrchesterError:
        return ""


def _finish(tid: str, name: str, path: Path, fut: Any, key: str | None, cache: FitCache | None, out: Path,
            satellite: str, model: bytes, figures: Sequence[str] = ()) -> dict[str, Any]:
    try:
        result = fut.result()
    except TaskFailed as exc:
        return {"file": str(path), "status": "failed", "error": f"{exc.type}: {exc.message}",
                "satellite": exc.satellite or ""}
    except (RemoteError, OrchesterError) as exc:
        return {"file": str(path), "status": "failed", "error": str(exc)}
    try:
        row = _row(path, result, "done")
        write_outputs(name, result, out, figures)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a result no real fit returns
        return {"file": str(path), "status": "failed", "error": f"malformed result: {type(exc).__name__}: {exc}"}
    if cache is not None and key:
        cache.put(key, result)
    row["satellite"] = satellite
    row["provenance"] = {**provenance(model, result), "satellite": satellite, "host": row.get("host", "")}
    return row


def _row(path: Path, result: dict[str, Any], status: str, cached: bool = False, satellite: str = "") -> dict[str, Any]:
    fom = result["fom"]
    if isinstance(fom, bool) or not isinstance(fom, (int, float)):
        raise TypeError(f"the figure of merit is a {type(fom).__name__}, not a number")
    used: dict[str, Any] = result["settings"] if isinstance(result.get("settings"), dict) else {}

    def value(name: str) -> Any:
        entry = used.get(name)
        return entry.get("value", "") if isinstance(entry, dict) else ""

    return {"file": str(path), "fom": f"{fom:.10g}", "generations": result["generations"],
            "population": result.get("population", ""), "km": value("km"), "kr": value("kr"),
            "method": value("method"), "seed": result.get("seed", ""), "settings_from": settings_from(result),
            "evaluations": result.get("evaluations", ""), "seconds": result["seconds"], "satellite": satellite,
            "host": str(result.get("host") or ""), "status": status, "error": "", "cached": "yes" if cached else "no"}


def _total(data: Any) -> int | None:
    """The generations a fit's progress event says it runs (``None``: none, or not a sensible count)."""
    total = data.get("total") if isinstance(data, dict) else None
    if isinstance(total, bool) or not isinstance(total, int) or not 0 < total <= MAX_BAR:
        return None
    return total
