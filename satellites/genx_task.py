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
import tempfile
import time
from typing import Any

import numpy as np

from .context import progress
from .registry import task

#: Seconds without a new generation after which a fit counts as stalled (tracker).
STALL_TIMEOUT = 300.0
TRIAL_METHODS = ("best_1_bin", "rand_1_bin", "best_either_or", "rand_either_or", "jade_best", "simplex_best_1_bin")


def genx_version() -> str:
    """The installed GenX version (read from the package metadata: GenX is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genx3")
    except PackageNotFoundError:
        from genx.version import __version__

        return str(__version__)


def _callbacks(started: float) -> Any:
    from genx.solver_basis import GenxOptimizerCallback

    class Progress(GenxOptimizerCallback):
        """Per-generation progress to the orchestrator (the tracker's task-progress signal)."""

        def __init__(self) -> None:
            self.optimizer: Any = None
            self.generation = 0

        def text_output(self, text: str) -> None:
            """GenX's status lines: progress carries what matters."""

        def plot_output(self, update_data: Any) -> None:
            self.generation += 1
            opt = self.optimizer
            evals = int(getattr(opt, "n_fom", 0) or 0)
            elapsed = max(time.perf_counter() - started, 1e-9)
            total = int(opt.opt.max_generations) if opt is not None else 0
            # GenX reports the initial population first: generations go 0 (that one) to ``total``
            progress(generation=self.generation - 1, total=total, fom=float(update_data.fom_value),
                     evaluations=evals, evals_per_s=round(evals / elapsed, 1))

        def parameter_output(self, param_info: Any) -> None:
            """Parameter updates: the result carries the best values."""

        def fitting_ended(self, result_data: Any) -> None:
            """The end of the fit: :func:`genx_fit` continues synchronously after ``optimize()``."""

        def autosave(self) -> None:
            """GenX's autosave: the fitted model is returned, never written behind the user's back."""

    return Progress()


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
def genx_fit(model: bytes, generations: int = 100, population: int = 50, seed: int = 0,
             km: float = 0.7, kr: float = 0.7, method: str = "best_1_bin",
             fit: dict[str, dict[str, Any]] | None = None, fom: str | None = None,
             max_evaluations: int | None = None) -> dict[str, Any]:
    """Fit a GenX model (``.hgx`` bytes) by differential evolution; deterministic for a seed."""
    from genx.diffev import DiffEv
    from genx.model_control import ModelController

    if not isinstance(model, (bytes, bytearray, memoryview)) or len(model) == 0:
        raise ValueError("model must be the bytes of a GenX .hgx file")
    if method not in TRIAL_METHODS:
        raise ValueError(f"unknown differential-evolution method {method!r}; use one of {TRIAL_METHODS}")
    population = int(population)
    if max_evaluations:  # a budget of figure-of-merit evaluations instead of generations
        generations = max(1, int(max_evaluations) // max(population, 1) - 1)
    generations, seed = int(generations), int(seed)
    if generations < 1 or population < 5:
        raise ValueError("need generations >= 1 and population >= 5")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="genx-fit-") as tmp:
        path = os.path.join(tmp, "model.hgx")
        with open(path, "wb") as f:
            f.write(bytes(model))
        opt = DiffEv()
        ctrl = ModelController(opt)
        cb = _callbacks(started)
        cb.optimizer = opt
        ctrl.set_callbacks(cb)
        try:
            ctrl.load_file(path)
        except Exception as exc:
            raise ValueError(f"cannot load the model: {type(exc).__name__}: {exc}") from exc
        m = ctrl.model
        if fit:
            _apply_overrides(m, fit)
        if fom:
            m.fomfunction = fom
        m.simulate()
        fom_start = float(m.fom)
        o = opt.opt
        o.use_max_generations = True
        o.max_generations = generations
        o.use_pop_mult = False
        o.pop_size = population
        o.km, o.kr, o.create_trial = float(km), float(kr), method
        o.use_parallel_processing = False
        np.random.seed(seed)  # differential evolution draws from numpy's global generator
        opt.reset()
        opt.init_fitting(m)
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
        "seconds": round(time.perf_counter() - started, 3), "generations": generations,
        "population": population, "seed": seed, "evaluations": int(getattr(opt, "n_fom", 0) or 0),
    }
