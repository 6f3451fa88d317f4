"""Draw a :class:`~depthlens.viz.panels.Picture` with matplotlib: static figures (PNG, PDF, SVG).

Text is drawn literally (``parse_math=False``: ``$x$`` is not TeX). Each column gets a fixed
width, wide enough for an 8-character cell label, so labels never overlap however many columns
there are; very wide figures are written at a lower resolution (:func:`dpi`). Titles wider than
the figure (a long title over a grid of few columns) wrap onto more lines instead of being cut off
(:func:`wrap_title`).
"""

from __future__ import annotations

import io
import textwrap
import warnings

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from depthlens.viz.panels import ColourScale, Panel, Picture

DPI = 150
"""Resolution of raster images (dots per inch)."""
MAX_PIXELS = 30_000
"""Largest side of a raster image; wider figures are written at a lower resolution."""


def _ink(colours: Colormap, norm: Normalize, value: float) -> str:
    """Black or white, whichever reads better on the colour of ``value``."""
    red, green, blue, _ = colours(norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


CHAR_WIDTH = 0.6
"""Mean width of a character of the title font, as a fraction of its size (DejaVu Sans ≈ 0.55)."""


def wrap_title(text: str, inches: float, fontsize: float) -> str:
    """``text`` broken at spaces into lines no wider than ``inches`` at ``fontsize`` points
    (about :data:`CHAR_WIDTH` × ``fontsize`` per character; 72 points to the inch)."""
    return textwrap.fill(text, width=max(12, int(inches * 72 / (CHAR_WIDTH * fontsize))), break_long_words=False)


def _panel(axes: Axes, panel: Panel, scale: ColourScale, inches: float) -> AxesImage:
    grid = panel.grid
    colours = matplotlib.colormaps[scale.colours].with_extremes(bad="#e0e0e0")
    norm = Normalize(scale.low, scale.high)
    image = axes.imshow(panel.z, origin="lower", aspect="auto", cmap=colours, norm=norm, interpolation="nearest")
    if panel.labelled and grid.cell_text is not None:
        for row, cells in enumerate(grid.cell_text):
            for column, label in enumerate(cells):
                ink = _ink(colours, norm, panel.z[row, column])
                axes.text(column, row, label, ha="center", va="center", fontsize=7, color=ink, parse_math=False)
    axes.set_xticks(range(grid.shape[1]), grid.col_labels, rotation=60, ha="right", rotation_mode="anchor",
                    fontsize=8, parse_math=False)
    if grid.top_labels is not None:
        top = axes.secondary_xaxis("top")
        top.set_xticks(range(grid.shape[1]), grid.top_labels, rotation=60, ha="left", rotation_mode="anchor",
                       fontsize=8, parse_math=False)
    if panel.show_row_labels:
        axes.set_yticks(range(grid.shape[0]), grid.row_labels, fontsize=8, parse_math=False)
        axes.set_ylabel(grid.row_title, parse_math=False)
    axes.set_xlabel(grid.col_title, parse_math=False)
    if panel.title:
        axes.set_title(wrap_title(panel.title, inches, 10), fontsize=10, parse_math=False)
    return image


def _colour_bar(figure: Figure, image: AxesImage, axes: list[Axes], scale: ColourScale) -> None:
    bar = figure.colorbar(image, ax=axes if len(axes) > 1 else axes[0], fraction=0.04, pad=0.02)
    bar.set_label(scale.title, fontsize=8, parse_math=False)
    if scale.ticks is not None:
        bar.set_ticks(list(scale.ticks), labels=list(scale.tick_labels or ()))
    bar.ax.tick_params(labelsize=7)


def size(picture: Picture) -> tuple[float, float]:
    """Figure size in inches: about 0.62 per column and 0.24 per row, plus room for labels."""
    panels = len(picture.panels)
    if picture.stacked:
        return 2.2 + 0.62 * picture.columns, 0.6 + panels * (1.9 + 0.24 * picture.rows)
    return 1.6 + panels * 0.6 + 0.62 * picture.columns, 2.2 + 0.24 * picture.rows


def draw(picture: Picture) -> Figure:
    """The matplotlib figure of ``picture``: the panels side by side sharing the row axis (or
    stacked, top first), each colour bar right of the panels that use it, the grids' top labels
    (the next input token) along the top."""
    figure = Figure(figsize=size(picture), layout="constrained")
    shape = (len(picture.panels), 1) if picture.stacked else (1, len(picture.panels))
    all_axes = list(np.atleast_1d(figure.subplots(*shape, sharey=not picture.stacked)).ravel())
    width = figure.get_size_inches()[0]
    panel_inches = width if picture.stacked else width / len(picture.panels)
    images = [_panel(axes, panel, picture.bars[panel.bar], panel_inches) for axes, panel in zip(all_axes, picture.panels)]
    for index in range(len(picture.panels)):
        bar = picture.bar_after(index)
        if bar is not None:
            users = [all_axes[i] for i in picture.bar_users(bar)]
            _colour_bar(figure, images[index], users, picture.bars[bar])
    if len(picture.panels) == 1:
        all_axes[0].set_title(wrap_title(picture.title, width, 10), fontsize=10, parse_math=False)
    else:
        figure.suptitle(wrap_title(picture.title, width, 11), fontsize=11, parse_math=False)
    return figure


def dpi(figure: Figure) -> float:
    """:data:`DPI`, lowered so that neither side exceeds :data:`MAX_PIXELS`."""
    return min(DPI, MAX_PIXELS / max(figure.get_size_inches()))


def render(figure: Figure, image_format: str) -> bytes:
    """``figure`` as ``image_format`` (``"png"``, ``"pdf"``, ``"svg"``) bytes; warnings about
    glyphs the font lacks (they are drawn as boxes) are silenced."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.savefig(buffer, format=image_format, dpi=dpi(figure))
    return buffer.getvalue()


__all__ = ["CHAR_WIDTH", "DPI", "MAX_PIXELS", "dpi", "draw", "render", "size", "wrap_title"]
