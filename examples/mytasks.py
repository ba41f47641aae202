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
    edges = np.linspace(a, b, 11)
    total = 0.0
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        xs = np.linspace(lo, hi, max(2, int(n) // 10 + 1))
        ys = np.sin(xs)
        total += float(((ys[1:] + ys[:-1]) * np.diff(xs)).sum() / 2)
        progress(done=i + 1, total=10)
    return total


@task("mytasks.histogram")
def histogram(values: np.ndarray, bins: int = 10) -> dict[str, np.ndarray]:
    """Histogram of an array sent as a zero-copy frame; the result arrays travel the same way."""
    counts, edges = np.histogram(values, bins=bins)
    return {"counts": counts, "edges": edges}
