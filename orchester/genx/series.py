"""Batch (series) fits: one GenX model fitted to each of a series of data files, over every satellite.

GenX's batch mode fits one model to a series of datasets (a temperature or time series) one
after another on one machine. Here each data file is one ``genx.fit`` task (its data read on the
satellite by GenX's own data loader, :data:`satellites.genx_task.DATA_LOADERS`):

* without ``chain`` every fit is submitted at once and they run in parallel over the satellites;
* with ``chain`` they run in the order of the sequence, each starting from the previous
  dataset's fitted values (GenX's "keep result values from last"), and with ``adjust_bounds``
  each fitted parameter's bounds are moved to centre on that value, keeping their width
  (GenX's "adjust boundaries around last values"). A dataset whose fit failed is skipped: the
  next starts from the last one that succeeded.

Each fit writes the files of :func:`~orchester.genx.fits.write_outputs` (named
``<model>_<data file>``); the series writes ``series.csv`` (one row per dataset: its sequence
value, every fitted parameter with its error bars, the figure of merit, or its error) and
``series.png`` (each fitted parameter against the sequence, with error bars), plus
``summary.csv`` and ``summary.json`` as ``orchester fit`` does. The sequence value of a data
file is the last number in its name (``nickel_T300K.dat``: 300), unless given.
"""

from __future__ import annotations

import csv
import math
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchester.client.sync import Client
from orchester.errors import OrchesterError, RemoteError, TaskFailed
from orchester.genx import MAX_DATA_BYTES
from orchester.genx.fits import FitSettings, _part, provenance, settings_from, write_outputs, write_summary
from orchester.genx.job import FitsInterrupted, _cancel, _row, _satellite
from orchester.render import csv_text
from orchester.signals import interrupt_exit_code, shielded, signal_name

#: Most parameters ``series.png`` draws.
MAX_PANELS = 24
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def sequence_value(name: str) -> float | None:
    """The last number in a file name's stem (``nickel_T300K.dat``: 300.0), or ``None``."""
    found = _NUMBER.findall(Path(name).stem)
    return float(found[-1]) if found else None


def sequence_values(names: Sequence[str], given: Sequence[float] | None = None) -> list[float]:
    """The sequence value of each data file: ``given``, or the last number in each name, or (when a
    name has none) the order the files were given in (0, 1, 2, ...)."""
    if given is not None:
        if len(given) != len(names):
            raise ValueError(f"{len(given)} sequence values for {len(names)} data files")
        if not all(math.isfinite(float(v)) for v in given):
            raise ValueError("sequence values must be finite numbers")
        return [float(v) for v in given]
    found = [sequence_value(n) for n in names]
    values = [v for v in found if v is not None and math.isfinite(v)]
    return values if len(values) == len(names) else [float(i) for i in range(len(names))]


def loader_of(path: Path) -> str:
    """GenX's data loader for a file: ``orso`` for ``.ort``, else ``default`` (columns x, y, error)."""
    return "orso" if path.suffix.lower() == ".ort" else "default"


def _safe(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80] or "data"


def run_series(client: Client, model_file: str | os.PathLike[str], data_files: Sequence[str | os.PathLike[str]],
               settings: FitSettings, out: str | os.PathLike[str], *, chain: bool = False,
               adjust_bounds: bool = False, sequence: Sequence[float] | None = None,
               console: Console | None = None, timeout: float | None = None,
               figures: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Fit ``model_file`` to each of ``data_files`` (see the module's docstring); the series' rows, in the
    order of the sequence. Raises :class:`~orchester.genx.job.FitsInterrupted` on a stop signal, with
    ``series.csv`` and ``summary.csv`` written (unfinished fits marked ``interrupted``)."""
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(model_file).read_bytes()
    base = _safe(Path(model_file).stem)
    files = [Path(f) for f in data_files]
    if sequence is not None and len(sequence) != len(files):
        raise ValueError(f"{len(sequence)} sequence values for {len(files)} data files")
    values = sequence_values([f.name for f in files], sequence)
    order = sorted(range(len(files)), key=lambda i: (values[i], i))
    rows: dict[int, dict[str, Any]] = {}
    pending: dict[str, int] = {}
    try:
        with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bars:
            overall = bars.add_task(f"series of {base}"[:28], total=len(files), info="")
            if chain:
                last: dict[str, Any] | None = None
                for place, i in enumerate(order):
                    fut = _submit(client, model, files[i], settings, _start_from(last, adjust_bounds))
                    pending[fut.task_id] = i
                    rows[i] = _collect(client, fut, files[i], values[i], base, out, place, model, timeout, figures)
                    del pending[fut.task_id]
                    if rows[i]["status"] == "done":
                        last = rows[i]["result"]
                    bars.update(overall, advance=1, info=f"{files[i].name}: {rows[i]['status']}"[:40])
            else:
                futures = [(i, _submit(client, model, files[i], settings, None)) for i in order]
                pending.update({fut.task_id: i for i, fut in futures})
                for place, (i, fut) in enumerate(futures):
                    rows[i] = _collect(client, fut, files[i], values[i], base, out, place, model, timeout, figures)
                    del pending[fut.task_id]
                    bars.update(overall, advance=1, info=f"{files[i].name}: {rows[i]['status']}"[:40])
    except KeyboardInterrupt as exc:
        signum = interrupt_exit_code(exc) - 128
        _cancel(client, list(pending))
        for place, i in enumerate(order):
            if i not in rows:
                rows[i] = {"file": str(files[i]), "sequence": values[i], "status": "interrupted", "order": place,
                           "error": f"interrupted by {signal_name(signum)} before the fit finished"}
        ordered = [rows[i] for i in order]
        write_series(ordered, out)
        raise FitsInterrupted(signum, ordered, write_summary(ordered, out)) from exc
    ordered = [rows[i] for i in order]
    write_series(ordered, out)
    write_summary(ordered, out)
    return ordered


def start_from(parameters: Sequence[dict[str, Any]], adjust_bounds: bool) -> dict[str, dict[str, Any]]:
    """The parameter overrides that start a chained fit from a previous fit's ``parameters`` (``name``,
    ``value``, ``min``, ``max``): each value, and with ``adjust_bounds`` its bounds moved to centre on
    it, keeping their width (GenX's "adjust boundaries around last values"). A parameter without a
    finite value is left to the model."""
    start: dict[str, dict[str, Any]] = {}
    for p in parameters:
        value = p.get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        change: dict[str, Any] = {"value": float(value)}
        low, high = p.get("min"), p.get("max")
        if adjust_bounds and isinstance(low, (int, float)) and isinstance(high, (int, float)) \
                and math.isfinite(float(high) - float(low)):
            width = float(high) - float(low)
            if math.isfinite(value - width / 2) and math.isfinite(value + width / 2):  # (else the model's own)
                change["min"], change["max"] = value - width / 2, value + width / 2
        start[str(p["name"])] = change
    return start


def _start_from(last: dict[str, Any] | None, adjust_bounds: bool) -> dict[str, dict[str, Any]] | None:
    """The parameter overrides that start a chained fit from the previous result (``None``: the model's own)."""
    return None if last is None else start_from(last["parameters"], adjust_bounds)


def _submit(client: Client, model: bytes, path: Path, settings: FitSettings,
            start: dict[str, dict[str, Any]] | None) -> Any:
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise ValueError(f"{path}: larger than {MAX_DATA_BYTES // 2**20} MiB")
    kwargs = settings.kwargs()
    if start:
        kwargs["fit"] = {**start, **kwargs.get("fit", {})}  # what the user overrides stays theirs
    data = {"name": path.name, "content": path.read_bytes(), "loader": loader_of(path)}
    return client.submit("genx.fit", model, data=data, **kwargs)


def _collect(client: Client, fut: Any, path: Path, value: float, base: str, out: Path, place: int, model: bytes,
             timeout: float | None, figures: Sequence[str] = ()) -> dict[str, Any]:
    """Wait for one fit; write its files; its series row (with the result, for a chained fit)."""
    name = f"{base}_{_safe(path.stem)}"
    common = {"file": str(path), "sequence": value, "order": place}
    try:
        result = fut.result(timeout)
    except TaskFailed as exc:
        return {**common, "status": "failed", "error": f"{exc.type}: {exc.message}", "satellite": exc.satellite or ""}
    except (RemoteError, OrchesterError, TimeoutError) as exc:
        return {**common, "status": "failed", "error": str(exc) or type(exc).__name__}
    try:
        with shielded():
            write_outputs(name, result, out, figures)
        row = _row(path, result, "done")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return {**common, "status": "failed", "error": f"malformed result: {type(exc).__name__}: {exc}"}
    satellite = _satellite(client, fut.task_id)
    row.update(common, satellite=satellite, result=result, settings_from=settings_from(result),
               provenance={**provenance(model, result), "data_file": path.name,
                           "data_sha256": _sha256(path), "satellite": satellite, "host": row.get("host", "")})
    return row


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parameters(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for p in (r.get("result") or {}).get("parameters", []):
            if p["name"] not in names:
                names.append(p["name"])
    return names


def write_series(rows: list[dict[str, Any]], out: Path) -> Path:
    """``series.csv`` and ``series.png`` (each written under a temporary name, then renamed)."""
    names = _parameters(rows)
    fields = ["file", "sequence", "status", "fom"]
    for n in names:
        fields += [n, f"{n} error_low", f"{n} error_high"]
    fields.append("error")
    path = out / "series.csv"
    tmp = _part(path, secrets.token_hex(4))
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([csv_text(x) for x in fields])
            for r in rows:
                pars = {p["name"]: p for p in (r.get("result") or {}).get("parameters", [])}
                cells: list[Any] = [csv_text(r["file"]), f"{r['sequence']:g}", r["status"], r.get("fom", "")]
                for n in names:
                    p = pars.get(n)
                    err = (p or {}).get("error") or ["", ""]
                    cells += [f"{p['value']:.10g}" if p else "", *(f"{e:.6g}" if e != "" else "" for e in err)]
                cells.append(csv_text(r.get("error", "")))
                w.writerow(cells)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    plot_series(rows, names, out / "series.png")
    return path


def plot_series(rows: list[dict[str, Any]], names: list[str], path: Path) -> Path | None:
    """Each fitted parameter against the sequence, with GenX's error bars (``None``: nothing fitted); the
    first :data:`MAX_PANELS` parameters (``series.csv`` has them all)."""
    if not names:
        return None
    names = names[:MAX_PANELS]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    tmp = _part(path, secrets.token_hex(4))
    try:
        for k, n in enumerate(names):
            ax = axes[k // cols][k % cols]
            xs, ys, lo, hi = [], [], [], []
            for r in rows:
                p = {q["name"]: q for q in (r.get("result") or {}).get("parameters", [])}.get(n)
                if p is None:
                    continue
                err = p.get("error") or [0.0, 0.0]
                xs.append(r["sequence"])
                ys.append(p["value"])
                lo.append(abs(min(err[0], 0.0)))
                hi.append(abs(max(err[1], 0.0)))
            ax.errorbar(xs, ys, yerr=np.array([lo, hi]), fmt="o-", ms=4, lw=1, capsize=3)
            ax.set_title(n, fontsize=9, loc="left")
            ax.set_xlabel("sequence")
        for k in range(len(names), nrows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.suptitle("fitted parameters along the series (error bars: GenX's, figure of merit +5 %)", fontsize=9)
        fig.tight_layout()
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
