"""GenX fits from the browser: uploads checked, submitted to the bus, followed, written to disk.

Each fit lives in a folder of its own under the web process's data folder, named by its id (the
task's id: 128 random bits)::

    <data>/fits/<id>/fit.json       what the page shows (state, settings, figure of merit per generation)
    <data>/fits/<id>/model.hgx      the uploaded model, as uploaded
    <data>/fits/<id>/data           the data file a fit of a series reads instead of the model's own
                                    (:mod:`orchester.web.series`)
    <data>/fits/<id>/out/           the files ``orchester fit`` writes for the same model and settings
                                    (<name>.csv, <name>_params.csv, <name>_fom.csv, <name>.hgx, <name>.png),
                                    plot.json (the result page's figure) and <name>.zip (all of it)

``fit.json`` is replaced atomically at every change of state, the outputs are written all or
nothing (:func:`orchester.genx.fits.write_outputs`), so a web process killed at any moment leaves
fits that a restarted one reads back: a fit that was still running is asked of the bus again
(the orchestrator keeps results, and journals them when it has a journal).

An upload that is not a GenX model is refused (:class:`~orchester.genx.inspect.ModelError`)
before anything runs; settings are checked against the ranges ``orchester fit`` accepts.
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
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchester.client.aio import AsyncClient
from orchester.errors import OrchesterError, RemoteError, TaskFailed
from orchester.genx import FLAGS, MIN_POPULATION, RANGES, TRIAL_METHODS
from orchester.genx.fits import FitSettings, output_paths, write_outputs

log = logging.getLogger("orchester.web")

#: A fit's id: a task id of 32 hex digits.
FIT_ID = re.compile(r"[0-9a-f]{32}")
#: States of a fit, as the page shows them.
STATES = ("queued", "running", "done", "failed")
#: Most generations a fit from the browser may ask for, and most figure-of-merit points kept live.
MAX_GENERATIONS = 100_000
#: Most fits kept in memory (the oldest finished ones are forgotten first; their folders stay).
MAX_FITS = 10_000
#: Largest ``fit.json`` read back.
MAX_FIT_JSON = 64 * 1024 * 1024


class SettingsError(OrchesterError, ValueError):
    """A fit setting from the form out of range or of the wrong type (the page shows it; HTTP 400)."""


#: Each setting the form may send: (type, lowest, highest, whether the lowest is excluded).
_RANGES: dict[str, tuple[type, float, float, bool]] = {
    "generations": (int, 1, MAX_GENERATIONS, False),
    "population": (int, MIN_POPULATION, 10_000, False),
    "seed": (int, 0, 2**32 - 1, False),
    "km": (float, 0.0, 2.0, True),
    "kr": (float, 0.0, 1.0, False),
    "max_evaluations": (int, 1, 10**9, False),
    **{name: (float, *RANGES[name][:2], False) for name in ("min_spread", "max_seconds")},  # orchester fit's
}
#: The form's words for true and false.
_FLAG_WORDS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}


def form_flag(form: Mapping[str, str], name: str) -> bool | None:
    """A yes-or-no field of the form (``None`` when empty); :class:`SettingsError` for another word."""
    raw = form.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in _FLAG_WORDS:
        raise SettingsError(f"{name}: {raw[:40]!r} is not yes or no")
    return _FLAG_WORDS[raw]


def parse_settings(form: Mapping[str, str]) -> FitSettings:
    """:class:`FitSettings` from the form's fields (strings): what the user typed overrides the model
    file's own setting, an empty field leaves it to the file (as ``orchester fit`` without the flag).

    Anything out of range is a :class:`SettingsError` naming the field and the range, as
    ``orchester fit`` would refuse it.
    """
    values: dict[str, Any] = {}
    for name, (kind, lo, hi, open_lo) in _RANGES.items():
        raw = form.get(name, "").strip()
        if not raw:
            continue
        try:
            number = int(raw) if kind is int else float(raw)
        except ValueError:
            raise SettingsError(f"{name}: {raw[:40]!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(number) or number < lo or number > hi or (open_lo and number == lo):
            bound = f"more than {lo:g}" if open_lo else f"at least {lo:g}"
            raise SettingsError(f"{name}: {raw[:40]} is out of range ({bound} and at most {hi:g})")
        values[name] = number
    for name in FLAGS:
        flag = form_flag(form, name)
        if flag is not None:
            values[name] = flag
    method = form.get("method", "").strip()
    if method:
        if method not in TRIAL_METHODS:
            raise SettingsError(f"method: {method[:40]!r} is not one of {', '.join(TRIAL_METHODS)}")
        values["method"] = method
    try:
        return FitSettings(**values)
    except TypeError as exc:  # a default of a shape FitSettings does not take
        raise SettingsError(f"settings: {exc}") from None


def checked_settings(settings: Any) -> dict[str, Any]:
    """Settings read back from a record (a fit's or a series'): those the form would give, every one in
    range (:class:`ValueError` otherwise: a damaged or planted record never reaches the bus)."""
    if not isinstance(settings, dict) or len(settings) > 20:
        raise ValueError("settings of the wrong shape")
    try:
        checked = parse_settings({str(k): str(v) for k, v in settings.items()}).kwargs()
    except SettingsError as exc:
        raise ValueError(f"settings out of range: {exc}") from None
    if not set(settings) <= set(checked):
        raise ValueError("settings that the form does not give")
    return {k: checked[k] for k in settings}  # (as recorded: a default the record leaves out stays out)


def safe_name(filename: str) -> str:
    """A model's name for its output files: the upload's file name without folder or extension,
    letters, digits, ``-``, ``_`` and ``.`` only, at most 80 characters."""
    stem = Path(filename.replace("\\", "/").rsplit("/", 1)[-1]).stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    return name or "model"


@dataclass
class WebFit:
    """One fit as the web process follows it (its ``fit.json``)."""

    id: str
    name: str  #: the model's name (its output files are named after it)
    file: str  #: the uploaded file's name, as given (shown, never used as a path)
    settings: dict[str, Any]
    state: str = "queued"
    submitted: float = 0.0
    finished: float | None = None
    generation: int = 0
    fom: float | None = None
    fom_name: str = "fom"
    #: ``[generation, best figure of merit]`` as the fit reported them
    fom_history: list[list[float]] = field(default_factory=list)
    error: str = ""
    satellite: str = ""
    seconds: float | None = None
    files: list[str] = field(default_factory=list)
    #: the fitted parameters: ``{name, value, min, max, error: [low, high] | None}``
    parameters: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  #: what inspection read of the model
    total: int | None = None  #: generations the fit runs (from its progress: the model file's, or the form's)
    series: str = ""  #: the series it belongs to (its id), if any
    data: str = ""  #: the data file it fits (its name as uploaded: shown, never a path), if any
    loader: str = ""  #: GenX's data loader for that file (``default`` or ``orso``)
    sequence: float | None = None  #: its place in the series (temperature, time, ...)
    #: where it starts: per fitted parameter ``{value, min?, max?}`` (a chained series' previous result)
    start: dict[str, dict[str, float]] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        """The fit as ``GET /api/fits/{id}`` gives it."""
        return {"id": self.id, "name": self.name, "file": self.file, "settings": self.settings,
                "series": self.series, "data": self.data, "loader": self.loader, "sequence": self.sequence,
                "start": self.start,
                "state": self.state, "submitted": self.submitted, "finished": self.finished,
                "generation": self.generation, "generations": self.settings.get("generations") or self.total,
                "fom": self.fom, "fom_name": self.fom_name, "fom_history": self.fom_history,
                "error": self.error, "satellite": self.satellite, "seconds": self.seconds,
                "files": self.files, "parameters": self.parameters, "model": self.model}

    @classmethod
    def of(cls, data: Any) -> WebFit:
        """A fit read back from its ``fit.json``: every field checked (:class:`ValueError` on anything of
        the wrong shape: a damaged or planted file never reaches a path or a page)."""
        if not isinstance(data, dict):
            raise ValueError("not a fit record")
        fid, name, state = data.get("id"), data.get("name"), data.get("state")
        if not (isinstance(fid, str) and FIT_ID.fullmatch(fid) and state in STATES and isinstance(name, str)
                and name == safe_name(f"{name}.hgx")):
            raise ValueError("not a fit record (id, name or state)")
        files = data.get("files", [])
        if not isinstance(files, list) or not set(files) <= set(expected_files(name)):
            raise ValueError("files that are not this fit's")
        settings = checked_settings(data.get("settings"))
        history = data.get("fom_history", [])
        series, loader = data.get("series", ""), data.get("loader", "")
        if not (series == "" or (isinstance(series, str) and FIT_ID.fullmatch(series))) or loader not in LOADERS:
            raise ValueError("not a fit record (series or loader)")
        start = _start(data.get("start", {}))
        return cls(
            fid, name, str(data.get("file", ""))[:300], settings, state,
            _number(data.get("submitted")) or 0.0, _number(data.get("finished")),
            int(_number(data.get("generation")) or 0), _number(data.get("fom")), str(data.get("fom_name", "fom"))[:40],
            list(_pairs(history))[:MAX_GENERATIONS] if isinstance(history, list) else [],
            str(data.get("error", ""))[:4000], str(data.get("satellite", ""))[:200], _number(data.get("seconds")),
            list(files),
            [_parameter(p) for p in data.get("parameters", [])[:10_000] if isinstance(p, dict)]
            if isinstance(data.get("parameters"), list) else [],
            {}, series=series, data=str(data.get("data", ""))[:300], loader=loader,
            sequence=_number(data.get("sequence")), start=start)


#: GenX's data loaders a fit's data file may be read with ("": the fit has no data file of its own).
LOADERS = ("", "default", "orso")


def _start(value: Any) -> dict[str, dict[str, float]]:
    """A fit's start values read back: parameter names to ``{value, min?, max?}`` of finite numbers."""
    if not isinstance(value, dict) or len(value) > 10_000:
        raise ValueError("start values of the wrong shape")
    out: dict[str, dict[str, float]] = {}
    for name, change in value.items():
        if not (isinstance(name, str) and 0 < len(name) <= 200 and isinstance(change, dict)
                and set(change) <= {"value", "min", "max"}):
            raise ValueError("start values of the wrong shape")
        numbers = {k: _number(v) for k, v in change.items()}
        if any(v is None for v in numbers.values()):
            raise ValueError("start values that are not finite numbers")
        out[name] = {k: float(v) for k, v in numbers.items() if v is not None}
    return out


Inspect = Callable[[bytes], Any]
#: The threads that wait for model inspections (each runs a child process): two at a time.
INSPECTORS = ThreadPoolExecutor(2, thread_name_prefix="orchester-inspect")
#: The one thread that writes fits' files: matplotlib (the PNG) and bokeh (the figure) are not
#: thread-safe, and two fits that end together must not draw at once.
WRITER = ThreadPoolExecutor(1, thread_name_prefix="orchester-fit-files")


class FitStore:
    """The fits of one web process: ``root`` is its data folder's ``fits/``.

    ``client`` submits and follows them; ``inspect`` checks an upload (by default
    :func:`orchester.genx.inspect.inspect_model`, in a child process). Call :meth:`load` once on
    the event loop, feed progress events to :meth:`on_event`.
    """

    def __init__(self, root: str | os.PathLike[str], client: AsyncClient, *, inspect: Inspect | None = None,
                 max_running: int = 1000) -> None:
        from orchester.journal.folder import private_directory

        self.root = Path(root)
        private_directory(self.root, "the fits folder", FIT_ID)  # another user's folder is refused
        self.client = client
        self.inspect = inspect
        self.max_running = max_running
        self.fits: dict[str, WebFit] = {}
        #: called with each fit that ends (done or failed), after its ``fit.json`` is written
        self.finished: list[Callable[[WebFit], None]] = []
        #: series (ids) under way: their fits are never forgotten from memory (:meth:`_trim`)
        self.pinned: set[str] = set()
        self._checking = 0
        self._waiting: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------- reading back
    def load(self) -> int:
        """Read every fit folder back; follow again the fits that were not finished. Returns how many."""
        for d in sorted(self.root.iterdir(), key=lambda p: p.name) if self.root.is_dir() else []:
            if not FIT_ID.fullmatch(d.name):
                continue
            try:
                fit = WebFit.of(read_json(d / "fit.json", MAX_FIT_JSON))
                if fit.id != d.name:
                    raise ValueError("its id is not its folder's name")
            except (OSError, ValueError, TypeError, RecursionError) as exc:
                log.warning("fit folder %s skipped: %s", d.name, exc)
                continue
            self.fits[fit.id] = fit
            if fit.state in ("queued", "running"):
                self._follow(fit, None)
        return len(self.fits)

    # ------------------------------------------------------------- new fits
    async def add(self, filename: str, data: bytes, form: Mapping[str, str]) -> WebFit:
        """Check an uploaded model and its settings, keep it, submit its fit; the new fit.

        :class:`~orchester.genx.inspect.ModelError` for a file that is not a GenX model,
        :class:`SettingsError` for a bad setting: nothing is kept or run then.
        """
        if self.waiting() >= self.max_running:
            raise SettingsError(f"{self.max_running} fits are already waiting or running: wait for some to finish")
        self._checking += 1  # counted while its model is checked: concurrent uploads never pass the cap together
        try:
            return await self._add(filename, data, form)
        finally:
            self._checking -= 1

    async def _add(self, filename: str, data: bytes, form: Mapping[str, str]) -> WebFit:
        from orchester.genx.inspect import inspect_model

        info = await asyncio.get_running_loop().run_in_executor(INSPECTORS, self.inspect or inspect_model, data)
        settings = parse_settings(form)
        fid = secrets.token_hex(16)
        model_info = info.to_json() if hasattr(info, "to_json") else {}
        fit = WebFit(fid, safe_name(filename), filename[:300], settings.kwargs(), submitted=time.time(),
                     model=model_info if isinstance(model_info, dict) else {})
        folder = self.root / fid
        folder.mkdir(mode=0o700)
        _write_atomic(folder / "model.hgx", data)
        return self._submit(fit, data, settings.kwargs())

    def waiting(self) -> int:
        """Fits waiting or running, and uploads being checked (against ``max_running``)."""
        return sum(f.state in ("queued", "running") for f in self.fits.values()) + self._checking

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[None]:
        """Count ``count`` fits against ``max_running`` while they are checked (a series' upload):
        concurrent uploads never pass the cap together. :class:`SettingsError` when they would."""
        waiting = self.waiting()
        if waiting + count > self.max_running:
            raise SettingsError(f"{waiting} fits are already waiting or running (at most {self.max_running}): "
                                "wait for some to finish")
        self._checking += count
        try:
            yield
        finally:
            self._checking -= count

    def recall(self, fid: str) -> WebFit | None:
        """A fit forgotten from memory (or never read back), read from its folder again; ``None`` when it
        has none. One that was not finished is followed again."""
        fit = self.fits.get(fid)
        if fit is not None or not FIT_ID.fullmatch(fid):
            return fit
        try:
            fit = WebFit.of(read_json(self.root / fid / "fit.json", MAX_FIT_JSON))
            if fit.id != fid:
                raise ValueError("its id is not its folder's name")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, RecursionError) as exc:
            log.warning("fit folder %s skipped: %s", fid, exc)
            return None
        self.fits[fid] = fit
        if fit.state in ("queued", "running"):
            self._follow(fit, None)
        return fit

    def add_member(self, series: str, name: str, filename: str, model_file: Path, data_name: str, data: bytes,
                   loader: str, sequence: float, settings: FitSettings, start: dict[str, dict[str, float]],
                   fid: str) -> WebFit:
        """Keep and submit one fit of a series (:mod:`orchester.web.series`), of id ``fid`` (the series
        records it first: a series taken up again never fits a dataset twice): the model in
        ``model_file`` (already checked; the fit's folder links to it) fitted to the data file ``data``
        read by GenX's ``loader``, starting from ``start``; the new fit. A fit the bus does not take is
        kept as failed, with the reason. :class:`ValueError` for a fit that exists."""
        if loader not in LOADERS[1:] or not FIT_ID.fullmatch(fid):
            raise ValueError(f"unknown data loader {loader!r} or a fit id of the wrong shape")
        fit = WebFit(fid, safe_name(f"{name}.hgx"), filename[:300], settings.kwargs(), submitted=time.time(),
                     series=series, data=data_name[:300], loader=loader, sequence=sequence, start=start)
        folder = self.root / fid
        folder.mkdir(mode=0o700, exist_ok=True)  # (a series taken up again may have made it, never its fit.json)
        if (folder / "fit.json").exists():
            raise ValueError(f"fit {fid} exists already")
        _link_or_copy(model_file, folder / "model.hgx")  # the series' one copy of the model, linked
        _write_atomic(folder / "data", data)
        return self._submit(fit, model_file.read_bytes(), self._kwargs(fit, data))

    def _submit(self, fit: WebFit, model: bytes, kwargs: dict[str, Any]) -> WebFit:
        """Keep a new fit (its folder is written) and submit it; one the bus does not take fails, with the reason."""
        self._save(fit)
        self.fits[fit.id] = fit
        try:
            fut = self.client.submit_nowait("genx.fit", model, task_id=fit.id, **kwargs)
        except (OrchesterError, ValueError) as exc:
            self._finish(fit, "failed", error=f"not submitted: {exc}")
            return fit
        self._follow(fit, fut)
        self._trim()
        return fit

    def _kwargs(self, fit: WebFit, data: bytes | None) -> dict[str, Any]:
        """The ``genx.fit`` keywords of a fit: its settings, its data file, its start values."""
        kwargs = dict(fit.settings)
        if fit.loader:
            if data is None:
                data = (self.root / fit.id / "data").read_bytes()
            kwargs["data"] = {"name": fit.data or "data", "content": data, "loader": fit.loader}
        if fit.start:
            kwargs["fit"] = {name: dict(change) for name, change in fit.start.items()}
        return kwargs

    def _follow(self, fit: WebFit, fut: Any) -> None:
        self._waiting[fit.id] = asyncio.get_running_loop().create_task(self._wait(fit, fut),
                                                                         name=f"orchester-web-fit-{fit.id[:8]}")

    async def _wait(self, fit: WebFit, fut: Any) -> None:
        """Wait for a fit's result (from its future, or asked of the bus after a restart); write its files.

        Whatever goes wrong ends the fit as failed, with the reason: never a fit left running."""
        try:
            await self._follow_result(fit, fut)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a result of a shape nothing foresaw: this fit fails, not the process
            log.exception("fit %s could not be finished", fit.id)
            self._finish(fit, "failed", error=f"the result could not be read: {type(exc).__name__}")

    async def _follow_result(self, fit: WebFit, fut: Any) -> None:
        try:
            result = await (fut if fut is not None else self._ask_again(fit))
        except TaskFailed as exc:
            self._finish(fit, "failed", error=f"{exc.type}: {exc.message}", satellite=exc.satellite or "")
            return
        except (RemoteError, OrchesterError, TimeoutError) as exc:
            self._finish(fit, "failed", error=str(exc) or type(exc).__name__)
            return
        finally:
            self._waiting.pop(fit.id, None)
        if not isinstance(result, dict):
            self._finish(fit, "failed", error="the result is not a fit's")
            return
        try:
            files = await asyncio.get_running_loop().run_in_executor(WRITER, self._write, fit, result)
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
            self._finish(fit, "failed", error=f"the result could not be written: {type(exc).__name__}: {exc}"[:500])
            return
        fit.fom = _number(result.get("fom"))
        fit.fom_name = str(result.get("fom_name", "fom"))[:40]
        fit.fom_history = _pairs(result.get("fom_history"))[:MAX_GENERATIONS]
        generations = _number(result.get("generations"))
        fit.generation = int(min(generations, MAX_GENERATIONS)) if generations is not None else fit.generation
        fit.seconds = _number(result.get("seconds"))
        fit.files = files
        if not fit.satellite:  # (a progress event names it, when the satellite says)
            with contextlib.suppress(OrchesterError, TimeoutError):
                sat = (await self.client.show(fit.id, timeout=5)).get("satellite")
                fit.satellite = sat[:200] if isinstance(sat, str) else ""
        params = result.get("parameters")
        fit.parameters = [_parameter(p) for p in params[:10_000] if isinstance(p, dict)] if isinstance(params, list) \
            else []
        self._finish(fit, "done")

    async def _ask_again(self, fit: WebFit) -> Any:
        """The result of a fit read back: asked of the bus; a fit the bus does not know (the web process
        was stopped before it was sent) is submitted again from its folder, with the same id."""
        try:
            return await self.client.result(fit.id)
        except RemoteError as exc:
            if exc.code != "unknown_task":
                raise
        model = (self.root / fit.id / "model.hgx").read_bytes()
        log.info("fit %s was never accepted by the bus: submitted again", fit.id)
        return await self.client.submit_nowait("genx.fit", model, task_id=fit.id, **self._kwargs(fit, None))

    def _write(self, fit: WebFit, result: dict[str, Any]) -> list[str]:
        """The result's files (those of ``orchester fit``), its figure and a zip of it all: the file names."""
        out = self.root / fit.id / "out"
        finals = write_outputs(fit.name, result, out)
        from orchester.web.plots import result_figure

        _write_atomic(out / "plot.json", json.dumps(result_figure(fit.name, result)).encode())
        archive = out / f"{fit.name}.zip"
        part = out / f".{fit.name}.{secrets.token_hex(4)}.part.zip"
        try:
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
                for p in finals:
                    z.write(p, p.name)
            os.replace(part, archive)
        finally:
            part.unlink(missing_ok=True)
        return [p.name for p in finals] + [archive.name]

    def _finish(self, fit: WebFit, state: str, *, error: str = "", satellite: str = "") -> None:
        fit.state = state
        fit.finished = time.time()
        fit.error = error[:4000]
        if satellite:
            fit.satellite = satellite[:200]
        self._save(fit)
        for call in list(self.finished):
            try:
                call(fit)
            except Exception:  # a listener's bug: logged, the fit stays ended
                log.exception("a listener of fit %s failed", fit.id)

    def _save(self, fit: WebFit) -> None:
        _write_atomic(self.root / fit.id / "fit.json", json.dumps(fit.json(), allow_nan=False).encode())

    def _trim(self) -> None:
        """Forget the oldest finished fits beyond :data:`MAX_FITS` (their folders stay on disk)."""
        if len(self.fits) <= MAX_FITS:
            return
        for fid in [f.id for f in sorted(self.fits.values(), key=lambda f: f.submitted)
                    if f.state in ("done", "failed") and f.series not in self.pinned][:len(self.fits) - MAX_FITS]:
            del self.fits[fid]

    # ------------------------------------------------------------- progress
    def on_event(self, topic: str, data: dict[str, Any]) -> None:
        """A bus event: a fit's progress (generation, figure of merit) or its task's state."""
        if topic.startswith("progress:"):
            fit = self.fits.get(topic[9:])
            if fit is None or fit.state not in ("queued", "running"):
                return
            gen, fom = data.get("generation"), data.get("fom")
            fit.state = "running"
            sat = data.get("sat")
            if isinstance(sat, str) and sat:
                fit.satellite = sat[:200]
            total = data.get("total")
            if isinstance(total, int) and not isinstance(total, bool) and 0 < total <= MAX_GENERATIONS:
                fit.total = total
            if isinstance(gen, (int, float)) and not isinstance(gen, bool) and math.isfinite(gen):
                fit.generation = int(max(0, min(gen, MAX_GENERATIONS)))
                if isinstance(fom, (int, float)) and not isinstance(fom, bool) and math.isfinite(fom):
                    fit.fom = float(fom)
                    if len(fit.fom_history) < MAX_GENERATIONS:
                        fit.fom_history.append([float(fit.generation), float(fom)])
        elif topic.startswith("task:"):
            fit = self.fits.get(topic[5:])
            if fit is not None and fit.state == "queued" and data.get("state") in ("dispatched", "running"):
                fit.state = "running"
                sat = data.get("sat")
                if isinstance(sat, str):
                    fit.satellite = sat[:200]

    # ------------------------------------------------------------- files
    def file(self, fid: str, name: str) -> Path | None:
        """The path of one of a finished fit's files, or ``None`` (never a path outside its folder)."""
        fit = self.fits.get(fid)
        if fit is None or name not in fit.files:
            return None
        return self.root / fid / "out" / name

    def figure(self, fid: str) -> bytes | None:
        """A finished fit's figure (bokeh JSON), or ``None``."""
        fit = self.fits.get(fid)
        if fit is None or fit.state != "done":
            return None
        try:
            return (self.root / fid / "out" / "plot.json").read_bytes()
        except OSError:
            return None

    async def close(self) -> None:
        """Stop following the fits (they go on on the bus; a restarted web process follows them again)."""
        for t in list(self._waiting.values()):
            t.cancel()
        for t in list(self._waiting.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._waiting.clear()


def expected_files(name: str) -> list[str]:
    """The names of the files a finished fit of model ``name`` offers."""
    return [p.name for p in output_paths(name, ".", sld=True, orso=True)] + [f"{name}.zip"]


def _number(v: Any) -> float | None:
    """A finite number, or ``None``."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _parameter(p: dict[str, Any]) -> dict[str, Any]:
    """A fitted parameter as the page shows it (numbers finite or ``None``)."""
    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    err = p.get("error")
    return {"name": str(p.get("name", ""))[:200], "value": num(p.get("value")), "min": num(p.get("min")),
            "max": num(p.get("max")),
            "error": [num(err[0]), num(err[1])] if isinstance(err, (list, tuple)) and len(err) == 2 else None}


def _pairs(history: Any) -> list[list[float]]:
    """``[generation, figure of merit]`` pairs of finite numbers (anything else is left out)."""
    import numpy as np

    try:
        arr = np.asarray(history, dtype=float).reshape(-1, 2)
    except (TypeError, ValueError):
        return []
    return [[g, v] for g, v in arr.tolist() if math.isfinite(g) and math.isfinite(v)]


def read_json(path: Path, limit: int) -> Any:
    """A record read back from ``path``: JSON of at most ``limit`` bytes (:class:`ValueError` beyond, or
    for anything that is not JSON; :class:`OSError` when it cannot be read)."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit >> 20} MB")
    return json.loads(raw)


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` the same file as ``source`` (a hard link), or a copy where links do not work."""
    part = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        try:
            os.link(source, part)
        except OSError:
            _write_atomic(part, source.read_bytes())
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (a temporary file in the same folder, then renamed)."""
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
