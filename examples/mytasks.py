"""A module of user task kinds. Start satellites with ``--tasks mytasks`` (on PYTHONPATH).

    cd examples
    orchester serve &
    satellite run --tasks mytasks --workers 2 &
    orchester submit mytasks.integrate 0 3.14159 1000000
"""

from __future__ import annotations

import numpy as np

from satellites import progress, task


@task("mytasks.integrate", reports_progress=True, stall_timeout=60)
def integrate(a: float, b: float, n: int) -> float:
    """Integrate sin(x) from a to b with the trapezoid rule in ``n`` steps, reporting progress."""
    chunks = np.array_split(np.linspace(a, b, int(n) + 1), 10)
    total = 0.0
    for i, xs in enumerate(chunks):
        ys = np.sin(xs)
        total += float(np.trapezoid(ys, xs)) if hasattr(np, "trapezoid") else float(np.trapz(ys, xs))
        progress(done=i + 1, total=len(chunks))
    return total


@task("mytasks.histogram")
def histogram(values: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Histogram of an array sent as a zero-copy frame; the result arrays travel the same way."""
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts, "edges": edges}
