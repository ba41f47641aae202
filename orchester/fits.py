"""GenX fits on the client side: settings, the content-addressed cache, and the files a fit writes.

Nothing here imports GenX: fits run on satellites (``genx.fit``, in
:mod:`satellites.genx_task`); this module turns their results into files.

For each model ``<name>`` a fit writes ``<name>.csv`` (x, data, error and fitted curve per
dataset), ``<name>_params.csv``, ``<name>_fom.csv`` (figure of merit per generation),
``<name>.png`` (log reflectivity against Q with the fit, and the figure of merit per
generation) and the fitted ``<name>.hgx``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from serializers import codecs


@dataclass
class FitSettings:
    """Settings of a ``genx.fit`` task (the keyword arguments of the task kind)."""

    generations: int = 100
    population: int = 50
    seed: int = 0
    km: float = 0.7
    kr: float = 0.7
    method: str = "best_1_bin"
    #: per parameter name: {"fit": bool, "value": v, "min": lo, "max": hi}
    fit: dict[str, dict[str, Any]] = field(default_factory=dict)
    fom: str | None = None
    max_evaluations: int | None = None

    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments (defaults left out where GenX's own apply)."""
        out = asdict(self)
        return {k: v for k, v in out.items() if v not in (None, {})}


def fit_key(model: bytes, settings: FitSettings, genx_version: str) -> str:
    """The content address of a fit: model bytes, settings and GenX version."""
    h = hashlib.sha256()
    h.update(model)
    h.update(json.dumps(settings.kwargs(), sort_keys=True).encode())
    h.update(genx_version.encode())
    return h.hexdigest()


class FitCache:
    """Finished fit results on disk, one file per key (written atomically)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.fit"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached result of ``key``, or ``None`` (also for an unreadable entry)."""
        try:
            raw = self._path(key).read_bytes()
            entry = msgpack.unpackb(raw, raw=False)
            value = codecs.decode("msgpack", entry["meta"], [entry["body"], *entry["buffers"]])
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
            return None
        except Exception:  # a damaged entry is a miss, never a crash
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Store ``result`` under ``key``."""
        meta, frames = codecs.encode(result)
        entry = {"meta": meta, "body": bytes(frames[0]), "buffers": [bytes(b) for b in frames[1:]]}
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(msgpack.packb(entry, use_bin_type=True))
        os.replace(tmp, path)


def default_cache_dir() -> Path:
    """``$ORCHESTER_CACHE`` or ``~/.cache/orchester/fits``."""
    env = os.environ.get("ORCHESTER_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orchester" / "fits"


def write_outputs(name: str, result: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write the files of one fit into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / f"{name}.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "x", "data", "error", "fit"])
        for d in result["datasets"]:
            for row in zip(d["x"], d["y"], d["error"], d["y_sim"], strict=True):
                w.writerow([d["name"], *(f"{v:.10g}" for v in row)])
    written.append(p)
    p = out / f"{name}_params.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["parameter", "value", "min", "max", "error_low", "error_high"])
        for par in result["parameters"]:
            err = par.get("error") or ["", ""]
            w.writerow([par["name"], f"{par['value']:.10g}", par["min"], par["max"], *err])
    written.append(p)
    p = out / f"{name}_fom.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["generation", result.get("fom_name", "fom")])
        for gen, value in np.asarray(result["fom_history"]).reshape(-1, 2):
            w.writerow([int(gen), f"{value:.10g}"])
    written.append(p)
    p = out / f"{name}.hgx"
    p.write_bytes(bytes(result["model"]))
    written.append(p)
    written.append(plot(name, result, out / f"{name}.png"))
    return written


def plot(name: str, result: dict[str, Any], path: Path) -> Path:
    """Data and fit (log intensity against Q) beside the figure of merit per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axf) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    try:
        for d in result["datasets"]:
            x, y, e, ys = (np.asarray(d[k]) for k in ("x", "y", "error", "y_sim"))
            pos = y > 0
            ax.errorbar(x[pos], y[pos], yerr=np.minimum(e[pos], y[pos] * 0.999), fmt=".", ms=3, lw=0.5,
                        label=f"{d['name']} data")
            ax.plot(x, ys, lw=1.2, label=f"{d['name']} fit")
        ax.set_yscale("log")
        ax.set_xlabel("Q (1/Å)")
        ax.set_ylabel("reflectivity")
        ax.set_title(f"{name}: {result.get('fom_name', 'fom')} = {result['fom']:.4g}")
        ax.legend(fontsize=7)
        hist = np.asarray(result["fom_history"]).reshape(-1, 2)
        axf.plot(hist[:, 0], hist[:, 1], lw=1.2)
        axf.set_yscale("log")
        axf.set_xlabel("generation")
        axf.set_ylabel("best figure of merit")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


SUMMARY_FIELDS = ["file", "fom", "generations", "seconds", "satellite", "status", "error", "cached"]


def write_summary(rows: list[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """``summary.csv``: one row per model."""
    p = Path(out) / "summary.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in SUMMARY_FIELDS})
    return p
