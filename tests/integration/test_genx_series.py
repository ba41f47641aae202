"""Series (batch) fits: one model, ten synthetic datasets whose film thickness grows along the series
(``examples/genx/make_series.py``), fitted by real GenX in satellite workers."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchester import LocalCluster
from orchester.genx.fits import FitSettings
from orchester.genx.series import run_series, sequence_value

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "genx"
SERIES = sorted((EXAMPLES / "series").glob("*.dat"))
TRUTH = json.loads((EXAMPLES / "series" / "truth.json").read_text())
MODEL = EXAMPLES / "nickel_film.hgx"


@pytest.fixture(scope="module")
def two() -> Any:
    with LocalCluster(satellites=2, workers=1, log_level="ERROR", heartbeat_interval=0.5) as c:
        yield c


@pytest.fixture(scope="module")
def one() -> Any:
    with LocalCluster(satellites=1, workers=1, log_level="ERROR", heartbeat_interval=0.5) as c:
        yield c


def _table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_sequence_is_the_last_number_of_a_file_name() -> None:
    assert sequence_value("nickel_T300K.dat") == 300.0 and sequence_value("run-2.5_b7.ort") == 7.0
    assert sequence_value("plain.dat") is None


def test_a_series_is_fitted_in_parallel_and_follows_the_truth(two: LocalCluster, tmp_path: Path) -> None:
    assert len(SERIES) >= 8
    with two.client() as c:
        rows = run_series(c, MODEL, list(reversed(SERIES)), FitSettings(generations=40, seed=1), tmp_path)
    assert [Path(r["file"]).name for r in rows] == [p.name for p in SERIES]  # in the order of the sequence
    assert all(r["status"] == "done" for r in rows) and {r["satellite"] for r in rows} == {"local-0", "local-1"}
    table = _table(tmp_path / "series.csv")
    assert [float(r["sequence"]) for r in table] == sorted(sequence_value(p.name) or 0 for p in SERIES)
    for r in table:
        true = TRUTH[Path(r["file"]).name]["Film.setD"]
        fitted, low, high = float(r["Film.setD"]), float(r["Film.setD error_low"]), float(r["Film.setD error_high"])
        # within its error bars (GenX's, figure of merit +5 %: often zero after few generations) or 0.1 Å
        assert fitted - true <= max(-low, 0.0) + 0.1 and true - fitted <= max(high, 0.0) + 0.1, \
            (r["file"], fitted, true, low, high)
    assert (tmp_path / "series.png").read_bytes()[:4] == b"\x89PNG"
    # every dataset's own files, and the summary with each fit's data file's hash
    assert (tmp_path / "nickel_film_nickel_T300K_params.csv").exists()
    fits = json.loads((tmp_path / "summary.json").read_text())["fits"]
    assert len(fits) == len(SERIES) and all(f["provenance"]["data_sha256"] for f in fits)


def test_a_chained_series_starts_each_fit_from_the_previous_result(two: LocalCluster, tmp_path: Path) -> None:
    with two.client() as c:
        rows = run_series(c, MODEL, SERIES[:4], FitSettings(generations=8, seed=2), tmp_path, chain=True,
                          adjust_bounds=True)
    assert all(r["status"] == "done" for r in rows)
    for before, after in zip(rows, rows[1:], strict=False):
        fitted = {p["name"]: p for p in before["result"]["parameters"]}
        assert after["result"]["start"] == pytest.approx({n: p["value"] for n, p in fitted.items()}, rel=1e-12)
        for p in after["result"]["parameters"]:  # bounds centred on the previous value, same width
            prev = fitted[p["name"]]
            assert p["min"] + p["max"] == pytest.approx(2 * prev["value"])
            assert p["max"] - p["min"] == pytest.approx(prev["max"] - prev["min"])
    first = rows[0]["result"]["start"]
    assert first["Film.setD"] == 110.0  # the model's own start value


def test_one_satellite_and_two_give_the_same_numbers(one: LocalCluster, two: LocalCluster, tmp_path: Path) -> None:
    settings = FitSettings(generations=10, seed=3)
    with one.client() as c:
        alone = run_series(c, MODEL, SERIES, settings, tmp_path / "one")
    with two.client() as c:
        pair = run_series(c, MODEL, SERIES, settings, tmp_path / "two")
    assert {r["satellite"] for r in alone} == {"local-0"}
    assert [r["fom"] for r in alone] == [r["fom"] for r in pair]
    assert (tmp_path / "one" / "series.csv").read_text() == (tmp_path / "two" / "series.csv").read_text()


def test_a_dataset_that_fails_is_a_row_with_its_error_and_the_rest_complete(two: LocalCluster,
                                                                            tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for p in SERIES[:3]:
        shutil.copy(p, data / p.name)
    (data / "nickel_T999K.dat").write_text("# a header and no numbers at all\nthis is not data\n")
    with two.client() as c:
        rows = run_series(c, MODEL, sorted(data.iterdir()), FitSettings(generations=3), tmp_path / "out",
                          chain=True)
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert "nickel_T999K.dat" in rows[-1]["error"] and "default loader" in rows[-1]["error"]
    table = _table(tmp_path / "out" / "series.csv")
    assert table[-1]["status"] == "failed" and table[-1]["error"] and table[0]["Film.setD"]


def test_the_command_line_runs_a_series_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    def fit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchester", "--log-level", "WARNING", "fit", *args],
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)

    r = fit(str(MODEL), "--data", *map(str, SERIES[:3]), "--local", "2", "--generations", "3", "--chain",
            "--sequence", "1,2,3", "--out", str(tmp_path / "cli"), "--no-cache")
    assert r.returncode == 0, r.stderr
    assert "3 of 3 fits done" in r.stdout and "series.csv" in r.stdout
    assert [row["sequence"] for row in _table(tmp_path / "cli" / "series.csv")] == ["1", "2", "3"]
    for bad, says in ((["--chain"], "--data"),
                      (["--data", str(SERIES[0]), str(EXAMPLES / "iron_film.hgx")], "one model"),
                      (["--data", str(SERIES[0]), "--adjust-bounds"], "--chain"),
                      (["--data", str(SERIES[0]), "--sequence", "1,x"], "numbers"),
                      (["--data", str(SERIES[0]), "--sequence", "1,2"], "values for 1")):
        r = fit(str(MODEL), *bad, "--local", "1", "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
