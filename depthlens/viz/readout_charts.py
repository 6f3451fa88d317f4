"""Bar charts and curves of the neighbouring readouts: the per-layer bars of a direct logit
attribution (:func:`dla_bars`) and per-layer curves (:func:`curves`: attribute-lens faithfulness,
Patchscope token identity). Each is a plotly figure (HTML) or a matplotlib one (PNG, PDF, SVG), to
write with :func:`depthlens.viz.pictures.save_figure`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from matplotlib.figure import Figure

from depthlens.analysis.dla import LogitAttribution
from depthlens.stats.grid import Grid


def dla_bars(attribution: LogitAttribution, backend: str = "plotly") -> go.Figure | Figure:
    """A per-layer bar chart (attention and MLP side by side, embeddings and biases as their own
    bars): a plotly figure, or a matplotlib one with ``backend="matplotlib"``."""
    totals = attribution.layer_totals()
    layers = [str(i) for i in range(attribution.num_layers)]
    title = (
        f"direct logit attribution of {attribution.target} "
        f"(sum {attribution.total:.3f} = logit {attribution.logit:.3f})"
    )
    extra = {"embeddings": totals["embeddings"][0], "biases": totals["other"][0]}
    if backend == "plotly":
        figure = go.Figure(
            [
                go.Bar(name="attention", x=layers, y=totals["attn"]),
                go.Bar(name="MLP", x=layers, y=totals["mlp"]),
                go.Bar(name="embeddings · biases", x=list(extra), y=list(extra.values())),
            ]
        )
        figure.update_layout(barmode="group", title=title, xaxis_title="layer", yaxis_title="direct effect (nats)")
        return figure
    figure = Figure(figsize=(max(6.0, 0.3 * len(layers) + 3), 4), layout="constrained")
    axes = figure.subplots()
    index = np.arange(len(layers))
    axes.bar(index - 0.2, totals["attn"], 0.4, label="attention")
    axes.bar(index + 0.2, totals["mlp"], 0.4, label="MLP")
    axes.bar(len(layers) + np.arange(2), list(extra.values()), 0.6, color="grey", label="embeddings · biases")
    axes.set_xticks(list(index) + [len(layers), len(layers) + 1], layers + list(extra), fontsize=7, rotation=90)
    axes.axhline(0, color="black", linewidth=0.5)
    axes.set(xlabel="layer", ylabel="direct effect (nats)", title=title)
    axes.title.set_fontsize(9)
    axes.legend(fontsize=8)
    return figure


Bands = Mapping[str, tuple[Sequence[float], Sequence[float]]]
"""``(low, high)`` (``[layers]`` each, e.g. a 95% interval) by the name of the series they surround."""


def curves(
    layers: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "layer",
    ylabel: str = "fraction",
    backend: str = "plotly",
    bands: Bands | None = None,
) -> go.Figure | Figure:
    """One line per entry of ``series`` (values in ``[0, 1]``) over ``layers``; a series named in
    ``bands`` is drawn inside its shaded ``(low, high)`` band."""
    bands = bands or {}
    if backend == "plotly":
        return _plotly_curves(layers, series, bands, title=title, xlabel=xlabel, ylabel=ylabel)
    figure = Figure(figsize=(6.5, 3.8), layout="constrained")
    axes = figure.subplots()
    for (name, values), marker in zip(series.items(), "os^vDx*+", strict=False):
        line, = axes.plot(list(layers), list(values), marker=marker, markersize=4, label=name)
        if name in bands:
            axes.fill_between(list(layers), *bands[name], color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02), title=title)
    axes.title.set_fontsize(9)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure


def _plotly_curves(layers: Sequence[int], series: Mapping[str, Sequence[float]], bands: Bands, *, title: str,
                   xlabel: str, ylabel: str) -> go.Figure:
    """:func:`curves` in plotly: each band a filled outline (low, then high backwards) under its
    line, in the line's colour."""
    palette = plotly.colors.qualitative.Plotly
    traces = []
    for index, (name, values) in enumerate(series.items()):
        colour = palette[index % len(palette)]
        if name in bands:
            low, high = bands[name]
            traces.append(go.Scatter(x=[*layers, *reversed(layers)], y=[*low, *reversed(high)], fill="toself",
                                     fillcolor=colour, opacity=0.2, line_width=0, hoverinfo="skip", showlegend=False))
        traces.append(go.Scatter(x=list(layers), y=list(values), mode="lines+markers", name=name, line_color=colour))
    figure = go.Figure(traces)
    figure.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, yaxis_range=[0, 1.02])
    return figure


def faithfulness_grid(rows: Sequence[Mapping[str, object]]) -> Grid:
    """Layers × (relation, β) grid of attribute-lens faithfulness from the rows of
    :meth:`~depthlens.lenses.attribute.Faithfulness.to_rows` (each with a ``beta``)."""
    keys = sorted({(r["relation"], r["beta"]) for r in rows})
    layers = sorted({r["layer"] for r in rows})
    table = {(r["relation"], r["beta"], r["layer"]): r["faithfulness"] for r in rows}
    values = np.array([[table.get((*key, layer), np.nan) for key in keys] for layer in layers], dtype=float)
    return Grid(
        values,
        [str(layer) for layer in layers],
        [f"{name} β={beta:g}" for name, beta in keys],
        title="attribute lens faithfulness (top-1 agreement with the model, held-out subjects)",
        quantity="faithfulness",
        value_range=(0, 1),
        row_title="layer",
        col_title="relation",
        value_format=".2f",
    )


__all__ = ["curves", "dla_bars", "faithfulness_grid"]
