"""Bootstrap intervals on the overthinking curves (calibrated accuracy per layer with correct and
with permuted demonstrations, and their gap), and the generic helpers they rest on in
:mod:`depthlens.stats.bootstrap`: every interval against an answer worked out independently
(a known value, or a loop over the same draws with calibrated accuracy written out by hand)."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection

from depthlens.analysis.applications.features import ChoiceScores
from depthlens.analysis.applications.overthinking import INTERVALS, OverthinkingResult, curves_from_scores
from depthlens.analysis.applications.tasks import Example, make_task
from depthlens.stats.bootstrap import (
    bootstrap_samples,
    bootstrap_statistic,
    interval,
    intervals,
    resample_counts,
    resample_indices,
)
from depthlens.viz.applications import overthinking_figure

overthinking_module = importlib.import_module("depthlens.analysis.applications.overthinking")

# --- the generic helpers ------------------------------------------------------------------------


def test_resample_indices_are_the_draws_that_resample_counts_counts():
    indices = resample_indices(7, 50, 3)
    assert indices.shape == (50, 7) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) <= 6
    counted = np.array([np.bincount(row, minlength=7) for row in indices.numpy()], dtype=float)
    np.testing.assert_array_equal(counted, resample_counts(7, 50, 3).numpy())
    assert not torch.equal(resample_indices(7, 50, 4), indices)  # another seed, other draws


def test_bootstrap_statistic_recomputes_the_statistic_on_every_drawn_row():
    """A mean over the drawn rows equals the count-weighted mean of :func:`bootstrap_samples` (the
    same draws); two quantities of one statistic come from the same row."""
    values = torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    samples = bootstrap_statistic(lambda rows: torch.stack([values[rows].mean(), values[rows].max()]), 5,
                                  resamples=40, seed=2)
    assert samples.shape == (40, 2) and samples.dtype == torch.float64
    torch.testing.assert_close(samples[:, 0], bootstrap_samples(values, resamples=40, seed=2))
    expected_max = [float(values[row].max()) for row in resample_indices(5, 40, 2)]
    assert samples[:, 1].tolist() == expected_max


def test_intervals_are_the_interval_of_every_column():
    samples = torch.tensor(np.random.default_rng(0).normal(size=(101, 3)))
    low, high = intervals(samples)
    for column in range(3):
        assert (float(low[column]), float(high[column])) == interval(samples[:, column])
    np.testing.assert_allclose(np.stack([low.numpy(), high.numpy()]),
                               np.quantile(samples.numpy(), [0.025, 0.975], axis=0), rtol=0, atol=1e-12)


# --- calibrated accuracy by hand ----------------------------------------------------------------


def _by_hand(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Calibrated accuracy per layer, input by input: label g counts as predicted for input i when
    its probability is above g's (n − 1)/n quantile across inputs; inputs tied at the quantile
    share the places left."""
    inputs, layers, n = probs.shape
    out = np.zeros(layers)
    for layer in range(layers):
        credit = 0.0
        for i, g in enumerate(gold):
            column = probs[:, layer, g]
            threshold = np.quantile(column, (n - 1) / n)
            above, tied = (column > threshold).sum(), (column == threshold).sum()
            if column[i] > threshold:
                credit += 1.0
            elif column[i] == threshold:
                credit += min(max(inputs / n - above, 0) / tied, 1.0)
        out[layer] = credit / inputs
    return out


def _scores(probs: np.ndarray, gold: np.ndarray) -> ChoiceScores:
    n, layers = probs.shape[:2]
    hidden = np.zeros((n, layers, 2), np.float32)
    return ChoiceScores({"logit": np.log(probs)}, np.asarray(gold, np.int64), hidden, [f"x{i}" for i in range(n)],
                        hidden)


def _random_probs(rng: np.random.Generator, examples: int, layers: int) -> np.ndarray:
    """Two-choice probabilities with no ties: ``[examples, layers, 2]``."""
    first = rng.uniform(0.05, 0.95, size=(examples, layers))
    return np.stack([first, 1 - first], -1)


def _percentiles(samples: list[np.ndarray]) -> np.ndarray:
    return np.quantile(np.array(samples), [0.025, 0.975], axis=0)  # [2, layers]


# --- the intervals ------------------------------------------------------------------------------


def test_a_readout_that_cannot_tell_inputs_apart_scores_chance_on_every_resample():
    """Every input gets the same probabilities: each resample scores exactly 1/n (the tied inputs
    share the places), so the intervals are [1/3, 1/3] and the gap's [0, 0]."""
    probs = np.full((9, 4, 3), 1 / 3)
    gold = np.arange(9) % 3
    curves = curves_from_scores(_scores(probs, gold), _scores(probs, gold), resamples=200)["logit"]
    for bound in (curves.correct_low, curves.correct_high, curves.permuted_low, curves.permuted_high):
        assert bound == pytest.approx([1 / 3] * 4, abs=1e-12)
    assert curves.gap_low == pytest.approx([0.0] * 4, abs=1e-12) and curves.gap_high == pytest.approx([0.0] * 4, abs=1e-12)


def test_intervals_are_percentiles_of_the_resampled_calibrated_accuracy_by_brute_force():
    """The same draws (``resample_counts``, seed 0), each resample scored by the hand-written
    calibrated accuracy, thresholds recomputed on the resample; percentiles by numpy."""
    rng = np.random.default_rng(5)
    gold = rng.integers(0, 2, 12)
    good, bad = _random_probs(rng, 12, 2), _random_probs(rng, 12, 2)
    resamples = 150
    curves = curves_from_scores(_scores(good, gold), _scores(bad, gold), resamples=resamples)["logit"]
    correct, permuted, gap = [], [], []
    for counts in resample_counts(12, resamples, 0).numpy().astype(int):
        rows = np.repeat(np.arange(12), counts)
        correct.append(_by_hand(good[rows], gold[rows]))
        permuted.append(_by_hand(bad[rows], gold[rows]))
        gap.append(correct[-1] - permuted[-1])
    for name, samples in (("correct", correct), ("permuted", permuted), ("gap", gap)):
        low, high = _percentiles(samples)
        assert getattr(curves, f"{name}_low") == pytest.approx(low, abs=1e-12), name
        assert getattr(curves, f"{name}_high") == pytest.approx(high, abs=1e-12), name
    assert curves.correct == pytest.approx(_by_hand(good, gold), abs=1e-12)


def _unpaired_gap_width(good: np.ndarray, bad: np.ndarray, gold: np.ndarray, resamples: int) -> np.ndarray:
    """The gap's interval width if the two prompt sets were resampled independently (seeds 0, 1)."""
    n = len(gold)
    gaps = []
    for a, b in zip(resample_indices(n, resamples, 0).numpy(), resample_indices(n, resamples, 1).numpy(), strict=True):
        gaps.append(_by_hand(good[a], gold[a]) - _by_hand(bad[b], gold[b]))
    low, high = _percentiles(gaps)
    return high - low


def test_the_gap_interval_is_paired():
    """Identical prompt sets: every paired resample has gap exactly 0, so [0, 0], where independent
    resamples of the two sets give a wide interval. Sets that differ in one of 40 examples: the
    paired interval matches the paired brute force and is under half as wide as the unpaired one
    (0.15 against 0.46 here)."""
    rng = np.random.default_rng(11)
    gold = np.arange(40) % 2
    good = _random_probs(rng, 40, 1)
    same = curves_from_scores(_scores(good, gold), _scores(good, gold), resamples=300)["logit"]
    assert (same.gap_low, same.gap_high) == ([0.0], [0.0])
    assert _unpaired_gap_width(good, good, gold, 300)[0] > 0.2
    bad = good.copy()
    bad[0, :, 0], bad[0, :, 1] = good[0, :, 1], good[0, :, 0]  # one example's choices swapped
    curves = curves_from_scores(_scores(good, gold), _scores(bad, gold), resamples=300)["logit"]
    paired = [_by_hand(good[rows], gold[rows]) - _by_hand(bad[rows], gold[rows])
              for rows in resample_indices(40, 300, 0).numpy()]
    low, high = _percentiles(paired)
    assert (curves.gap_low, curves.gap_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert curves.gap_high[0] - curves.gap_low[0] < 0.5 * _unpaired_gap_width(good, bad, gold, 300)[0]


def test_the_two_prompt_sets_must_hold_the_same_examples():
    probs, gold = np.full((4, 2, 2), 0.5), np.array([0, 1, 0, 1])
    other = _scores(probs, gold)
    other.ids = ["x0", "x1", "x3", "x2"]
    with pytest.raises(ValueError, match="same examples in the same order"):
        curves_from_scores(_scores(probs, gold), other)


# --- what is written and drawn ------------------------------------------------------------------


def test_the_pipeline_writes_every_bound_and_how_it_was_computed(monkeypatch):
    """``overthinking`` with scores made up per prompt set: the result carries the curves of
    :func:`curves_from_scores` with their bounds, in ``to_dict`` (JSON) and in the CSV rows."""
    rng = np.random.default_rng(2)
    made = {"true": _random_probs(rng, 10, 3), "permuted": _random_probs(rng, 10, 3)}

    def fake_scores(model, tokenizer, readouts, examples, *, batch_size, progress, description):
        gold = np.array([e.gold for e in examples])
        return _scores(made["true" if "true" in description else "permuted"], gold)

    monkeypatch.setattr(overthinking_module, "score_choices", fake_scores)
    task = make_task("toy", [Example(f"q{i}?", (" a", " b"), i % 2, f"q{i}") for i in range(14)])
    result, right, wrong = overthinking_module.overthinking(None, None, {}, task, shots=2, limit=10, progress=False)
    expected = curves_from_scores(right, wrong)["logit"]
    document = json.loads(json.dumps(result.to_dict()))
    assert document["curves"]["logit"] == json.loads(json.dumps(vars(expected)))
    assert document["intervals"] == INTERVALS and INTERVALS["level"] == 0.95
    for key in ("correct", "permuted", "gap"):
        assert all(lo <= hi for lo, hi in zip(document["curves"]["logit"][f"{key}_low"],
                                               document["curves"]["logit"][f"{key}_high"], strict=True))
    row = result.rows()[2]
    assert row["layer"] == 2 and row["gap_low"] == expected.gap_low[2] and row["permuted_high"] == expected.permuted_high[2]


def test_the_figure_draws_each_curve_in_its_band():
    """One band per curve: correct and permuted on the top axes, the gap below, each spanning
    exactly that curve's bounds at every layer."""
    rng = np.random.default_rng(3)
    gold = np.arange(16) % 2
    curves = curves_from_scores(_scores(_random_probs(rng, 16, 3), gold), _scores(_random_probs(rng, 16, 3), gold),
                                resamples=100)
    figure = overthinking_figure(OverthinkingResult("toy", 2, 1, 16, 0.5, 0.5, curves))
    accuracy, gap = figure.axes
    drawn = [[c for c in axes.collections if isinstance(c, PolyCollection)] for axes in (accuracy, gap)]
    assert [len(bands) for bands in drawn] == [2, 1]
    c = curves["logit"]
    for band, (low, high) in zip([*drawn[0], *drawn[1]], [(c.correct_low, c.correct_high),
                                                           (c.permuted_low, c.permuted_high), (c.gap_low, c.gap_high)],
                                 strict=True):
        vertices = band.get_paths()[0].vertices
        for layer in range(3):
            at = vertices[np.isclose(vertices[:, 0], layer), 1]
            assert (min(at), max(at)) == (pytest.approx(low[layer]), pytest.approx(high[layer]))
