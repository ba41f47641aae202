"""Build the example GenX models shipped in this folder: our own script, synthetic data.

Each model is an X-ray reflectivity measurement of one metal film on a silicon substrate,
simulated with GenX from known *true* parameters, with 3 % Gaussian noise added. The fit
starts from deliberately wrong values inside the bounds, so a good fit can be checked
against the truth (``TRUTH`` below, also written to ``truth.json``).

    python examples/genx/make_models.py [OUTDIR]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

SCRIPT = """\
import models.spec_nx as model
from models.utils import UserVars, fp, fw, bc, bw

inst = model.Instrument(probe='x-ray', wavelength=1.54, coords='q', I0=1.0, res=0.001,
                        restype='no conv', footype='no corr', Ibkg=1e-7)
fp.set_wavelength(inst.wavelength)

Amb = model.Layer(d=0.0, sigma=0.0, dens=0.0, f=0.0)
Film = model.Layer(d=100.0, sigma=3.0, dens={dens}, f=fp.{element})
Sub = model.Layer(d=0.0, sigma=3.0, dens=8/5.431**3, f=fp.Si)
sample = model.Sample(Stacks=[model.Stack(Layers=[Film], Repetitions=1)], Ambient=Amb, Substrate=Sub)


def Sim(data):
    return [sample.SimSpecular(d.x, inst) for d in data]
"""

#: name -> (element, density in formula units per cubic angstrom, true parameters)
TRUTH: dict[str, dict[str, Any]] = {
    "nickel_film": {"element": "Ni", "dens": 4 / 3.524**3,
                    "true": {"Film.setD": 152.0, "Film.setSigma": 4.5, "Sub.setSigma": 2.5, "inst.setI0": 1.0}},
    "iron_film": {"element": "Fe", "dens": 2 / 2.866**3,
                  "true": {"Film.setD": 87.0, "Film.setSigma": 3.2, "Sub.setSigma": 4.0, "inst.setI0": 1.0}},
    "platinum_film": {"element": "Pt", "dens": 4 / 3.924**3,
                      "true": {"Film.setD": 64.0, "Film.setSigma": 6.0, "Sub.setSigma": 3.0, "inst.setI0": 1.0}},
}
#: fit bounds and the (wrong) start values
BOUNDS = {"Film.setD": (40.0, 200.0, 110.0), "Film.setSigma": (0.5, 10.0, 2.0),
          "Sub.setSigma": (0.5, 10.0, 5.0), "inst.setI0": (0.5, 2.0, 1.2)}


#: GenX's differential-evolution settings stored in each model (``genx.diffev.DiffEvConfig`` names)
SOLVER: dict[str, Any] = {"use_pop_mult": False, "pop_size": 50, "use_max_generations": True, "max_generations": 120,
                          "km": 0.7, "kr": 0.7, "create_trial": "best_1_bin", "use_start_guess": True,
                          "use_boundaries": True, "min_parameter_spread": 0.0}


def set_rows(model: Any, rows: list[list[Any]]) -> None:
    """Fill the model's parameter grid (name, value, fit, min, max, error) with ``rows``."""
    while model.parameters.get_len_rows() < len(rows):
        model.parameters.append()
    model.parameters.set_data(rows)


def build(name: str, path: str, seed: int = 0, noise: float = 0.03) -> dict[str, float]:
    """Write model ``name`` to ``path`` and return its true parameters."""
    from genx.diffev import DiffEv
    from genx.model import Model
    from genx.model_control import ModelController

    spec = TRUTH[name]
    m = Model()
    m.set_script(SCRIPT.format(dens=repr(spec["dens"]), element=spec["element"]))
    q = np.linspace(0.01, 0.35, 300)
    ds = m.data[0]
    ds.name = f"{name} (synthetic)"
    ds.x_raw, ds.y_raw, ds.error_raw = q, np.ones_like(q), np.ones_like(q)
    ds.run_command()
    set_rows(m, [[par, spec["true"][par], True, lo, hi, "-"] for par, (lo, hi, _) in BOUNDS.items()])
    m.simulate()  # with the true values
    y_true = np.asarray(m.data[0].y_sim, dtype=float)
    rng = np.random.default_rng(seed)
    y = y_true * (1 + noise * rng.standard_normal(q.size))
    ds.y_raw, ds.error_raw = y, noise * y_true
    ds.run_command()
    set_rows(m, [[par, start, True, lo, hi, "-"] for par, (lo, hi, start) in BOUNDS.items()])
    m.fomfunction = "chi2bars"
    ctrl = ModelController(DiffEv())
    ctrl.model = m
    # the optimizer settings stored in the file, which `orchester fit` (like GenX) uses unless a flag says
    # otherwise: a fixed population and number of generations that recover the truth
    for setting, value in SOLVER.items():
        setattr(ctrl.optimizer.opt, setting, value)
    ctrl.save_file(path)  # .hgx: GenX's HDF5 format
    return dict(spec["true"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out, exist_ok=True)
    truth = {}
    for i, name in enumerate(TRUTH):
        truth[name] = build(name, os.path.join(out, f"{name}.hgx"), seed=i)
        print(f"wrote {os.path.join(out, name + '.hgx')}")
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
