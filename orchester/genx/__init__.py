"""The client side of GenX fits: settings, the fit cache, outputs and plots (``fits``), and the fit
job that submits models and collects results (``job``). Satellites run the fits (``satellites.genx_task``).
"""

#: The differential-evolution trial methods of GenX (``satellites.genx_task`` takes them from here: this
#: module imports no GenX, so the client side can read them).
TRIAL_METHODS = ("best_1_bin", "rand_1_bin", "best_either_or", "rand_either_or", "jade_best", "simplex_best_1_bin")
#: The smallest population GenX's differential evolution (and the genx.fit task) takes.
MIN_POPULATION = 5
#: Largest count taken for a setting (msgpack carries it, a worker can loop over it).
MAX_COUNT = 2**31 - 1


#: Each numeric setting of a fit: (lowest, highest, whole number); ``km`` excludes its lowest. The
#: ``genx.fit`` task (``satellites.genx_task``) and ``orchester fit`` check them here.
RANGES: dict[str, tuple[float, float, bool]] = {
    "generations": (1, MAX_COUNT, True), "population": (MIN_POPULATION, MAX_COUNT, True), "km": (0.0, 2.0, False),
    "kr": (0.0, 1.0, False), "min_spread": (0.0, 100.0, False), "max_evaluations": (1, 2**62, True),
    "max_seconds": (0.001, 1e9, False)}
#: The settings of a fit that are true or false.
FLAGS = ("start_guess", "boundaries")
#: Largest data file a series fit sends (the task refuses larger ones).
MAX_DATA_BYTES = 256 * 1024 * 1024


def setting_error(name: str, value: object) -> str | None:
    """Why ``value`` is not a valid fit setting ``name`` (``None``: it is): :data:`RANGES`, :data:`FLAGS`,
    ``method`` one of :data:`TRIAL_METHODS`."""
    import math

    if name == "method":
        return None if isinstance(value, str) and value in TRIAL_METHODS else \
            f"method must be one of {', '.join(TRIAL_METHODS)}, not {value!r}"[:300]
    if name in FLAGS:
        return None if isinstance(value, bool) else f"{name} must be true or false, not {value!r}"[:300]
    if name not in RANGES:
        return f"unknown setting {name!r}"[:300]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, not {value!r}"[:300]
    low, high, integer = RANGES[name]
    if integer and value != int(value):
        return f"{name} must be a whole number, not {value!r}"
    if not low <= value <= high or (name == "km" and value == low):
        return f"{name} must be between {low:g} and {high:g}" + (" (above 0)" if name == "km" else "") + \
            f", not {value!r}"
    return None


def check_setting(name: str, value: object) -> int | float | str | bool | None:
    """``value`` as the fit setting ``name`` takes it (the ranges ``orchester fit`` accepts, see
    :func:`setting_error`), or ``None``."""
    if setting_error(name, value) is not None:
        return None
    if name == "method" or name in FLAGS:
        return value  # type: ignore[return-value]
    assert isinstance(value, (int, float))
    return int(value) if RANGES[name][2] else float(value)
