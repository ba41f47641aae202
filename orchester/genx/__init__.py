"""The client side of GenX fits: settings, the fit cache, outputs and plots (``fits``), and the fit
job that submits models and collects results (``job``). Satellites run the fits (``satellites.genx_task``).
"""

#: The differential-evolution trial methods of GenX (``satellites.genx_task.TRIAL_METHODS``, which
#: the client side does not import: it would load GenX).
TRIAL_METHODS = ("best_1_bin", "rand_1_bin", "best_either_or", "rand_either_or", "jade_best", "simplex_best_1_bin")
#: The smallest population GenX's differential evolution (and the genx.fit task) takes.
MIN_POPULATION = 5
#: The fit settings a model file may give and their defaults (those of ``orchester fit``).
DEFAULTS: dict[str, int | float | str] = {"generations": 100, "population": 50, "km": 0.7, "kr": 0.7,
                                          "method": "best_1_bin"}
#: Largest count taken for a setting (msgpack carries it, a worker can loop over it).
MAX_COUNT = 2**31 - 1


def check_setting(name: str, value: object) -> int | float | str | None:
    """``value`` as the fit setting ``name`` takes it (the ranges ``orchester fit`` accepts), or ``None``.

    ``generations`` >= 1 and ``population`` >= :data:`MIN_POPULATION` (integers, at most
    :data:`MAX_COUNT`), 0 < ``km`` <= 2, 0 <= ``kr`` <= 1, ``method`` one of :data:`TRIAL_METHODS`.
    """
    import math

    if name == "method":
        return value if isinstance(value, str) and value in TRIAL_METHODS else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if name in ("generations", "population"):
        if value != int(value):
            return None
        n = int(value)
        return n if (1 if name == "generations" else MIN_POPULATION) <= n <= MAX_COUNT else None
    if name == "km":
        return float(value) if 0.0 < value <= 2.0 else None
    if name == "kr":
        return float(value) if 0.0 <= value <= 1.0 else None
    return None
