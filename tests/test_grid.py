"""Grids: any labelled matrix is drawn like a trajectory, checked on construction, subtracted,
coloured on log scales with readable ticks, and written as a tidy table."""

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from tiny_models import tiny_model

from depthlens import LogitLens, capture
from depthlens.analysis.trajectory import Trajectory, encode
from depthlens.analysis.trajectory_grid import trajectory_grid, trajectory_grids
from depthlens.errors import DepthlensError, GridError, TrajectoryError
from depthlens.stats.grid import Grid
from depthlens.viz import panels, plotly_draw
from depthlens.viz.pictures import (
    heatmap_figure,
    heatmap_matplotlib,
    save_figure,
    side_by_side,
    side_by_side_matplotlib,
)

SIZE = 5


def similarity(size: int = SIZE, shift: float = 0.0, **fields) -> Grid:
    """A layer × layer matrix built by hand, as a later analysis would (cosine similarity of
    residual states, say): symmetric, 1 + ``shift`` on the diagonal, one empty cell."""
    values = np.cos(np.subtract.outer(np.arange(size), np.arange(size)) / 2.0) + shift
    values[0, -1] = np.nan
    labels = [f"<{i}>" for i in range(size)]
    defaults = {
        "row_labels": labels, "col_labels": labels, "cell_text": [[f"{v:.1f}" for v in row] for row in values],
        "title": "state similarity · tiny", "name": "similarity", "quantity": "cosine",
        "scale": "diverging", "value_range": (-1.0, 1.0), "row_title": "layer", "col_title": "layer",
    }
    return Grid(values, **{**defaults, **fields})


def test_a_grid_built_by_hand_is_drawn_to_html_and_png(tmp_path):
    grid = similarity()
    figure = heatmap_figure(grid)
    assert np.allclose(np.array(figure.data[0].z, dtype=float), grid.values, equal_nan=True)
    assert list(figure.layout.xaxis.ticktext) == [html.escape(f"<{i}>", quote=False) for i in range(SIZE)]
    assert list(figure.layout.yaxis.ticktext) == list(figure.layout.xaxis.ticktext)
    assert figure.data[0].text[2][3] == grid.cell_text[2][3]
    assert figure.data[0].hovertext[1][2] == "layer &lt;1&gt; · layer &lt;2&gt;<br>cosine: 0.8776"
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (-1, 1)
    assert figure.layout.coloraxis.colorscale == go.Figure(layout={"coloraxis": {"colorscale": "RdBu"}}).layout.coloraxis.colorscale
    assert figure.layout.title.text == "state similarity · tiny"
    image = heatmap_matplotlib(grid)
    assert [t.get_text() for t in image.axes[0].texts] == [c for row in grid.cell_text for c in row]
    assert [t.get_text() for t in image.axes[0].get_xticklabels()] == list(grid.col_labels)
    assert image.axes[0].images[0].get_clim() == (-1.0, 1.0)
    page = save_figure(grid, tmp_path / "grid.html").read_text()
    assert "&lt;4&gt;" in page and "max(100%," in page and '"responsive": true' in page
    assert save_figure(grid, tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pair_png = save_figure([grid, similarity(name="other")], tmp_path / "pair.png")
    assert pair_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"row_labels": ["a", "b"]}, "row_labels has 2 labels but the values have 5"),
        ({"col_labels": ["a"] * 6}, "col_labels has 6 labels but the values have 5"),
        ({"top_labels": ["a"] * 4}, "top_labels has 4 labels but the values have 5"),
        ({"cell_text": [["x"] * 5] * 4}, "cell_text has 4 rows of 5 cells but the values are 5 × 5"),
        ({"hover": [["x"] * 5] * 4 + [["x"] * 3]}, "hover has 5 rows of 3/5 cells"),
        ({"row_labels": "abcde"}, "must be a sequence of strings"),
        ({"scale": "rainbow"}, "unknown colour scale 'rainbow'"),
        ({"value_range": (1.0, 1.0)}, "low < high"),
        ({"values": np.zeros(5)}, "non-empty 2-D array"),
        ({"values": np.zeros((0, 5))}, "non-empty 2-D array"),
        ({"values": [["a"] * 5] * 5}, "must be numbers"),
    ],
)
def test_parts_that_do_not_fit_are_refused_in_one_line(fields, message):
    with pytest.raises(GridError, match=message) as caught:
        Grid(fields["values"], [], []) if "values" in fields else similarity(**fields)
    assert isinstance(caught.value, DepthlensError) and isinstance(caught.value, TrajectoryError)
    assert "\n" not in str(caught.value)


def test_a_grid_is_frozen_and_its_labels_are_tuples():
    grid = similarity()
    assert grid.shape == (SIZE, SIZE) and grid.row_labels == tuple(f"<{i}>" for i in range(SIZE))
    with pytest.raises(ValueError):
        grid.values[0, 0] = 2.0


def test_difference_is_a_minus_b_with_both_hovers():
    a = similarity(unit="nats")
    b = Grid(np.full((SIZE, SIZE), 0.25), a.row_labels, a.col_labels, name="flat", unit="nats", quantity="cosine")
    difference = a.difference(b)
    assert np.allclose(difference.values, a.values - 0.25, equal_nan=True)
    assert difference.scale == "diverging" and difference.value_range is None and difference.cell_text is None
    assert difference.name == "similarity − flat" and difference.quantity == "Δ cosine"
    hover = difference.hover_text(1, 1)
    assert hover.startswith("similarity − flat: 0.75 nats\n\n") and hover.endswith("cosine: 0.25 nats")
    assert difference.hover_text(0, SIZE - 1).startswith("similarity − flat: empty")
    ranks = Grid([[1.0, 300.0]], ["0"], ["a", "b"], scale="log")
    assert ranks.difference(ranks).scale == "diverging-log"
    with pytest.raises(GridError, match="different col labels"):
        a.difference(Grid(np.ones((SIZE, SIZE)), a.row_labels, list("vwxyz"), unit="nats"))
    with pytest.raises(GridError, match="cannot subtract a 4 × 5 grid from a 5 × 5 one"):
        a.difference(a.select_rows(range(4)))
    with pytest.raises(GridError, match="cannot subtract unitless values from nats ones"):
        a.difference(similarity())


def test_side_by_side_of_two_grids_and_their_difference():
    a, b = similarity(), similarity(shift=-0.5, name="shifted")
    figure = side_by_side(a, b)
    assert [t.text for t in figure.layout.annotations] == ["similarity", "shifted", "similarity − shifted"]
    assert np.allclose(np.array(figure.data[2].z, dtype=float), a.values - b.values, equal_nan=True)
    assert figure.data[2].text is None
    assert figure.layout.coloraxis2.cmin == -figure.layout.coloraxis2.cmax == pytest.approx(-0.5)
    assert (figure.layout.coloraxis.cmin, figure.layout.coloraxis.cmax) == (-1, 1)
    domains = [figure.layout[f"xaxis{s}"].domain for s in ("", "2", "3")]
    assert domains[0][0] == 0 and domains[-1][1] == pytest.approx(1)
    assert figure.layout.coloraxis.colorbar.x == pytest.approx(domains[1][1] + 0.005)
    static = side_by_side_matplotlib(a, b, title="two grids")
    assert static.get_suptitle() == "two grids" and [ax.get_title() for ax in static.axes[:3]] == ["similarity", "shifted", "similarity − shifted"]


def test_log_scale_ticks_read_as_counts():
    ticks, labels = panels.log_ticks(math.log10(1 + 3000), centred=False)
    assert labels == ("0", "1", "10", "100", "1k")
    assert ticks == pytest.approx([0, math.log10(2), math.log10(11), math.log10(101), math.log10(1001)])
    _, mirrored = panels.log_ticks(math.log10(1 + 300), centred=True)
    assert mirrored == ("−100", "−10", "0", "10", "100")
    counts = Grid([[0.0, 9.0, 300.0], [2.0, np.nan, 40.0]], ["0", "output"], ["a", "b", "c"], scale="log", quantity="rank")
    figure = heatmap_figure(counts)
    assert np.allclose(np.array(figure.data[0].z, dtype=float), np.log10(1 + counts.values), equal_nan=True)
    assert list(figure.layout.coloraxis.colorbar.ticktext) == ["0", "1", "10", "100"]
    assert figure.layout.coloraxis.cmax == pytest.approx(math.log10(301))
    assert figure.layout.coloraxis.colorbar.title.text == "rank (log scale)"
    bar = heatmap_matplotlib(counts).axes[-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["0", "1", "10", "100"]


def test_a_grid_is_written_as_a_tidy_table(tmp_path):
    grid = similarity(top_labels=list("abcde"), unit="nats")
    table = pd.read_csv(save_figure(grid, tmp_path / "grid.csv"), keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["grid", "row", "row_label", "col", "col_label", "top_label", "cell_text", "quantity", "unit", "value"]
    assert len(table) == SIZE * SIZE and table.value.isna().sum() == 1
    assert table.set_index(["row", "col"]).value.loc[(1, 2)] == pytest.approx(grid.values[1, 2])
    assert (table.row_label == "<1>").sum() == SIZE


def test_rows_are_selected_and_strided():
    grid = similarity(size=7)
    assert grid.strided(3).row_labels == ("<0>", "<3>", "<6>")
    assert grid.strided(4).row_labels == ("<0>", "<4>", "<6>")
    picked = grid.select_rows([6, 1])
    assert picked.cell_text == (grid.cell_text[6], grid.cell_text[1]) and np.array_equal(picked.values, grid.values[[6, 1]], equal_nan=True)
    assert heatmap_figure(grid, layer_stride=3).layout.yaxis.ticktext == ("&lt;0&gt;", "&lt;3&gt;", "&lt;6&gt;")
    with pytest.raises(GridError, match=r"rows \[7\] cannot be selected"):
        grid.select_rows([7])
    with pytest.raises(GridError, match="at least 1"):
        grid.strided(0)


def test_the_plotly_figure_fills_its_container():
    wide = heatmap_figure(similarity(size=20))
    assert wide.layout.width is None and wide.layout.autosize is True
    assert plotly_draw.min_width(wide) > plotly_draw.min_width(heatmap_figure(similarity()))
    assert plotly_draw.min_width(wide) <= 1000


@pytest.fixture(scope="module")
def trajectory(tiny_tokenizer) -> Trajectory:
    model = tiny_model("llama", initializer_range=0.4)
    input_ids, mask = encode(tiny_tokenizer, ["Fair is foul, and foul is fair", "When shall we"])
    return Trajectory.from_states(LogitLens(model), capture(model, input_ids, mask), mask, tokenizer=tiny_tokenizer, k=3)


def test_a_trajectory_gives_the_grid_of_one_statistic(trajectory):
    grid = trajectory_grid(trajectory, "kl", batch=1, max_chars=5)
    length = int(trajectory.attention_mask[1].sum())
    assert grid.shape == (len(trajectory.layers), length)
    assert np.allclose(grid.values, trajectory.kl_to_final[:, 1, :length].numpy(), equal_nan=True)
    assert grid.row_labels[-1] == "output" and list(grid.col_labels) == trajectory.input_labels(1, 5)
    assert list(grid.top_labels) == [*trajectory.input_labels(1, 5)[1:], ""]
    assert [list(row) for row in grid.cell_text] == trajectory.top1_labels(1, 5)
    assert (grid.unit, grid.scale, grid.name, grid.row_title) == ("nats", "sequential", "logit lens", "layer")
    assert "1. " in grid.hover[0][0] and "→ next" in grid.hover[0][0]
    assert trajectory_grid(trajectory, "rank").scale == "log"
    assert trajectory_grid(trajectory, "prob").value_range == (0.0, 1.0)
    assert trajectory_grid(trajectory, layer_stride=2).row_labels == ("0", "2", "output")
    with pytest.raises(TrajectoryError, match="batch item 2 does not exist"):
        trajectory_grid(trajectory, batch=2)
    shorter = trajectory.select_rows([0, len(trajectory.layers) - 1])
    with pytest.raises(TrajectoryError, match="different layers"):
        trajectory_grids(trajectory, shorter)
    assert side_by_side(trajectory_grid(trajectory), trajectory).layout.annotations[-1].text == "logit lens − logit lens"


def test_a_wide_pair_is_stacked_in_both_libraries():
    a, b = similarity(size=11), similarity(size=11, shift=0.5, name="shifted")
    figure = side_by_side(a, b)
    axes = [figure.layout[f"{letter}axis{s}"] for s in ("", "2", "3") for letter in "xy"]
    x_domains, y_domains = [tuple(ax.domain) for ax in axes[0::2]], [tuple(ax.domain) for ax in axes[1::2]]
    assert set(x_domains) == {(0, 1)}
    assert y_domains[0][1] == 1 and y_domains[0][0] > y_domains[1][1] > y_domains[1][0] > y_domains[2][1]
    assert all(ax.showticklabels for ax in axes[1::2])
    assert [t.text for t in figure.layout.annotations] == ["similarity", "shifted", "similarity − shifted"]
    assert figure.layout.coloraxis.colorbar.lenmode == "pixels"
    assert plotly_draw.min_width(figure) == plotly_draw.min_width(heatmap_figure(a))
    assert side_by_side(a, b, stacked=False).layout.yaxis2.domain == (0, 1)
    static = side_by_side_matplotlib(a, b).axes[:3]
    tops = [ax.get_position().y1 for ax in static]
    assert tops[0] > tops[1] > tops[2] and len({round(ax.get_position().x0, 3) for ax in static}) == 1
    assert [t.get_text() for t in static[1].get_yticklabels()] == list(b.row_labels)
