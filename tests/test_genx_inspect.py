"""orchester.genx.inspect: GenX models read without running them, in a child process; anything else refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from orchester.errors import OrchesterError
from orchester.genx import inspect as gi
from orchester.genx.inspect import (
    GENX_DEFAULT_PROFILE,
    GENX_SETTINGS,
    ModelError,
    ModelInfo,
    fit_defaults,
    genx_settings,
    hdf5_offset,
    inspect_model,
)

h5py = pytest.importorskip("h5py")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "genx").glob("*.hgx"))
IRON = ROOT / "examples" / "genx" / "iron_film.hgx"
SETTING_NAMES = {"generations", "population", "km", "kr", "method"}


def genx_default(n: int) -> dict[str, Any]:
    """The fit GenX's shipped default profile gives a model with ``n`` fitted parameters."""
    return {"generations": 6 * n * 50, "population": 50, "km": 0.6, "kr": 0.6, "method": "best_1_bin"}


def genx_examples() -> list[Path]:
    """The models shipped inside genx3 (one of them saved with GenX's other solver, one in an older layout)."""
    from importlib.util import find_spec

    spec = find_spec("genx")
    return sorted(Path(spec.origin).parent.glob("examples/*.hgx")) if spec and spec.origin else []


def refused(data: bytes, kind: str | None = None, **kw: Any) -> ModelError:
    """The ModelError that inspecting ``data`` raises (checked: one line, no traceback)."""
    with pytest.raises(ModelError) as info:
        inspect_model(data, **kw)
    err = info.value
    message = str(err)
    assert message and "\n" not in message and len(message) < 300 and "Traceback" not in message, message
    assert isinstance(err, ValueError) and isinstance(err, OrchesterError)
    assert err.kind in gi._KINDS
    if kind is not None:
        assert err.kind == kind, (err.kind, message)
    return err


def in_range(defaults: dict[str, Any]) -> None:
    assert set(defaults) == SETTING_NAMES
    assert isinstance(defaults["generations"], int) and defaults["generations"] >= 1
    assert isinstance(defaults["population"], int) and defaults["population"] >= 5
    assert 0 < defaults["km"] <= 2 and 0 <= defaults["kr"] <= 1
    from orchester.cli.fit import TRIAL_METHODS

    assert defaults["method"] in TRIAL_METHODS


@pytest.fixture
def genx_reads() -> Iterator[Any]:
    """What GenX itself reads from a (trusted) model file: its loader, its config, its solver settings."""
    genx = pytest.importorskip("genx.model_control")
    from configparser import ConfigParser

    from genx.core.config import config
    from genx.diffev import DiffEv

    saved = config.model_config

    def read(path: Path) -> dict[str, Any]:
        config.model_config = ConfigParser()  # GenX merges the config of every file it loads: one at a time
        ctrl = genx.ModelController(DiffEv())
        ctrl.load_file(str(path))
        opt = ctrl.optimizer.opt
        model = ctrl.model
        return {"settings": {name: getattr(opt, name) for name in gi.GENX_SETTINGS},
                "fitted": list(model.parameters.get_fit_pars()[1]), "datasets": [d.name for d in model.data],
                "fom": model.fomfunction}

    yield read
    config.model_config = saved


# models that are GenX's


def test_examples_inspect_and_match_what_genx_reads(genx_reads: Any) -> None:
    paths = EXAMPLES + genx_examples()
    assert len(EXAMPLES) == 3
    with ThreadPoolExecutor(4) as pool:  # several at once: each inspection has its own child
        infos = list(pool.map(lambda p: inspect_model(p.read_bytes()), paths))
    for path, info in zip(paths, infos, strict=True):
        assert isinstance(info, ModelInfo)
        in_range(info.defaults)
        genx = genx_reads(path)
        assert info.genx_settings == genx["settings"], path.name
        assert list(info.fit_parameters) == genx["fitted"] and info.fit_parameter_count == len(genx["fitted"])
        assert list(info.datasets) == genx["datasets"] and info.dataset_count == len(genx["datasets"])
        assert info.fom == genx["fom"]
        assert info.genx_version is None  # GenX stores none
        # the settings as GenX's DiffEv.init_fitting sets them, where the command line takes them
        s, n = genx["settings"], len(genx["fitted"])
        population = int(s["pop_mult"] * n) if s["use_pop_mult"] else int(s["pop_size"])
        generations = int(s["max_generations"]) if s["use_max_generations"] else \
            int(s["max_generation_mult"] * n * population)
        expected = {"generations": generations, "population": population, "km": s["km"], "kr": s["kr"],
                    "method": s["create_trial"]}
        for name, value in expected.items():
            want = genx_default(n)[name] if name in info.fallbacks else value
            assert info.defaults[name] == want, (path.name, name)
        assert json.loads(json.dumps(info.to_json())) == info.to_json()
    iron = infos[paths.index(IRON)]
    assert iron.defaults == {"generations": 120, "population": 50, "km": 0.7, "kr": 0.7,  # stored in the file
                             "method": "best_1_bin"}
    assert iron.fallbacks == () and iron.model_names == ("spec_nx",) and iron.solver == "DiffEv"
    assert iron.datasets == ("iron_film (synthetic)",) and iron.parameter_count == 4
    by_name = {p.name: i for p, i in zip(paths, infos, strict=True)}
    if "SuperAdam_SiO_systematic_errors.hgx" in by_name:  # saved with GenX's Bumps solver
        assert by_name["SuperAdam_SiO_systematic_errors.hgx"].solver == "BumpsOptimizer"


def test_a_user_block_before_the_hdf5_file_is_accepted(tmp_path: Path) -> None:
    """HDF5 looks for its superblock at 0, 512, 1024, 2048 … (after a user block): h5py reads such a file."""
    moved = tmp_path / "user_block.hgx"
    with h5py.File(IRON, "r") as src, h5py.File(moved, "w", userblock_size=1024) as dst:
        for key in src:
            src.copy(src[key], dst, name=key)
    data = moved.read_bytes()
    assert hdf5_offset(data) == 1024 and hdf5_offset(IRON.read_bytes()) == 0
    assert inspect_model(data).to_json() == inspect_model(IRON.read_bytes()).to_json()
    assert hdf5_offset(b"\0" * 100 + gi.HDF5_SIGNATURE) is None  # nowhere HDF5 looks
    refused(b"\0" * 100 + IRON.read_bytes(), "not_hdf5")


# files that are not, or not whole


def test_cheap_refusals_need_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "CHILD_COMMAND", [sys.executable, "-c", "raise SystemExit(3)"])  # never started
    png = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + b"\0" * 17
    assert "empty" in str(refused(b"", "empty"))
    assert "not an HDF5 file" in str(refused(b"import models.spec_nx as model\nprint('hello')\n", "not_hdf5"))
    refused(png, "not_hdf5")
    refused(gi.HDF5_SIGNATURE[:7], "not_hdf5")
    big = refused(IRON.read_bytes(), "too_large", max_bytes=1000)
    assert "larger than" in str(big)
    with pytest.raises(ValueError):
        inspect_model(IRON.read_bytes(), timeout=0)


def test_damaged_models_are_refused() -> None:
    data = IRON.read_bytes()
    refused(data[: len(data) // 2], "damaged")
    refused(data[:4096], "damaged")
    flipped = bytearray(data)
    for i in range(len(data) // 4, 3 * len(data) // 4):  # the middle half
        flipped[i] ^= 0xFF
    refused(bytes(flipped), "damaged")
    garbage = gi.HDF5_SIGNATURE + os.urandom(4096)
    refused(garbage, "damaged")


def test_small_damage_anywhere_never_crashes() -> None:
    """A few bytes flipped: refused, or read (they hit the data arrays, which GenX would read as they are)."""
    data = IRON.read_bytes()

    def one(position: int) -> str:
        flipped = bytearray(data)
        for i in range(position, min(len(data), position + 48)):
            flipped[i] ^= 0xFF
        try:
            in_range(inspect_model(bytes(flipped), timeout=10).defaults)
            return "read"
        except ModelError as exc:
            assert "\n" not in str(exc)
            return exc.kind

    with ThreadPoolExecutor(4) as pool:
        kinds = list(pool.map(one, range(0, len(data), len(data) // 12)))
    assert "read" in kinds and set(kinds) - {"read"}, kinds


def make(path: Path, build: Any) -> bytes:
    with h5py.File(path, "w") as f:
        build(f)
    return path.read_bytes()


def test_hdf5_files_that_are_not_genx_models(tmp_path: Path) -> None:
    def plain(f: Any) -> None:
        f["values"] = [1.0, 2.0, 3.0]

    def no_script(f: Any) -> None:
        f.create_group("current")["fomfunction"] = b"chi2"

    def no_data(f: Any) -> None:
        f.create_group("current")["script"] = b"import models.spec_nx as model\n"

    refused(make(tmp_path / "a.h5", plain), "not_genx")
    assert "no model script" in str(refused(make(tmp_path / "b.h5", no_script), "not_genx"))
    assert "no data sets" in str(refused(make(tmp_path / "c.h5", no_data), "not_genx"))

    def copy_without(name: str) -> bytes:
        path = tmp_path / f"without_{name.replace('/', '_')}.hgx"
        path.write_bytes(IRON.read_bytes())
        with h5py.File(path, "r+") as f:
            del f[name]
        return path.read_bytes()

    assert "parameter grid" in str(refused(copy_without("current/parameters"), "not_genx"))
    refused(copy_without("current/parameters/data col 2"), "not_genx")
    refused(copy_without("current/data/datasets/0/x"), "not_genx")
    empty_script = tmp_path / "empty_script.hgx"
    empty_script.write_bytes(IRON.read_bytes())
    with h5py.File(empty_script, "r+") as f:
        del f["current/script"]
        f["current/script"] = b"   \n"
    assert "empty" in str(refused(empty_script.read_bytes(), "not_genx"))


# files made to attack the reader


def test_nothing_in_the_file_is_run(tmp_path: Path) -> None:
    """GenX's own loader runs the stored solver name (exec) and [startup] script (eval): inspection never."""
    marks = [tmp_path / "solver_ran", tmp_path / "startup_ran"]
    evil = tmp_path / "evil.hgx"
    evil.write_bytes(IRON.read_bytes())
    with h5py.File(evil, "r+") as f:
        del f["current/optimizer/solver"]
        f["current/optimizer/solver"] = f"DiffEv as X\nopen({str(marks[0])!r}, 'w')\nDiffEv = None".encode()
        config = f["current/config"][()].decode()
        del f["current/config"]
        f["current/config"] = config.replace('script = [""]', f"script = [open({str(marks[1])!r}, 'w') and '']"
                                             ).replace("pop size = 50", "pop size = %(boom)s").encode()
        f.copy(f["current"], f, name="1-second")  # GenX makes a Model() for it, after reading the config
        del f["current/script"]
        f["current/script"] = f"open({str(marks[0])!r}, 'w')\nimport models.spec_nx as model\n".encode()
    info = inspect_model(evil.read_bytes())
    assert not any(m.exists() for m in marks)
    assert info.solver and info.solver.startswith("DiffEv as X") and "\n" not in info.solver
    assert info.model_names == ("spec_nx",) and "pop_size" not in info.genx_settings
    in_range(info.defaults)


def test_links_and_storage_outside_the_file_are_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOP-SECRET-" * 4)
    external = tmp_path / "external.hgx"
    external.write_bytes(IRON.read_bytes())
    with h5py.File(external, "r+") as f:  # the parameter names stored in another file (HDF5 "external storage")
        del f["current/parameters/data col 0"]
        f["current/parameters"].create_dataset("data col 0", shape=(4,), dtype="S11",
                                               external=[(str(secret), 0, 44)])
    with h5py.File(external, "r") as f:  # h5py reads it from there
        assert f["current/parameters/data col 0"][0] == b"TOP-SECRET-"
    assert "SECRET" not in str(refused(external.read_bytes(), "not_genx"))
    linked = tmp_path / "linked.hgx"
    linked.write_bytes(IRON.read_bytes())
    with h5py.File(linked, "r+") as f:
        del f["current/script"]
        f["current/script"] = h5py.ExternalLink(str(IRON), "/current/script")
    refused(linked.read_bytes(), "not_genx")


def test_settings_of_a_hand_made_file_fall_back_to_genx_s_defaults(tmp_path: Path) -> None:
    odd = tmp_path / "odd.hgx"
    odd.write_bytes(IRON.read_bytes())
    with h5py.File(odd, "r+") as f:
        config = f["current/config"][()].decode()
        del f["current/config"]
        f["current/config"] = (config.replace("km = 0.7", "km = nan").replace("kr = 0.7", "kr = 1.5")
                               .replace("create trial = best_1_bin", "create trial = os.system")
                               .replace("max generations = 120", "max generations = 40")).encode()
    info = inspect_model(odd.read_bytes())
    assert info.defaults == {"generations": 40, "population": 50, "km": 0.6, "kr": 0.6, "method": "best_1_bin"}
    assert set(info.fallbacks) == {"km", "kr", "method"}
    no_config = tmp_path / "no_config.hgx"
    no_config.write_bytes(IRON.read_bytes())
    with h5py.File(no_config, "r+") as f:
        del f["current/config"]
    info = inspect_model(no_config.read_bytes())
    # no stored config: GenX's default profile, as GenX fits it (4 parameters fitted)
    assert info.defaults == genx_default(4) and set(info.fallbacks) == SETTING_NAMES and info.genx_settings == {}


def test_mapping_of_genx_settings() -> None:
    raw = {"km": " 0.5 ", "kr": "1", "create_trial": "rand_1_bin", "use_pop_mult": "yes", "pop_mult": "2",
           "pop_size": "x", "use_max_generations": "off", "max_generations": "7", "max_generation_mult": "3",
           "unknown": "1"}
    genx = genx_settings(raw)
    assert genx == {"km": 0.5, "kr": 1.0, "create_trial": "rand_1_bin", "use_pop_mult": True, "pop_mult": 2,
                    "use_max_generations": False, "max_generations": 7, "max_generation_mult": 3}
    defaults, fallbacks = fit_defaults(genx, 10)
    assert defaults == {"generations": 3 * 10 * 20, "population": 20, "km": 0.5, "kr": 1.0, "method": "rand_1_bin"}
    assert fallbacks == ()
    # GenX's relative population of 2 parameters (4) is below the command line's 5: its default, and
    # the generations that depend on it follow GenX's population all the same
    defaults, fallbacks = fit_defaults(genx, 2)
    assert defaults["population"] == 50 and defaults["generations"] == 3 * 2 * 4 and fallbacks == ("population",)
    defaults, fallbacks = fit_defaults(genx, 0)  # nothing fitted: GenX's numbers are 0
    assert defaults["population"] == 50 and defaults["generations"] == 500  # GenX's fixed numbers
    names = ("generations", "population", "km", "kr", "method")  # in the order fit_defaults gives them
    assert fit_defaults({}, 5) == (genx_default(5), names)
    assert fit_defaults({"km": 0.0, "kr": -0.1, "create_trial": "x"}, 5) == (genx_default(5), names)
    # stored and in range (km 2 and kr 0 are GenX's limits): the file's own
    assert fit_defaults({"km": 2.0, "kr": 0.0}, 5) == (genx_default(5) | {"km": 2.0, "kr": 0.0},
                                                        ("generations", "population", "method"))
    assert genx_settings({"km": "inf", "kr": "1e400", "pop_size": "5.0", "use_pop_mult": "maybe"}) == {}
    huge = {"use_pop_mult": False, "pop_size": 10**30, "use_max_generations": True, "max_generations": 2**31}
    assert fit_defaults(huge, 5) == (genx_default(5), ("generations", "population", "km", "kr", "method"))


def test_genx_default_profile_is_genx_s_own() -> None:
    import configparser

    genx = pytest.importorskip("genx")
    profile = configparser.ConfigParser()
    profile.read(Path(genx.__file__).parent / "profiles" / "default.profile")
    raw = {name: profile.get("solver", name.replace("_", " ")) for name in GENX_SETTINGS}
    assert genx_settings(raw) == GENX_DEFAULT_PROFILE


# the child: its limits, its hangs, crashes and nonsense


def test_a_hanging_child_is_killed_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gi, "CHILD_COMMAND", [sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    err = refused(IRON.read_bytes(), "timeout", timeout=1.0)
    assert time.monotonic() - started < 10
    assert "could not be read in 1 s" in str(err)


@pytest.mark.parametrize("code", [
    "import os; os.abort()",
    "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
    "raise SystemExit(2)",
    "print('not json')",
    "print('[1, 2]')",
    "print('{\"ok\": true, \"model\": {\"datasets\": 5}}')",
    "print('{\"ok\": false, \"kind\": \"damaged\", \"error\": \"x\"}')",
])
def test_a_child_that_crashes_or_talks_nonsense_is_a_damaged_model(monkeypatch: pytest.MonkeyPatch,
                                                                    code: str) -> None:
    monkeypatch.setattr(gi, "CHILD_COMMAND", [sys.executable, "-c", code])
    refused(IRON.read_bytes(), "damaged")


def test_the_childs_reason_is_cleaned(monkeypatch: pytest.MonkeyPatch) -> None:
    reply = {"ok": False, "kind": "not_genx", "error": "bad\nline\x1b[31m" + "x" * 1000}
    monkeypatch.setattr(gi, "CHILD_COMMAND", [sys.executable, "-c", f"print({json.dumps(json.dumps(reply))})"])
    err = refused(IRON.read_bytes(), "not_genx")
    assert "\x1b" not in str(err)
    reply = {"ok": False, "kind": "unavailable", "error": "h5py is not installed"}
    monkeypatch.setattr(gi, "CHILD_COMMAND", [sys.executable, "-c", f"print({json.dumps(json.dumps(reply))})"])
    with pytest.raises(OrchesterError) as info:
        inspect_model(IRON.read_bytes())
    assert not isinstance(info.value, ModelError) and "h5py is not installed" in str(info.value)


def test_the_child_runs_under_limits() -> None:
    code = ("import json, resource, sys; from orchester.genx.inspect import _apply_limits; "
            "_apply_limits(7, 2**31); "
            "print(json.dumps([resource.getrlimit(getattr(resource, n)) for n in "
            "('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_CORE')]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [[7, 8], [2**31, 2**31], [0, 0], [0, 0]]


def test_the_child_keeps_stdout_for_its_answer() -> None:
    r = subprocess.run([sys.executable, "-m", "orchester.genx.inspect"], input=IRON.read_bytes(),
                       capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["ok"] and reply["model"]["fit_parameter_count"] == 4
    r = subprocess.run([sys.executable, "-m", "orchester.genx.inspect"], input=b"\x89HDF\r\n\x1a\n damaged",
                       capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": False, "kind": "damaged",
                                                          "error": "the file could not be read"}
    assert b"cannot read the model" in r.stderr


def test_the_module_imports_neither_genx_nor_h5py() -> None:
    code = "import sys, orchester.genx.inspect; print([m for m in ('genx', 'h5py', 'click') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout.replace("'", '"')) == [], r.stdout + r.stderr


def test_model_info_is_frozen_and_hashable() -> None:
    info = inspect_model(IRON.read_bytes())
    with pytest.raises(AttributeError):
        info.dataset_count = 2  # type: ignore[misc]
    assert hash(info) == hash(info) and info == inspect_model(IRON.read_bytes())
