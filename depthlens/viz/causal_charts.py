"""The causal-fidelity scatter (paper §4): per layer, each direction's effect on the readout
against its effect on the model's output, on log axes, with Spearman ρ and its two intervals (over
positions and over directions) in the panel's title. :func:`fidelity_scatter` draws it with plotly
(HTML) or matplotlib (PNG, PDF, SVG), to write with :func:`depthlens.viz.pictures.save_figure`.

Every log axis carries numbers: where the points span less than two powers of ten (a narrow
cloud, common for the readout's KL), matplotlib would label no tick, so :func:`log_ticks` picks
three round values across the data instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from depthlens.analysis.causal.fidelity import Fidelity

FLOOR_NATS = 1e-6
"""Smallest KL drawn (nats): a direction with no effect sits here rather than off a log axis."""
COLUMNS = 4
"""Panels per row."""


def _title(fidelity: Fidelity, newline: str = "\n") -> str:
    """``layer ℓ: ρ = …`` over its two 95% intervals, over positions and over directions."""
    low, high = fidelity.directions
    return (f"layer {fidelity.layer}: ρ = {fidelity.rho:.2f}{newline}"
            f"positions [{fidelity.low:.2f}, {fidelity.high:.2f}] · directions [{low:.2f}, {high:.2f}]")


def log_ticks(values: Sequence[float]) -> list[float] | None:
    """Tick values for a log axis over ``values`` (all > 0), or ``None`` when it spans at least
    two powers of ten, which matplotlib's own ticks label. Otherwise three values evenly spaced
    in log across the data, rounded to two significant digits."""
    low, high = min(values), max(values)
    if math.floor(math.log10(high)) - math.ceil(math.log10(low)) >= 1:
        return None
    spread = np.geomspace(low, high, 3) if high > low else np.array([low])
    return sorted({float(f"{value:.2g}") for value in spread})


def _label_log_axis(axis: Axis, values: Sequence[float]) -> None:
    """Give ``axis`` (log scale) numbered ticks over ``values`` (see :func:`log_ticks`)."""
    axis.set_minor_formatter(NullFormatter())
    ticks = log_ticks(values)
    if ticks is not None:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_locator(NullLocator())


def fidelity_scatter(fidelities: Sequence[Fidelity], title: str, backend: str = "plotly") -> go.Figure | Figure:
    """One panel per layer of ``fidelities``, :data:`COLUMNS` to a row: readout KL (x, nats)
    against model KL (y, nats) of each direction, both on log axes floored at
    :data:`FLOOR_NATS`; a plotly figure, or a matplotlib one with ``backend="matplotlib"``."""
    from plotly.subplots import make_subplots

    columns = min(COLUMNS, len(fidelities))
    rows = math.ceil(len(fidelities) / columns)
    titles = [_title(fidelity, "<br>" if backend == "plotly" else "\n") for fidelity in fidelities]
    points = [(f.readout_kl.clamp_min(FLOOR_NATS).tolist(), f.model_kl.clamp_min(FLOOR_NATS).tolist()) for f in fidelities]
    if backend == "plotly":
        figure = make_subplots(rows=rows, cols=columns, subplot_titles=titles, horizontal_spacing=0.06,
                               vertical_spacing=0.5 / rows)
        for index, (x, y) in enumerate(points):
            place = {"row": index // columns + 1, "col": index % columns + 1}
            figure.add_trace(go.Scatter(x=x, y=y, mode="markers", showlegend=False), **place)
            figure.update_xaxes(type="log", title_text="readout KL (nats)", **place)
            figure.update_yaxes(type="log", title_text="model KL (nats)" if index % columns == 0 else None, **place)
        figure.update_annotations(font_size=12)
        figure.update_layout(title=title, height=120 + 300 * rows)
        return figure
    static = Figure(figsize=(3.2 * columns, 2.8 * rows), layout="constrained")
    axes = static.subplots(rows, columns, squeeze=False)
    for index, (x, y) in enumerate(points):
        panel = axes[index // columns][index % columns]
        panel.scatter(x, y, s=8)
        panel.set(xscale="log", yscale="log", xlabel="readout KL (nats)", ylabel="model KL (nats)")
        panel.set_title(titles[index], fontsize=8)
        _label_log_axis(panel.xaxis, x)
        _label_log_axis(panel.yaxis, y)
    for index in range(len(points), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    static.suptitle(title)
    return static


__all__ = ["COLUMNS", "FLOOR_NATS", "fidelity_scatter", "log_ticks"]
