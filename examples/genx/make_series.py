"""Build a synthetic series of reflectivity datasets for a batch (series) fit: one model, many files.

A nickel film (``nickel_film.hgx``, see ``make_models.py``) whose thickness grows along a
temperature series: ``series/nickel_T<temperature>K.dat`` for 10 temperatures, each simulated by
GenX from the true parameters with 3 % Gaussian noise, in GenX's default data format
(whitespace-separated columns q, intensity, error). The truth is written to
``series/truth.json``: fit them with

    orchester fit examples/genx/nickel_film.hgx --data examples/genx/series/*.dat [--chain]

and compare ``series.csv`` with it.

    python examples/genx/make_series.py [OUTDIR]
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
#: temperature (K) -> film thickness (Å): thermal expansion, greatly exaggerated
TEMPERATURES = [300, 350, 400, 450, 500, 550, 600, 650, 700, 750]
#: the parameters that do not change along the series
FIXED = {"Film.setSigma": 4.5, "Sub.setSigma": 2.5, "inst.setI0": 1.0}


def thickness(temperature: float) -> float:
    """The true film thickness at ``temperature``."""
    return 120.0 + 0.1 * (temperature - 300)


def build(out: str, noise: float = 0.03) -> dict[str, dict[str, float]]:
    """Write the series into ``out``; return the true parameters per file name."""
    from genx.diffev import DiffEv
    from genx.model_control import ModelController

    ctrl = ModelController(DiffEv())
    ctrl.load_file(os.path.join(HERE, "nickel_film.hgx"))
    m = ctrl.model
    grid = m.parameters
    rows = {grid.get_value(r, 0): r for r in range(grid.get_len_rows()) if grid.get_value(r, 0)}
    truth: dict[str, dict[str, float]] = {}
    os.makedirs(out, exist_ok=True)
    for i, temperature in enumerate(TEMPERATURES):
        true = {"Film.setD": thickness(temperature), **FIXED}
        for name, value in true.items():
            grid.set_value(rows[name], 1, value)
        m.simulate()
        d = m.data[0]
        q = np.asarray(d.x, dtype=float)
        y_true = np.asarray(d.y_sim, dtype=float)
        rng = np.random.default_rng(100 + i)
        y = y_true * (1 + noise * rng.standard_normal(q.size))
        name = f"nickel_T{temperature}K.dat"
        np.savetxt(os.path.join(out, name), np.column_stack([q, y, noise * y_true]), fmt="%.8e",
                   header=f"synthetic nickel film at {temperature} K: q (1/A), intensity, error")
        truth[name] = true
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=2)
    return truth


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else os.path.join(HERE, "series")
    for name in build(out):
        print(f"wrote {os.path.join(out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
