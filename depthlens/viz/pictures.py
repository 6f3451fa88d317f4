"""Pictures of trajectories: the layers × positions grid of Belrose et al. (2023), Figure 1.

Every cell shows the token a layer predicts after an input position (its top-1 label) and is
coloured by one statistic. Rows run from layer 0 at the bottom to the model's output at the top;
the input tokens label the bottom axis. Colour scales: entropy, KL and cross-entropy in nats from
0, the rank of the model's top-1 on a log scale, the top-1 probability from 0 to 1; differences
use a diverging scale centred on 0.

- :func:`heatmap_figure` / :func:`side_by_side` build interactive plotly figures (HTML), whose
  hover shows the top-``k`` tokens with their probabilities;
- :func:`heatmap_matplotlib` / :func:`side_by_side_matplotlib` build static matplotlib figures
  (PNG, PDF, SVG) with the next input token along the top;
- :func:`save_figure` writes either, or a CSV table, picking by the file's suffix, atomically.

``side_by_side`` shows two lenses on the same text and their difference ``a − b``.
"""

from __future__ import annotations

import html
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from plotly.subplots import make_subplots

from depthlens.atomic import write_file
from depthlens.analysis.trajectory import Trajectory, TrajectoryError, statistic

FIGURE_SUFFIXES = {".html": "plotly", ".png": "matplotlib", ".pdf": "matplotlib", ".svg": "matplotlib", ".csv": "table"}
"""What :func:`save_figure` writes for each file suffix."""

SEQUENTIAL = "viridis"
"""Colour map of one lens's statistic (the same palette in plotly and matplotlib)."""
DIVERGING = "RdBu"
"""Colour map of a difference between two lenses, centred on 0."""


def output_kind(path: str | os.PathLike) -> str:
    """``"plotly"``, ``"matplotlib"`` or ``"table"``: what :func:`save_figure` writes to ``path``;
    :class:`TrajectoryError` for a suffix it cannot write."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_SUFFIXES:
        raise TrajectoryError(
            f"cannot write {os.fspath(path)!r}: the file name must end in one of {', '.join(FIGURE_SUFFIXES)}"
        )
    return FIGURE_SUFFIXES[suffix]


@dataclass
class _Panel:
    """What one heatmap shows: a statistic over rows (layers) × real positions of one text."""

    values: np.ndarray
    """The raw statistic ``[rows, positions]``."""
    cells: list[list[str]]
    """The shortened top-1 label of each cell."""
    hover: list[list[str]]
    """HTML hover text of each cell: position, tokens, the statistic and the top-k."""
    rows: list[str]
    inputs: list[str]
    nexts: list[str]
    name: str


@dataclass
class _Scale:
    """How values become colours: the transformed values, their range and colour-bar ticks."""

    values: np.ndarray
    low: float
    high: float
    title: str
    colours: str
    ticks: list[float] | None = None
    tick_labels: list[str] | None = None


def _panel(traj: Trajectory, stat: str, layer_stride: int, batch: int, max_chars: int) -> _Panel:
    if not 0 <= batch < traj.input_ids.shape[0]:
        raise TrajectoryError(f"batch item {batch} does not exist: the trajectory has {traj.input_ids.shape[0]}")
    traj = traj.strided(layer_stride)
    mask = traj.attention_mask[batch]
    values = traj.stat(stat)[:, batch, mask].numpy()
    top_ids = traj.top_ids[:, batch, mask].tolist()
    top_probs = traj.top_probs[:, batch, mask].tolist()
    words = traj.input_labels(batch)
    nexts = words[1:] + [""]
    rows = ["output" if layer == traj.num_layers else str(layer) for layer in traj.layers]
    title = statistic(stat).title

    def hover(row: int, position: int) -> str:
        lines = [
            f"layer {rows[row]} · position {position}: {words[position]!r} → next {nexts[position]!r}",
            f"{title}: {values[row, position]:{'.0f' if stat == 'rank' else '.4g'}}",
        ]
        lines += [f"{i + 1}. {traj.label(t)!r} {p:.3f}" for i, (t, p) in enumerate(zip(top_ids[row][position], top_probs[row][position]))]
        return "<br>".join(html.escape(line) for line in lines)

    return _Panel(
        values=values,
        cells=[[traj.label(ids[0], max_chars) for ids in row] for row in top_ids],
        hover=[[hover(r, p) for p in range(len(words))] for r in range(len(rows))],
        rows=rows,
        inputs=traj.input_labels(batch, max_chars),
        nexts=traj.input_labels(batch, max_chars)[1:] + [""],
        name=f"{traj.lens_name} · {traj.model_name}",
    )


def _scale(stat: str, values: np.ndarray, high: float | None = None, difference: bool = False) -> _Scale:
    """Colour scale of ``values``; ``high`` is the largest magnitude to cover (default: the data's).
    Ranks are shown as ``log10(1 + rank)``, signed for differences."""
    title = statistic(stat).short
    if stat == "rank":
        transformed = np.sign(values) * np.log10(1 + np.abs(values))
        top = math.log10(1 + (high if high is not None else _largest(values)))
        first = 1 if difference and top >= 1.5 else 0
        ranks = [0] + [10**e for e in range(first, int(top) + 1)]
        ticks = [math.log10(1 + r) for r in ranks]
        labels = [_count(r) for r in ranks]
        if difference:
            ticks, labels = [-t for t in ticks[:0:-1]] + ticks, [f"−{t}" for t in labels[:0:-1]] + labels
        return _Scale(transformed, -top if difference else 0.0, max(top, 1e-9), f"{title} (log scale)",
                      DIVERGING if difference else SEQUENTIAL, ticks, labels)
    top = 1.0 if stat == "prob" else max(high if high is not None else _largest(values), 1e-9)
    return _Scale(values, -top if difference else 0.0, top, title, DIVERGING if difference else SEQUENTIAL)


def _largest(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def _count(rank: int) -> str:
    return f"{rank // 1000}k" if rank >= 1000 else str(rank)


def _check_pair(a: Trajectory, b: Trajectory) -> None:
    if a.input_ids.shape != b.input_ids.shape or not bool((a.input_ids == b.input_ids).all()):
        raise TrajectoryError("the two trajectories are of different texts: build both from the same input")
    if a.layers != b.layers:
        raise TrajectoryError(f"the two trajectories have different layers: {a.layers} and {b.layers}")


def _colour_bar(scale: _Scale, x: float | None = None) -> dict:
    bar: dict = {"title": {"text": scale.title, "side": "right"}}
    if scale.ticks is not None:
        bar.update(tickvals=scale.ticks, ticktext=scale.tick_labels)
    if x is not None:
        bar["x"] = x
    return bar


def _heatmap(panel: _Panel, scale: _Scale, labelled: bool, colour_axis: str) -> go.Heatmap:
    return go.Heatmap(
        z=scale.values,
        text=[[html.escape(cell) for cell in row] for row in panel.cells] if labelled else None,
        texttemplate="%{text}" if labelled else None,
        textfont={"size": 10},
        hovertext=panel.hover,
        hovertemplate="%{hovertext}<extra></extra>",
        coloraxis=colour_axis,
        xgap=1,
        ygap=1,
    )


def _plotly_axes(figure: go.Figure, panel: _Panel, column: int) -> None:
    figure.update_xaxes(
        tickvals=list(range(len(panel.inputs))), ticktext=[html.escape(t) for t in panel.inputs],
        tickangle=-60, title_text="input token", row=1, col=column,
    )
    figure.update_yaxes(
        tickvals=list(range(len(panel.rows))), ticktext=panel.rows,
        title_text="layer" if column == 1 else None, row=1, col=column,
    )


def _plotly_size(panels: int, panel: _Panel) -> dict:
    return {"width": 160 + panels * (40 + 64 * len(panel.inputs)), "height": 190 + 22 * len(panel.rows)}


def heatmap_figure(
    traj: Trajectory, stat: str = "entropy", *, layer_stride: int = 1, batch: int = 0, max_chars: int = 8
) -> go.Figure:
    """An interactive plotly heatmap of ``stat`` over layers × positions of batch item ``batch``.

    Cells show the top-1 label (cut to ``max_chars``); hover shows the input and next token, the
    statistic and the top-``k`` tokens with probabilities. ``layer_stride`` keeps every n-th layer
    and the output row.
    """
    panel = _panel(traj, stat, layer_stride, batch, max_chars)
    scale = _scale(stat, panel.values)
    figure = make_subplots(rows=1, cols=1)
    figure.add_trace(_heatmap(panel, scale, True, "coloraxis"), row=1, col=1)
    _plotly_axes(figure, panel, 1)
    figure.update_layout(
        title_text=html.escape(panel.name),
        coloraxis={"colorscale": SEQUENTIAL, "cmin": scale.low, "cmax": scale.high, "colorbar": _colour_bar(scale)},
        **_plotly_size(1, panel),
    )
    return figure


def side_by_side(
    traj_a: Trajectory,
    traj_b: Trajectory,
    stat: str = "entropy",
    *,
    layer_stride: int = 1,
    batch: int = 0,
    max_chars: int = 8,
) -> go.Figure:
    """Two lenses on the same text, sharing one colour scale, and a third panel with ``a − b``.

    Both trajectories must have the same input and layers (see :func:`heatmap_figure` for the
    other arguments).
    """
    _check_pair(traj_a, traj_b)
    a, b = (_panel(t, stat, layer_stride, batch, max_chars) for t in (traj_a, traj_b))
    difference = a.values - b.values
    high = max(_largest(a.values), _largest(b.values))
    scale_a, scale_b = _scale(stat, a.values, high), _scale(stat, b.values, high)
    scale_d = _scale(stat, difference, _largest(difference), difference=True)
    names = (traj_a.lens_name, traj_b.lens_name)
    size = _plotly_size(3, a)
    gap = min(0.2, 150 / size["width"])
    figure = make_subplots(
        rows=1, cols=3, shared_yaxes=True, horizontal_spacing=gap,
        subplot_titles=[html.escape(n) for n in (*names, f"{names[0]} − {names[1]}")],
    )
    diff_panel = _Panel(difference, a.cells, [
        [f"{html.escape(names[0])} − {html.escape(names[1])}: {d:.4g}<br><br>{ha}<br><br>{hb}"
         for d, ha, hb in zip(drow, arow, brow)]
        for drow, arow, brow in zip(difference, a.hover, b.hover)
    ], a.rows, a.inputs, a.nexts, a.name)
    figure.add_trace(_heatmap(a, scale_a, True, "coloraxis"), row=1, col=1)
    figure.add_trace(_heatmap(b, scale_b, True, "coloraxis"), row=1, col=2)
    figure.add_trace(_heatmap(diff_panel, scale_d, False, "coloraxis2"), row=1, col=3)
    for column, panel in enumerate((a, b, diff_panel), start=1):
        _plotly_axes(figure, panel, column)
    figure.update_layout(
        title_text=html.escape(f"{statistic(stat).title} · {traj_a.model_name}"),
        coloraxis={"colorscale": SEQUENTIAL, "cmin": scale_a.low, "cmax": scale_a.high,
                   "colorbar": _colour_bar(scale_a, x=2 * (1 - 2 * gap) / 3 + gap + 0.005)},
        coloraxis2={"colorscale": DIVERGING, "cmin": scale_d.low, "cmax": scale_d.high, "colorbar": _colour_bar(scale_d)},
        **size,
    )
    return figure


def _mpl_panel(axes: Axes, panel: _Panel, scale: _Scale, labelled: bool, first: bool) -> AxesImage:
    colours = matplotlib.colormaps[scale.colours].with_extremes(bad="#e0e0e0")
    norm = Normalize(scale.low, scale.high)
    image = axes.imshow(scale.values, origin="lower", aspect="auto", cmap=colours, norm=norm, interpolation="nearest")
    if labelled:
        for (row, position), label in np.ndenumerate(np.array(panel.cells, dtype=object)):
            value = scale.values[row, position]
            red, green, blue, _ = colours(norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            axes.text(position, row, label, ha="center", va="center", fontsize=7, color=ink, parse_math=False)
    axes.set_xticks(range(len(panel.inputs)), panel.inputs, rotation=60, ha="right", rotation_mode="anchor",
                    fontsize=8, parse_math=False)
    top = axes.secondary_xaxis("top")
    top.set_xticks(range(len(panel.nexts)), panel.nexts, rotation=60, ha="left", rotation_mode="anchor",
                   fontsize=8, parse_math=False)
    if first:
        axes.set_yticks(range(len(panel.rows)), panel.rows, fontsize=8)
        axes.set_ylabel("layer")
    axes.set_xlabel("input token")
    return image


def _mpl_colour_bar(figure: Figure, image: AxesImage, axes: Axes | list[Axes], scale: _Scale) -> None:
    bar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    bar.set_label(scale.title, fontsize=8)
    if scale.ticks is not None:
        bar.set_ticks(scale.ticks, labels=scale.tick_labels)
    bar.ax.tick_params(labelsize=7)


def _mpl_size(panels: int, panel: _Panel) -> tuple[float, float]:
    return 1.6 + panels * (0.6 + 0.62 * len(panel.inputs)), 2.2 + 0.24 * len(panel.rows)


def heatmap_matplotlib(
    traj: Trajectory, stat: str = "entropy", *, layer_stride: int = 1, batch: int = 0, max_chars: int = 8
) -> Figure:
    """The static (matplotlib) version of :func:`heatmap_figure`, with the next input token of
    each position along the top axis."""
    panel = _panel(traj, stat, layer_stride, batch, max_chars)
    scale = _scale(stat, panel.values)
    figure = Figure(figsize=_mpl_size(1, panel), layout="constrained")
    axes = figure.add_subplot()
    image = _mpl_panel(axes, panel, scale, True, True)
    _mpl_colour_bar(figure, image, axes, scale)
    axes.set_title(panel.name, fontsize=10, parse_math=False)
    return figure


def side_by_side_matplotlib(
    traj_a: Trajectory,
    traj_b: Trajectory,
    stat: str = "entropy",
    *,
    layer_stride: int = 1,
    batch: int = 0,
    max_chars: int = 8,
) -> Figure:
    """The static (matplotlib) version of :func:`side_by_side`."""
    _check_pair(traj_a, traj_b)
    a, b = (_panel(t, stat, layer_stride, batch, max_chars) for t in (traj_a, traj_b))
    difference = a.values - b.values
    high = max(_largest(a.values), _largest(b.values))
    figure = Figure(figsize=_mpl_size(3, a), layout="constrained")
    all_axes = figure.subplots(1, 3, sharey=True)
    scale_a = _scale(stat, a.values, high)
    _mpl_panel(all_axes[0], a, scale_a, True, True)
    image = _mpl_panel(all_axes[1], b, _scale(stat, b.values, high), True, False)
    _mpl_colour_bar(figure, image, list(all_axes[:2]), scale_a)
    scale_d = _scale(stat, difference, _largest(difference), difference=True)
    diff_panel = _Panel(difference, a.cells, a.hover, a.rows, a.inputs, a.nexts, a.name)
    image = _mpl_panel(all_axes[2], diff_panel, scale_d, False, False)
    _mpl_colour_bar(figure, image, all_axes[2], scale_d)
    names = (traj_a.lens_name, traj_b.lens_name)
    for axes, title in zip(all_axes, (*names, f"{names[0]} − {names[1]}")):
        axes.set_title(title, fontsize=10, parse_math=False)
    figure.suptitle(f"{statistic(stat).title} · {traj_a.model_name}", fontsize=11, parse_math=False)
    return figure


def save_figure(
    figure: go.Figure | Figure | Trajectory | Sequence[Trajectory],
    path: str | os.PathLike,
    *,
    stat: str = "entropy",
    layer_stride: int = 1,
    batch: int = 0,
    max_chars: int = 8,
    plotlyjs: Literal["inline", "cdn"] = "inline",
) -> Path:
    """Write a figure, or the picture of one trajectory or a pair (side by side), to ``path``.

    The suffix decides: ``.html`` a plotly figure (``plotlyjs="inline"`` embeds plotly.js, about
    5 MB, so it opens offline; ``"cdn"`` loads it from the web), ``.png``/``.pdf``/``.svg`` a
    matplotlib figure, ``.csv`` the tidy table of the trajectories. A figure is written as it is;
    the keyword arguments shape figures built from trajectories. The file is replaced atomically.
    """
    kind = output_kind(path)
    trajectories = _trajectories(figure)
    if kind == "table":
        if trajectories is None:
            raise TrajectoryError(f"{os.fspath(path)}: a table needs trajectories, not a figure")
        table = pd.concat([t.to_dataframe() for t in trajectories], ignore_index=True)
        return write_file(path, table.to_csv(index=False).encode())
    options = {"stat": stat, "layer_stride": layer_stride, "batch": batch, "max_chars": max_chars}
    if kind == "plotly":
        if trajectories is not None:
            figure = heatmap_figure(*trajectories, **options) if len(trajectories) == 1 else side_by_side(*trajectories, **options)
        if not isinstance(figure, go.Figure):
            raise TrajectoryError(f"{os.fspath(path)}: HTML is written from plotly figures or trajectories")
        include = True if plotlyjs == "inline" else "cdn"
        return write_file(path, figure.to_html(include_plotlyjs=include).encode())
    if trajectories is not None:
        figure = heatmap_matplotlib(*trajectories, **options) if len(trajectories) == 1 else side_by_side_matplotlib(*trajectories, **options)
    if not isinstance(figure, Figure):
        raise TrajectoryError(
            f"{os.fspath(path)}: static images are drawn with matplotlib; pass the trajectories "
            "(or a matplotlib figure), not a plotly figure"
        )
    image = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.savefig(image, format=Path(path).suffix.lower()[1:], dpi=150)
    return write_file(path, image.getvalue())


def _trajectories(item: object) -> list[Trajectory] | None:
    """The trajectories in ``item`` (one, or a sequence of one or two), or ``None`` for a figure."""
    if isinstance(item, Trajectory):
        return [item]
    if isinstance(item, (list, tuple)) and all(isinstance(t, Trajectory) for t in item):
        if len(item) not in (1, 2):
            raise TrajectoryError(f"a picture shows one trajectory or two side by side, not {len(item)}")
        return list(item)
    return None


__all__ = [
    "DIVERGING",
    "FIGURE_SUFFIXES",
    "SEQUENTIAL",
    "heatmap_figure",
    "heatmap_matplotlib",
    "output_kind",
    "save_figure",
    "side_by_side",
    "side_by_side_matplotlib",
]
