"""A fit takes the model file's own optimizer settings, as GenX itself does.

Each fit runs in a real satellite worker (``genx.fit``) and is compared with GenX run directly in
this process, as ``genx --run`` runs it (``ModelController`` with ``DiffEv``, the default profile
loaded first, the file loaded, the seed set, ``start_fit``): the best figure of merit and every
parameter agree to 1e-9 relative, on GenX's shipped examples and on ours, with and without
overrides; the result says which value each setting had and where it came from.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchester import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
OURS = ROOT / "examples" / "genx"


def genx_examples() -> Path:
    import genx

    return Path(genx.__file__).parent / "examples"


def genx_directly(path: Path, seed: int, generations: int | None = None, km: float | None = None,
                  population: int | None = None, min_spread: float | None = None) -> dict[str, Any]:
    """GenX's own fit of ``path``, as ``genx --run`` does it (its ``set_diffev_pars`` for the overrides)."""
    import genx
    from genx.core import config as io
    from genx.diffev import DiffEv
    from genx.model_control import ModelController

    io.config.load_default(os.path.join(os.path.dirname(genx.__file__), "profiles", "default.profile"), reset=True)
    ctrl = ModelController(DiffEv())
    ctrl.load_file(str(path))
    opt = ctrl.optimizer
    ctrl.model.simulate()
    if generations is not None:
        opt.set_max_generations(generations)
        opt.set_use_max_generations(True)
    if population is not None:
        opt.set_pop_size(population)
        opt.set_use_pop_mult(False)
    if km is not None:
        opt.set_km(km)
    if min_spread is not None:
        opt.opt.min_parameter_spread = min_spread
    opt.opt.use_parallel_processing = False
    np.random.seed(seed)
    opt.start_fit(ctrl.model)
    deadline = time.monotonic() + 600
    while opt.is_running():
        assert time.monotonic() < deadline, "GenX's own fit did not end"
        time.sleep(0.02)
    assert not opt.error, opt.error
    return {"fom": float(opt.best_fom), "values": [float(v) for v in opt.best_vec], "population": int(opt.n_pop),
            "generations": int(opt.max_gen), "km": float(opt.opt.km), "kr": float(opt.opt.kr)}


@pytest.fixture(scope="module")
def genx_cluster() -> Any:
    with LocalCluster(satellites=1, workers=2, log_level="ERROR", heartbeat_interval=0.5) as c:
        yield c


CASES = [
    # (model file, seed, overrides): ours with nothing overridden (the file's whole fit), GenX's shipped
    # reflectivity and peak-fit examples with fewer generations (and other overrides)
    ("ours:iron_film.hgx", 3, {}),
    ("ours:platinum_film.hgx", 5, {"km": 0.5, "population": 8, "generations": 20}),
    ("genx:X-ray_Reflectivity.hgx", 1, {"generations": 6}),
    ("genx:Peakfit_Gauss.hgx", 2, {"generations": 8}),
    ("genx:SuperAdam_SiO.hgx", 4, {"generations": 4, "km": 0.8}),
]


@pytest.mark.parametrize("name,seed,overrides", CASES, ids=[c[0] for c in CASES])
def test_a_fit_is_the_fit_genx_gives_for_the_same_file_and_seed(genx_cluster: LocalCluster, name: str, seed: int,
                                                                 overrides: dict[str, Any]) -> None:
    where, file = name.split(":")
    path = (OURS if where == "ours" else genx_examples()) / file
    mine = genx_cluster.client().submit("genx.fit", path.read_bytes(), seed=seed, **overrides).result(600)
    theirs = genx_directly(path, seed, **overrides)
    assert mine["fom"] == pytest.approx(theirs["fom"], rel=1e-9)
    assert [p["value"] for p in mine["parameters"]] == pytest.approx(theirs["values"], rel=1e-9)
    used = mine["settings"]
    assert used["population"]["value"] == theirs["population"] and used["generations"]["value"] == theirs["generations"]
    assert used["km"]["value"] == theirs["km"] and used["kr"]["value"] == theirs["kr"]
    for setting in ("generations", "population", "km", "kr", "method", "start_guess", "boundaries", "min_spread"):
        assert used[setting]["source"] == ("argument" if setting in overrides else "file"), setting
    stored = mine["genx_settings"]
    if "km" not in overrides:
        assert used["km"]["value"] == stored["km"]  # e.g. GenX's own examples carry 0.6, not 0.7
    assert mine["generations_run"] == theirs["generations"] and mine["stopped"] == "generations"


def test_a_fit_stops_at_its_wall_time_and_says_so(genx_cluster: LocalCluster) -> None:
    model = (genx_examples() / "X-ray_Reflectivity.hgx").read_bytes()
    started = time.monotonic()
    result = genx_cluster.client().submit("genx.fit", model, seed=1, max_seconds=1.0).result(600)
    assert result["stopped"] == "max_seconds" and result["generations_run"] < result["generations"]
    assert result["settings"]["max_seconds"] == {"value": 1.0, "source": "argument"}
    assert time.monotonic() - started < 120  # (the file's own stop would be thousands of generations later)


def test_a_fit_stops_on_genx_s_parameter_spread_and_says_so(genx_cluster: LocalCluster) -> None:
    # GenX's stop rule: every fitted parameter's spread over the population below min_spread % of its
    # range; a generous threshold stops the nickel film's fit long before its 400 generations
    model = (OURS / "nickel_film.hgx").read_bytes()
    result = genx_cluster.client().submit("genx.fit", model, seed=2, generations=400, population=12,
                                          min_spread=40.0).result(600)
    assert result["stopped"] == "min_spread" and 0 < result["generations_run"] < 400
    assert result["settings"]["min_spread"] == {"value": 40.0, "source": "argument"}
    same = genx_directly(OURS / "nickel_film.hgx", 2, generations=400, population=12, min_spread=40.0)
    assert result["fom"] == pytest.approx(same["fom"], rel=1e-9)  # where GenX itself stops


@pytest.mark.parametrize("bad", [{"km": 0}, {"kr": 1.5}, {"generations": 0}, {"population": 4}, {"km": float("nan")},
                                 {"start_guess": "yes"}, {"min_spread": 101}, {"max_seconds": 0}])
def test_bad_settings_fail_the_fit_with_a_clear_error(genx_cluster: LocalCluster, bad: dict[str, Any]) -> None:
    from orchester import TaskFailed

    model = (OURS / "iron_film.hgx").read_bytes()
    with pytest.raises(TaskFailed, match=next(iter(bad))):
        genx_cluster.client().submit("genx.fit", model, **bad).result(120)


def test_a_fit_says_its_models_axis_labels_and_gives_its_sld_profile(genx_cluster: LocalCluster) -> None:
    client = genx_cluster.client()
    model = (genx_examples() / "X-ray_Reflectivity.hgx").read_bytes()
    xray = client.submit("genx.fit", model, generations=2).result(600)
    assert xray["xlabel"].startswith("2θ") and xray["sld"]["parts"]["Re"].shape == xray["sld"]["z"].shape
    assert xray["errorbar_level"] == 1.05 and sum(p["fit"] for p in xray["all_parameters"]) == len(xray["parameters"])
    import io

    from orsopy.fileio import load_orso

    (exported,) = load_orso(io.StringIO(xray["orso"].decode()))  # the field's exchange format, read back
    assert [c.name for c in exported.info.columns][:4] == ["Qz", "R", "sR", "Rsim"]
    assert exported.data.shape[0] == len(xray["datasets"][0]["x"])
    peaks = client.submit("genx.fit", (genx_examples() / "Peakfit_Gauss.hgx").read_bytes(), generations=2).result(600)
    assert peaks["xlabel"] == "x-axis" and "sld" not in peaks and "orso" not in peaks  # not reflectivity
