"""Pictures of grids: heatmaps of any :class:`~depthlens.stats.grid.Grid`, alone or two side by side.

A grid is the one picture type every analysis produces; a trajectory gives the layers × positions
grid of Belrose et al. (2023), Figure 1, through :func:`~depthlens.analysis.trajectory_grid.trajectory_grid`
(cells show the top-1 token, rows run from layer 0 at the bottom to the model's output at the top,
the input tokens label the bottom axis). Every function here takes grids, or trajectories, which it
turns into the grid of statistic ``stat`` first (the other keyword arguments shape that grid):

- :func:`heatmap_figure` / :func:`side_by_side` build interactive plotly figures (HTML) whose
  hover shows each cell's details (for trajectories the top-``k`` tokens and probabilities);
- :func:`heatmap_matplotlib` / :func:`side_by_side_matplotlib` build static matplotlib figures
  (PNG, PDF, SVG), with the grid's top labels (the next input token) along the top;
- :func:`save_figure` writes either, or a CSV table, picking by the file's suffix, atomically.

``side_by_side`` shows two grids on one colour scale and their difference ``a − b`` on a diverging
scale. Both libraries draw the same description (:mod:`depthlens.viz.panels`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure

from depthlens.analysis.trajectory import Trajectory, statistic
from depthlens.analysis.trajectory_grid import trajectory_grid, trajectory_grids
from depthlens.atomic import write_file
from depthlens.errors import GridError
from depthlens.stats.grid import Grid
from depthlens.viz import matplotlib_draw, plotly_draw
from depthlens.viz.panels import DIVERGING, SEQUENTIAL, Picture, pair, single
from depthlens.viz.plotly_draw import PlotlyJs

FIGURE_SUFFIXES = {".html": "plotly", ".png": "matplotlib", ".pdf": "matplotlib", ".svg": "matplotlib", ".csv": "table"}
"""What :func:`save_figure` writes for each file suffix."""

Drawable = Grid | Trajectory
"""What a picture is drawn from: a grid, or a trajectory (drawn as the grid of one statistic)."""


def output_kind(path: str | os.PathLike) -> str:
    """``"plotly"``, ``"matplotlib"`` or ``"table"``: what :func:`save_figure` writes to ``path``;
    :class:`~depthlens.errors.GridError` for a suffix it cannot write."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_SUFFIXES:
        raise GridError(f"cannot write {os.fspath(path)!r}: the file name must end in one of {', '.join(FIGURE_SUFFIXES)}")
    return FIGURE_SUFFIXES[suffix]


def as_grid(item: Drawable, stat: str = "entropy", *, layer_stride: int = 1, batch: int = 0, max_chars: int = 8) -> Grid:
    """``item`` as a grid: a grid keeps its cells (``layer_stride`` keeps every n-th row and the
    last); a trajectory becomes :func:`~depthlens.analysis.trajectory_grid.trajectory_grid`."""
    if isinstance(item, Grid):
        return item if layer_stride == 1 else item.strided(layer_stride)
    if isinstance(item, Trajectory):
        return trajectory_grid(item, stat, batch=batch, layer_stride=layer_stride, max_chars=max_chars)
    raise GridError(f"a picture is drawn from a Grid or a Trajectory, not a {type(item).__name__}")


def picture(
    item_a: Drawable, item_b: Drawable | None = None, stat: str = "entropy", *,
    layer_stride: int = 1, batch: int = 0, max_chars: int = 8, title: str | None = None, stacked: bool | None = None,
) -> Picture:
    """The description both libraries draw: one grid, or two side by side with their difference
    (see :func:`~depthlens.viz.panels.pair` for ``title`` and ``stacked``). Two trajectories must
    be of the same text and layers; their title names the statistic and the model."""
    options = {"layer_stride": layer_stride, "batch": batch, "max_chars": max_chars}
    if item_b is None:
        return single(as_grid(item_a, stat, **options))
    if isinstance(item_a, Trajectory) and isinstance(item_b, Trajectory):
        grids = trajectory_grids(item_a, item_b, stat, **options)
        title = title or f"{statistic(stat).title} · {item_a.model_name}"
    else:
        grids = (as_grid(item_a, stat, **options), as_grid(item_b, stat, **options))
    return pair(*grids, title=title, stacked=stacked)


def heatmap_figure(
    item: Drawable, stat: str = "entropy", *, layer_stride: int = 1, batch: int = 0, max_chars: int = 8
) -> go.Figure:
    """An interactive plotly heatmap of a grid, or of ``stat`` over layers × positions of batch
    item ``batch`` of a trajectory.

    Cells show the cell text (a trajectory's top-1 label cut to ``max_chars``); hover shows the
    hover text (a trajectory's input and next token, the statistic and the top-``k`` tokens with
    probabilities). ``layer_stride`` keeps every n-th layer and the output row. The figure fills
    the width of its container.
    """
    return plotly_draw.draw(picture(item, None, stat, layer_stride=layer_stride, batch=batch, max_chars=max_chars))


def side_by_side(
    item_a: Drawable,
    item_b: Drawable,
    stat: str = "entropy",
    *,
    layer_stride: int = 1,
    batch: int = 0,
    max_chars: int = 8,
    title: str | None = None,
    stacked: bool | None = None,
) -> go.Figure:
    """Two grids (two lenses on the same text) sharing one colour scale, and a third panel with
    ``a − b`` on a diverging scale.

    Both must have the same rows and columns (trajectories: the same input and layers); see
    :func:`heatmap_figure` for the other arguments. ``title`` replaces the default title;
    ``stacked=True`` puts the panels one above another, which is the default when a row would
    hold more than :data:`~depthlens.viz.panels.STACK_COLUMNS` columns.
    """
    return plotly_draw.draw(picture(item_a, item_b, stat, layer_stride=layer_stride, batch=batch,
                                    max_chars=max_chars, title=title, stacked=stacked))


def heatmap_matplotlib(
    item: Drawable, stat: str = "entropy", *, layer_stride: int = 1, batch: int = 0, max_chars: int = 8
) -> Figure:
    """The static (matplotlib) version of :func:`heatmap_figure`, with the grid's top labels (a
    trajectory's next input token at each position) along the top axis."""
    return matplotlib_draw.draw(picture(item, None, stat, layer_stride=layer_stride, batch=batch, max_chars=max_chars))


def side_by_side_matplotlib(
    item_a: Drawable,
    item_b: Drawable,
    stat: str = "entropy",
    *,
    layer_stride: int = 1,
    batch: int = 0,
    max_chars: int = 8,
    title: str | None = None,
    stacked: bool | None = None,
) -> Figure:
    """The static (matplotlib) version of :func:`side_by_side`."""
    return matplotlib_draw.draw(picture(item_a, item_b, stat, layer_stride=layer_stride, batch=batch,
                                        max_chars=max_chars, title=title, stacked=stacked))


def _items(item: object) -> list[Drawable] | None:
    """The grids or trajectories in ``item`` (one, or a sequence of one or two), or ``None`` for
    anything else (a figure)."""
    if isinstance(item, (Grid, Trajectory)):
        return [item]
    if isinstance(item, (list, tuple)) and item and all(isinstance(t, (Grid, Trajectory)) for t in item):
        if len(item) not in (1, 2):
            raise GridError(f"a picture shows one trajectory or grid, or two side by side, not {len(item)}")
        return list(item)
    return None


def table(items: Sequence[Drawable], stat: str = "entropy", *, layer_stride: int = 1, batch: int = 0, max_chars: int = 8) -> pd.DataFrame:
    """The tidy table of ``items``: trajectories alone give their full tables
    (:meth:`~depthlens.analysis.trajectory.Trajectory.to_dataframe`, every statistic); otherwise
    each item's grid gives one row per cell (:meth:`~depthlens.stats.grid.Grid.tidy`)."""
    if all(isinstance(item, Trajectory) for item in items):
        return pd.concat([item.to_dataframe() for item in items], ignore_index=True)
    options = {"layer_stride": layer_stride, "batch": batch, "max_chars": max_chars}
    return pd.concat([pd.DataFrame(as_grid(item, stat, **options).tidy()) for item in items], ignore_index=True)


def save_figure(
    figure: go.Figure | Figure | Drawable | Sequence[Drawable],
    path: str | os.PathLike,
    *,
    stat: str = "entropy",
    layer_stride: int = 1,
    batch: int = 0,
    max_chars: int = 8,
    plotlyjs: PlotlyJs = "directory",
) -> Path:
    """Write a figure, or the picture of one grid or trajectory or a pair (side by side), to ``path``.

    The suffix decides: ``.html`` a plotly figure (``plotlyjs="directory"``, the default, shares
    one plotly.js file among the pages of the folder, written beside them once, so each page is
    small and opens offline; ``"inline"`` embeds plotly.js, about 4.8 MB, in the page; ``"cdn"``
    loads it from the web: :func:`~depthlens.viz.plotly_draw.write_html`), ``.png``/``.pdf``/``.svg`` a
    matplotlib figure, ``.csv`` the tidy table (:func:`table`). A figure is written as it is; the
    keyword arguments shape pictures built from trajectories. The file is replaced atomically.
    """
    kind = output_kind(path)
    items = _items(figure)
    options = {"stat": stat, "layer_stride": layer_stride, "batch": batch, "max_chars": max_chars}
    if kind == "table":
        if items is None:
            raise GridError(f"{os.fspath(path)}: a table needs trajectories or grids, not a figure")
        return write_file(path, table(items, **options).to_csv(index=False).encode())
    if items is not None:
        described = picture(*items, **options) if len(items) == 2 else picture(items[0], None, **options)
        figure = plotly_draw.draw(described) if kind == "plotly" else matplotlib_draw.draw(described)
    if kind == "plotly":
        if not isinstance(figure, go.Figure):
            raise GridError(f"{os.fspath(path)}: HTML is written from plotly figures, grids or trajectories")
        return plotly_draw.write_html(figure, path, plotlyjs)
    if not isinstance(figure, Figure):
        raise GridError(
            f"{os.fspath(path)}: static images are drawn with matplotlib; pass the grids or trajectories "
            "(or a matplotlib figure), not a plotly figure"
        )
    return write_file(path, matplotlib_draw.render(figure, Path(path).suffix.lower()[1:]))


__all__ = [
    "DIVERGING",
    "FIGURE_SUFFIXES",
    "SEQUENTIAL",
    "Drawable",
    "as_grid",
    "heatmap_figure",
    "heatmap_matplotlib",
    "output_kind",
    "picture",
    "save_figure",
    "side_by_side",
    "side_by_side_matplotlib",
    "table",
]
