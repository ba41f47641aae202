"""What an uploaded GenX model (``.hgx``) holds, read without running it, in a short-lived child process.

:func:`inspect_model` tells a GenX model from anything else and reads what a form needs before a
fit: the data sets, the fitted parameters, and the fit settings stored in the file, mapped onto
Orchester's (:class:`ModelInfo`). Every file is taken as hostile:

* the cheap checks run here (size, the HDF5 signature); nothing else of the file is looked at in
  this process, and nothing of it reaches h5py or the HDF5 library here;
* the file is read by a child process (``python -m orchester.genx.inspect``) under resource
  limits (address space, CPU seconds, no files written, no core dump), killed at a timeout; a
  crash, a hang or an output that is not the expected JSON is a :class:`ModelError`, never a
  traceback;
* the child reads the HDF5 structure with h5py itself, never through GenX's loader
  (``genx.model_control.ModelController.load_file``): that loader executes text from the file
  (the stored solver name goes through ``exec``, the ``[startup] script`` of the stored config
  through ``eval``, free-form metadata through ``pickle.loads``) before any model script runs.
  The model script is never run, compiled or imported; only its ``import models.<name>`` lines
  are read. Only hard links are followed, datasets stored in external files or virtual datasets
  are not read, and HDF5 filter plugins are not loaded.

GenX keeps its solver settings in the model file, in the ``[solver]`` section of the config it
stores (``current/config``; the names of ``genx.diffev.DiffEvConfig``). They become Orchester's
``generations``, ``population``, ``km``, ``kr`` and ``method`` as GenX itself would use them (see
:func:`fit_defaults`): GenX's default profile under the file's own settings, each checked against
the range the ``orchester fit`` command line accepts; a setting the file does not store, or
stores unreadable or out of range, is GenX's default.

The module imports neither GenX nor h5py (the child does).
"""

from __future__ import annotations

import argparse
import configparser
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchester.errors import OrchesterError
from orchester.genx import check_setting

log = logging.getLogger("orchester.genx.inspect")

#: The first eight bytes of an HDF5 superblock (GenX ``.hgx`` files are HDF5).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The first offset past 0 where HDF5 looks for its superblock after a user block; then twice
#: that, and so on (a file written with ``h5py.File(..., userblock_size=512)`` starts there).
USER_BLOCK_MIN = 512
#: Largest file :func:`inspect_model` takes by default (bytes).
MAX_BYTES = 200 * 1024 * 1024
#: Seconds the child may take by default.
TIMEOUT = 20.0
#: Address space of the child (bytes), at least: more when ``max_bytes`` is larger than the default.
CHILD_MEMORY = 2 * 1024**3
#: The child's command line (the limits are appended as options); ``None``: this module in this Python,
#: ``[sys.executable, "-m", "orchester.genx.inspect"]``. For tests: a child that hangs, crashes, talks nonsense.
CHILD_COMMAND: Sequence[str] | None = None
#: Most names (data sets, fitted parameters) a :class:`ModelInfo` lists; the counts are complete.
MAX_NAMES = 1000
#: Longest name kept (longer ones are cut).
MAX_NAME = 200
#: Largest answer read from the child (bytes).
MAX_REPLY = 4 * 1024 * 1024
#: The fit settings a :class:`ModelInfo` proposes (the options of ``orchester fit`` of the same names).
SETTINGS = ("generations", "population", "km", "kr", "method")
#: GenX's differential-evolution settings read from the ``[solver]`` section of the stored config,
#: by their attribute name in ``genx.diffev.DiffEvConfig`` (the config option is the name with spaces).
GENX_SETTINGS: dict[str, type] = {
    "km": float, "kr": float, "create_trial": str,
    "use_pop_mult": bool, "pop_size": int, "pop_mult": int,
    "use_max_generations": bool, "max_generations": int, "max_generation_mult": int,
}
#: The model library modules of GenX's own that are not models (``from models.utils import UserVars``).
_HELPER_MODULES = frozenset({"utils", "lib"})
_MODEL_IMPORT = re.compile(r"^[ \t]*import[ \t]+models\.([A-Za-z_]\w*)", re.MULTILINE)
_FOM_NAME = re.compile(r"[A-Za-z_]\w{0,63}")
#: The ``[solver]`` settings of GenX's shipped default profile (``genx/profiles/default.profile``):
#: GenX loads them before a model file's own, so a file that stores none fits with these (the tests
#: compare them with GenX's file).
GENX_DEFAULT_PROFILE: dict[str, Any] = {
    "km": 0.6, "kr": 0.6, "create_trial": "best_1_bin", "use_pop_mult": False, "pop_size": 50, "pop_mult": 3,
    "use_max_generations": False, "max_generations": 500, "max_generation_mult": 6,
}
_MODULE = "orchester.genx.inspect"
_MAX_TEXT = 16 * 1024 * 1024  # longest script or config the child reads (characters)
_MAX_ROWS = 100_000  # most rows of the parameter grid
_KINDS = ("empty", "too_large", "not_hdf5", "not_genx", "damaged", "timeout")
_DAMAGED = "could not be read: the file is damaged or not a GenX model"


class ModelError(OrchesterError, ValueError):
    """A file that is not a GenX model, or cannot be read as one; the message is one line for the user.

    ``kind`` says why: ``"empty"``, ``"too_large"``, ``"not_hdf5"``, ``"not_genx"`` (HDF5, but not
    a GenX model), ``"damaged"`` (the file could not be read: damaged, not a GenX model, or the
    reader crashed) or ``"timeout"``.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ModelInfo:
    """What a GenX model file holds, read without running it (see :func:`inspect_model`).

    Names are as stored, control characters replaced and each cut to :data:`MAX_NAME`
    characters; the lists hold the first :data:`MAX_NAMES`, the counts are complete.
    """

    #: data set names, in GenX's order (empty when a data set has no name)
    datasets: tuple[str, ...]
    #: number of data sets
    dataset_count: int
    #: names of the fitted parameters (rows of the parameter grid with a name and "fit" on), in order
    fit_parameters: tuple[str, ...]
    #: number of fitted parameters
    fit_parameter_count: int
    #: number of named rows of the parameter grid, fitted or not
    parameter_count: int
    #: hints at what the model is: the GenX model libraries its script imports (``spec_nx`` for
    #: ``import models.spec_nx as model``), read from the script's text, never by running it
    model_names: tuple[str, ...]
    #: the figure of merit the model uses (a function of ``genx.fom_funcs``, such as ``chi2bars``)
    fom: str | None
    #: the solver the file was saved with (``DiffEv``; ``genx.fit`` always fits with ``DiffEv``)
    solver: str | None
    #: the GenX version that wrote the file, when stored: GenX (3.8.13, and its current source) writes
    #: none into ``.hgx`` files, so this is ``None`` for them
    genx_version: str | None
    #: GenX's solver settings as stored (names of ``genx.diffev.DiffEvConfig``); those missing or
    #: unreadable are left out
    genx_settings: dict[str, Any] = field(hash=False)
    #: the proposed fit settings, for ``orchester fit`` / ``genx.fit``: ``generations``,
    #: ``population``, ``km``, ``kr``, ``method``, each valid for ``orchester fit``
    defaults: dict[str, Any] = field(hash=False)
    #: the settings of :attr:`defaults` that are GenX's defaults, not the file's (missing, unreadable
    #: or out of range in the file)
    fallbacks: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy (lists for tuples)."""
        return {
            "datasets": list(self.datasets), "dataset_count": self.dataset_count,
            "fit_parameters": list(self.fit_parameters), "fit_parameter_count": self.fit_parameter_count,
            "parameter_count": self.parameter_count, "model_names": list(self.model_names), "fom": self.fom,
            "solver": self.solver, "genx_version": self.genx_version, "genx_settings": dict(self.genx_settings),
            "defaults": dict(self.defaults), "fallbacks": list(self.fallbacks),
        }


def hdf5_offset(data: bytes) -> int | None:
    """Where the HDF5 superblock signature of ``data`` is: 0, or after a user block (512, 1024, 2048 …).

    ``None`` when it is nowhere HDF5 looks for it.
    """
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= len(data):
        if bytes(data[offset:offset + len(HDF5_SIGNATURE)]) == HDF5_SIGNATURE:
            return offset
        offset = USER_BLOCK_MIN if offset == 0 else offset * 2
    return None


def inspect_model(data: bytes, *, timeout: float = TIMEOUT, max_bytes: int = MAX_BYTES) -> ModelInfo:
    """Read what the GenX model file ``data`` (the bytes of an ``.hgx``) holds, without running it.

    The size and the HDF5 signature are checked here; the file is then read in a child process
    (``python -m orchester.genx.inspect``, see :func:`main`) under resource limits, killed after
    ``timeout`` seconds. Safe to call from several threads at once; it blocks (about 0.2 s for a
    small model, at most ``timeout``): from an event loop, call it in a worker thread.

    :raises ModelError: the file is empty, larger than ``max_bytes``, not HDF5, not a GenX model,
        damaged, or not read within ``timeout`` (the message is one line, for the user).
    :raises OrchesterError: the file could not be inspected here at all (h5py missing, the child
        cannot start): not the file's fault.
    """
    if not timeout > 0 or not max_bytes > 0:
        raise ValueError("timeout and max_bytes must be positive")
    size = len(data)
    if size == 0:
        raise ModelError("not a GenX model (.hgx): the file is empty", "empty")
    if size > max_bytes:
        raise ModelError(f"not accepted: the file is {_size(size)}, larger than the {_size(max_bytes)} allowed",
                         "too_large")
    if hdf5_offset(data) is None:
        raise ModelError("not a GenX model (.hgx): not an HDF5 file", "not_hdf5")
    reply = _run_child(data, timeout, max_bytes)
    try:
        return _model_info(reply["model"])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("model inspector: unexpected answer (%s)", exc)
        raise ModelError(_DAMAGED, "damaged") from None


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MB"


def _run_child(data: bytes, timeout: float, max_bytes: int) -> dict[str, Any]:
    """Run the child on ``data``; its answer (``{"ok": true, "model": {...}}``), or raise."""
    command = list(CHILD_COMMAND) if CHILD_COMMAND is not None else [sys.executable, "-m", _MODULE]
    memory = max(CHILD_MEMORY, 3 * max_bytes + 1024**3)
    command += ["--cpu", str(math.ceil(timeout) + 1), "--memory", str(memory), "--max-bytes", str(max_bytes)]
    env = dict(os.environ)
    for name in ("PYTHONINSPECT", "PYTHONSTARTUP"):
        env.pop(name, None)
    env.update({
        "HDF5_PLUGIN_PRELOAD": "::",  # no HDF5 filter plugin is loaded, whatever filter a file names
        "HDF5_PLUGIN_PATH": os.path.join(os.devnull, "none"),  # a folder nobody can create
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    root = Path(__file__).resolve().parents[2]  # where `orchester` is: `-m` finds this very code
    try:
        proc = subprocess.run(command, input=data, capture_output=True, timeout=timeout, cwd=root, env=env,
                              check=False)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise ModelError(f"could not be read in {timeout:g} s: the file is damaged, too large or not a GenX "
                         "model", "timeout") from None
    except OSError as exc:
        raise OrchesterError(f"cannot start the GenX model inspector: {exc}") from None
    if proc.returncode != 0:
        log.warning("model inspector exited with %s: %s", _exit(proc.returncode), _tail(proc.stderr))
        raise ModelError(_DAMAGED, "damaged")
    try:
        if len(proc.stdout) > MAX_REPLY:
            raise ValueError(f"{len(proc.stdout)} bytes")
        reply = json.loads(proc.stdout)
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ValueError("not an answer")
    except ValueError as exc:
        log.warning("model inspector: unreadable answer (%s): %s", exc, _tail(proc.stderr))
        raise ModelError(_DAMAGED, "damaged") from None
    if reply["ok"]:
        return reply
    kind = reply.get("kind")
    if kind == "unavailable":
        raise OrchesterError(f"cannot inspect GenX models here: {_clean(reply.get('error'), 200)}")
    if kind == "not_genx" and isinstance(reply.get("error"), str):
        raise ModelError(f"not a GenX model (.hgx): {_clean(reply['error'], 200)}", "not_genx")
    raise ModelError(_DAMAGED, "damaged")


def _exit(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"


def _tail(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return _clean(lines[-1] if lines else "(nothing on stderr)", 500)


def _clean(value: Any, limit: int = MAX_NAME) -> str:
    from orchester.render import clean_text

    return clean_text(value, limit)


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"not a count: {type(value).__name__}")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("not a list of names")
    return tuple(_clean(v) for v in value[:MAX_NAMES])


def _optional(value: Any, limit: int = 100) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("not a string")
    return _clean(value, limit)


def _model_info(raw: Any) -> ModelInfo:
    """A :class:`ModelInfo` from the child's answer, every field checked (a bad one raises ValueError)."""
    if not isinstance(raw, dict):
        raise ValueError("not a map")
    settings = raw["settings"]
    if not isinstance(settings, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in settings.items()):
        raise ValueError("settings are not a map of strings")
    genx = genx_settings(settings)
    fitted = _count(raw["fit_parameter_count"])
    defaults, fallbacks = fit_defaults(genx, fitted)
    fom = _optional(raw["fom"])
    return ModelInfo(
        datasets=_names(raw["datasets"]), dataset_count=_count(raw["dataset_count"]),
        fit_parameters=_names(raw["fit_parameters"]), fit_parameter_count=fitted,
        parameter_count=_count(raw["parameter_count"]), model_names=_names(raw["model_names"]),
        fom=fom if fom is not None and _FOM_NAME.fullmatch(fom) else None, solver=_optional(raw["solver"]),
        genx_version=_optional(raw["genx_version"]), genx_settings=genx, defaults=defaults, fallbacks=fallbacks)


def genx_settings(raw: Mapping[str, str]) -> dict[str, Any]:
    """GenX's solver settings from the text of the stored config, converted as GenX converts them.

    ``raw`` maps :data:`GENX_SETTINGS` names to the option text (``configparser``'s ``getint``,
    ``getfloat``, ``getboolean``); a value that does not convert is left out, as are unknown names
    and non-finite numbers.
    """
    states = configparser.ConfigParser.BOOLEAN_STATES
    out: dict[str, Any] = {}
    for name, kind in GENX_SETTINGS.items():
        text = raw.get(name)
        if not isinstance(text, str):
            continue
        text = text.strip()
        try:
            if kind is bool:
                if text.lower() not in states:
                    continue
                value: Any = states[text.lower()]
            elif kind is int:
                value = int(text)
            elif kind is float:
                value = float(text)
                if not math.isfinite(value):
                    continue
            else:
                value = text
        except ValueError:
            continue
        out[name] = value
    return out


def _proposed(genx: Mapping[str, Any], fit_parameters: int) -> dict[str, Any]:
    """The fit settings GenX's ``DiffEv.init_fitting`` derives from its solver settings ``genx``."""
    proposed: dict[str, Any] = {"km": genx.get("km"), "kr": genx.get("kr"), "method": genx.get("create_trial")}
    population = None
    if genx.get("use_pop_mult") is True and "pop_mult" in genx:
        population = int(genx["pop_mult"] * fit_parameters)
    elif genx.get("use_pop_mult") is False and "pop_size" in genx:
        population = int(genx["pop_size"])
    proposed["population"] = population
    if genx.get("use_max_generations") is True and "max_generations" in genx:
        proposed["generations"] = int(genx["max_generations"])
    elif genx.get("use_max_generations") is False and "max_generation_mult" in genx and population is not None:
        proposed["generations"] = int(genx["max_generation_mult"] * fit_parameters * population)
    return proposed


def fit_defaults(genx: Mapping[str, Any], fit_parameters: int) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Orchester's fit settings from GenX's (``genx_settings``) for a model with ``fit_parameters`` fitted.

    As GenX fits the file: its shipped default profile (:data:`GENX_DEFAULT_PROFILE`) under the
    settings the file stores, then as ``DiffEv.init_fitting`` sets them: ``population`` is
    ``pop_mult`` × the number of fitted parameters when ``use_pop_mult``, else ``pop_size``;
    ``generations`` is ``max_generations`` when ``use_max_generations``, else
    ``max_generation_mult`` × fitted parameters × population; ``km``, ``kr`` as they are;
    ``method`` is ``create_trial``. Each is then checked by :func:`orchester.genx.check_setting`
    (the ranges ``orchester fit`` accepts); one out of range is what GenX's default profile alone
    gives (with its fixed population and generation count when that is out of range too).

    Returns the settings and the names of those that are not the file's own (the file does not
    store what determines them, or stores a value out of range): GenX's defaults.
    """
    stored = _proposed(genx, fit_parameters)
    merged = _proposed({**GENX_DEFAULT_PROFILE, **genx}, fit_parameters)
    profile = _proposed(GENX_DEFAULT_PROFILE, fit_parameters)
    fixed = _proposed({**GENX_DEFAULT_PROFILE, "use_pop_mult": False, "use_max_generations": True}, fit_parameters)
    defaults: dict[str, Any] = {}
    fallbacks: list[str] = []
    for name in SETTINGS:
        value = merged.get(name)
        checked = check_setting(name, value) if value is not None else None
        if checked is None or stored.get(name) is None:
            fallbacks.append(name)
        if checked is None:
            checked = check_setting(name, profile[name])
        if checked is None:
            checked = check_setting(name, fixed[name])
        defaults[name] = checked
    return defaults, tuple(fallbacks)


# The child side: ``python -m orchester.genx.inspect`` reads one file on stdin, writes one JSON object.


class _NotGenX(Exception):
    """An HDF5 file that is not a GenX model; the message (one of ours, never the file's text) says why."""


def _apply_limits(cpu: int, memory: int) -> None:
    """Resource limits of the child: CPU seconds, address space, no file written, no core dump."""
    import resource

    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
              (resource.RLIMIT_FSIZE, 0, 0), (resource.RLIMIT_CORE, 0, 0)]
    for which, soft, hard in limits:
        old_soft, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:  # never above what the parent had
            hard = min(hard, old_hard)
        if old_soft != resource.RLIM_INFINITY:
            soft = min(soft, old_soft)
        resource.setrlimit(which, (min(soft, hard), hard))


def main(argv: Sequence[str] | None = None) -> int:
    """The child: read a model file on stdin, print one JSON object on stdout, exit 0.

    ``{"ok": true, "model": {...}}``, or ``{"ok": false, "kind": "not_genx" | "damaged" |
    "unavailable", "error": "..."}``. The limits come as options (``--cpu``, ``--memory``,
    ``--max-bytes``) and are applied before the file is read; anything else writes on stderr
    (stdout is kept for the answer).
    """
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=main.__doc__)
    parser.add_argument("--cpu", type=int, default=math.ceil(TIMEOUT) + 1)
    parser.add_argument("--memory", type=int, default=CHILD_MEMORY)
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    args = parser.parse_args(argv)
    answer = os.dup(1)  # the answer's way out; everything else printed (file descriptor 1 too) goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.dont_write_bytecode = True
    _apply_limits(args.cpu, args.memory)
    reply: dict[str, Any]
    try:
        data = sys.stdin.buffer.read(args.max_bytes + 1)
        if len(data) > args.max_bytes or hdf5_offset(data) is None:
            raise ValueError("too large or not HDF5")
        reply = {"ok": True, "model": read_model(data)}
    except _NotGenX as exc:
        reply = {"ok": False, "kind": "not_genx", "error": str(exc)}
    except ImportError as exc:
        reply = {"ok": False, "kind": "unavailable", "error": f"{exc.name or 'h5py'} is not installed"}
    except Exception as exc:  # the file is damaged (or a limit was hit): the answer says so, never a traceback
        print(f"cannot read the model: {type(exc).__name__}: {str(exc)[:500]}", file=sys.stderr)
        reply = {"ok": False, "kind": "damaged", "error": "the file could not be read"}
    out = json.dumps(reply).encode()
    while out:
        out = out[os.write(answer, out):]
    os.close(answer)
    return 0


def read_model(data: bytes) -> dict[str, Any]:
    """The facts of the GenX model in ``data`` (in the child: this opens the file with h5py).

    Raises :class:`_NotGenX` for an HDF5 file without the parts of a GenX model (a model script,
    data sets numbered from 0, the parameter grid), another exception when the file cannot be read.
    """
    import h5py

    try:  # no filter plugin from anywhere (the parent's environment says so too)
        while h5py.h5pl.size():
            h5py.h5pl.remove(0)
    except Exception as exc:
        print(f"cannot clear the HDF5 plugin path: {exc}", file=sys.stderr)
    with h5py.File(io.BytesIO(data), "r") as f:
        current = _group(f, "current")
        if current is None:
            raise _NotGenX("it has no GenX model (no 'current' group)")
        script = _text(current, "script")
        if script is None:
            raise _NotGenX("it has no model script")
        if not script.strip():
            raise _NotGenX("its model script is empty")
        datasets = _datasets(current)
        fitted, rows = _parameters(current)
        config = _text(current, "config")
        optimizer = _group(current, "optimizer")
        solver = _text(optimizer, "solver") if optimizer is not None else None
        settings, config_fom = _config_settings(config)
        fom = _text(current, "fomfunction") or config_fom
        models = [m for m in dict.fromkeys(_MODEL_IMPORT.findall(script)) if m not in _HELPER_MODULES]
        return {
            "datasets": [n[:MAX_NAME] for n in datasets[:MAX_NAMES]], "dataset_count": len(datasets),
            "fit_parameters": [n[:MAX_NAME] for n in fitted[:MAX_NAMES]], "fit_parameter_count": len(fitted),
            "parameter_count": rows, "model_names": [m[:MAX_NAME] for m in models[:MAX_NAMES]],
            "fom": fom[:100] if fom else None,
            "solver": solver[:100] if solver else None, "genx_version": None, "settings": settings,
        }


def _member(group: Any, name: str) -> Any:
    """``group[name]`` when it is a hard link (no external, soft or user-defined link is followed), else ``None``."""
    import h5py

    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        return None
    return group.get(name)


def _group(group: Any, name: str) -> Any:
    import h5py

    obj = _member(group, name)
    return obj if isinstance(obj, h5py.Group) else None


def _dataset(group: Any, name: str) -> Any:
    """A dataset stored in this file (``None`` for a missing one, a group, external storage, a virtual dataset)."""
    import h5py

    obj = _member(group, name)
    if not isinstance(obj, h5py.Dataset) or obj.external or obj.is_virtual:
        return None
    return obj


def _text(group: Any, name: str) -> str | None:
    """A scalar string dataset as text (UTF-8), or ``None``."""
    ds = _dataset(group, name)
    if ds is None or ds.shape != () or ds.dtype.kind not in "OSU":
        return None
    if ds.dtype.kind != "O" and ds.dtype.itemsize > _MAX_TEXT:
        return None
    value = ds[()]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        return None
    return value


def _column(group: Any, name: str, kinds: str) -> Any:
    ds = _dataset(group, name)
    if ds is None or ds.ndim != 1 or ds.shape[0] > _MAX_ROWS or ds.dtype.kind not in kinds:
        raise _NotGenX("its parameter grid is not GenX's")
    return ds[()]


def _datasets(current: Any) -> list[str]:
    """The data set names, in order (GenX numbers them ``0`` to ``n-1`` under ``data/datasets``)."""
    data = _group(current, "data")
    datasets = _group(data, "datasets") if data is not None else None
    if datasets is None or len(datasets) == 0:
        raise _NotGenX("it has no data sets")
    names = []
    for i in range(len(datasets)):
        ds = _group(datasets, str(i))
        if ds is None or _dataset(ds, "x") is None or _dataset(ds, "y") is None:
            raise _NotGenX("its data sets are not GenX's")
        names.append(_text(ds, "name") or "")
    return names


def _parameters(current: Any) -> tuple[list[str], int]:
    """The parameter grid: the fitted parameters' names, and the number of named rows."""
    grid = _group(current, "parameters")
    if grid is None or _dataset(grid, "data_labels") is None:
        raise _NotGenX("it has no parameter grid")
    names = _column(grid, "data col 0", "OSU")
    fit = _column(grid, "data col 2", "biuf")
    columns = [names, fit] + [_column(grid, f"data col {i}", "biufOSU") for i in (1, 3, 4, 5)]
    if len({len(c) for c in columns}) != 1:
        raise _NotGenX("its parameter grid is not GenX's")
    decoded = []
    for value in names:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            raise _NotGenX("its parameter grid is not GenX's")
        decoded.append(value)
    fitted = [n for n, f in zip(decoded, fit, strict=True) if bool(f) and n != ""]  # GenX's get_fit_pars
    return fitted, sum(n != "" for n in decoded)


def _config_settings(config: str | None) -> tuple[dict[str, str], str | None]:
    """The text of GenX's solver settings in the stored config (``[solver]``), and its figure of merit."""
    if config is None:
        return {}, None
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(config)
    except configparser.Error:
        return {}, None
    if not parser.has_section("solver"):
        return {}, None
    section = parser["solver"]
    settings = {name: section[name.replace("_", " ")][:100] for name in GENX_SETTINGS
                if section.get(name.replace("_", " ")) is not None}
    fom = section.get("figure of merit")
    return settings, fom[:100] if fom else None


if __name__ == "__main__":
    sys.exit(main())
