"""The ``genx.fit`` task kind: a GenX differential-evolution fit in a satellite's worker process.

This module is the only importer of ``genx`` (the ``genx3`` package, headless). It is
registered on satellites that can import it (``satellites.builtins`` loads it when GenX is
installed). Input: the model file's bytes (``.hgx``) and the fit settings; output: a map
with the fitted parameters, the figure of merit and its history, every dataset's curves
(numpy arrays: zero-copy frames), the fitted model file, the GenX version and the wall time.

Loading a model runs the Python script embedded in it: a fit request is code from the
submitter. Only let trusted clients submit ``genx.fit`` tasks.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any

import numpy as np

from orchester.genx import TRIAL_METHODS as _TRIAL_METHODS

from .context import progress
from .registry import task

#: Seconds without a new generation after which a fit counts as stalled (tracker).
STALL_TIMEOUT = 300.0
#: GenX's differential-evolution trial methods (one list, in :mod:`orchester.genx`, which imports no GenX).
TRIAL_METHODS = _TRIAL_METHODS


def genx_version() -> str:
    """The installed GenX version (read from the package metadata: GenX is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genx3")
    except PackageNotFoundError:
        from genx.version import __version__

        return str(__version__)


def _callbacks(started: float, max_seconds: float | None) -> Any:
    from genx.solver_basis import GenxOptimizerCallback

    class Progress(GenxOptimizerCallback):
        """Per-generation progress to the orchestrator (the tracker's task-progress signal), and
        the wall-time stop rule (``max_seconds``: GenX stops before its next generation)."""

        def __init__(self) -> None:
            self.optimizer: Any = None
            self.generation = 0
            self.timed_out = False

        def text_output(self, text: str) -> None:
            """GenX's status lines: progress carries what matters."""

        def plot_output(self, update_data: Any) -> None:
            self.generation += 1
            opt = self.optimizer
            evals = int(getattr(opt, "n_fom", 0) or 0)
            elapsed = max(time.perf_counter() - started, 1e-9)
            total = int(getattr(opt, "max_gen", 0) or 0) if opt is not None else 0
            # GenX reports the initial population first: generations go 0 (that one) to ``total``
            progress(generation=self.generation - 1, total=total, fom=float(update_data.fom_value),
                     evaluations=evals, evals_per_s=round(evals / elapsed, 1))
            if max_seconds is not None and elapsed >= max_seconds and opt is not None:
                self.timed_out = True
                opt.stop = True

        def parameter_output(self, param_info: Any) -> None:
            """Parameter updates: the result carries the best values."""

        def fitting_ended(self, result_data: Any) -> None:
            """The end of the fit: :func:`genx_fit` continues synchronously after ``optimize()``."""

        def autosave(self) -> None:
            """GenX's autosave: the fitted model is returned, never written behind the user's back."""

    return Progress()


#: GenX's differential-evolution settings a model file stores (``genx.diffev.DiffEvConfig``) that decide
#: a fit: each is read from the file unless an argument names it.
FILE_SETTINGS = ("km", "kr", "create_trial", "use_pop_mult", "pop_size", "pop_mult", "use_max_generations",
                 "max_generations", "max_generation_mult", "use_start_guess", "use_boundaries", "min_parameter_spread")


def _file_settings(o: Any) -> dict[str, Any]:
    """The model file's settings as GenX read them (plain values)."""
    out: dict[str, Any] = {}
    for name in FILE_SETTINGS:
        value = getattr(o, name)
        if not isinstance(value, (bool, str)):
            value = float(value) if isinstance(value, float) else int(value)
        out[name] = value
    return out


def _reset_genx_config() -> None:
    """GenX's configuration (a module global) back to its shipped default profile, as ``genx --run`` starts:
    a model file without a stored config then fits as GenX would fit it, whatever this worker fitted before."""
    import genx
    from genx.core import config as io

    io.config.load_default(os.path.join(os.path.dirname(os.path.abspath(genx.__file__)), "profiles",
                                        "default.profile"), reset=True)


#: The GenX data loaders a series fit may use (``genx.plugins.data_loaders``).
DATA_LOADERS = ("default", "orso")


def _load_data(model: Any, data: Any, tmp: str) -> None:
    """Replace one dataset's data with a data file's (see :func:`genx_fit`); a clear ``ValueError`` when
    the file cannot be read or gives no points."""
    import importlib

    from orchester.genx import MAX_DATA_BYTES

    if not isinstance(data, dict):
        raise ValueError("data must be a map of name, content, loader and dataset")
    name, content = data.get("name"), data.get("content")
    loader, index = data.get("loader", "default"), data.get("dataset", 0)
    if not isinstance(name, str) or not isinstance(content, (bytes, bytearray, memoryview)):
        raise ValueError("data needs a file name and its content (bytes)")
    if len(content) > MAX_DATA_BYTES:
        raise ValueError(f"the data file is larger than {MAX_DATA_BYTES // 2**20} MiB")
    if loader not in DATA_LOADERS:
        raise ValueError(f"unknown data loader {loader!r}; use one of {DATA_LOADERS}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(model.data):
        raise ValueError(f"the model has no dataset {index!r} (it has {len(model.data)})")
    suffix = os.path.splitext(name)[1][:16] if loader == "default" else ".ort"
    path = os.path.join(tmp, "data" + "".join(c for c in suffix if c.isalnum() or c == "."))
    with open(path, "wb") as f:
        f.write(bytes(content))
    plugin = importlib.import_module(f"genx.plugins.data_loaders.{loader}").Plugin(None)
    plugin.SetStatusText = lambda text: None  # (GenX's loaders report to a window's status bar)
    dataset = model.data[index]
    dataset.x_raw = np.zeros(0)
    try:
        plugin.LoadData(dataset, path)
    except Exception as exc:
        raise ValueError(f"cannot read the data file {name!r} with GenX's {loader} loader: "
                         f"{type(exc).__name__}: {exc}") from None
    if len(getattr(dataset, "x_raw", ())) == 0:
        raise ValueError(f"cannot read the data file {name!r} with GenX's {loader} loader: no data points "
                         f"(the default loader reads whitespace-separated columns x, y, error)")
    dataset.name = os.path.splitext(os.path.basename(name))[0][:100] or dataset.name
    dataset.run_command()


def _plain(value: Any) -> float | str:
    """A parameter grid cell as a number when it is one (GenX keeps them as numbers or text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if np.isfinite(number) else str(value)


def _label(model: Any, axis: str) -> str:
    """The axis label the model's script (its GenX model library) sets, as GenX's own plot reads it
    (``__xlabel__``/``__ylabel__``; ``""`` when it sets none)."""
    try:
        text = model.eval_in_model(f'globals().get("__{axis}label__", getattr(model, "__{axis}label__", ""))')
    except Exception:
        try:
            text = model.eval_in_model(f'globals().get("__{axis}label__", "")')
        except Exception:
            return ""
    return str(text)[:200] if isinstance(text, str) else ""


def _orso(model: Any, tmp: str) -> bytes | None:
    """The data and the fitted curve in the field's exchange format, an ORSO ``.ort`` file, as GenX's own
    export writes it (the model's layers, its script and parameters in the header); ``None`` for a model
    GenX cannot export (not a reflectivity model). GenX describes the layers only when the script names
    each stack; otherwise the file has everything but that description."""
    import contextlib
    import io

    base = os.path.join(tmp, "export")
    for attempt in range(2):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                model.export_orso(base)
            break
        except Exception:
            if attempt:
                return None
            model.create_simple_model = lambda: None  # (this model object only: it is thrown away after the fit)
    for path in (base, base + ".ort"):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return None


def _sld_profile(model: Any) -> dict[str, Any] | None:
    """The scattering length density profile, where the model's script provides one (GenX's reflectivity
    models: ``sample.SimSLD``): depth ``z``, one real-valued array per part (``Re``, ``Im``, …), the unit."""
    try:
        sm = model.script_module
        raw = sm.sample.SimSLD(None, None, sm.inst)
    except Exception:  # a model without a layered sample (a peak fit, a surface diffraction model)
        return None
    if not isinstance(raw, dict) or "z" not in raw:
        return None
    z = np.asarray(raw["z"], dtype=float)
    parts: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        if key in ("z", "SLD unit") or not isinstance(key, str):
            continue
        try:
            arr = np.asarray(value)
        except Exception:
            continue
        if arr.shape != z.shape or not np.issubdtype(arr.dtype, np.number):
            continue
        arr = np.real(arr).astype(float)
        if np.all(arr == 0) or not np.all(np.isfinite(arr)):
            continue
        parts[key[:40]] = arr
    if not parts or z.size == 0:
        return None
    return {"z": z, "parts": parts, "unit": str(raw.get("SLD unit", ""))[:60]}


def _checked(**given: Any) -> dict[str, Any]:
    """The settings given (not ``None``), checked (:func:`orchester.genx.setting_error`): a bad one is a
    clear :class:`ValueError`."""
    from orchester.genx import check_setting, setting_error

    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        why = setting_error(name, value)
        if why is not None:
            raise ValueError(why)
        out[name] = check_setting(name, value)
    return out


def _apply_overrides(model: Any, overrides: dict[str, dict[str, Any]]) -> None:
    """Change which parameters are fitted and their value and bounds, by parameter name."""
    pars = model.parameters
    rows = {pars.get_value(r, 0): r for r in range(pars.get_len_rows()) if pars.get_value(r, 0)}
    columns = {"value": 1, "fit": 2, "min": 3, "max": 4}
    for name, changes in overrides.items():
        if name not in rows:
            raise ValueError(f"the model has no parameter {name!r}; it has {sorted(rows)}")
        if not isinstance(changes, dict):
            raise ValueError(f"override of {name!r} must be a map of value/fit/min/max")
        for key, value in changes.items():
            if key not in columns:
                raise ValueError(f"unknown override {key!r} for {name!r}; use value, fit, min or max")
            pars.set_value(rows[name], columns[key], bool(value) if key == "fit" else float(value))


@task("genx.fit", reports_progress=True, stall_timeout=STALL_TIMEOUT, version=genx_version())
def genx_fit(model: bytes, generations: int | None = None, population: int | None = None, seed: int = 0,
             km: float | None = None, kr: float | None = None, method: str | None = None,
             fit: dict[str, dict[str, Any]] | None = None, fom: str | None = None,
             max_evaluations: int | None = None, start_guess: bool | None = None,
             boundaries: bool | None = None, min_spread: float | None = None,
             max_seconds: float | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit a GenX model (``.hgx`` bytes) by differential evolution, as GenX itself would; deterministic
    for a seed.

    Every optimizer setting comes from the model file (as ``genx --run`` reads it) unless an
    argument names it: ``generations`` (a fixed number, instead of the file's), ``population``
    (a fixed size), ``km``, ``kr``, ``method`` (the trial method), ``start_guess`` (the file's
    values are the first member), ``boundaries`` (fit within the bounds), ``min_spread`` (stop
    when every parameter's spread in the population is below this percentage of its range).
    ``max_evaluations`` sets the generations from a budget of figure-of-merit evaluations;
    ``max_seconds`` stops the fit after that much wall time (at the end of a generation). The
    result's ``settings`` says the value used for each and where it came from (``file`` or
    ``argument``); ``genx_settings`` has the file's own.

    ``data`` (``{"name", "content", "loader", "dataset"}``) replaces one dataset's data (the
    first by default) with a data file's, read by GenX's own data loader (``default``: columns
    x, y, error; ``orso``: an ORSO ``.ort`` file, through orsopy); the model's transforms of
    that dataset apply. The parameters' values before the fit are the result's ``start``.
    """
    from . import genx_numba

    genx_numba.apply_in_worker()  # numba off for this satellite: GenX's numpy kernels (before GenX loads)
    from genx.diffev import DiffEv
    from genx.model_control import ModelController

    if not isinstance(model, (bytes, bytearray, memoryview)) or len(model) == 0:
        raise ValueError("model must be the bytes of a GenX .hgx file")
    if method is not None and method not in TRIAL_METHODS:
        raise ValueError(f"unknown differential-evolution method {method!r}; use one of {TRIAL_METHODS}")
    given = _checked(generations=generations, population=population, km=km, kr=kr, start_guess=start_guess,
                     boundaries=boundaries, min_spread=min_spread, max_evaluations=max_evaluations,
                     max_seconds=max_seconds)
    seed = int(seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genx-fit-") as tmp:
        path = os.path.join(tmp, "model.hgx")
        with open(path, "wb") as f:
            f.write(bytes(model))
        _reset_genx_config()
        opt = DiffEv()
        ctrl = ModelController(opt)
        cb = _callbacks(started, given.get("max_seconds"))
        cb.optimizer = opt
        ctrl.set_callbacks(cb)
        try:
            ctrl.load_file(path)
        except Exception as exc:
            raise ValueError(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
        if ctrl.optimizer is not opt:  # a file saved with another solver: fitted with DiffEv, the file's settings
            ctrl.optimizer = opt
            opt.ReadConfig()
        m = ctrl.model
        if data is not None:
            _load_data(m, data, tmp)
        if fit:
            _apply_overrides(m, fit)
        if fom:
            m.fomfunction = fom
        m.simulate()
        fom_start = float(m.fom)
        _, fitted, first, _, _ = m.parameters.get_fit_pars()
        start = {str(n): float(v) for n, v in zip(fitted, first, strict=True)}
        o = opt.opt
        stored = _file_settings(o)
        sources = {name: "file" for name in ("generations", "population", "km", "kr", "method", "start_guess",
                                             "boundaries", "min_spread")}
        if "generations" in given:
            o.use_max_generations, o.max_generations = True, given["generations"]
            sources["generations"] = "argument"
        if "population" in given:
            o.use_pop_mult, o.pop_size = False, given["population"]
            sources["population"] = "argument"
        for name, attr in (("km", "km"), ("kr", "kr"), ("start_guess", "use_start_guess"),
                           ("boundaries", "use_boundaries"), ("min_spread", "min_parameter_spread")):
            if name in given:
                setattr(o, attr, given[name])
                sources[name] = "argument"
        if method is not None:
            o.create_trial = method
            sources["method"] = "argument"
        o.use_parallel_processing = False  # one fit per worker: the satellite runs them side by side
        o.use_mpi = False
        o.use_autosave = False
        np.random.seed(seed)  # differential evolution draws from numpy's global generator
        opt.reset()
        opt.init_fitting(m)
        if "max_evaluations" in given:  # a budget of figure-of-merit evaluations instead of generations
            opt.max_gen = max(1, given["max_evaluations"] // max(opt.n_pop, 1) - 1)
            sources["generations"] = "max_evaluations"
        if opt.n_pop < 5:
            raise ValueError(f"the population would be {opt.n_pop} (GenX needs at least 5): give a population")
        opt.stop = False
        try:
            opt.optimize()
        finally:
            opt.running = False
        if opt.error:
            raise RuntimeError(f"GenX fit failed: {opt.error}")
        best_fom = float(opt.best_fom)
        if not np.isfinite(best_fom):
            raise ValueError(f"the fit produced a non-finite figure of merit ({best_fom})")
        used = {"generations": int(opt.max_gen), "population": int(opt.n_pop), "km": float(o.km), "kr": float(o.kr),
                "method": str(o.create_trial), "start_guess": bool(o.use_start_guess),
                "boundaries": bool(o.use_boundaries), "min_spread": float(o.min_parameter_spread)}
        settings = {name: {"value": value, "source": sources[name]} for name, value in used.items()}
        if "max_seconds" in given:
            settings["max_seconds"] = {"value": given["max_seconds"], "source": "argument"}
        names = list(m.parameters.get_fit_pars()[1])
        values = np.asarray(opt.best_vec, dtype=float)
        m.parameters.set_value_pars(values)
        m.simulate()
        params = []
        for i, name in enumerate(names):
            row = next(r for r in range(m.parameters.get_len_rows()) if m.parameters.get_value(r, 0) == name)
            try:
                low, high = opt.calc_error_bar(i)
                error: list[float] | None = [float(low), float(high)]
            except Exception:  # GenX cannot always compute them (too few evaluations)
                error = None
            params.append({"name": name, "value": float(values[i]), "min": float(m.parameters.get_value(row, 3)),
                           "max": float(m.parameters.get_value(row, 4)), "error": error})
        grid = m.parameters
        every = [{"name": str(grid.get_value(r, 0)), "value": _plain(grid.get_value(r, 1)),
                  "fit": bool(grid.get_value(r, 2)), "min": _plain(grid.get_value(r, 3)),
                  "max": _plain(grid.get_value(r, 4))}
                 for r in range(grid.get_len_rows()) if str(grid.get_value(r, 0)).strip()]
        labels = {axis: _label(m, axis) for axis in ("x", "y")}
        sld = _sld_profile(m)
        orso = _orso(m, tmp)
        datasets: list[dict[str, Any]] = [
            {"name": str(d.name), "x": np.asarray(d.x, dtype=float), "y": np.asarray(d.y, dtype=float),
             "error": np.asarray(d.error, dtype=float), "y_sim": np.asarray(d.y_sim, dtype=float)}
            for d in m.data if d.use]
        for d in datasets:
            if not np.all(np.isfinite(d["y_sim"])):
                raise ValueError(f"the fitted model simulates non-finite values (NaN or inf) for dataset "
                                 f"{d['name']!r}: GenX masks them out of the figure of merit, so the fit is void")
        fom_log = np.asarray(opt.get_fom_log(), dtype=float).reshape(-1, 2)
        out_path = os.path.join(tmp, "fitted.hgx")
        ctrl.save_file(out_path)
        with open(out_path, "rb") as f:
            fitted = f.read()
    return {
        "parameters": params, "fom": best_fom, "fom_start": fom_start, "fom_name": str(m.fomfunction),
        "fom_history": fom_log, "datasets": datasets, "model": fitted, "genx_version": genx_version(),
        "seconds": round(time.perf_counter() - started, 3), "generations": used["generations"],
        "generations_run": max(0, cb.generation - 1), "population": used["population"], "seed": seed,
        "evaluations": int(getattr(opt, "n_fom", 0) or 0), "settings": settings, "genx_settings": stored,
        "host": socket.gethostname(), "start": start, "all_parameters": every, **genx_numba.in_use(),
        "errorbar_level": float(o.errorbar_level),
        "xlabel": labels["x"], "ylabel": labels["y"], **({"sld": sld} if sld is not None else {}),
        **({"orso": orso} if orso is not None else {}),
        "stopped": "max_seconds" if cb.timed_out else ("min_spread" if cb.generation - 1 < used["generations"]
                                                       else "generations"),
    }
