"""Series fits from the browser: one GenX model fitted to each of a series of data files.

What ``orchester fit model.hgx --data series/*.dat [--chain]`` does (:mod:`orchester.genx.series`),
kept by the web process: each data file is one fit of :class:`~orchester.web.fits.FitStore` (a page
of its own, followed live), and the series groups them in the order of its sequence (the last
number in each file's name, or the values given). Without ``chain`` every fit is submitted at
once and they run in parallel over the satellites; with ``chain`` one after another, each starting
from the previous dataset's fitted values (and with ``adjust_bounds`` its bounds centred on them).
A dataset whose fit fails is a row with its error; the rest complete.

Each series lives in a folder of its own under the web process's data folder::

    <data>/series/<id>/series.json   the series: settings, its datasets in order, each one's fit id
    <data>/series/<id>/model.hgx     the uploaded model
    <data>/series/<id>/data/<k>      the k-th data file of the sequence, as uploaded
    <data>/series/<id>/out/          series.csv, series.png and series.zip (those and every fit's
                                     files), written when every fit has ended

``series.json`` is replaced atomically at every change, and every fit's id is recorded in it
before the first is submitted, so a web process killed at any moment leaves series that a
restarted one takes up again: the fits still running are followed, the datasets not yet
submitted are submitted from where it stopped, under the ids recorded (the orchestrator knows a
fit it has seen by its id). At most :data:`WINDOW` fits of a series are in flight at once; each
fit's folder links to the series' one copy of the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchester.genx import MAX_DATA_BYTES
from orchester.genx.fits import FitSettings
from orchester.genx.series import _safe, loader_of, sequence_values, start_from, write_series
from orchester.web.fits import (
    FIT_ID,
    INSPECTORS,
    LOADERS,
    WRITER,
    FitStore,
    SettingsError,
    WebFit,
    _number,
    _write_atomic,
    checked_settings,
    form_flag,
    parse_settings,
    read_json,
    safe_name,
)

log = logging.getLogger("orchester.web")

#: Most data files in one series (GenX's own batch example has 100).
MAX_DATASETS = 1000
#: Most series kept in memory (the oldest finished ones are forgotten first; their folders stay).
MAX_SERIES = 1000
#: Largest ``series.json`` read back.
MAX_SERIES_JSON = 16 * 1024 * 1024
#: The files a finished series offers.
SERIES_FILES = ("series.csv", "series.png", "series.zip")
STATES = ("running", "done")
#: Fits of one series submitted and not ended at once, at most (each holds the model in the web process
#: until it ends, and in the bus's budget of this client).
WINDOW = 16
#: Series figures kept made (the most recently asked).
MAX_FIGURES = 32


@dataclass
class Dataset:
    """One data file of a series, in the order of the sequence."""

    file: str  #: its name as uploaded (shown, never a path)
    sequence: float
    loader: str  #: GenX's data loader for it (``default`` or ``orso``)
    fit: str = ""  #: the id of its fit (recorded before it is submitted)
    error: str = ""  #: why it has no fit, when its fit could not even be made


@dataclass
class WebSeries:
    """One series as the web process keeps it (its ``series.json``)."""

    id: str
    name: str  #: the model's name (each fit is named ``<name>_<data file>``)
    file: str  #: the model's file name as uploaded (shown, never a path)
    settings: dict[str, Any]
    chain: bool
    adjust_bounds: bool
    datasets: list[Dataset]
    parameters: list[str]  #: the model's fitted parameters (the figure's panels)
    submitted: float = 0.0
    state: str = "running"
    finished: float | None = None
    files: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        """The series as ``series.json`` keeps it."""
        return {"id": self.id, "name": self.name, "file": self.file, "settings": self.settings, "chain": self.chain,
                "adjust_bounds": self.adjust_bounds, "parameters": self.parameters, "submitted": self.submitted,
                "state": self.state, "finished": self.finished, "files": self.files,
                "datasets": [{"file": d.file, "sequence": d.sequence, "loader": d.loader, "fit": d.fit,
                              **({"error": d.error} if d.error else {})} for d in self.datasets]}

    @classmethod
    def of(cls, data: Any) -> WebSeries:
        """A series read back from its ``series.json``: every field checked (:class:`ValueError` on
        anything of the wrong shape)."""
        if not isinstance(data, dict):
            raise ValueError("not a series record")
        sid, name, state = data.get("id"), data.get("name"), data.get("state")
        if not (isinstance(sid, str) and FIT_ID.fullmatch(sid) and state in STATES and isinstance(name, str)
                and name == safe_name(f"{name}.hgx")):
            raise ValueError("not a series record (id, name or state)")
        raw_sets, params = data.get("datasets"), data.get("parameters", [])
        if not (isinstance(raw_sets, list) and 0 < len(raw_sets) <= MAX_DATASETS):
            raise ValueError("datasets of the wrong shape")
        if not (isinstance(params, list) and len(params) <= 10_000 and all(isinstance(p, str) for p in params)):
            raise ValueError("parameters of the wrong shape")
        sets: list[Dataset] = []
        for d in raw_sets:
            if not isinstance(d, dict):
                raise ValueError("a dataset of the wrong shape")
            fid, sequence, loader = d.get("fit", ""), _number(d.get("sequence")), d.get("loader")
            if not (fid == "" or (isinstance(fid, str) and FIT_ID.fullmatch(fid))) or sequence is None \
                    or loader not in LOADERS[1:]:
                raise ValueError("a dataset of the wrong shape")
            sets.append(Dataset(str(d.get("file", ""))[:300], sequence, loader, fid, str(d.get("error", ""))[:1000]))
        files = data.get("files", [])
        if not isinstance(files, list) or not set(files) <= set(SERIES_FILES):
            raise ValueError("files that are not a series'")
        return cls(sid, name, str(data.get("file", ""))[:300], checked_settings(data.get("settings")),
                   data.get("chain") is True, data.get("adjust_bounds") is True, sets, [p[:200] for p in params],
                   _number(data.get("submitted")) or 0.0, state, _number(data.get("finished")), list(files))


def parse_sequence(text: str, count: int) -> list[float] | None:
    """The sequence values typed in the form (numbers separated by commas or spaces), one per data file;
    ``None`` for an empty field. :class:`SettingsError` for anything else."""
    words = [w for w in re.split(r"[,\s]+", text.strip()) if w]
    if not words:
        return None
    try:
        values = [float(w) for w in words]
    except ValueError:
        raise SettingsError("sequence: give one number per data file, separated by commas") from None
    if not all(math.isfinite(v) for v in values):
        raise SettingsError("sequence: every value must be a finite number")
    if len(values) != count:
        raise SettingsError(f"sequence: {len(values)} numbers for {count} data files")
    return values


class SeriesStore:
    """The series of one web process: ``root`` is its data folder's ``series/``; their fits are ``fits``'.

    Call :meth:`load` once on the event loop, after ``fits.load()``.
    """

    def __init__(self, root: str | os.PathLike[str], fits: FitStore) -> None:
        from orchester.journal.folder import private_directory

        self.root = Path(root)
        private_directory(self.root, "the series folder", FIT_ID)
        self.fits = fits
        self.series: dict[str, WebSeries] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._ended: dict[str, asyncio.Event] = {}  #: per fit id a chain waits for
        self._figures: dict[str, dict[str, Any]] = {}
        fits.finished.append(self._fit_ended)

    # ------------------------------------------------------------- reading back
    def load(self) -> int:
        """Read every series folder back; take up those not finished. Returns how many."""
        for d in sorted(self.root.iterdir(), key=lambda p: p.name) if self.root.is_dir() else []:
            if not FIT_ID.fullmatch(d.name):
                continue
            try:
                series = WebSeries.of(read_json(d / "series.json", MAX_SERIES_JSON))
                if series.id != d.name:
                    raise ValueError("its id is not its folder's name")
            except (OSError, ValueError, TypeError, RecursionError) as exc:
                log.warning("series folder %s skipped: %s", d.name, exc)
                continue
            self.series[series.id] = series
            if series.state == "running":
                self._start(series)
        return len(self.series)

    # ------------------------------------------------------------- new series
    async def add(self, filename: str, model: bytes, data: Sequence[tuple[str, bytes]],
                  form: Mapping[str, str]) -> WebSeries:
        """Check an uploaded model, its data files and the settings; keep them; start the series.

        :class:`~orchester.genx.inspect.ModelError` for a model that is not GenX's,
        :class:`SettingsError` for a bad setting or data file: nothing is kept or run then.
        """
        from orchester.genx.inspect import inspect_model

        if not data:
            raise SettingsError("no data files: send one or more as 'data'")
        if len(data) > MAX_DATASETS:
            raise SettingsError(f"at most {MAX_DATASETS} data files in one series")
        for name, content in data:
            if not content:
                raise SettingsError(f"{name[:100]}: the data file is empty")
            if len(content) > MAX_DATA_BYTES:
                raise SettingsError(f"{name[:100]}: larger than {MAX_DATA_BYTES >> 20} MiB")
        settings = parse_settings(form)
        chain, adjust = form_flag(form, "chain") is True, form_flag(form, "adjust_bounds") is True
        if adjust and not chain:
            raise SettingsError("adjust_bounds: only for a chained series (each fit starts from the previous)")
        try:
            values = sequence_values([n for n, _ in data], parse_sequence(form.get("sequence", ""), len(data)))
        except ValueError as exc:
            raise SettingsError(f"sequence: {exc}") from None
        with self.fits.reserve(min(len(data), WINDOW)):  # (a series keeps at most WINDOW fits in flight)
            info = await asyncio.get_running_loop().run_in_executor(INSPECTORS, self.fits.inspect or inspect_model,
                                                                    model)
        model_info = info.to_json() if hasattr(info, "to_json") else {}
        order = sorted(range(len(data)), key=lambda i: (values[i], i))
        sid = secrets.token_hex(16)
        series = WebSeries(sid, safe_name(filename), filename[:300], settings.kwargs(), chain, adjust,
                           [Dataset(data[i][0][:300], values[i], loader_of(Path(data[i][0]))) for i in order],
                           [str(p)[:200] for p in model_info.get("fit_parameters", [])][:10_000]
                           if isinstance(model_info, dict) else [], submitted=time.time())
        folder = self.root / sid
        folder.mkdir(mode=0o700)
        try:
            (folder / "data").mkdir(mode=0o700)
            _write_atomic(folder / "model.hgx", model)
            for k, i in enumerate(order):
                _write_atomic(folder / "data" / str(k), data[i][1])
            self._save(series)
        except BaseException:  # nothing kept of a series that is not started
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.series[sid] = series
        self._trim()
        self._start(series)
        return series

    def _start(self, series: WebSeries) -> None:
        self._running[series.id] = asyncio.get_running_loop().create_task(
            self._run(series), name=f"orchester-web-series-{series.id[:8]}")

    async def _run(self, series: WebSeries) -> None:
        """Submit the series' fits (at most :data:`WINDOW` at once, or one after another for a chain), wait
        for every one, write the series' files. A dataset whose fit cannot even be made is a row with its
        error; the rest go on; the series always ends."""
        self.fits.pinned.add(series.id)
        try:
            if any(not d.fit for d in series.datasets):  # every fit's id recorded before any is submitted
                for d in series.datasets:
                    d.fit = d.fit or secrets.token_hex(16)
                self._save(series)
            if series.chain:
                last: WebFit | None = None
                for k in range(len(series.datasets)):
                    fit = self._fit_of(series, k, last)
                    if fit is not None:
                        await self._until_ended(fit)
                        if fit.state == "done":
                            last = fit
            else:
                flight: list[WebFit] = []  # submitted, not ended
                for k in range(len(series.datasets)):
                    fit = self._fit_of(series, k, None)
                    if fit is not None:
                        flight.append(fit)
                    while len(flight) >= WINDOW or (flight and k == len(series.datasets) - 1):
                        await self._until_ended(flight[0])
                        flight = [f for f in flight if f.state in ("queued", "running")]
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug of ours: the series ends with the fits it has, never left running
            log.exception("series %s could not go on", series.id)
        finally:
            self._running.pop(series.id, None)
            self.fits.pinned.discard(series.id)
        try:
            series.files = await asyncio.get_running_loop().run_in_executor(WRITER, self._write, series)
        except Exception as exc:  # the series ends all the same: its fits have their own files
            log.warning("the files of series %s could not be written: %s", series.id, exc)
        series.state, series.finished = "done", time.time()
        try:
            self._save(series)
        except Exception as exc:  # (a full disk): a restarted web process takes it up again
            log.warning("series %s could not be saved: %s", series.id, exc)

    def _fit_of(self, series: WebSeries, k: int, last: WebFit | None) -> WebFit | None:
        """The fit of the series' ``k``-th dataset: the one it has (read back from its folder if need be),
        or a new one submitted (a chain's starting from ``last``, the previous fit that succeeded);
        ``None`` when it cannot be made (the dataset's row then says why)."""
        d = series.datasets[k]
        if d.error:
            return None
        fit = self.fits.recall(d.fit)
        if fit is not None:
            return fit
        folder = self.root / series.id
        start = start_from(last.parameters, series.adjust_bounds) if last is not None else {}
        try:
            return self.fits.add_member(
                series.id, f"{series.name}_{_safe(Path(d.file).stem)}", series.file, folder / "model.hgx", d.file,
                (folder / "data" / str(k)).read_bytes(), d.loader, d.sequence, FitSettings(**series.settings), start,
                d.fit)
        except Exception as exc:  # its files gone, a disk full, a start value out of range: this dataset only
            log.warning("series %s: the fit of %s could not be made: %s", series.id, d.file, exc)
            d.error = f"the fit could not be made: {type(exc).__name__}: {exc}"[:1000]
            with contextlib.suppress(Exception):
                self._save(series)
            return None

    async def _until_ended(self, fit: WebFit) -> None:
        if fit.state in ("done", "failed"):
            return
        event = self._ended.setdefault(fit.id, asyncio.Event())
        try:
            await event.wait()
        finally:
            self._ended.pop(fit.id, None)

    def _fit_ended(self, fit: WebFit) -> None:
        event = self._ended.get(fit.id)
        if event is not None:
            event.set()

    # ------------------------------------------------------------- what the pages show
    def _fit(self, d: Dataset) -> WebFit | None:
        """A dataset's fit, once it has one in memory."""
        return self.fits.fits.get(d.fit) if d.fit else None

    def rows(self, series: WebSeries) -> list[dict[str, Any]]:
        """One row per dataset, in the order of the sequence: its fit's state, figure of merit and
        fitted parameters (``{name, value, error}``), or its error."""
        out: list[dict[str, Any]] = []
        for d in series.datasets:
            fit = self._fit(d)
            row: dict[str, Any] = {"file": d.file, "sequence": d.sequence, "fit": d.fit if fit else "",
                                   "state": "waiting", "fom": None, "error": "", "generation": 0, "satellite": ""}
            if fit is not None:
                row.update(state=fit.state, fom=fit.fom, error=fit.error, generation=fit.generation,
                           satellite=fit.satellite)
            elif d.error:
                row.update(state="failed", error=d.error, fit="")
            row["parameters"] = [{"name": p["name"], "value": p["value"], "error": p["error"]}
                                 for p in (fit.parameters if fit is not None and fit.state == "done" else [])
                                 if p.get("value") is not None]
            out.append(row)
        return out

    def counts(self, series: WebSeries) -> dict[str, int]:
        """How many of the series' datasets wait, are queued, run, are done or failed."""
        out = dict.fromkeys(("waiting", "queued", "running", "done", "failed"), 0)
        for d in series.datasets:
            fit = self._fit(d)
            if fit is not None:
                out[fit.state] += 1
            else:
                out["failed" if d.error else "waiting"] += 1
        return out

    def json(self, series: WebSeries) -> dict[str, Any]:
        """The series as ``GET /api/series/{id}`` gives it."""
        done = [f for f in map(self._fit, series.datasets) if f is not None and f.state == "done"]
        return {**{k: v for k, v in series.json().items() if k != "datasets"}, "rows": self.rows(series),
                "counts": self.counts(series), "fom_name": done[0].fom_name if done else "fom"}

    def figure(self, series: WebSeries) -> dict[str, Any]:
        """The series' live figure (bokeh JSON, made once): each fitted parameter against the sequence."""
        from orchester.web.plots import series_figure

        item = self._figures.pop(series.id, None)
        if item is None:
            item = series_figure(series.parameters)
        self._figures[series.id] = item  # the newest last: the oldest are dropped
        while len(self._figures) > MAX_FIGURES:
            del self._figures[next(iter(self._figures))]
        return item

    def file(self, sid: str, name: str) -> Path | None:
        """The path of one of a finished series' files, or ``None`` (never a path outside its folder)."""
        series = self.series.get(sid)
        if series is None or name not in series.files:
            return None
        return self.root / sid / "out" / name

    # ------------------------------------------------------------- files
    def _write(self, series: WebSeries) -> list[str]:
        """``series.csv``, ``series.png`` and ``series.zip`` (those and every fit's files)."""
        out = self.root / series.id / "out"
        out.mkdir(mode=0o700, exist_ok=True)
        rows = []
        for r in self.rows(series):
            status = {"done": "done", "failed": "failed"}.get(r["state"], "interrupted")
            rows.append({"file": r["file"], "sequence": r["sequence"], "status": status,
                         "fom": "" if r["fom"] is None or status != "done" else f"{r['fom']:.10g}",
                         "error": r["error"] if status != "done" else "",
                         "result": {"parameters": [{"name": p["name"], "value": p["value"],
                                                    "error": p["error"] if p["error"] and None not in p["error"]
                                                    else None} for p in r["parameters"]]}})
        write_series(rows, out)
        names = [n for n in SERIES_FILES[:2] if (out / n).exists()]
        archive = out / "series.zip"
        part = out / f".series.{secrets.token_hex(4)}.part.zip"
        try:
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
                for n in names:
                    z.write(out / n, n)
                for k, d in enumerate(series.datasets):  # each fit's files but its fitted model (on its page)
                    fit = self._fit(d)
                    if fit is None:
                        continue
                    for n in fit.files:
                        if not n.endswith((".zip", ".hgx")):
                            with contextlib.suppress(OSError):
                                z.write(self.fits.root / fit.id / "out" / n, f"{k + 1:04d}_{fit.name}/{n}")
            os.replace(part, archive)
        finally:
            part.unlink(missing_ok=True)
        return [*names, archive.name]

    def _save(self, series: WebSeries) -> None:
        _write_atomic(self.root / series.id / "series.json", json.dumps(series.json(), allow_nan=False).encode())

    def _trim(self) -> None:
        """Forget the oldest finished series beyond :data:`MAX_SERIES` (their folders stay on disk)."""
        if len(self.series) <= MAX_SERIES:
            return
        for sid in [s.id for s in sorted(self.series.values(), key=lambda s: s.submitted)
                    if s.state == "done"][:len(self.series) - MAX_SERIES]:
            del self.series[sid]
            self._figures.pop(sid, None)

    async def close(self) -> None:
        """Stop taking the series on (their fits go on on the bus; a restarted web process takes them up)."""
        for t in list(self._running.values()):
            t.cancel()
        for t in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._running.clear()


