"""The web pages' figures, made with bokeh and shown by BokehJS (served from the bokeh wheel: no CDN).

Each function returns a figure as :func:`bokeh.embed.json_item` gives it; the page embeds it
with ``Bokeh.embed.embed_item``. Live figures have named data sources (``name=``) whose data
the page replaces as new points come (``doc.get_model_by_name``): the figure is made once, the
data travels as plain JSON.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

#: Colours of successive data sets (bokeh's Category10).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


#: Ticks of a log axis (BokehJS, ``CustomJSTicker``): 1, 2 and 5 of each decade when at most six of them
#: fall in the view, else the decades (every second or third one over many); over less than one of them,
#: a few round numbers. (Bokeh's own ticker
#: labels every one of 1000 to 9000 over a decade and a half, and on a log axis those run into each other.)
LOG_TICKS = """
const start = cb_data.start, end = cb_data.end;
const lo = Math.log10(Math.max(Math.min(start, end), 1e-12)), hi = Math.log10(Math.max(start, end, 1e-12));
const within = (steps) => {
  const ticks = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of steps) {
      const t = m * 10 ** e, l = Math.log10(t);
      if (l >= lo - 1e-9 && l <= hi + 1e-9) ticks.push(Number(t.toPrecision(12)));
    }
  }
  return ticks;
};
const fine = within([1, 2, 5]);
if (fine.length >= 2 && fine.length <= 6) return fine;
const decades = within([1]);
if (decades.length >= 2) {
  const every = Math.ceil(decades.length / 6);
  return decades.filter((_, i) => i % every === 0);
}
const raw = Math.abs(end - start) / 5 || 1, mag = 10 ** Math.floor(Math.log10(raw));
const step = [1, 2, 5, 10].map((x) => x * mag).find((x) => x >= raw);
const out = [];
for (let t = Math.ceil(Math.min(start, end) / step) * step; t <= Math.max(start, end) && out.length < 12; t += step) {
  out.push(Number(t.toPrecision(12)));
}
return out;
"""


def _figure(*, from_zero: bool = False, counts: bool = False, **kw: Any) -> Any:
    """A figure; ``from_zero``: its y axis starts at 0 (an idle series shows 0 to 1, not -1 to 1); ``counts``:
    it also labels whole numbers only."""
    from bokeh.models import AdaptiveTicker, DataRange1d
    from bokeh.plotting import figure

    base: dict[str, Any] = {"sizing_mode": "stretch_width", "height": 300, "toolbar_location": "above",
                            "tools": "pan,wheel_zoom,box_zoom,reset,save"}
    if from_zero or counts:
        base["y_range"] = DataRange1d(start=0, default_span=1)
    base.update(kw)
    fig = figure(**base)
    if counts:
        fig.yaxis.ticker = AdaptiveTicker(min_interval=1)
    return fig


def _item(fig: Any) -> dict[str, Any]:
    from bokeh.embed import json_item

    return dict(json_item(fig))


@lru_cache(maxsize=1)
def fom_figure() -> dict[str, Any]:
    """The live figure of merit of one fit per generation (source ``fom``: columns ``generation``, ``fom``)."""
    from bokeh.models import ColumnDataSource

    fig = _figure(height=260, y_axis_type="log", x_axis_label="generation", y_axis_label="best figure of merit")
    src = ColumnDataSource({"generation": [], "fom": []}, name="fom")
    fig.line("generation", "fom", source=src, line_width=2)
    fig.scatter("generation", "fom", source=src, size=3)
    return _item(fig)


@lru_cache(maxsize=1)
def overview_figures() -> dict[str, Any]:
    """The overview's live figures, side by side on one time axis: throughput, latency (p50, p95),
    and satellites with their slots (and the busy ones) and the queue.

    Sources: ``throughput`` (``t``, ``done_per_s``), ``latency`` (``t``, ``p50``, ``p95``, in ms),
    ``fleet`` (``t``, ``satellites``, ``slots``,
    ``busy``, ``queued``), ``marks`` (``t``: a failover or a restart of the orchestrator).
    """
    from bokeh.layouts import gridplot
    from bokeh.models import ColumnDataSource, CustomJSTicker

    marks = ColumnDataSource({"t": [], "what": []}, name="marks")
    tput = _figure(height=220, x_axis_type="datetime", y_axis_label="tasks finished / s", title="Throughput",
                   from_zero=True)
    src = ColumnDataSource({"t": [], "done_per_s": []}, name="throughput")
    tput.line("t", "done_per_s", source=src, line_width=2)
    tput.scatter("t", 0, source=marks, marker="triangle", size=12, color="#d62728", legend_label="failover / restart")
    tput.legend.location = "top_left"
    fleet = _figure(height=220, x_axis_type="datetime", y_axis_label="count", title="Satellites, slots, queue",
                    x_range=tput.x_range, counts=True)
    fsrc = ColumnDataSource({"t": [], "satellites": [], "slots": [], "busy": [], "queued": []}, name="fleet")
    for col, colour in (("satellites", PALETTE[0]), ("slots", PALETTE[2]), ("busy", PALETTE[1]),
                        ("queued", PALETTE[3])):
        fleet.line("t", col, source=fsrc, line_width=2, color=colour, legend_label=col)
    fleet.legend.location = "top_left"
    lat = _figure(height=220, x_axis_type="datetime", y_axis_label="ms", y_axis_type="log",
                  title="Latency, submission to end", x_range=tput.x_range)
    lat.yaxis.ticker = CustomJSTicker(major_code=LOG_TICKS)
    lsrc = ColumnDataSource({"t": [], "p50": [], "p95": []}, name="latency")
    lat.line("t", "p50", source=lsrc, line_width=2, color=PALETTE[0], legend_label="p50")
    lat.line("t", "p95", source=lsrc, line_width=2, color=PALETTE[1], legend_label="p95")
    lat.legend.location = "top_left"
    for fig in (tput, lat, fleet):
        fig.sizing_mode = "stretch_width"
        fig.xaxis.ticker.desired_num_ticks = 4  # (a third of the page wide: six times would run into each other)
        legend = fig.legend[0]  # above the plot, in one row: never over the curves
        legend.orientation = "horizontal"
        legend.label_text_font_size = "11px"
        legend.padding = legend.margin = 2
        fig.add_layout(legend, "above")
    return _item(gridplot([[tput, lat, fleet]], sizing_mode="stretch_width", toolbar_location="right"))


@lru_cache(maxsize=1)
def history_figure() -> dict[str, Any]:
    """The history page's figures on one time axis: tasks ended per step (done, failed), utilisation
    (busy slots / available slots), satellites (available, and those that worked).

    Source ``history``: columns ``t`` (the middle of each step), ``w`` (its width; both in ms), ``done``,
    ``failed``, ``utilisation`` (percent), ``available``, ``active``.
    """
    from bokeh.layouts import column
    from bokeh.models import ColumnDataSource

    src = ColumnDataSource({"t": [], "w": [], "done": [], "failed": [], "utilisation": [], "available": [],
                            "active": []}, name="history")
    ended = _figure(height=220, x_axis_type="datetime", y_axis_label="tasks per step", title="Tasks ended",
                    counts=True)
    ended.vbar_stack(["done", "failed"], x="t", width="w", source=src, color=[PALETTE[2], PALETTE[3]],
                     legend_label=["done", "failed"])
    ended.legend.location = "top_left"
    util = _figure(height=180, x_axis_type="datetime", y_axis_label="%", title="Utilisation (busy / available slots)",
                   x_range=ended.x_range, from_zero=True)
    util.line("t", "utilisation", source=src, line_width=2, color=PALETTE[1])
    fleet = _figure(height=180, x_axis_type="datetime", y_axis_label="satellites", title="Satellites",
                    x_range=ended.x_range, counts=True)
    fleet.step("t", "available", source=src, line_width=6, line_alpha=0.45, color=PALETTE[0], legend_label="available",
               mode="after")
    fleet.step("t", "active", source=src, line_width=2, color=PALETTE[4], legend_label="worked", mode="after")
    fleet.legend.location = "top_left"
    return _item(column(ended, util, fleet, sizing_mode="stretch_width"))


def result_figure(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A finished fit: each data set with its error bars and the fitted curve, reflectivity on a log scale."""
    from bokeh.models import ColumnDataSource
    from bokeh.models.annotations import Whisker

    sets = [tuple(np.asarray(d[k], dtype=float) for k in ("x", "y", "error", "y_sim")) for d in result["datasets"]]
    ys_all = np.concatenate([s[1] for s in sets]) if sets else np.zeros(0)
    finite = ys_all[np.isfinite(ys_all)]
    pos_all = finite[finite > 0]
    log = bool(finite.size) and bool(np.all(finite > 0)) and pos_all.max() / pos_all.min() >= 100
    fig = _figure(height=380, y_axis_type="log" if log else "linear",
                  x_axis_label=_label(result.get("xlabel"), "x"), y_axis_label=_label(result.get("ylabel"), "y"),
                  title=f"{name}: {result.get('fom_name', 'fom')} = {_g(result.get('fom'))}")
    for i, (d, (x, y, e, ys)) in enumerate(zip(result["datasets"], sets, strict=True)):
        colour = PALETTE[i % len(PALETTE)]
        pos = ((y > 0) if log else np.ones_like(y, dtype=bool)) & np.isfinite(y) & np.isfinite(x)
        lower = np.maximum(y[pos] - np.nan_to_num(e[pos]), y[pos] * 1e-3) if log \
            else y[pos] - np.nan_to_num(e[pos])  # a log axis has no room below 0
        data = ColumnDataSource({"x": x[pos].tolist(), "y": y[pos].tolist(), "lower": lower.tolist(),
                                 "upper": (y[pos] + np.nan_to_num(e[pos])).tolist()})
        label = str(d.get("name", f"data {i}"))[:60]
        fig.scatter("x", "y", source=data, size=4, color=colour, legend_label=f"{label} data")
        fig.add_layout(Whisker(source=data, base="x", lower="lower", upper="upper", line_color=colour,
                               line_alpha=0.6, upper_head=None, lower_head=None))
        fin = np.isfinite(ys) & ((ys > 0) if log else True) & np.isfinite(x)
        fig.line(x[fin].tolist(), ys[fin].tolist(), line_width=2, color=colour, legend_label=f"{label} fit")
    fig.legend.location = "top_right"
    fig.legend.click_policy = "hide"
    return _item(fig)


def series_figure(parameters: list[str]) -> dict[str, Any]:
    """A series' live figure: each fitted parameter against the sequence, with GenX's error bars.

    One panel per parameter (the first :data:`orchester.genx.series.MAX_PANELS`, as ``series.png``), all
    on one sequence axis; panel
    ``k``'s source is ``series-k`` (columns ``sequence``, ``value``, ``lower``, ``upper``), which the
    page fills as fits end.
    """
    from bokeh.layouts import gridplot
    from bokeh.models import ColumnDataSource

    from orchester.genx.series import MAX_PANELS

    panels = []
    x_range = None
    for k, name in enumerate(parameters[:MAX_PANELS]):
        kw: dict[str, Any] = {"x_range": x_range} if x_range is not None else {}
        fig = _figure(height=230, title=str(name)[:80], x_axis_label="sequence", **kw)
        x_range = fig.x_range
        src = ColumnDataSource({"sequence": [], "value": [], "lower": [], "upper": []}, name=f"series-{k}")
        colour = PALETTE[k % len(PALETTE)]
        fig.line("sequence", "value", source=src, line_width=1, color=colour)
        fig.scatter("sequence", "value", source=src, size=6, color=colour)
        # error bars as a glyph (not a whisker): the axis takes them in when it scales itself
        fig.segment("sequence", "lower", "sequence", "upper", source=src, color=colour, line_width=1.5)
        panels.append(fig)
    if not panels:  # a model with nothing fitted: an empty panel says so
        fig = _figure(height=120, title="the model has no fitted parameters")
        panels.append(fig)
    return _item(gridplot(panels, ncols=min(3, len(panels)), sizing_mode="stretch_width", toolbar_location="right"))


def _label(text: Any, fallback: str) -> str:
    """A GenX axis label as plain text (GenX writes mathtext: ``q [Å$^{-1}$]``)."""
    if not isinstance(text, str) or not text.strip():
        return fallback
    plain = text.replace("$^{-1}$", "⁻¹").replace("$^{-2}$", "⁻²").replace("$", "").replace("\\AA", "Å")
    return plain[:80]


def _g(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else "?"
