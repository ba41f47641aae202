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
import os
import re
import secrets
import stat
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


def output_paths(name: str, out: str | os.PathLike[str]) -> list[Path]:
    """The files a fit of model ``name`` writes into ``out``."""
    out = Path(out)
    return [out / f"{name}{suffix}" for suffix in (".csv", "_params.csv", "_fom.csv", ".hgx", ".png")]


def _part(path: Path, token: str) -> Path:
    """The temporary name ``path`` is written under (hidden, same folder, same extension)."""
    return path.with_name(f".{path.stem}.{token}.part{path.suffix}")


def write_outputs(name: str, result: dict[str, Any], out: str | os.PathLike[str]) -> list[Path]:
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
    finals = output_paths(name, out)
    token = secrets.token_hex(4)
    parts = [_part(p, token) for p in finals]
    data, params, fom, model, png = parts
    try:
        with open(data, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["dataset", "x", "data", "error", "fit"])
            for d in result["datasets"]:
                for row in zip(d["x"], d["y"], d["error"], d["y_sim"], strict=True):
                    w.writerow([csv_text(d["name"]), *(f"{v:.10g}" for v in row)])
        with open(params, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["parameter", "value", "min", "max", "error_low", "error_high"])
            for par in result["parameters"]:
                err = par.get("error") or ["", ""]
                w.writerow([csv_text(par["name"]), f"{par['value']:.10g}", par["min"], par["max"], *err])
        with open(fom, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["generation", result.get("fom_name", "fom")])
            for gen, value in np.asarray(result["fom_history"]).reshape(-1, 2):
                w.writerow([int(gen), f"{value:.10g}"])
        model.write_bytes(bytes(result["model"]))
        plot(name, result, png)
        with shielded():
            for part, final in zip(parts, finals, strict=True):
                os.replace(part, final)
    finally:
        for part in parts:  # none left after a complete write
            part.unlink(missing_ok=True)
    return finals


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
    evaluations, generations run and why the fit stopped, wall time."""
    return {"genx_version": result.get("genx_version"), "model_sha256": hashlib.sha256(model).hexdigest(),
            "settings": result.get("settings"), "genx_settings": result.get("genx_settings"),
            "seed": result.get("seed"), "evaluations": result.get("evaluations"),
            "generations_run": result.get("generations_run"), "stopped": result.get("stopped"),
            "seconds": result.get("seconds"), "fom_name": result.get("fom_name")}


def settings_from(result: dict[str, Any]) -> str:
    """Where each setting of a fit came from, in one cell: ``km=argument population=file …``."""
    settings = result.get("settings")
    if not isinstance(settings, dict):
        return ""
    return " ".join(f"{name}={v.get('source')}" for name, v in settings.items() if isinstance(v, dict))
