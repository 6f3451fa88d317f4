"""Divergences and the bootstrap: each pinned against its direct formula, also with -inf entries."""

import math

import pytest
import torch

from depthlens.stats import divergences
from depthlens.stats.bootstrap import group_bootstrap, resample_counts
from depthlens.stats.divergences import cross_entropy, entropy, js, kl, log_probs, tv

LN2 = math.log(2)


def _pair(seed: int = 0, shape=(3, 5, 40), impossible: bool = False):
    """Two batches of log-distributions ``[..., vocab]``, float64; with ``impossible``, some
    tokens get probability 0 (-inf) in one, the other or both."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    b = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    if impossible:
        a[..., :4] = -math.inf
        b[..., 2:6] = -math.inf
    return a.log_softmax(-1), b.log_softmax(-1)


def _plogp(p, log_q):
    """``p log q`` with 0 where ``p = 0`` (the direct convention)."""
    return torch.where(p > 0, p * log_q, torch.zeros_like(p))


@pytest.mark.parametrize("impossible", [False, True])
def test_each_divergence_is_its_formula(impossible):
    log_p, log_q = _pair(impossible=impossible)
    p, q = log_p.exp(), log_q.exp()
    m = (p + q) / 2
    direct_entropy = -_plogp(p, log_p).sum(-1)
    direct_js = 0.5 * (_plogp(p, log_p) - _plogp(p, m.log())).sum(-1) + 0.5 * (_plogp(q, log_q) - _plogp(q, m.log())).sum(-1)
    assert torch.allclose(entropy(log_p), direct_entropy)
    assert torch.allclose(js(log_p, log_q), direct_js)
    assert torch.allclose(tv(log_p, log_q), 0.5 * (p - q).abs().sum(-1))
    for result in (entropy(log_p), js(log_p, log_q), tv(log_p, log_q)):
        assert result.shape == (3, 5) and torch.isfinite(result).all()
    direct_kl = (_plogp(p, log_p) - torch.where(p > 0, p * log_q, torch.zeros_like(p))).sum(-1)
    if impossible:  # p puts mass on tokens 4, 5 where q is 0
        assert torch.isinf(kl(log_p, log_q)).all() and (kl(log_p, log_q) > 0).all()
        both = torch.cat([log_p[..., 6:], log_q[..., 6:]])  # tokens both allow
        log_p, log_q = both[:3].log_softmax(-1), both[3:].log_softmax(-1)
        p = log_p.exp()
        direct_kl = (p * (log_p - log_q)).sum(-1)
    assert torch.allclose(kl(log_p, log_q), direct_kl)


def test_kl_where_q_covers_p_and_p_has_zeros_is_finite():
    log_p, log_q = _pair(1)
    log_p = log_p.clone()
    log_p[..., :10] = -math.inf
    log_p = log_p.log_softmax(-1)
    p = log_p.exp()
    direct = (p[..., 10:] * (log_p[..., 10:] - log_q[..., 10:])).sum(-1)
    assert torch.allclose(kl(log_p, log_q), direct)
    assert torch.allclose(kl(log_p, log_p), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12)


def test_bounds_and_symmetry():
    log_p, log_q = _pair(2, shape=(200, 30))
    assert (js(log_p, log_q) >= 0).all() and (js(log_p, log_q) <= LN2).all()
    assert (tv(log_p, log_q) >= 0).all() and (tv(log_p, log_q) <= 1).all()
    assert torch.allclose(js(log_p, log_q), js(log_q, log_p))
    assert torch.allclose(tv(log_p, log_q), tv(log_q, log_p))
    assert (kl(log_p, log_q) >= -1e-12).all()
    disjoint_p = torch.tensor([0.0, -math.inf]).expand(2, 2)
    disjoint_q = torch.tensor([-math.inf, 0.0]).expand(2, 2)
    assert torch.allclose(js(disjoint_p, disjoint_q), torch.full((2,), LN2))
    assert torch.allclose(tv(disjoint_p, disjoint_q), torch.ones(2))
    assert torch.equal(entropy(disjoint_p), torch.zeros(2))
    assert torch.equal(js(disjoint_p, disjoint_p), torch.zeros(2))


def test_cross_entropy_picks_the_target_and_marks_missing_ones_nan():
    log_q, _ = _pair(3, shape=(4, 40))
    targets = torch.tensor([3, -1, 0, -100])
    ce = cross_entropy(log_q, targets)
    assert ce[0] == -log_q[0, 3] and ce[2] == -log_q[2, 0]
    assert ce[[1, 3]].isnan().all()
    impossible = log_q.clone()
    impossible[0, 3] = -math.inf
    assert cross_entropy(impossible, targets)[0] == math.inf


def test_gradients_stay_finite_with_impossible_tokens():
    log_p, _ = _pair(4, impossible=True)
    logits = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    log_q = logits.log_softmax(-1)
    (kl(log_p, log_q).sum() + entropy(log_q).sum() + js(log_p, log_q).sum() + tv(log_p, log_q).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    targets = torch.tensor([1, -100, 7]).expand(5, 3).T
    logits.grad = None
    ce = cross_entropy(logits.log_softmax(-1), targets)
    torch.where(targets >= 0, ce, 0.0).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


def test_group_bootstrap_is_the_quantile_of_resampled_ratios():
    values = torch.tensor([1.0, 4.0, 2.0, 8.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    counts = resample_counts(4, 300, seed=3)
    assert counts.shape == (300, 4) and (counts.sum(1) == 4).all()
    assert torch.equal(counts, resample_counts(4, 300, seed=3))
    ratios = (counts @ values) / (counts @ weights)
    low, high = group_bootstrap(values, weights, resamples=300, seed=3)
    assert (low, high) == pytest.approx(torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist())
    assert low <= values.sum() / weights.sum() <= high
    narrow = group_bootstrap(values, weights, resamples=300, seed=3, level=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    total = group_bootstrap(values[:, None].expand(4, 3), resamples=300, seed=3,
                            statistic=lambda sums, totals: sums.sum(-1) / totals)
    assert total == pytest.approx(group_bootstrap(3 * values, torch.ones(4, dtype=torch.float64), resamples=300, seed=3))


def test_log_probs_normalise_the_last_axis_of_any_shape():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.allclose(log_probs(logits).exp().sum(-1), torch.ones(2, 3, dtype=torch.float32))


def test_floored_logsumexp_and_exp_equal_torchs_on_a_near_one_hot_distribution():
    """A spread of hundreds of nats (the logit lens at the embeddings), -inf entries included: the
    floored forms equal torch's to float rounding, in value and gradient. Planted bugs: the floor
    applied to the unshifted logits (the value moves by the shift), or the shift left out of the
    result."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 300, generator=generator) * 80 + 500
    logits[:, :5] = -math.inf
    wide = logits.clone().requires_grad_(True)
    value = divergences.floored_logsumexp(wide)
    value.sum().backward()
    exact = logits.clone().requires_grad_(True)
    torch.logsumexp(exact, -1).sum().backward()
    torch.testing.assert_close(value, torch.logsumexp(logits, -1), rtol=1e-6, atol=0)
    # torch's gradient is exp(z − lse): the rounding of lse ≈ 800 (a few ulp of it) is its relative error
    ulps = 4 * float(torch.where(logits.isfinite(), logits, 0).abs().max()) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(wide.grad, exact.grad, rtol=ulps, atol=1e-30)
    log_p = logits.log_softmax(-1)
    floored = divergences.floored_exp(log_p)
    assert torch.equal(floored[log_p > divergences.EXP_FLOOR], log_p.exp()[log_p > divergences.EXP_FLOOR])
    assert float(floored.max()) <= 1 and float((floored - log_p.exp()).abs().max()) < 2e-35


def test_kl_to_logits_equals_float64_kl_of_the_normalised_softmax():
    """``KL(p ‖ softmax z)`` from raw logits, broadcast over directions ``[K, n, V]`` against
    ``p [n, V]``, on moderate logits and on a near one-hot spread of hundreds of nats, with zero-
    probability tokens in ``p`` whose log-probabilities are shifted by ``1e-4`` (a float32
    ``log_softmax``'s normaliser is off by up to a tenth of that): equal to the float64 KL of the
    renormalised ``p`` to float32 rounding of terms as large as the biggest logit (a few ulp of it,
    times the pairwise sum's depth). Logits with ``-inf`` take the exact path (``+inf`` where
    ``p > 0 = q``, finite where both are 0). Planted bugs: the shift left out of the result, the
    cross term taken with ``log p``, the floor applied before the shift, ``Σ p`` taken as 1 (the
    shift times ``logsumexp z``)."""
    generator = torch.Generator().manual_seed(5)
    for scale, offset in ((5.0, 0.0), (80.0, -500.0)):
        log_p = (torch.randn(4, 300, generator=generator) * 3).log_softmax(-1)
        log_p[:, :7] = -math.inf
        log_p = log_p.log_softmax(-1) + 1e-4
        logits = torch.randn(3, 4, 300, generator=generator) * scale + offset
        exact = kl(log_p.double().log_softmax(-1), logits.double().log_softmax(-1))
        largest = float(logits.abs().max())
        got = divergences.kl_to_logits_(divergences.KLReference.of(log_p), logits.clone())
        ulps = 4 * math.log2(300) * largest * torch.finfo(torch.float32).eps
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=ulps)
    masked = torch.randn(2, 300, generator=generator)
    masked[0, 10] = -math.inf  # p > 0 there: KL is +inf
    masked[1, :7] = -math.inf  # only where p = 0: finite
    result = divergences.kl_to_logits_(divergences.KLReference.of(log_p[:2]), masked.clone())
    expected = kl(log_p[1].double().log_softmax(-1), masked[1].double().log_softmax(-1))
    assert math.isinf(float(result[0])) and float(result[1]) == pytest.approx(float(expected), abs=1e-5)
