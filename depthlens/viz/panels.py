"""What a picture shows, before any plotting library draws it.

A :class:`Picture` is a row of :class:`Panel` s, each a :class:`~depthlens.stats.grid.Grid` with
the values as coloured (:func:`drawn_values`) and the colour bar it uses, plus the colour bars
(:class:`ColourScale`) and the title. :func:`single` describes one grid; :func:`pair` describes two
grids beside each other, sharing one colour bar, and a third panel with their difference on a
diverging scale (stacked one above another when a row would be too wide to read). :mod:`depthlens.viz.plotly_draw` and :mod:`depthlens.viz.matplotlib_draw` draw the
same description, so both libraries show the same numbers, colours, ticks and titles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from depthlens.errors import GridError
from depthlens.stats.grid import Grid, ScaleKind

SEQUENTIAL = "viridis"
"""Colour map of sequential and log scales (the same palette in plotly and matplotlib)."""
DIVERGING = "RdBu"
"""Colour map of diverging scales (differences), centred on 0."""

_LOGARITHMIC = ("log", "diverging-log")
_CENTRED = ("diverging", "diverging-log")


def drawn_values(kind: ScaleKind, values: np.ndarray) -> np.ndarray:
    """``values`` as coloured: unchanged, or ``sign(v) · log10(1 + |v|)`` on a log scale."""
    values = np.asarray(values, dtype=np.float64)
    if kind in _LOGARITHMIC:
        return np.sign(values) * np.log10(1 + np.abs(values))
    return values


@dataclass(frozen=True)
class ColourScale:
    """How values become colours, in the units of :func:`drawn_values`."""

    kind: ScaleKind
    colours: str
    """Colour map name, valid in plotly and matplotlib."""
    low: float
    high: float
    title: str
    """The colour bar's title: the quantity, its unit, ``(log scale)`` where it is one."""
    ticks: tuple[float, ...] | None = None
    """Colour bar tick positions, or ``None`` for the library's own."""
    tick_labels: tuple[str, ...] | None = None


def _count(value: int) -> str:
    return f"{value // 1000}k" if value >= 1000 and value % 1000 == 0 else str(value)


def log_ticks(top: float, centred: bool) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """Colour bar ticks of a log scale reaching ``top = log10(1 + largest count)``: at counts
    0, 1, 10, 100, … (drawn at ``log10(1 + count)``), mirrored with ``−`` when ``centred``."""
    first = 1 if centred and top >= 1.5 else 0
    counts = [0] + [10**e for e in range(first, int(top) + 1)]
    ticks = [math.log10(1 + c) for c in counts]
    labels = [_count(c) for c in counts]
    if centred:
        ticks, labels = [-t for t in ticks[:0:-1]] + ticks, [f"−{t}" for t in labels[:0:-1]] + labels
    return tuple(ticks), tuple(labels)


def _largest(grids: Sequence[Grid]) -> float:
    """The largest finite magnitude in ``grids`` (0 if none)."""
    finite = np.concatenate([np.abs(g.values[np.isfinite(g.values)]) for g in grids])
    return float(finite.max()) if finite.size else 0.0


def _data_range(kind: ScaleKind, grids: Sequence[Grid]) -> tuple[float, float]:
    """The colour range of ``grids``' values, in drawn units."""
    if kind in _CENTRED or kind == "log":
        top = max(float(drawn_values(kind, np.array(_largest(grids)))), 1e-9)
        return (-top if kind in _CENTRED else 0.0), top
    finite = np.concatenate([g.values[np.isfinite(g.values)] for g in grids])
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 0.0
    return low, max(high, low + 1e-9)


def colour_scale(grids: Sequence[Grid]) -> ColourScale:
    """The one colour scale shared by ``grids`` (all of one scale kind).

    The range is the union of the grids' fixed :attr:`~depthlens.stats.grid.Grid.value_range`
    where any has one, else the data's: from ``min(0, smallest)`` to the largest value
    (sequential), ``± the largest magnitude`` (diverging), from 0 to ``log10(1 + largest)`` (log).
    """
    kinds = {g.scale for g in grids}
    if len(kinds) != 1:
        raise GridError(f"grids sharing a colour bar need one colour scale, got {', '.join(sorted(kinds))}: draw them apart")
    kind: ScaleKind = grids[0].scale
    fixed = [g.value_range for g in grids if g.value_range is not None]
    if fixed:
        low, high = (float(v) for v in drawn_values(kind, np.array([min(r[0] for r in fixed), max(r[1] for r in fixed)])))
    else:
        low, high = _data_range(kind, grids)
    colours = DIVERGING if kind in _CENTRED else SEQUENTIAL
    title = grids[0].label + (" (log scale)" if kind in _LOGARITHMIC else "")
    if kind in _LOGARITHMIC:
        ticks, labels = log_ticks(max(abs(low), abs(high)), kind in _CENTRED)
        return ColourScale(kind, colours, low, high, title, ticks, labels)
    return ColourScale(kind, colours, low, high, title)


STACK_COLUMNS = 30
"""A pair whose three panels would have more columns than this in one row is stacked instead
(the two grids and their difference one above another), so each keeps room for its labels."""


@dataclass(frozen=True)
class Panel:
    """One heatmap of a picture."""

    grid: Grid
    z: np.ndarray
    """The grid's values as coloured (:func:`drawn_values`) ``[rows, columns]``."""
    bar: int
    """Index of its colour scale in :attr:`Picture.bars`."""
    title: str
    """Its title above it ("" when the picture has one panel: the picture's title says it)."""
    labelled: bool
    """Whether its cells show :attr:`~depthlens.stats.grid.Grid.cell_text`."""
    show_row_labels: bool
    """Whether it shows the row labels (the leftmost panel of a row; every stacked panel)."""


@dataclass(frozen=True)
class Picture:
    """Panels side by side (or stacked, top first), the colour scales they use, and the title.

    Every panel has the same rows and the same columns; each colour bar stands right of the last
    panel that uses it (:meth:`bar_after`), beside all its panels when stacked.
    """

    panels: tuple[Panel, ...]
    bars: tuple[ColourScale, ...]
    title: str
    stacked: bool = False

    @property
    def rows(self) -> int:
        """Rows of each panel."""
        return self.panels[0].grid.shape[0]

    @property
    def columns(self) -> int:
        """Columns side by side: of all panels in a row, of one panel when stacked."""
        widths = [p.grid.shape[1] for p in self.panels]
        return max(widths) if self.stacked else sum(widths)

    def bar_after(self, index: int) -> int | None:
        """The colour bar drawn right of panel ``index``: the one it uses if no later panel
        uses it too, else ``None``."""
        bar = self.panels[index].bar
        return None if any(p.bar == bar for p in self.panels[index + 1:]) else bar

    def bar_users(self, bar: int) -> list[int]:
        """Indices of the panels coloured by colour bar ``bar``."""
        return [i for i, panel in enumerate(self.panels) if panel.bar == bar]


def single(grid: Grid) -> Picture:
    """One grid, titled with its title (or name), with its own colour bar."""
    scale = colour_scale([grid])
    panel = Panel(grid, drawn_values(scale.kind, grid.values), 0, "", grid.cell_text is not None, True)
    return Picture((panel,), (scale,), grid.title or grid.name)


def pair(a: Grid, b: Grid, *, title: str | None = None, stacked: bool | None = None) -> Picture:
    """``a`` and ``b`` beside each other on one shared colour scale, and ``a − b`` on a diverging
    scale (see :meth:`~depthlens.stats.grid.Grid.difference`, whose checks apply).

    ``title`` defaults to the quantity and the grids' source (e.g. the model's name). ``stacked``
    puts the three panels one above another; by default they are when a row would hold more than
    :data:`STACK_COLUMNS` columns.
    """
    names = (a.name or "first", b.name or "second")
    difference = a.difference(b, name=f"{names[0]} − {names[1]}")
    if stacked is None:
        stacked = 3 * a.shape[1] > STACK_COLUMNS
    shared, centred = colour_scale([a, b]), colour_scale([difference])
    panels = (
        Panel(a, drawn_values(shared.kind, a.values), 0, names[0], a.cell_text is not None, True),
        Panel(b, drawn_values(shared.kind, b.values), 0, names[1], b.cell_text is not None, stacked),
        Panel(difference, drawn_values(centred.kind, difference.values), 1, difference.name, False, stacked),
    )
    if title is None:
        title = f"{a.label} · {a.source}" if a.source else a.label
    return Picture(panels, (shared, centred), title, stacked)


__all__ = ["DIVERGING", "SEQUENTIAL", "STACK_COLUMNS", "ColourScale", "Panel", "Picture", "colour_scale", "drawn_values", "log_ticks", "pair", "single"]
