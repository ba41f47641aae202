"""GenX fits on the client side: settings, the content-addressed cache, and the files a fit writes.

Nothing here imports GenX: fits run on satellites (``genx.fit``, in
:mod:`satellites.genx_task`); this module turns their results into files.

For each model ``<name>`` a fit writes ``<name>.csv`` (x, data, error and fitted curve per
dataset), ``<name>_params.csv``, ``<name>_fom.csv`` (figure of merit per generation),
``<name>.png`` (log reflectivity against Q with the fit, and the figure of merit per
generation) and the fitted ``<name>.hgx``, all or nothing (see :func:`write_outputs`).

The cache is private and every entry is authenticated (see :class:`FitCache`): an entry that
another local user planted or altered is never served.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from orchester.journal.folder import DIR_MODE, JournalError, open_private, private_directory
from orchester.render import csv_text
from serializers import codecs

log = logging.getLogger("orchester.fits")


@dataclass
class FitSettings:
    """Settings of a ``genx.fit`` task (the keyword arguments of the task kind).

    ``None`` is the model file's own (GenX's differential-evolution settings stored in the
    ``.hgx``, as GenX itself reads them); a value overrides only that setting.
    """

    generations: int | None = None
    population: int | None = None
    seed: int = 0
    km: float | None = None
    kr: float | None = None
    method: str | None = None
    #: per parameter name: {"fit": bool, "value": v, "min": lo, "max": hi}
    fit: dict[str, dict[str, Any]] = field(default_factory=dict)
    fom: str | None = None
    max_evaluations: int | None = None
    start_guess: bool | None = None  #: the file's values are the first member of the population
    boundaries: bool | None = None  #: fit within the parameters' bounds
    min_spread: float | None = None  #: stop when every parameter's spread is below this % of its range
    max_seconds: float | None = None  #: stop a fit after this much wall time

    def kwargs(self) -> dict[str, Any]:
        """The task's keyword arguments (those left to the model file left out)."""
        out = asdict(self)
        return {k: v for k, v in out.items() if v not in (None, {})}


def fit_key(model: bytes, settings: FitSettings, genx_version: str) -> str:
    """The content address of a fit: model bytes, settings and GenX version."""
    h = hashlib.sha256()
    h.update(model)
    h.update(json.dumps(settings.kwargs(), sort_keys=True).encode())
    h.update(genx_version.encode())
    return h.hexdigest()


#: First bytes of an authenticated cache entry: ``MAGIC | HMAC-SHA256 (32 bytes) | msgpack entry``.
ENTRY_MAGIC = b"OFC2"
_MAC_SIZE = 32
_MAC_DOMAIN = b"orchester fit cache entry v2\0"
#: The per-user secret key of a cache folder, 32 random bytes, 0600.
SECRET_NAME = "hmac.key"
#: The names a fit cache folder holds (entry folders, the secret and their temporary files).
CACHE_NAMES = re.compile(r"[0-9a-f]{2}|hmac\.key|\..*\.tmp")
_KEY = re.compile(r"[0-9a-f]{16,128}")


class FitCache:
    """Finished fit results on disk, one file per key, private to this user and authenticated.

    The folder is created 0700 (entries 0600, written to a temporary name and renamed). A
    folder that another user owns or that group or others can write is not used at all: one
    warning, then every lookup misses and nothing is stored. Each entry carries an HMAC-SHA256
    of its key and content under a secret that is kept 0600 in the folder
    (:data:`SECRET_NAME`), made at first use; an entry that fails the check (planted, altered,
    truncated, or written by an older version) is moved aside as ``<key>.rejected`` and never
    served.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        #: why the cache is not used (``None`` while it is)
        self.disabled: str | None = None
        self._secret: bytes | None = None

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a fit key: {key!r}")
        return self.dir / key[:2] / f"{key}.fit"

    def _ready(self, create: bool) -> bytes | None:
        """The folder's secret once the folder is checked (created if ``create``); ``None``: no cache."""
        if self._secret is not None or self.disabled is not None:
            return self._secret
        if not create and not self.dir.exists():
            return None  # nothing cached yet; the folder is made (and checked) at the first store
        try:
            try:  # seen before the folder is tightened: a secret others could read signs nothing any more
                exposed = bool(os.lstat(self.dir / SECRET_NAME).st_mode & 0o077)
            except OSError:
                exposed = False
            before, tightened = private_directory(self.dir, "fit cache", CACHE_NAMES)
            if before & 0o077 or tightened:
                log.warning("fit cache %s was readable by others (folder mode %04o, %d entries not private): "
                            "made it 0700 and its files 0600", self.dir, before, tightened)
            self._secret = self._load_secret(exposed)
        except (JournalError, OSError) as exc:
            self.disabled = str(exc) if isinstance(exc, JournalError) else f"fit cache {self.dir}: {exc}"
            log.warning("%s; running without the fit cache", self.disabled)
            return None
        return self._secret

    def _load_secret(self, exposed: bool = False) -> bytes:
        """The folder's secret: read, made at first use, or replaced when it cannot be trusted."""
        path = self.dir / SECRET_NAME
        if exposed:
            log.warning("fit cache %s: its key %s was readable by others: made a new one (every entry is dropped "
                        "as it is next read)", self.dir, SECRET_NAME)
            return self._new_secret(path, replace=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return self._new_secret(path, replace=False)
        except OSError:  # a symlink, say: not ours to trust
            return self._new_secret(path, replace=True)
        try:
            st = os.fstat(fd)
            secret = os.read(fd, _MAC_SIZE + 1)
        finally:
            os.close(fd)
        if (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077
                and len(secret) == _MAC_SIZE):
            return secret
        log.warning("fit cache %s: its key %s was not private or not whole: made a new one (every entry is "
                    "dropped as it is next read)", self.dir, SECRET_NAME)
        return self._new_secret(path, replace=True)

    def _new_secret(self, path: Path, replace: bool) -> bytes:
        secret = secrets.token_bytes(_MAC_SIZE)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_EXCL)
        try:
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if replace:
                os.replace(tmp, path)
                return secret
            try:
                os.link(tmp, path)  # never over a key another process made meanwhile
                return secret
            except FileExistsError:
                return self._load_secret()
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _mac(secret: bytes, key: str, payload: bytes) -> bytes:
        return hmac.new(secret, _MAC_DOMAIN + key.encode() + b"\0" + payload, hashlib.sha256).digest()

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached result of ``key``, or ``None`` (no entry, no usable cache, or an entry that fails its check)."""
        path = self._path(key)
        secret = self._ready(create=False)
        if secret is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._reject(path, f"cannot be read ({exc.strerror})")
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
        except OSError as exc:
            self._reject(path, f"cannot be read ({exc.strerror})")
            return None
        head = len(ENTRY_MAGIC) + _MAC_SIZE
        payload = raw[head:]
        if len(raw) < head or raw[:len(ENTRY_MAGIC)] != ENTRY_MAGIC or \
                not hmac.compare_digest(raw[len(ENTRY_MAGIC):head], self._mac(secret, key, payload)):
            self._reject(path, "fails verification")
            return None
        try:  # authentic from here on: what fails now is a format this version cannot read
            entry = msgpack.unpackb(payload, raw=False)
            value = codecs.decode("msgpack", entry["meta"], [entry["body"], *entry["buffers"]])
        except Exception:
            value = None
        if not isinstance(value, dict):
            self._reject(path, "cannot be decoded")
            return None
        return value

    def _reject(self, path: Path, why: str) -> None:
        """Move a bad entry aside (``<key>.rejected``, replacing an older one), or remove it."""
        aside = path.with_suffix(".rejected")
        try:
            os.replace(path, aside)
            log.warning("fit cache entry %s %s: ignored, moved aside to %s", path, why, aside.name)
        except OSError as exc:
            try:
                os.unlink(path)
                log.warning("fit cache entry %s %s: ignored and removed (it cannot be moved aside: %s)", path, why,
                            exc.strerror)
            except OSError as again:  # it stays, and fails its check again next time: never served
                log.warning("fit cache entry %s %s: ignored; it can be neither moved aside nor removed (%s)", path,
                            why, again.strerror)

    def put(self, key: str, result: dict[str, Any]) -> None:
        """Store ``result`` under ``key`` (a failure to store is logged, never raised: it is only a cache)."""
        path = self._path(key)
        secret = self._ready(create=True)
        if secret is None:
            return
        meta, frames = codecs.encode(result)
        entry = {"meta": meta, "body": bytes(frames[0]), "buffers": [bytes(b) for b in frames[1:]]}
        payload = msgpack.packb(entry, use_bin_type=True)
        data = ENTRY_MAGIC + self._mac(secret, key, payload) + payload
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with contextlib.suppress(FileExistsError):  # made by an earlier entry: checked with the folder
                os.mkdir(path.parent, DIR_MODE)
                os.chmod(path.parent, DIR_MODE)  # exactly 0700, whatever the umask
            fd = open_private(tmp, os.O_WRONLY | os.O_EXCL)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("fit cache %s: cannot store %s: %s", self.dir, path.name, exc)
            tmp.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """``$ORCHESTER_CACHE`` or ``~/.cache/orchester/fits``."""
    env = os.environ.get("ORCHESTER_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orchester" / "fits"


#: The formats a fit's figures may also be written in, beside PNG (``orchester fit --figures``).
FIGURE_FORMATS = ("png", "pdf", "svg")


def output_paths(name: str, out: str | os.PathLike[str], sld: bool = False, orso: bool = False,
                 figures: Sequence[str] = ()) -> list[Path]:
    """The files a fit of model ``name`` writes into ``out``: with ``sld``, also its scattering length
    density profile (``<name>_sld.csv``, ``<name>_sld.png``); with ``orso``, the data and the fitted
    curve as an ORSO file (``<name>.ort``); each figure also in the other ``figures`` formats."""
    out = Path(out)
    suffixes = [".csv", "_params.csv", "_fom.csv", ".hgx", ".png"] + (["_sld.csv", "_sld.png"] if sld else [])
    suffixes += [".ort"] if orso else []
    for fmt in figures:
        if fmt != "png":
            suffixes += [f".{fmt}"] + ([f"_sld.{fmt}"] if sld else [])
    return [out / f"{name}{suffix}" for suffix in suffixes]


def _part(path: Path, token: str) -> Path:
    """The temporary name ``path`` is written under (hidden, same folder, same extension)."""
    return path.with_name(f".{path.stem}.{token}.part{path.suffix}")


def significant(value: float, error: float | None = None, digits: int = 2) -> str:
    """``value`` as text: to the decimal place of ``error``'s ``digits`` significant digits when an error is
    given (a value is never printed more precisely than it is known), else with 10 significant digits."""
    if error is None or not math.isfinite(error) or error <= 0 or not math.isfinite(value) \
            or error < abs(value) * 1e-10:  # (an error below 10 significant digits says nothing more)
        return f"{value:.10g}"
    place = digits - 1 - math.floor(math.log10(error))
    return f"{round(value, place):.{max(place, 0)}f}" if place > 0 else f"{round(value, place):.0f}"


def _bound(value: Any, low: Any, high: Any) -> str:
    """``"min"`` or ``"max"`` when a fitted value sits at (within 1e-6 of the range of) a bound, else ``""``."""
    try:
        v, lo, hi = float(value), float(low), float(high)
    except (TypeError, ValueError):
        return ""
    if not (math.isfinite(v) and math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return ""
    tol = 1e-6 * (hi - lo)
    return "min" if v - lo <= tol else "max" if hi - v <= tol else ""


def parameter_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter table of a fit: every parameter of the model, fitted or not, with its value, bounds,
    GenX's error bars (the values where the figure of merit rises to ``errorbar_level`` times its best:
    +5 % by default — not 1σ), and whether a fitted value sits at a bound."""
    fitted = {p["name"]: p for p in result["parameters"]}
    level = result.get("errorbar_level", 1.05)
    every = result.get("all_parameters") or [{**p, "fit": True} for p in result["parameters"]]
    rows = []
    for par in every:
        name = str(par.get("name", ""))
        best = fitted.get(name)
        value = best["value"] if best is not None else par.get("value")
        err = (best or {}).get("error") or None
        low = high = None
        if err is not None:
            low, high = float(err[0]), float(err[1])
        width = max(abs(low), abs(high)) if low is not None and high is not None else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        rows.append({"parameter": name, "value": significant(float(value), width) if number else str(value),
                     "fitted": "yes" if best is not None else "no",
                     "min": (best or par).get("min", ""), "max": (best or par).get("max", ""),
                     "error_low": significant(low, abs(low) or None) if low is not None else "",
                     "error_high": significant(high, abs(high) or None) if high is not None else "",
                     "error_level": f"fom x {level:g}" if err is not None else "",
                     "at_bound": _bound(value, (best or par).get("min"), (best or par).get("max"))
                     if best is not None else ""})
    return rows


PARAMETER_FIELDS = ["parameter", "value", "fitted", "min", "max", "error_low", "error_high", "error_level", "at_bound"]


def write_outputs(name: str, result: dict[str, Any], out: str | os.PathLike[str],
                  figures: Sequence[str] = ()) -> list[Path]:
    """Write the files of one fit into ``out`` all or nothing; return their paths.

    Every file is first written under a hidden temporary name in ``out``
    (``.<name>.<random>.part.csv`` …); only when all are complete are they renamed into place,
    with a stop signal held back meanwhile (:func:`orchester.signals.shielded`). A failure or an
    interruption before that removes the temporary files and leaves the previous files (if any)
    as they were.
    """
    from orchester.signals import shielded

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sld = result.get("sld") if isinstance(result.get("sld"), dict) else None
    orso = result.get("orso") if isinstance(result.get("orso"), (bytes, bytearray)) else None
    figures = [f for f in figures if f in FIGURE_FORMATS and f != "png"]
    finals = output_paths(name, out, sld=sld is not None, orso=orso is not None, figures=figures)
    token = secrets.token_hex(4)
    parts = [_part(p, token) for p in finals]
    by_name = {final.name: part for final, part in zip(finals, parts, strict=True)}
    data, params, fom, model, png = parts[:5]
    try:
        with open(data, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["dataset", "x", "data", "error", "fit"])
            for d in result["datasets"]:
                for row in zip(d["x"], d["y"], d["error"], d["y_sim"], strict=True):
                    w.writerow([csv_text(d["name"]), *(f"{v:.10g}" for v in row)])
        with open(params, "w", newline="") as f:
            table = csv.DictWriter(f, fieldnames=PARAMETER_FIELDS)
            table.writeheader()
            for par in parameter_rows(result):
                table.writerow({k: csv_text(v) for k, v in par.items()})
        with open(fom, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["generation", result.get("fom_name", "fom")])
            for gen, value in np.asarray(result["fom_history"]).reshape(-1, 2):
                w.writerow([int(gen), f"{value:.10g}"])
        model.write_bytes(bytes(result["model"]))
        plot(name, result, png)
        for fmt in figures:
            plot(name, result, by_name[f"{name}.{fmt}"])
        if orso is not None:
            by_name[f"{name}.ort"].write_bytes(bytes(orso))
        if sld is not None:
            sld_csv, sld_png = by_name[f"{name}_sld.csv"], by_name[f"{name}_sld.png"]
            keys = list(sld["parts"])
            with open(sld_csv, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["z", *(f"{csv_text(k)} ({sld.get('unit', '')})" for k in keys)])
                for i, z in enumerate(np.asarray(sld["z"], dtype=float)):
                    w.writerow([f"{z:.10g}", *(f"{float(np.asarray(sld['parts'][k])[i]):.10g}" for k in keys)])
            plot_sld(name, sld, sld_png)
            for fmt in figures:
                plot_sld(name, sld, by_name[f"{name}_sld.{fmt}"])
        with shielded():
            for part, final in zip(parts, finals, strict=True):
                os.replace(part, final)
    finally:
        for part in parts:  # none left after a complete write
            part.unlink(missing_ok=True)
    return finals


def _tex(label: str, fallback: str) -> str:
    """A GenX axis label for matplotlib (GenX writes ``q [Å$^{-1}$]``: mathtext already)."""
    text = (label or fallback).replace("\n", " ")
    return text if text.count("$") % 2 == 0 else text.replace("$", "")


def plot(name: str, result: dict[str, Any], path: Path) -> Path:
    """Each dataset's data (with error bars) and fit, on a log scale when the data span decades, over its
    residuals (normalised by the error); beside them the named figure of merit per generation. The
    axes are labelled as the model's script labels them (as GenX shows them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["datasets"])[:MAX_PLOTTED]
    n = max(1, len(datasets))
    fom_name = str(result.get("fom_name", "fom"))
    fig = plt.figure(figsize=(11.5, 2.2 + 3.0 * n))
    grid = fig.add_gridspec(2 * n, 2, width_ratios=[3, 2], height_ratios=[3, 1] * n, hspace=0.08, wspace=0.28)
    xlabel, ylabel = _tex(str(result.get("xlabel", "")), "x"), _tex(str(result.get("ylabel", "")), "y")
    try:
        for i, d in enumerate(datasets):
            ax = fig.add_subplot(grid[2 * i, 0])
            res = fig.add_subplot(grid[2 * i + 1, 0], sharex=ax)
            x, y, e, ys = (np.asarray(d[k], dtype=float) for k in ("x", "y", "error", "y_sim"))
            log = bool(np.all(y[np.isfinite(y)] > 0)) and _decades(y) >= 2
            shown = (y > 0) if log else np.isfinite(y)
            err = np.minimum(e[shown], y[shown] * 0.999) if log else e[shown]
            ax.errorbar(x[shown], y[shown], yerr=np.abs(err), fmt="o", ms=2.5, lw=0.6, color="#4c72b0",
                        ecolor="#9fb3d6", alpha=0.8, label="data", zorder=2)
            ax.plot(x, ys, lw=1.6, color="#dd5521", label="fit", zorder=3)  # over the data, never under
            if log:
                ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{d['name']}" if n > 1 else f"{name}: {d['name']}", fontsize=9, loc="left")
            ax.legend(fontsize=7, loc="best")
            ax.tick_params(labelbottom=False)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = np.where(e > 0, (y - ys) / e, np.nan)
            res.axhline(0, color="0.4", lw=0.8)
            res.plot(x, r, ".", ms=2.5, color="#4c72b0")
            res.set_ylabel("(data−fit)/σ", fontsize=8)
            res.set_xlabel(xlabel)
        axf = fig.add_subplot(grid[:, 1])
        hist = np.asarray(result["fom_history"]).reshape(-1, 2)
        axf.plot(hist[:, 0], hist[:, 1], lw=1.4, color="#55a868")
        if len(hist) and np.all(hist[:, 1] > 0):
            axf.set_yscale("log")
        axf.set_xlabel("generation")
        axf.set_ylabel(f"best figure of merit ({fom_name})")
        axf.set_title(f"{name}: {fom_name} = {result['fom']:.5g}", fontsize=10, loc="left")
        if len(result["datasets"]) > MAX_PLOTTED:
            fig.suptitle(f"the first {MAX_PLOTTED} of {len(result['datasets'])} datasets", fontsize=9)
        fig.savefig(path, dpi=110, bbox_inches="tight", format=_format(path))
    finally:
        plt.close(fig)
    return path


def _format(path: Path) -> str:
    """A figure's format from its final name (a temporary ``….part.pdf`` keeps the extension)."""
    fmt = path.suffix.lstrip(".").lower()
    return fmt if fmt in FIGURE_FORMATS else "png"


#: Most datasets one figure shows (one row each).
MAX_PLOTTED = 8


def _decades(y: np.ndarray) -> float:
    pos = y[np.isfinite(y) & (y > 0)]
    return float(np.log10(pos.max() / pos.min())) if pos.size > 1 else 0.0


def plot_sld(name: str, sld: dict[str, Any], path: Path) -> Path:
    """The scattering length density profile against depth, each part (real, imaginary …) a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        z = np.asarray(sld["z"], dtype=float)
        for key, values in sld["parts"].items():
            ax.plot(z, np.asarray(values, dtype=float), lw=1.5, label=str(key))
        ax.set_xlabel("depth z (Å)")
        unit = str(sld.get("unit", ""))
        shown = f" (${unit}$)" if unit and "$" not in unit else ""
        ax.set_ylabel(f"scattering length density{shown}")
        ax.set_title(f"{name}: SLD profile", fontsize=10, loc="left")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110, format=_format(path))
    finally:
        plt.close(fig)
    return path


SUMMARY_FIELDS = ["file", "fom", "generations", "population", "km", "kr", "method", "seed", "settings_from",
                  "evaluations", "seconds", "satellite", "host", "status", "error", "cached"]


def write_summary(rows: list[dict[str, Any]], out: str | os.PathLike[str]) -> Path:
    """``summary.csv`` (one row per model, in the order the models were given) and ``summary.json`` (the
    same with each fit's provenance), each written under a temporary name, then renamed into place."""
    ordered = sorted(rows, key=lambda r: r.get("order", len(rows)))
    p = Path(out) / "summary.csv"
    tmp = _part(p, secrets.token_hex(4))
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            w.writeheader()
            for r in ordered:
                w.writerow({k: csv_text(r.get(k, "")) for k in SUMMARY_FIELDS})
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    j = Path(out) / "summary.json"
    tmp = _part(j, secrets.token_hex(4))
    try:
        fits = [{**{k: r.get(k) for k in SUMMARY_FIELDS if k in r}, **({"provenance": r["provenance"]}
                                                                        if "provenance" in r else {})}
                for r in ordered]
        tmp.write_text(json.dumps({"fits": fits}, indent=2, default=str) + "\n")
        os.replace(tmp, j)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def provenance(model: bytes, result: dict[str, Any]) -> dict[str, Any]:
    """What a fit's result says of how it was made, for ``summary.json``: GenX's version, the model's
    SHA-256 (its data are inside it), every optimizer setting with where it came from, the seed,
    evaluations, generations run and why the fit stopped, wall time, and whether GenX's kernels ran
    with numba (on how many threads)."""
    return {"genx_version": result.get("genx_version"), "model_sha256": hashlib.sha256(model).hexdigest(),
            "settings": result.get("settings"), "genx_settings": result.get("genx_settings"),
            "seed": result.get("seed"), "evaluations": result.get("evaluations"),
            "generations_run": result.get("generations_run"), "stopped": result.get("stopped"),
            "seconds": result.get("seconds"), "fom_name": result.get("fom_name"),
            "numba": result.get("numba"), "numba_threads": result.get("numba_threads")}


def settings_from(result: dict[str, Any]) -> str:
    """Where each setting of a fit came from, in one cell: ``km=argument population=file …``."""
    settings = result.get("settings")
    if not isinstance(settings, dict):
        return ""
    return " ".join(f"{name}={v.get('source')}" for name, v in settings.items() if isinstance(v, dict))
