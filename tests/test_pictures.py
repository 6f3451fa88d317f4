"""Pictures: cells carry the top-1 labels, colours the statistic, files are written whole."""

import html
import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from plotly.offline import get_plotlyjs
from tiny_models import tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.analysis.causal.fidelity import Fidelity
from depthlens.analysis.trajectory import Trajectory, TrajectoryError, encode
from depthlens.stats.grid import Grid
from depthlens.viz.causal_charts import fidelity_scatter, log_ticks
from depthlens.viz.pictures import (
    heatmap_figure,
    heatmap_matplotlib,
    save_figure,
    side_by_side,
    side_by_side_matplotlib,
)
from depthlens.viz.plotly_draw import bundle_name

TEXTS = ["Fair is foul, and foul is fair", "When shall we three meet again"]




@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    model = tiny_model("llama", initializer_range=0.4)
    tuned = TunedLens(model)
    with torch.no_grad():
        for translator in tuned.translators:
            translator.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    input_ids, mask = encode(tiny_tokenizer, TEXTS)
    states = capture(model, input_ids, mask)
    return tuple(
        Trajectory.from_states(lens, states, mask, tokenizer=tiny_tokenizer, k=3)
        for lens in (LogitLens(model), tuned)
    )


def _rows(figure: go.Figure, trace: int = 0) -> list[list[str]]:
    return [list(row) for row in figure.data[trace].text]


def test_plotly_cells_hover_and_axes(pair):
    logit, _ = pair
    figure = heatmap_figure(logit, "kl", batch=1, max_chars=6)
    length = int(logit.attention_mask[1].sum())
    assert _rows(figure) == [[html.escape(c, quote=False) for c in row] for row in logit.top1_labels(1, 6)]
    assert np.allclose(np.array(figure.data[0].z, dtype=float), logit.kl_to_final[:, 1, :length].numpy(), equal_nan=True)
    assert list(figure.layout.yaxis.ticktext) == ["0", "1", "2", "output"]
    assert list(figure.layout.xaxis.ticktext) == [html.escape(t, quote=False) for t in logit.input_labels(1, 6)]
    hover = figure.data[0].hovertext[2][1]
    second = logit.label(int(logit.top_ids[2, 1, 1, 1]))
    assert html.escape(f"2. {second!r}", quote=False) in hover and "→ next" in hover
    assert figure.layout.coloraxis.cmin == 0


def test_layer_stride_keeps_the_output_row(pair):
    figure = heatmap_figure(pair[0], layer_stride=2)
    assert list(figure.layout.yaxis.ticktext) == ["0", "2", "output"]
    assert _rows(figure) == [[html.escape(c, quote=False) for c in row] for row in pair[0].strided(2).top1_labels(0, 8)]


def test_rank_is_coloured_on_a_log_scale(pair):
    figure = heatmap_figure(pair[0], "rank")
    ranks = pair[0].final_top1_rank[:, 0, pair[0].attention_mask[0]].numpy()
    assert np.allclose(np.array(figure.data[0].z, dtype=float), np.log10(1 + ranks))
    assert list(figure.layout.coloraxis.colorbar.ticktext)[:3] == ["0", "1", "10"]


def test_side_by_side_shows_both_and_their_difference(pair):
    logit, tuned = pair
    figure = side_by_side(logit, tuned, "entropy")
    assert len(figure.data) == 3
    assert _rows(figure, 0) == [[html.escape(c, quote=False) for c in row] for row in logit.top1_labels(0, 8)]
    assert _rows(figure, 1) == [[html.escape(c, quote=False) for c in row] for row in tuned.top1_labels(0, 8)]
    difference = (logit.entropy - tuned.entropy)[:, 0, logit.attention_mask[0]].numpy()
    assert np.allclose(np.array(figure.data[2].z, dtype=float), difference)
    assert np.abs(difference[:-1]).max() > 0.01 and np.allclose(difference[-1], 0, atol=1e-5)
    assert figure.layout.coloraxis2.cmin == -figure.layout.coloraxis2.cmax
    assert [a.text for a in figure.layout.annotations] == ["logit lens", "tuned lens", "logit lens − tuned lens"]


def test_side_by_side_needs_the_same_text(pair, tiny_tokenizer):
    model = tiny_model("llama")
    other = Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), TEXTS[1])
    with pytest.raises(TrajectoryError, match="different texts"):
        side_by_side(pair[0], other)


def test_matplotlib_cells_are_the_top1_labels(pair):
    figure = heatmap_matplotlib(pair[0], "prob", batch=1, max_chars=5)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == [c for row in pair[0].top1_labels(1, 5) for c in row]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == pair[0].input_labels(1, 5)
    assert figure.axes[0].images[0].get_clim() == (0.0, 1.0)


def test_matplotlib_side_by_side_difference(pair):
    logit, tuned = pair
    figure = side_by_side_matplotlib(logit, tuned, "ce")
    panels = figure.axes[:3]
    assert [t.get_text() for t in panels[0].texts] == [c for row in logit.top1_labels(0, 8) for c in row]
    assert [t.get_text() for t in panels[1].texts] == [c for row in tuned.top1_labels(0, 8) for c in row]
    assert len(panels[2].texts) == 0
    difference = (logit.ce - tuned.ce)[:, 0, logit.attention_mask[0]].numpy()
    assert np.allclose(panels[2].images[0].get_array().filled(np.nan), difference, equal_nan=True)


def test_save_figure_picks_the_format_by_suffix(pair, tmp_path):
    paths = {suffix: save_figure(pair, tmp_path / "new" / f"pair{suffix}", stat="kl") for suffix in (".html", ".png", ".pdf", ".svg", ".csv")}
    assert paths[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[".pdf"].read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in paths[".svg"].read_bytes()[:500]
    assert "plotly" in paths[".html"].read_text()
    table = pd.read_csv(paths[".csv"], keep_default_na=False, na_values=[""])
    assert set(table.lens) == {"logit lens", "tuned lens"}
    assert len(table) == sum(len(t.to_dataframe()) for t in pair)
    written = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert written == sorted([*(p.name for p in paths.values()), bundle_name()])


@pytest.mark.parametrize(
    ("item", "name", "message"),
    [
        ("trajectory", "picture.jpg", "must end in one of"),
        ("plotly", "picture.png", "static images are drawn with matplotlib"),
        ("plotly", "table.csv", "a table needs trajectories"),
        ("matplotlib", "picture.html", "HTML is written from plotly"),
        ("three", "picture.png", "not 3"),
    ],
)
def test_save_figure_refuses_what_it_cannot_write(pair, tmp_path, item, name, message):
    items = {
        "trajectory": pair[0],
        "plotly": heatmap_figure(pair[0]),
        "matplotlib": heatmap_matplotlib(pair[0]),
        "three": [pair[0]] * 3,
    }
    with pytest.raises(TrajectoryError, match=message):
        save_figure(items[item], tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_awkward_labels_are_escaped_not_interpreted(pair, tmp_path):
    label = r"<i>$\zz$"
    odd = Trajectory(**{**pair[0].__dict__, "labels": dict.fromkeys(pair[0].labels, label)})
    assert heatmap_figure(odd).data[0].text[0][0] == "&lt;i&gt;$\\zz$"
    quoted = Trajectory(**{**pair[0].__dict__, "labels": dict.fromkeys(pair[0].labels, 'say "hi"')})
    assert heatmap_figure(quoted).data[0].text[0][0] == 'say "hi"'  # plotly.js would show &quot; literally
    assert heatmap_matplotlib(odd).axes[0].texts[0].get_text() == label
    assert save_figure(odd, tmp_path / "odd.png").stat().st_size > 0


def test_nan_cells_do_not_break_the_colours(pair):
    figure = heatmap_figure(pair[0], "ce")
    last = [row[-1] for row in figure.data[0].z]
    assert all(math.isnan(v) for v in last)
    assert math.isfinite(figure.layout.coloraxis.cmax) and figure.layout.coloraxis.cmax > 0


def _script_sources(page: str) -> list[str]:
    return re.findall(r'<script[^>]*src="([^"]+)"', page)


def test_html_pages_of_a_folder_share_one_plotlyjs(pair, tmp_path):
    """By default the pages of a folder load one plotly.js copy written once beside them: each page
    stays small and still opens offline; "inline" embeds it, "cdn" loads it from the web."""
    bundle = get_plotlyjs().encode()
    first = save_figure(pair[0], tmp_path / "a.html")
    shared = tmp_path / bundle_name()
    inode = shared.stat().st_ino
    second = save_figure(list(pair), tmp_path / "b.html", stat="kl")
    assert shared.read_bytes() == bundle and shared.stat().st_ino == inode  # written once, not per page
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".js"] == [bundle_name()]
    for page in (first, second):
        assert _script_sources(page.read_text()) == [bundle_name()]
        assert page.stat().st_size < len(bundle) / 20
    shared.write_bytes(bundle[:1000])  # a damaged copy is replaced
    save_figure(pair[0], tmp_path / "c.html")
    assert shared.read_bytes() == bundle
    inline = save_figure(pair[0], tmp_path / "inline" / "page.html", plotlyjs="inline")
    cdn = save_figure(pair[0], tmp_path / "cdn" / "page.html", plotlyjs="cdn")
    assert bundle.decode()[:2000] in inline.read_text() and _script_sources(inline.read_text()) == []
    assert next(s for s in _script_sources(cdn.read_text()) if "plotly" in s).startswith("https://cdn.plot.ly/")
    assert [p.name for p in (tmp_path / "inline").iterdir()] == ["page.html"]
    assert [p.name for p in (tmp_path / "cdn").iterdir()] == ["page.html"]


def test_a_long_title_over_a_narrow_grid_is_wrapped_not_cut(tmp_path):
    title = "attribute lens faithfulness (top-1 agreement with the model, held-out subjects)"
    grid = Grid(np.array([[0.2], [0.9]]), ["0", "1"], ["country-capital β=1"], title=title, quantity="faithfulness")
    figure = heatmap_matplotlib(grid)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    box = figure.axes[0].title.get_window_extent(canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= figure.bbox.width
    assert " ".join(figure.axes[0].title.get_text().split()) == title


def _fidelity(layer: int, readout: list[float], model: list[float]) -> Fidelity:
    return Fidelity(layer, torch.tensor(readout), torch.tensor(model), 0.9, 0.5, 1.0)


def _labelled_ticks(axis, limits) -> list[str]:
    """The texts of ``axis``'s labelled major ticks inside ``limits``."""
    pairs = zip(axis.get_majorticklocs(), axis.get_majorticklabels())
    return [label.get_text() for loc, label in pairs if limits[0] <= loc <= limits[1] and label.get_text()]


def test_fidelity_axes_carry_numbers_however_narrow_the_data():
    """Readout KLs within one decade (no power of ten on the axis) still get labelled ticks."""
    fidelities = [_fidelity(0, [0.21, 0.25, 0.33, 0.4], [1e-4, 3e-3, 0.2, 5.0]), _fidelity(6, [2.0, 2.0], [1.5, 1.6])]
    figure = fidelity_scatter(fidelities, "causal fidelity · logit lens", "matplotlib")
    FigureCanvasAgg(figure).draw()
    first, second = figure.axes[:2]
    assert _labelled_ticks(first.xaxis, first.get_xlim()) == ["0.21", "0.29", "0.4"]
    assert len(_labelled_ticks(first.yaxis, first.get_ylim())) >= 2  # five decades: matplotlib's own ticks
    assert _labelled_ticks(second.xaxis, second.get_xlim()) == ["2"]
    assert len(_labelled_ticks(second.yaxis, second.get_ylim())) >= 2
    renderer = figure.canvas.get_renderer()
    assert all(0 <= panel.title.get_window_extent(renderer).x0 and panel.title.get_window_extent(renderer).x1
               <= figure.bbox.width for panel in (first, second))
    assert first.get_title() == "layer 0: ρ = 0.90\npositions [0.50, 1.00] · directions [1.00, 1.00]"  # one order
    interactive = fidelity_scatter(fidelities, "causal fidelity · logit lens")
    assert [np.allclose(trace.x, f.readout_kl) for trace, f in zip(interactive.data, fidelities)] == [True, True]
    second_title = interactive.layout.annotations[1].text
    assert second_title.endswith("<br>positions [0.50, 1.00] · directions [nan, nan]")  # readout KLs tied
    assert log_ticks([0.21, 0.4]) == [0.21, 0.29, 0.4] and log_ticks([1e-4, 5.0]) is None
