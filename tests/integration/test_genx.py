"""GenX fits for real: genx3 runs in satellite worker processes; results, determinism, cache, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchester import LocalCluster, TaskFailed
from orchester.genx.fits import FitCache, FitSettings
from orchester.genx.job import run_fits

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "genx"


def load_builder() -> Any:
    spec = importlib.util.spec_from_file_location("make_models", EXAMPLES / "make_models.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_genx_is_installed_headless() -> None:
    assert importlib.util.find_spec("genx") is not None, "pip install --no-deps genx3==3.8.13"
    r = subprocess.run([sys.executable, "-c", "import sys, genx.model_control, genx.diffev; "
                        "print('wx' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False"


@pytest.fixture(scope="module")
def genx_cluster() -> Any:
    """Two satellites tagged a and b (one worker each), so a test can choose where a fit runs."""
    with LocalCluster(satellites=0, workers=1, log_level="ERROR", heartbeat_interval=0.5) as c:
        c.add_satellite("genx-a", tags=["a"])
        c.add_satellite("genx-b", tags=["b"])
        c.wait_for_satellites(2)
        yield c


def test_a_fit_recovers_the_true_parameters(genx_cluster: LocalCluster, tmp_path: Path) -> None:
    truth = load_builder().build("nickel_film", str(tmp_path / "ni.hgx"), seed=7)
    c = genx_cluster.client()
    result = c.submit("genx.fit", (tmp_path / "ni.hgx").read_bytes(), generations=60, population=30,
                      seed=3).result(300)
    fitted = {p["name"]: p["value"] for p in result["parameters"]}
    # stated tolerance: thickness within 1 %, roughnesses within 0.3 Å, scale within 2 %
    assert fitted["Film.setD"] == pytest.approx(truth["Film.setD"], rel=0.01)
    assert fitted["Film.setSigma"] == pytest.approx(truth["Film.setSigma"], abs=0.3)
    assert fitted["Sub.setSigma"] == pytest.approx(truth["Sub.setSigma"], abs=0.3)
    assert fitted["inst.setI0"] == pytest.approx(truth["inst.setI0"], rel=0.02)
    assert result["fom"] < 1.5 < result["fom_start"]  # chi2 with 3 % noise: about 1
    d = result["datasets"][0]
    assert isinstance(d["y_sim"], np.ndarray) and d["x"].shape == d["y_sim"].shape == (300,)
    assert result["fom_history"].shape == (61, 2) and result["genx_version"].startswith("3.")
    assert result["model"][:8] == b"\x89HDF\r\n\x1a\n"  # the fitted .hgx
    assert all(p["error"] is None or len(p["error"]) == 2 for p in result["parameters"])


def test_the_same_fit_gives_the_same_result_on_two_satellites(genx_cluster: LocalCluster) -> None:
    model = (EXAMPLES / "iron_film.hgx").read_bytes()
    c = genx_cluster.client()
    futs = [c.submit("genx.fit", model, generations=15, population=20, seed=11, tags=[tag]) for tag in "ab"]
    ra, rb = (f.result(300) for f in futs)
    assert {c.show(f.task_id)["satellite"] for f in futs} == {"genx-a", "genx-b"}
    assert ra["fom"] == pytest.approx(rb["fom"], rel=1e-9)
    for pa, pb in zip(ra["parameters"], rb["parameters"], strict=True):
        assert pa["value"] == pytest.approx(pb["value"], rel=1e-9)
    np.testing.assert_allclose(ra["fom_history"], rb["fom_history"], rtol=1e-9)


def test_progress_is_streamed_per_generation(genx_cluster: LocalCluster) -> None:
    c = genx_cluster.client()
    with c.subscribe(["progress:"]) as events:
        import time

        time.sleep(0.3)
        fut = c.submit("genx.fit", (EXAMPLES / "platinum_film.hgx").read_bytes(), generations=30, population=20)
        fut.result(300)
        seen = []
        while (ev := events.recv(timeout=1)) is not None:
            if ev.data.get("id") == fut.task_id:
                seen.append(ev.data)
    assert seen and {"generation", "fom", "evals_per_s", "total"} <= set(seen[-1])
    gens = [s["generation"] for s in seen]
    assert gens == sorted(gens) and gens[-1] <= 31 and seen[-1]["total"] == 30


def bad_models(tmp_path: Path) -> dict[str, Path]:
    builder = load_builder()
    (tmp_path / "garbage.hgx").write_bytes(os.urandom(5000))
    (tmp_path / "text.hgx").write_text("this is not a GenX model\n")
    broken = tmp_path / "broken_script.hgx"
    builder.build("iron_film", str(broken))
    from genx.diffev import DiffEv
    from genx.model_control import ModelController

    ctrl = ModelController(DiffEv())
    ctrl.load_file(str(broken))
    ctrl.model.set_script(ctrl.model.script + "\nraise RuntimeError('the script fails on purpose')\n")
    ctrl.save_file(str(broken))
    nan = tmp_path / "nan_model.hgx"
    builder.build("iron_film", str(nan))
    ctrl = ModelController(DiffEv())
    ctrl.load_file(str(nan))
    ctrl.model.set_script(ctrl.model.script.replace(
        "return [sample.SimSpecular(d.x, inst) for d in data]", "return [d.x * float('nan') for d in data]"))
    ctrl.save_file(str(nan))
    return {"garbage": tmp_path / "garbage.hgx", "text": tmp_path / "text.hgx", "broken": broken, "nan": nan}


def test_bad_models_fail_alone_with_clear_errors(genx_cluster: LocalCluster, tmp_path: Path) -> None:
    bad = bad_models(tmp_path)
    files = [bad["garbage"], EXAMPLES / "iron_film.hgx", bad["text"], bad["broken"], bad["nan"],
             tmp_path / "missing.hgx"]
    c = genx_cluster.client()
    rows = run_fits(c, files, FitSettings(generations=5, population=10), tmp_path / "out", cache=None)
    by_file = {Path(r["file"]).name: r for r in rows}
    assert by_file["iron_film.hgx"]["status"] == "done"
    for name in ("garbage.hgx", "text.hgx", "broken_script.hgx", "nan_model.hgx", "missing.hgx"):
        assert by_file[name]["status"] == "failed" and by_file[name]["error"], name
    assert "cannot load the model" in by_file["garbage.hgx"]["error"]
    assert "the script fails on purpose" in by_file["broken_script.hgx"]["error"]
    assert "non-finite" in by_file["nan_model.hgx"]["error"]
    assert "cannot read" in by_file["missing.hgx"]["error"]
    with open(tmp_path / "out" / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 6 and sum(r["status"] == "done" for r in summary) == 1
    assert (tmp_path / "out" / "iron_film.png").stat().st_size > 10_000
    with pytest.raises(TaskFailed):  # and directly, as a task
        c.submit("genx.fit", b"nonsense").result(120)


def test_cache_returns_an_identical_fit_at_once(genx_cluster: LocalCluster, tmp_path: Path) -> None:
    c = genx_cluster.client()
    cache = FitCache(tmp_path / "cache")
    settings = FitSettings(generations=10, population=15, seed=5)
    first = run_fits(c, [EXAMPLES / "nickel_film.hgx"], settings, tmp_path / "one", cache)
    second = run_fits(c, [EXAMPLES / "nickel_film.hgx"], settings, tmp_path / "two", cache)
    assert first[0]["cached"] == "no" and second[0]["cached"] == "yes"
    assert first[0]["fom"] == second[0]["fom"]
    for suffix in (".csv", "_params.csv", "_fom.csv", ".hgx"):
        assert (tmp_path / "one" / f"nickel_film{suffix}").read_bytes() == \
            (tmp_path / "two" / f"nickel_film{suffix}").read_bytes()
    other = run_fits(c, [EXAMPLES / "nickel_film.hgx"], FitSettings(generations=10, population=15, seed=6),
                     tmp_path / "three", cache)
    assert other[0]["cached"] == "no"  # another seed is another fit


def test_orchester_fit_command_on_the_shipped_examples(tmp_path: Path) -> None:
    env = {**os.environ, "ORCHESTER_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "orchester", "--log-level", "WARNING", "fit",
                        *map(str, sorted(EXAMPLES.glob("*.hgx"))), "--local", "2", "--generations", "30",
                        "--out", str(tmp_path / "fits")], capture_output=True, text=True, timeout=600, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "3 of 3 fits done" in r.stdout
    truth = json.loads((EXAMPLES / "truth.json").read_text())
    for name, true in truth.items():
        with open(tmp_path / "fits" / f"{name}_params.csv") as f:
            fitted = {row["parameter"]: float(row["value"]) for row in csv.DictReader(f)}
        assert fitted["Film.setD"] == pytest.approx(true["Film.setD"], rel=0.03), name
        for suffix in (".csv", "_fom.csv", ".png", ".hgx"):
            assert (tmp_path / "fits" / f"{name}{suffix}").exists()
    # the summary: the models in the order given, each setting's value and where it came from, provenance
    with open(tmp_path / "fits" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    given = sorted(EXAMPLES.glob("*.hgx"))
    assert [Path(r["file"]).name for r in rows] == [p.name for p in given]
    for row in rows:
        assert row["generations"] == "30" and row["population"] == "50" and row["km"] == "0.7"  # the file's own
        assert "generations=argument" in row["settings_from"] and "population=file" in row["settings_from"]
        assert row["cached"] == "no" and row["seed"] == "0" and int(row["evaluations"]) > 0
    fits = json.loads((tmp_path / "fits" / "summary.json").read_text())["fits"]
    import hashlib

    for fit, path in zip(fits, given, strict=True):
        prov = fit["provenance"]
        assert prov["model_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert prov["genx_version"] and prov["seed"] == 0 and prov["stopped"] == "generations"
        assert prov["settings"]["generations"] == {"value": 30, "source": "argument"}
        assert prov["settings"]["population"] == {"value": 50, "source": "file"}
        assert prov["genx_settings"]["pop_size"] == 50 and prov["host"] and prov["satellite"]
    r = subprocess.run([sys.executable, "-m", "orchester", "fit", str(tmp_path / "nope.hgx"), "--local", "1",
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr  # a usage mistake
    (tmp_path / "broken.hgx").write_bytes(b"not an HDF5 model")
    r = subprocess.run([sys.executable, "-m", "orchester", "fit", str(tmp_path / "broken.hgx"), "--local", "1",
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "FAILED" in r.stdout  # a model that fails: reported, exit 1
