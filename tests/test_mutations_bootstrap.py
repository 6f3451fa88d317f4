"""Bootstrap intervals that mean what they say: coverage, width, resampling whole groups, and
weighting groups by their token counts, in :mod:`depthlens.stats.bootstrap` and in evaluation.

Written against planted bugs the older tests let through: a point ± 1e-3 interval, a min–max
interval, and an unweighted mean over groups (every group in the older fixture has the same size).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.analysis.evaluate import evaluate
from depthlens.stats.bootstrap import group_bootstrap


def _synthetic(rng: np.random.Generator, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums and token counts of a population whose token mean is exactly 1: group sizes
    1…20, a group effect (sd 0.5) and token noise (sd 1)."""
    sizes = rng.integers(1, 21, groups)
    effects = rng.normal(1.0, 0.5, groups)
    sums = np.array([rng.normal(effect, 1.0, size).sum() for effect, size in zip(effects, sizes)])
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)


def _delta_standard_error(sums: torch.Tensor, sizes: torch.Tensor) -> float:
    """The large-sample standard error of the ratio Σ sums / Σ sizes over resampled groups."""
    ratio = sums.sum() / sizes.sum()
    residual = sums - ratio * sizes
    n = len(sums)
    return float((residual.pow(2).sum() / (n - 1) * n).sqrt() / sizes.sum())


def test_95_percent_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered, width_ratios = 0, []
    trials = 200
    for trial in range(trials):
        sums, sizes = _synthetic(rng, groups=40)
        low, high = group_bootstrap(sums, sizes, resamples=400, seed=trial)
        covered += low <= 1.0 <= high
        width_ratios.append((high - low) / (2 * 1.96 * _delta_standard_error(sums, sizes)))
    assert 0.88 <= covered / trials <= 0.985, covered
    assert 0.85 <= float(np.mean(width_ratios)) <= 1.15, np.mean(width_ratios)


def _reference_interval(sums: np.ndarray, sizes: np.ndarray, resamples: int = 20_000) -> tuple[float, float]:
    """Percentile interval of Σ c·sums / Σ c·sizes, c the counts of groups drawn with replacement."""
    rng = np.random.default_rng(123)
    counts = rng.multinomial(len(sums), np.full(len(sums), 1 / len(sums)), size=resamples)
    ratios = (counts @ sums) / (counts @ sizes)
    low, high = np.quantile(ratios, [0.025, 0.975])
    return float(low), float(high)


def test_groups_are_weighted_by_their_token_counts():
    """One big group (200 tokens, mean 3) among twelve small ones (1…12 tokens, mean about 0):
    the token-weighted mean is near 2.6, the unweighted mean of group means near 0.2."""
    rng = np.random.default_rng(1)
    sizes = np.array([200.0, *range(1, 13)])
    means = np.array([3.0, *rng.normal(0.0, 0.3, 12)])
    sums = means * sizes
    low, high = group_bootstrap(torch.tensor(sums), torch.tensor(sizes), resamples=2000, seed=0)
    ref_low, ref_high = _reference_interval(sums, sizes)
    width = ref_high - ref_low
    assert low == pytest.approx(ref_low, abs=0.1 * width) and high == pytest.approx(ref_high, abs=0.1 * width)
    assert low <= sums.sum() / sizes.sum() <= high


def test_identical_groups_give_a_zero_width_interval():
    sums, sizes = torch.full((8,), 6.0, dtype=torch.float64), torch.full((8,), 3.0, dtype=torch.float64)
    assert group_bootstrap(sums, sizes) == pytest.approx((2.0, 2.0), abs=1e-12)


# --------------------------------------------------------------------------- through evaluate()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.3)


def _rows(report, metric: str, unit: str = "nats") -> list[dict]:
    return [r for r in report.table if r["metric"] == metric and r["unit"] == unit]


EPS32 = float(torch.finfo(torch.float32).eps)


def _bias_rounding(model, chunk: torch.Tensor, layer: int) -> float:
    """A bound on the float32 rounding that separates a bias resample of identical groups from
    the point estimate, derived from the arithmetic rather than one CPU's kernels.

    Each summed probability carries a relative error δ ≤ (4 + n + 8)·ε: a few ulps from the
    softmax (which rounds differently by batch position under some kernels), the n-token sum of a
    group and the 8-group sum of a resample. ``KL = Σ p·log(p/q)/P + log(Q/P)`` then moves by at
    most δ·(2·Σ P|log P/Q| + 4) to first order, and its own sum over V terms by V·ε·Σ P|log P/Q|
    (any summation order)."""
    states = capture(model, chunk[None])
    final = states.logits[0, :-1].float().softmax(-1).mean(0)
    lens = LogitLens(model)(states[layer], layer)[0, :-1].float().softmax(-1).mean(0)
    spread = float((final * (final / lens).log().abs()).sum())
    delta = (4 + 2 * (len(chunk) - 1) + 8) * EPS32
    return delta * (2 * spread + 4) + VOCAB * EPS32 * spread


def test_evaluation_resamples_groups_not_tokens(model):
    """Sixteen copies of one chunk: every group of chunks is the same, so a bootstrap over groups
    has nothing to vary; one over tokens (or a fixed ± margin) would give the intervals width.
    What may separate them is float32 rounding: 8·ε relative for the summed metrics (float64 sums
    of float32 per-token values, each a few ulps from its softmax), and :func:`_bias_rounding`
    for the bias."""
    chunk = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    report = evaluate(model, {"logit": LogitLens(model)}, [chunk] * 16, [30] * 16, groups=8, resamples=100,
                      progress=False)
    assert report.table
    nats = {(r["metric"], r["layer"]): r["value"] for r in report.table if r["unit"] in ("nats", "fraction")}
    bias_rounding = {layer: _bias_rounding(model, chunk, layer) for metric, layer in nats if metric == "bias"}
    assert max(bias_rounding.values()) < 1e-4, bias_rounding
    for row in report.table:
        point = nats[row["metric"], row["layer"]]
        scale = row["value"] / point if row["unit"] == "bits_per_byte" and point else 1.0
        rounding = bias_rounding[row["layer"]] if row["metric"] == "bias" else 8 * EPS32 * abs(point) + 1e-12
        assert abs(row["ci_low"] - row["value"]) <= rounding * scale, (row, rounding)
        assert abs(row["ci_high"] - row["value"]) <= rounding * scale, (row, rounding)


def test_chunks_of_one_group_are_resampled_together(model):
    """Chunks go round-robin to 8 groups, and chunk ``g + 8`` is a copy of chunk ``g``: the
    interval is that of 8 groups of two equal chunks, about √2 wider than if the 16 chunks were
    resampled one by one."""
    generator = torch.Generator().manual_seed(1)
    firsts = [torch.randint(0, VOCAB, (12,), generator=generator) for _ in range(8)]
    report = evaluate(model, {"logit": LogitLens(model)}, firsts + firsts, [30] * 16, groups=8, resamples=2000,
                      progress=False)
    sums = []
    for chunk in firsts:
        log_q = LogitLens(model)(capture(model, chunk[None])[1], 1)[0, :-1].log_softmax(-1)
        sums.append(-log_q.gather(-1, chunk[1:, None]).sum().item())
    sums = np.array(sums)
    (row,) = [r for r in _rows(report, "ce") if r["layer"] == 1]
    group_low, group_high = _reference_interval(2 * sums, np.full(8, 22.0))
    chunk_low, chunk_high = _reference_interval(np.concatenate([sums, sums]), np.full(16, 11.0))
    width = row["ci_high"] - row["ci_low"]
    assert 0.85 <= width / (group_high - group_low) <= 1.2, (row, group_low, group_high)
    assert width / (chunk_high - chunk_low) > 1.2


def test_evaluation_intervals_match_a_reference_bootstrap_over_unequal_groups(model):
    """Chunks of 4 to 40 tokens, one group each: the interval of the cross-entropy is the
    bootstrap of the token-weighted mean over chunks, computed here from the per-chunk sums."""
    generator = torch.Generator().manual_seed(2)
    lengths = [4, 40, 9, 33, 5, 28, 12, 40, 6, 21, 15, 37, 8, 25, 11, 30, 7, 19, 35, 10]
    chunks = [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]
    tuned = TunedLens(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.normal_(0, 0.05, generator=generator)
    report = evaluate(model, {"tuned": tuned}, chunks, [3 * n for n in lengths], batch_size=1, groups=len(chunks),
                      resamples=2000, progress=False)
    assert report.tokens == sum(n - 1 for n in lengths)
    for layer in (0, 2):
        sums = []
        for chunk in chunks:
            states = capture(model, chunk[None])
            log_q = tuned(states[layer], layer)[0, :-1].log_softmax(-1)
            sums.append(-log_q.gather(-1, chunk[1:, None]).sum().item())
        sums, sizes = np.array(sums), np.array([n - 1 for n in lengths], dtype=float)
        (row,) = [r for r in _rows(report, "ce") if r["layer"] == layer]
        assert row["value"] == pytest.approx(sums.sum() / sizes.sum(), rel=1e-5)
        ref_low, ref_high = _reference_interval(sums, sizes)
        width = ref_high - ref_low
        assert 0.8 <= (row["ci_high"] - row["ci_low"]) / width <= 1.25, (row, ref_low, ref_high)
        assert row["ci_low"] == pytest.approx(ref_low, abs=0.2 * width), (row, ref_low)
        assert row["ci_high"] == pytest.approx(ref_high, abs=0.2 * width), (row, ref_high)


# --------------------------------------------------------------------------- options and units


def test_bootstrap_options_are_honoured():
    from depthlens.stats.bootstrap import bootstrap_samples, interval

    values = torch.arange(1.0, 21.0, dtype=torch.float64)
    weights = torch.full((20,), 2.0, dtype=torch.float64)
    assert bootstrap_samples(values).shape == (500,)
    assert bootstrap_samples(values, resamples=37).shape == (37,)
    assert torch.equal(bootstrap_samples(values, weights, seed=3), bootstrap_samples(values, weights, seed=3))
    assert not torch.equal(bootstrap_samples(values, weights, seed=3), bootstrap_samples(values, weights, seed=4))
    assert torch.allclose(bootstrap_samples(values, weights), bootstrap_samples(values) / 2)
    assert bootstrap_samples(values.float()).dtype == torch.float64
    assert interval(torch.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert interval(torch.arange(101.0)) == pytest.approx((2.5, 97.5))
    wide, narrow = group_bootstrap(values, weights), group_bootstrap(values, weights, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert group_bootstrap(values, weights, seed=1) != group_bootstrap(values, weights, seed=2)
    assert group_bootstrap(values, weights, resamples=50) != group_bootstrap(values, weights, resamples=51)
    doubled = group_bootstrap(values, weights, statistic=lambda sums, totals: 2 * sums / totals)
    assert doubled == pytest.approx(tuple(2 * bound for bound in group_bootstrap(values, weights)))


@pytest.fixture(scope="module")
def two_lens_report(model):
    generator = torch.Generator().manual_seed(3)
    chunks = [torch.randint(0, VOCAB, (10,), generator=generator) for _ in range(9)]
    tuned = TunedLens(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.normal_(0, 0.2, generator=generator)
    byte_counts = [20 + i for i in range(9)]
    return evaluate(model, {"logit": LogitLens(model), "tuned": tuned}, chunks, byte_counts, groups=9,
                    resamples=200, progress=False)


def test_every_nats_metric_is_also_in_bits_per_byte(two_lens_report):
    report = two_lens_report
    assert report.tokens == 81 and report.bytes == sum(20 + i for i in range(9))
    factor = report.tokens / (report.bytes * np.log(2))
    rows = {(r["lens"], r["layer"], r["metric"], r["unit"]): r for r in report.table}
    for lens, layer, metric, unit in rows:
        if metric == "top1":
            assert unit == "fraction"
            continue
        assert unit in ("nats", "bits_per_byte")
        nats = rows[(lens, layer, metric, "nats")]
        bits = rows[(lens, layer, metric, "bits_per_byte")]
        for key in ("value", "ci_low", "ci_high"):
            assert bits[key] == pytest.approx(nats[key] * factor, rel=1e-9, abs=1e-12)
    assert {r["metric"] for r in report.table if r["unit"] == "bits_per_byte"} == {"kl", "ce", "entropy", "bias"}
    assert len(report.table) == 2 * 4 * (4 * 2 + 1)


def test_report_means_and_json_keep_the_lenses_apart(two_lens_report):
    report = two_lens_report
    logit, tuned = report.mean("logit", "kl"), report.mean("tuned", "kl")
    assert len(logit) == len(tuned) == 4 and logit[:3] != pytest.approx(tuned[:3])
    assert report.mean("tuned", "top1", "fraction")[-1] == 1.0
    document = report.to_json()
    assert set(document) == {"tokens", "bytes", "meta", "table", "differences"}
    assert (document["tokens"], document["bytes"], document["table"]) == (report.tokens, report.bytes, report.table)
    assert document["differences"] is report.differences and {r["lens"] for r in report.differences} == {"tuned"}
    assert document["meta"] is report.meta
    assert report.has_intervals and "95% bootstrap intervals over 9 groups of chunks" in report.interval_label()


def test_the_marginal_bias_interval_holds_its_point(two_lens_report):
    for row in two_lens_report.table:
        if row["metric"] == "bias":
            assert row["ci_low"] <= row["value"] <= row["ci_high"]
            assert row["ci_high"] - row["ci_low"] < 5 * max(row["value"], 1e-3), row
