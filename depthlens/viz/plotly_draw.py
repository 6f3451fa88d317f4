"""Draw a :class:`~depthlens.viz.panels.Picture` with plotly: interactive heatmaps for the web.

Every text is HTML-escaped here (labels such as ``<i>`` are shown, not interpreted); hover text
lines become ``<br>``. The figure has no fixed width: it fills its container (autosize, and
``responsive`` in written HTML), so every column stays visible in a narrow window; written HTML
keeps at least :data:`MIN_COLUMN_PX` per column and scrolls sideways below that.

Every HTML page depthlens writes goes through :func:`write_html`. By default (``"directory"``) the
pages of one folder share one copy of plotly.js (about 4.8 MB), written once beside them as
``plotly-VERSION.min.js``: pages stay small (tens of kB) and still open offline, as long as the
folder travels whole. ``"inline"`` embeds plotly.js in the page (one self-contained file, as the
web app's downloads are); ``"cdn"`` loads it from the web (smallest, but blank offline).
"""

from __future__ import annotations

import html
import os
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from depthlens.atomic import write_file
from depthlens.viz.panels import ColourScale, Panel, Picture

MIN_COLUMN_PX = 36
"""Narrowest column of a written HTML page (pixels); a wider window shares out its width."""
_FRAME_PX = 200
"""Width outside the columns: row labels, colour bars and margins (pixels)."""
_GAP = 0.02
"""Space between two panels in a row that share a colour bar, as a fraction of the width."""
_GAP_WITH_BAR = 0.1
"""Space after a panel in a row whose colour bar stands between it and the next."""
_ROW_PX = 22
"""Height of one row of cells (pixels)."""
_STACK_GAP_PX = 125
"""Height between stacked panels: the upper one's column labels and the lower one's title."""
_MARGINS = {"t": 100, "b": 110}
"""Top and bottom margins of stacked pictures (pixels; Gradio raises a titled figure's top
margin to at least 100)."""


def _escape(text: str) -> str:
    """``text`` safe inside plotly's HTML-like labels: ``&``, ``<`` and ``>`` escaped, quotes
    kept as they are (plotly.js shows ``&quot;`` literally), line breaks as ``<br>``."""
    return html.escape(text, quote=False).replace("\n", "<br>")


def _suffix(index: int) -> str:
    """Plotly's axis suffix of panel ``index``: ``""``, ``"2"``, ``"3"``, …"""
    return "" if index == 0 else str(index + 1)


def _x_domains(picture: Picture) -> list[tuple[float, float]]:
    """The horizontal extent of each panel in paper coordinates, each panel as wide per column."""
    if picture.stacked:
        return [(0.0, 1.0)] * len(picture.panels)
    gaps = [_GAP_WITH_BAR if picture.bar_after(i) is not None else _GAP for i in range(len(picture.panels) - 1)]
    usable = 1.0 - sum(gaps)
    start, domains = 0.0, []
    for index, panel in enumerate(picture.panels):
        width = usable * panel.grid.shape[1] / picture.columns
        domains.append((start, start + width))
        start += width + (gaps[index] if index < len(gaps) else 0.0)
    return domains


def _height(picture: Picture) -> int:
    """The figure's height in pixels: rows of cells, column labels, titles."""
    panel = _ROW_PX * picture.rows + 10
    if picture.stacked:
        return _MARGINS["t"] + _MARGINS["b"] + len(picture.panels) * panel + (len(picture.panels) - 1) * _STACK_GAP_PX
    return 180 + panel + (24 if any(p.title for p in picture.panels) else 0)


def _y_domains(picture: Picture) -> list[tuple[float, float]]:
    """The vertical extent of each panel in paper coordinates (top panel first when stacked)."""
    if not picture.stacked:
        return [(0.0, 1.0)] * len(picture.panels)
    plot = _height(picture) - _MARGINS["t"] - _MARGINS["b"]
    panel, gap = (_ROW_PX * picture.rows + 10) / plot, _STACK_GAP_PX / plot
    tops = [1.0 - i * (panel + gap) for i in range(len(picture.panels))]
    return [(max(top - panel, 0.0), top) for top in tops]


def _heatmap(panel: Panel, index: int, font_size: int) -> go.Heatmap:
    grid, suffix = panel.grid, _suffix(index)
    labelled = panel.labelled and grid.cell_text is not None
    return go.Heatmap(
        z=np.array(panel.z),
        text=[[_escape(cell) for cell in row] for row in grid.cell_text] if labelled else None,
        texttemplate="%{text}" if labelled else None,
        textfont={"size": font_size},
        hovertext=[[_escape(text) for text in row] for row in grid.hover_texts()],
        hovertemplate="%{hovertext}<extra></extra>",
        coloraxis="coloraxis" + _suffix(panel.bar),
        xaxis="x" + suffix,
        yaxis="y" + suffix,
        xgap=1,
        ygap=1,
    )


def _axes(panel: Panel, index: int, x_domain: tuple[float, float], y_domain: tuple[float, float]) -> dict:
    """The x and y axes of panel ``index``; later panels zoom and pan with the first."""
    grid, suffix = panel.grid, _suffix(index)
    x_axis = {
        "domain": list(x_domain), "anchor": "y" + suffix, "tickangle": -60, "automargin": True,
        "tickvals": list(range(grid.shape[1])), "ticktext": [_escape(t) for t in grid.col_labels],
        "title": {"text": _escape(grid.col_title)},
    }
    y_axis = {
        "domain": list(y_domain), "anchor": "x" + suffix, "automargin": True, "showticklabels": panel.show_row_labels,
        "tickvals": list(range(grid.shape[0])), "ticktext": [_escape(t) for t in grid.row_labels],
        "title": {"text": _escape(grid.row_title) if panel.show_row_labels else None},
    }
    if index > 0:
        x_axis["matches"], y_axis["matches"] = "x", "y"
    return {"xaxis" + suffix: x_axis, "yaxis" + suffix: y_axis}


def _colour_axis(scale: ColourScale, place: dict) -> dict:
    bar: dict = {"title": {"text": _escape(scale.title), "side": "right"}, "thickness": 14, **place}
    if scale.ticks is not None:
        bar.update(tickvals=list(scale.ticks), ticktext=list(scale.tick_labels or ()))
    return {"colorscale": scale.colours, "cmin": scale.low, "cmax": scale.high, "colorbar": bar}


def _bar_place(picture: Picture, bar: int, x_domains: list, y_domains: list) -> dict:
    """Where colour bar ``bar`` stands: right of the last panel using it (in a row), or beside
    all the panels using it (stacked)."""
    users = picture.bar_users(bar)
    if picture.stacked:
        # The length is in pixels: as a fraction, a redraw that changes the height (plotly's
        # react from a shorter figure) can leave a short bar a negative length, which throws.
        low, high = min(y_domains[i][0] for i in users), max(y_domains[i][1] for i in users)
        plot = _height(picture) - _MARGINS["t"] - _MARGINS["b"]
        return {"y": (low + high) / 2, "yanchor": "middle", "len": max(50.0, (high - low) * plot), "lenmode": "pixels"}
    if users[-1] == len(picture.panels) - 1:
        return {}
    return {"x": x_domains[users[-1]][1] + 0.005, "xanchor": "left", "xpad": 4}


def draw(picture: Picture) -> go.Figure:
    """The plotly figure of ``picture``: one heatmap per panel (side by side, or stacked) sharing
    the row and column zoom, cell text, hover text, colour bars, panel titles above the panels
    and the title on top. Its width follows its container (no fixed width)."""
    x_domains, y_domains = _x_domains(picture), _y_domains(picture)
    font_size = 10 if picture.columns <= 30 else 8
    figure = go.Figure([_heatmap(panel, index, font_size) for index, panel in enumerate(picture.panels)])
    layout: dict = {}
    for index, panel in enumerate(picture.panels):
        layout.update(_axes(panel, index, x_domains[index], y_domains[index]))
    for bar, scale in enumerate(picture.bars):
        layout["coloraxis" + _suffix(bar)] = _colour_axis(scale, _bar_place(picture, bar, x_domains, y_domains))
    layout["annotations"] = [
        {"text": _escape(panel.title), "x": (x[0] + x[1]) / 2, "y": y[1], "xref": "paper", "yref": "paper",
         "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 14}}
        for panel, x, y in zip(picture.panels, x_domains, y_domains) if panel.title
    ]
    if picture.stacked:
        layout["margin"] = dict(_MARGINS)
    figure.update_layout(title_text=_escape(picture.title), autosize=True, height=_height(picture), **layout)
    return figure


def min_width(figure: go.Figure) -> int:
    """The narrowest width (pixels) at which every column of ``figure``'s heatmaps keeps
    :data:`MIN_COLUMN_PX`: heatmaps side by side add up, stacked ones (same x extent) do not."""
    across: dict[tuple, int] = {}
    for trace in figure.data:
        if isinstance(trace, go.Heatmap) and trace.z is not None and len(trace.z):
            axis = figure.layout["xaxis" + (trace.xaxis or "x")[1:]]
            extent = tuple(axis.domain) if axis.domain is not None else (0, 1)
            across[extent] = max(across.get(extent, 0), len(trace.z[0]))
    return _FRAME_PX + 40 * len(across) + MIN_COLUMN_PX * sum(across.values())


PlotlyJs = Literal["directory", "inline", "cdn"]
"""Where a written page gets plotly.js: a shared file beside it, embedded, or the web (see above)."""


@cache
def _bundle() -> bytes:
    """plotly.js, minified, as the installed plotly ships it."""
    return get_plotlyjs().encode()


def bundle_name() -> str:
    """The file name of the shared plotly.js copy: ``plotly-VERSION.min.js``, so that pages written
    with different plotly versions into one folder each find their own."""
    return f"plotly-{get_plotlyjs_version()}.min.js"


def to_html(figure: go.Figure, plotlyjs: PlotlyJs = "directory") -> str:
    """A whole HTML page of ``figure`` that fills the window's width (at least :func:`min_width`,
    scrolling sideways below it) and follows it when the window is resized. ``plotlyjs`` says
    where it gets plotly.js (see the module docstring); ``"directory"`` expects
    :func:`bundle_name` beside the page, which :func:`write_html` writes."""
    width = f"{figure.layout.width}px" if figure.layout.width else f"max(100%, {min_width(figure)}px)"
    include = {"directory": bundle_name(), "inline": True, "cdn": "cdn"}[plotlyjs]
    return figure.to_html(include_plotlyjs=include, default_width=width, config={"responsive": True})


def write_html(figure: go.Figure, path: str | os.PathLike, plotlyjs: PlotlyJs = "directory") -> Path:
    """Write ``figure`` as the HTML page :func:`to_html` makes, atomically; with ``"directory"``
    (the default) also write the folder's one shared plotly.js copy, unless it is there already."""
    path = Path(path)
    if plotlyjs == "directory":
        shared = path.parent / bundle_name()
        if not shared.is_file() or shared.stat().st_size != len(_bundle()):
            write_file(shared, _bundle())
    return write_file(path, to_html(figure, plotlyjs).encode())


__all__ = ["MIN_COLUMN_PX", "PlotlyJs", "bundle_name", "draw", "min_width", "to_html", "write_html"]
