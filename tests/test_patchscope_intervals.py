"""Bootstrap intervals on the token-identity Patchscope curve: per layer, resampling whole source
texts (positions of one text share its context), checked against known answers, a loop over the
same draws, the large-sample normal interval, a case where one text dominates, and the tiny model
patched position by position."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from tiny_models import tiny_model

from depthlens import capture, find_parts
from depthlens.analysis.patchscope import IDENTITY_PROMPT, MIN_TEXTS, text_intervals, token_identity_curve
from depthlens.model.hooks import hooked, replace
from depthlens.stats.bootstrap import bootstrap_samples, interval, ratio, resample_counts, weighted_means
from depthlens.viz.readout_charts import curves


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _hits(per_text: list[list[list[int]]]) -> tuple[torch.Tensor, list[int]]:
    """``hits [layers, positions]`` and ``lengths`` from 0/1 hits given per text, ``[layers][positions]``."""
    return torch.tensor(np.concatenate([np.array(t, dtype=float) for t in per_text], axis=1)), [len(t[0]) for t in per_text]


def _brute_force(hits: np.ndarray, lengths: list[int], resamples: int, seed: int = 0) -> np.ndarray:
    """Percentiles of Σ (count · hits of the text) / Σ (count · positions of the text) over the same
    draws of texts, text by text: ``[2, layers]``."""
    starts = np.cumsum([0, *lengths])
    per_text = np.array([hits[:, a:b].sum(1) for a, b in itertools.pairwise(starts)])  # [texts, layers]
    rates = []
    for counts in resample_counts(len(lengths), resamples, seed).numpy():
        rates.append(sum(c * h for c, h in zip(counts, per_text, strict=True)) / float(np.dot(counts, lengths)))
    return np.quantile(np.array(rates), [0.025, 0.975], axis=0)


# --- the generic statistic ----------------------------------------------------------------------


def test_weighted_means_divide_each_row_by_its_own_total():
    """Two resamples of two layers: a square case, where dividing along the wrong axis (as plain
    ``ratio`` broadcasts) gives other numbers without an error."""
    sums, totals = torch.tensor([[2.0, 4.0], [3.0, 6.0]]), torch.tensor([2.0, 3.0])
    assert weighted_means(sums, totals).tolist() == [[1.0, 2.0], [1.0, 2.0]]
    assert ratio(sums, totals).tolist() != [[1.0, 2.0], [1.0, 2.0]]
    assert weighted_means(torch.tensor([3.0, 8.0]), torch.tensor([2.0, 4.0])).tolist() == [1.5, 2.0]


# --- intervals over texts -----------------------------------------------------------------------


def test_known_answers_every_hit_no_hit_and_one_text():
    hits, lengths = _hits([[[1, 1, 1], [0, 0, 0]], [[1, 1], [0, 0]], [[1], [0]]])
    low, high = text_intervals(hits, lengths)
    assert (low, high) == ([1.0, 0.0], [1.0, 0.0])
    one, length = _hits([[[1, 0, 1, 0]]])
    assert MIN_TEXTS == 2 and text_intervals(one, length) is None  # one text: no spread to resample


def test_texts_without_positions_are_left_out():
    hits, lengths = _hits([[[1, 0, 1]], [[0, 0]], [[1, 1, 1, 0]]])
    with_empty = text_intervals(hits, [0, *lengths[:2], 0, lengths[2]])
    assert with_empty == text_intervals(hits, lengths)
    assert text_intervals(hits[:, :3], [3, 0]) is None  # one text with positions left


def test_intervals_are_percentiles_over_the_same_draws_of_texts():
    rng = np.random.default_rng(4)
    lengths = [int(n) for n in rng.integers(1, 9, 7)]
    hits = (rng.random((3, sum(lengths))) < 0.4).astype(float)
    low, high = text_intervals(torch.tensor(hits), lengths, resamples=400, seed=5)
    expected = _brute_force(hits, lengths, 400, seed=5)
    np.testing.assert_allclose([low, high], expected, rtol=0, atol=1e-12)


def test_one_dominant_text_makes_a_wide_interval_that_resampling_positions_would_hide():
    """Text A: 40 positions, every one a hit; four texts of 2 positions, none. A resample of 5 texts
    holds no A with probability (4/5)^5 ≈ 0.33, so the lower bound is exactly 0 and the interval is
    nearly [0, 1]; resampling the 48 positions alone would give about ±0.1 around 40/48."""
    hits, lengths = _hits([[[1] * 40], *[[[0, 0]]] * 4])
    low, high = text_intervals(hits, lengths)
    assert low == [0.0]
    assert high == pytest.approx(_brute_force(hits.numpy(), lengths, 1000)[1], abs=1e-12)
    assert high[0] > 0.95
    positions = interval(bootstrap_samples(hits[0], resamples=1000))
    assert positions[1] - positions[0] < 0.3


def test_many_texts_match_the_normal_interval_of_a_ratio():
    """300 texts of 1 … 20 positions with a per-text hit rate: the percentile interval matches
    r ± 1.96 · se, se² = Σ (hits_t − r · n_t)² / (Σ n_t)² (the delta method's variance of a ratio of
    resampled sums). Tolerance: 0.3 se per bound, over 3 Monte Carlo standard deviations of a 2.5%
    quantile from 1000 resamples (√(0.025 · 0.975 / 1000) / φ(1.96) ≈ 0.085 se)."""
    rng = np.random.default_rng(8)
    lengths = [int(n) for n in rng.integers(1, 21, 300)]
    rates = rng.beta(2, 3, 300)
    hits = np.concatenate([rng.random(n) < p for n, p in zip(lengths, rates, strict=True)]).astype(float)[None]
    low, high = text_intervals(torch.tensor(hits), lengths)
    n = np.array(lengths)
    per_text = np.array([h.sum() for h in np.split(hits[0], np.cumsum(n)[:-1])])
    r = per_text.sum() / n.sum()
    se = np.sqrt(((per_text - r * n) ** 2).sum()) / n.sum()
    assert low[0] == pytest.approx(r - 1.96 * se, abs=0.3 * se)
    assert high[0] == pytest.approx(r + 1.96 * se, abs=0.3 * se)


# --- through the model --------------------------------------------------------------------------


def test_the_curve_resamples_the_texts_it_patched(llama, tiny_tokenizer):
    """Three texts of different lengths, patched one position at a time by hand: the curve's
    intervals are the brute-force percentiles of the hits grouped by text, and its rows say so."""
    texts = ["When shall we three meet again", "Fair is foul, and foul is fair", "Hover through"]
    layers = [0, 2]
    target = tiny_tokenizer(IDENTITY_PROMPT + " ->", return_tensors="pt").input_ids
    slot = tiny_tokenizer(IDENTITY_PROMPT, return_tensors="pt").input_ids.shape[1] - 1
    parts = find_parts(llama)
    identity, next_token, lengths = [[] for _ in layers], [[] for _ in layers], []
    for text in texts:
        ids = tiny_tokenizer(text, return_tensors="pt").input_ids
        lengths.append(ids.shape[1] - 1)
        clean = capture(llama, ids, layers=layers)
        for index, layer in enumerate(layers):
            for position in range(1, ids.shape[1]):
                state = clean[layer][:, position][:, None]
                with torch.no_grad(), hooked(parts, edits=[replace(f"resid.{layer}", state, positions=[slot])]):
                    logits = llama(input_ids=target, use_cache=False).logits[0]
                identity[index].append(float(int(logits[-1].argmax()) == int(ids[0, position])))
                next_token[index].append(float(int(logits[slot].argmax()) == int(clean.logits[0, position].argmax())))
    assert len(set(lengths)) == 3
    curve = token_identity_curve(llama, tiny_tokenizer, texts, layers=layers)
    assert (curve.texts, curve.positions) == (3, sum(lengths))
    for bounds, hits in ((curve.identity_interval, identity), (curve.next_token_interval, next_token)):
        np.testing.assert_allclose(bounds, _brute_force(np.array(hits), lengths, 1000), rtol=0, atol=1e-12)
    row = curve.to_rows()[1]
    assert row["precision_at_1_identity_low"] == curve.identity_interval[0][1]
    assert row["precision_at_1_next_token_high"] == curve.next_token_interval[1][1]
    assert (row["texts"], row["bootstrap_unit"], row["interval_level"]) == (3, "text", 0.95)
    single = token_identity_curve(llama, tiny_tokenizer, texts[:1], layers=layers)
    assert single.identity_interval is None and single.to_rows()[0]["precision_at_1_identity_low"] is None


# --- the band in the picture --------------------------------------------------------------------


def test_curves_draw_a_band_only_around_the_series_given_one():
    series = {"identity": [0.2, 0.5, 0.9], "next token": [0.1, 0.3, 0.4]}
    bands = {"identity": ([0.1, 0.4, 0.8], [0.3, 0.7, 1.0])}
    figure = curves([0, 2, 4], series, backend="matplotlib", bands=bands)
    drawn = [c for c in figure.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(drawn) == 1
    vertices = drawn[0].get_paths()[0].vertices
    for x, low, high in zip([0, 2, 4], *bands["identity"], strict=True):
        at = vertices[np.isclose(vertices[:, 0], x), 1]
        assert (min(at), max(at)) == (pytest.approx(low), pytest.approx(high))
    line = figure.axes[0].lines[0]
    assert drawn[0].get_facecolor()[0][:3] == pytest.approx(to_rgb(line.get_color()))
    plotly = curves([0, 2, 4], series, bands=bands)
    assert [trace.fill for trace in plotly.data] == ["toself", None, None]
    assert list(plotly.data[0].y) == [0.1, 0.4, 0.8, 1.0, 0.7, 0.3] and list(plotly.data[0].x) == [0, 2, 4, 4, 2, 0]
    assert plotly.data[0].fillcolor == plotly.data[1].line.color
    assert len(curves([0, 2, 4], series).data) == 2  # no bands: the lines alone, as before
