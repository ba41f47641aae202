"""The files a fit writes: the parameter table (fitted or not, GenX's error bars, bounds), the SLD
profile, the plot with residuals and the model's own axis labels (pure functions, real matplotlib)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from orchester.genx.fits import output_paths, parameter_rows, significant, write_outputs

RESULT: dict[str, Any] = {
    "fom": 0.123456789, "generations": 3, "seconds": 0.1, "fom_name": "chi2bars", "errorbar_level": 1.05,
    "xlabel": "2θ [°]", "ylabel": "Intensity [a.u.]",
    "datasets": [{"name": "scan", "x": np.linspace(0.1, 3, 50), "y": np.logspace(0, -5, 50),
                  "error": np.logspace(0, -5, 50) * 0.05, "y_sim": np.logspace(0, -5, 50) * 1.01}],
    "parameters": [{"name": "Film.setD", "value": 152.123456, "min": 40.0, "max": 200.0, "error": [-0.0345, 0.0412]},
                   {"name": "Sub.setSigma", "value": 10.0, "min": 0.5, "max": 10.0, "error": None}],
    "all_parameters": [{"name": "Film.setD", "value": 110.0, "fit": True, "min": 40.0, "max": 200.0},
                       {"name": "Sub.setSigma", "value": 5.0, "fit": True, "min": 0.5, "max": 10.0},
                       {"name": "inst.setI0", "value": 1.0, "fit": False, "min": 0.5, "max": 2.0}],
    "fom_history": [[0, 3.0], [1, 2.0], [2, 0.123456789]], "model": b"model bytes",
    "sld": {"z": np.linspace(-20, 120, 30), "parts": {"Re": np.linspace(0.7, 2.1, 30)}, "unit": "r_{e}/\\AA^{3}"},
}


def test_a_value_is_printed_to_the_precision_its_error_bar_gives() -> None:
    assert significant(152.123456, 0.0412) == "152.123"
    assert significant(152.123456, 3.4) == "152.1"
    assert significant(152.123456, 34) == "152"
    assert significant(0.000123456, 0.0000021) == "0.0001235"
    assert significant(152.123456) == "152.123456" and significant(1.5, float("nan")) == "1.5"


def test_the_parameter_table_says_what_was_fitted_its_error_level_and_bounds() -> None:
    rows = {r["parameter"]: r for r in parameter_rows(RESULT)}
    assert list(rows) == ["Film.setD", "Sub.setSigma", "inst.setI0"]  # every parameter of the model
    film, sub, i0 = rows["Film.setD"], rows["Sub.setSigma"], rows["inst.setI0"]
    assert film["fitted"] == "yes" and film["value"] == "152.123" and film["error_low"] == "-0.035"
    assert film["error_high"] == "0.041" and film["error_level"] == "fom x 1.05" and film["at_bound"] == ""
    assert sub["at_bound"] == "max" and sub["error_low"] == "" and sub["error_level"] == ""
    assert i0["fitted"] == "no" and i0["value"] == "1"
    assert i0["at_bound"] == ""


def test_a_fit_writes_its_sld_profile_and_a_plot_with_residuals(tmp_path: Path) -> None:
    written = write_outputs("m", RESULT, tmp_path)
    assert [p.name for p in written] == [p.name for p in output_paths("m", tmp_path, sld=True)]
    assert {"m_sld.csv", "m_sld.png"} <= {p.name for p in written}
    with open(tmp_path / "m_sld.csv") as f:
        table = list(csv.reader(f))
    assert table[0][0] == "z" and table[0][1].startswith("Re (") and len(table) == 31
    with open(tmp_path / "m_params.csv") as f:
        assert next(csv.reader(f)) == ["parameter", "value", "fitted", "min", "max", "error_low", "error_high",
                                       "error_level", "at_bound"]
    for png in ("m.png", "m_sld.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without = {k: v for k, v in RESULT.items() if k != "sld"}  # a peak fit: no layered sample, no profile
    assert "m2_sld.csv" not in {p.name for p in write_outputs("m2", without, tmp_path)}


def test_figures_in_other_formats_and_the_orso_file_are_written_when_asked(tmp_path: Path) -> None:
    result = {**RESULT, "orso": b"# # ORSO reflectivity data file | 1.0 standard | YAML encoding\n"}
    written = {p.name for p in write_outputs("m", result, tmp_path, figures=["png", "pdf", "svg"])}
    assert {"m.ort", "m.pdf", "m.svg", "m_sld.pdf", "m_sld.svg", "m.png"} <= written
    assert (tmp_path / "m.pdf").read_bytes()[:5] == b"%PDF-" and b"<svg" in (tmp_path / "m.svg").read_bytes()[:2000]
    assert (tmp_path / "m.ort").read_bytes() == result["orso"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left
