"""The grid: the one picture type every analysis produces.

A :class:`Grid` is a matrix of numbers over labelled rows and columns, with everything a picture
needs to show it: text in the cells, hover text, what the numbers are and their unit, and how
they are coloured. Trajectories produce one per statistic (rows = layers, columns = input
positions, cells = the top-1 prediction); later analyses produce their own the same way (causal
effects of patching a layer at a position, drift of a lens over training, the direct logit
attribution of each layer, a layer × layer similarity matrix). :mod:`depthlens.viz.pictures`
draws any grid, alone or beside another with their difference, with plotly or matplotlib, and
writes it as a tidy table.

This module imports nothing but numpy, so any analysis can build grids without plotting
libraries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import numpy as np

from depthlens.errors import GridError

ScaleKind = Literal["sequential", "diverging", "log", "diverging-log"]
"""How a grid's values become colours:

- ``"sequential"``: one colour ramp from ``min(0, smallest value)`` to the largest value;
- ``"diverging"``: two ramps meeting at 0, symmetric around it (differences, signed effects);
- ``"log"``: counts such as ranks, coloured by ``log10(1 + value)`` with ticks at 0, 1, 10, 100, …;
- ``"diverging-log"``: differences of counts, coloured by ``sign(v) · log10(1 + |v|)``.
"""

SCALES: tuple[str, ...] = get_args(ScaleKind)
"""The valid :data:`ScaleKind` names."""


def _labels(what: str, labels: Sequence[str], length: int) -> tuple[str, ...]:
    """``labels`` as a tuple of strings; :class:`GridError` unless there are ``length``."""
    if isinstance(labels, str):
        raise GridError(f"{what} must be a sequence of strings, not one string {labels!r}: wrap it in a list")
    result = tuple(str(label) for label in labels)
    if len(result) != length:
        raise GridError(f"{what} has {len(result)} labels but the values have {length}: give one label each")
    return result


def _cells(what: str, cells: Sequence[Sequence[str]], shape: tuple[int, int]) -> tuple[tuple[str, ...], ...]:
    """``cells`` as a tuple of row tuples; :class:`GridError` unless their shape is ``shape``."""
    rows = tuple(tuple(str(cell) for cell in row) for row in cells)
    found = (len(rows), *{len(row) for row in rows})
    if found != shape:
        widths = "/".join(str(n) for n in sorted(found[1:]))
        layout = f"{len(rows)} rows" + (f" of {widths} cells" if widths else "")
        raise GridError(f"{what} has {layout} but the values are {shape[0]} × {shape[1]}: give one string per cell")
    return rows


@dataclass(frozen=True, eq=False)
class Grid:
    """A labelled matrix ``values [rows, columns]`` and how to show it.

    Build one with the values and their row and column labels; every other field is optional.
    Shapes are checked on construction (:class:`~depthlens.errors.GridError` names the field
    that does not fit). Text fields are plain text: pictures escape them as their format needs
    (HTML for plotly), so labels such as ``<i>`` or ``$x$`` are shown literally. Row 0 is drawn
    at the bottom, column 0 at the left.
    """

    values: np.ndarray
    """The numbers ``[rows, columns]``, float64 (a read-only copy of what was given); NaN marks
    an empty cell (drawn grey, left out of colour ranges)."""
    row_labels: Sequence[str]
    """One label per row (for a trajectory the layer, ``"output"`` for the model's own)."""
    col_labels: Sequence[str]
    """One label per column, along the bottom axis (for a trajectory the input tokens)."""
    top_labels: Sequence[str] | None = None
    """One label per column along the top axis (for a trajectory the next input tokens)."""
    cell_text: Sequence[Sequence[str]] | None = None
    """Short text written in each cell ``[rows][columns]`` (for a trajectory the top-1 token)."""
    hover: Sequence[Sequence[str]] | None = None
    """Hover text of each cell ``[rows][columns]``, lines separated by ``"\\n"``; ``None`` for the
    default from the labels and value (:meth:`hover_text`)."""
    title: str = ""
    """The picture's title when the grid is drawn alone."""
    name: str = ""
    """A short name, above the grid beside another and in differences (``"logit lens"``)."""
    source: str = ""
    """What the grid was computed on (the model's name), added to side-by-side titles."""
    quantity: str = "value"
    """What the numbers are (``"entropy"``), for the colour bar and the hover."""
    unit: str = ""
    """Their unit (``"nats"``), or ``""`` for counts, probabilities and other pure numbers."""
    scale: ScaleKind = "sequential"
    """How values become colours (see :data:`ScaleKind`)."""
    value_range: tuple[float, float] | None = None
    """A fixed colour range ``(low, high)`` in the values' units (``(0, 1)`` for probabilities);
    ``None`` to take it from the data."""
    row_title: str = "row"
    """What the rows are (``"layer"``), beside the row labels."""
    col_title: str = "column"
    """What the columns are (``"input token"``), under the column labels."""
    value_format: str = ".4g"
    """Format spec of a value in hover text and tables' companions (``".0f"`` for counts)."""
    shape: tuple[int, int] = field(init=False)
    """``(rows, columns)``."""

    def __post_init__(self) -> None:
        try:
            values = np.array(self.values, dtype=np.float64)
        except (TypeError, ValueError):
            raise GridError("the grid's values must be numbers [rows, columns]: pass a 2-D array of floats") from None
        if values.ndim != 2 or 0 in values.shape:
            raise GridError(f"the grid's values must be a non-empty 2-D array [rows, columns], got shape {values.shape}")
        values.setflags(write=False)
        rows, cols = values.shape
        set_field = object.__setattr__
        set_field(self, "values", values)
        set_field(self, "shape", (rows, cols))
        set_field(self, "row_labels", _labels("row_labels", self.row_labels, rows))
        set_field(self, "col_labels", _labels("col_labels", self.col_labels, cols))
        if self.top_labels is not None:
            set_field(self, "top_labels", _labels("top_labels", self.top_labels, cols))
        for name in ("cell_text", "hover"):
            if getattr(self, name) is not None:
                set_field(self, name, _cells(name, getattr(self, name), (rows, cols)))
        if self.scale not in SCALES:
            raise GridError(f"unknown colour scale {self.scale!r}: choose one of {', '.join(SCALES)}")
        if self.value_range is not None:
            low, high = (float(v) for v in self.value_range)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise GridError(f"the value range must be two finite numbers low < high, got {self.value_range}")
            set_field(self, "value_range", (low, high))

    @property
    def label(self) -> str:
        """The quantity with its unit, e.g. ``"entropy (nats)"``."""
        return f"{self.quantity} ({self.unit})" if self.unit else self.quantity

    def format_value(self, value: float) -> str:
        """``value`` written with :attr:`value_format` and the unit; ``"empty"`` for NaN."""
        if math.isnan(value):
            return "empty"
        return f"{value:{self.value_format}}" + (f" {self.unit}" if self.unit else "")

    def hover_text(self, row: int, col: int) -> str:
        """The hover text of one cell: :attr:`hover` if given, else its row, column (and top
        label), the quantity and the value."""
        if self.hover is not None:
            return self.hover[row][col]
        place = f"{self.row_title} {self.row_labels[row]} · {self.col_title} {self.col_labels[col]}"
        if self.top_labels is not None and self.top_labels[col]:
            place += f" → {self.top_labels[col]}"
        return f"{place}\n{self.quantity}: {self.format_value(float(self.values[row, col]))}"

    def hover_texts(self) -> tuple[tuple[str, ...], ...]:
        """:meth:`hover_text` of every cell ``[rows][columns]``."""
        return tuple(tuple(self.hover_text(r, c) for c in range(self.shape[1])) for r in range(self.shape[0]))

    def select_rows(self, rows: Sequence[int]) -> Grid:
        """A grid of only the given row indices, in that order; :class:`GridError` for an index
        outside ``0 … rows − 1``."""
        index = [int(r) for r in rows]
        bad = [r for r in index if not 0 <= r < self.shape[0]]
        if bad or not index:
            raise GridError(f"rows {bad or '[]'} cannot be selected: this grid has rows 0 … {self.shape[0] - 1}")

        def pick(cells: Sequence[Sequence[str]] | None) -> list[Sequence[str]] | None:
            return None if cells is None else [cells[r] for r in index]

        return replace(
            self, values=self.values[index], row_labels=[self.row_labels[r] for r in index],
            cell_text=pick(self.cell_text), hover=pick(self.hover),
        )

    def strided(self, step: int) -> Grid:
        """Rows ``0, step, 2·step, …`` and always the last row (for a trajectory, the output)."""
        if step < 1:
            raise GridError(f"the row stride must be at least 1, got {step}")
        last = self.shape[0] - 1
        return self.select_rows([r for r in range(self.shape[0]) if r % step == 0 or r == last])

    def difference(self, other: Grid, *, name: str | None = None) -> Grid:
        """``self − other`` cell by cell, on a diverging scale centred on 0.

        Both grids must have the same rows, columns and unit. The difference has no cell text;
        its hover shows the difference above both grids' hover text. ``name`` defaults to
        ``"<self.name> − <other.name>"``.
        """
        if self.shape != other.shape:
            raise GridError(f"cannot subtract a {other.shape[0]} × {other.shape[1]} grid from a "
                            f"{self.shape[0]} × {self.shape[1]} one: build both over the same rows and columns")
        for what in ("row_labels", "col_labels"):
            if getattr(self, what) != getattr(other, what):
                raise GridError(f"the two grids have different {what.replace('_', ' ')}: build both over the same rows and columns")
        if self.unit != other.unit:
            raise GridError(f"cannot subtract {other.unit or 'unitless'} values from {self.unit or 'unitless'} ones: compare like with like")
        label = name or f"{self.name or 'first'} − {other.name or 'second'}"
        values = self.values - other.values
        ours, theirs = self.hover_texts(), other.hover_texts()
        hover = [
            [f"{label}: {self.format_value(float(values[r, c]))}\n\n{ours[r][c]}\n\n{theirs[r][c]}"
             for c in range(self.shape[1])]
            for r in range(self.shape[0])
        ]
        logarithmic = self.scale in ("log", "diverging-log")
        return replace(
            self, values=values, cell_text=None, hover=hover, name=label,
            title=f"{label} · {self.source}" if self.source else label,
            quantity=f"Δ {self.quantity}", scale="diverging-log" if logarithmic else "diverging", value_range=None,
        )

    def tidy(self) -> dict[str, list]:
        """The grid as a tidy table, one row per cell, as columns (lists): ``grid`` (the name),
        ``row``, ``row_label``, ``col``, ``col_label``, then ``top_label`` and ``cell_text`` where
        the grid has them, then ``quantity``, ``unit`` and ``value`` (NaN for empty cells)."""
        rows, cols = self.shape
        row_index, col_index = (a.ravel().tolist() for a in np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"))
        table: dict[str, list] = {
            "grid": [self.name] * (rows * cols),
            "row": row_index,
            "row_label": [self.row_labels[r] for r in row_index],
            "col": col_index,
            "col_label": [self.col_labels[c] for c in col_index],
        }
        if self.top_labels is not None:
            table["top_label"] = [self.top_labels[c] for c in col_index]
        if self.cell_text is not None:
            table["cell_text"] = [self.cell_text[r][c] for r, c in zip(row_index, col_index)]
        table["quantity"] = [self.quantity] * (rows * cols)
        table["unit"] = [self.unit] * (rows * cols)
        table["value"] = self.values.ravel().tolist()
        return table


__all__ = ["SCALES", "Grid", "GridError", "ScaleKind"]
