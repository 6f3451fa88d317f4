"""Oracle tests of causal fidelity and stimulus–response alignment: every number against a
reference computed another way, on a readout built so that one direction provably does not
matter to it, at a layer that is not the last (where ``ρ = 1`` whatever the statistic)."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from tiny_models import tiny_model

from depthlens import TunedLens, capture
from depthlens.analysis.causal import (
    causal_fidelity,
    direction_interval,
    model_kl,
    prepare,
    spearman,
    stimulus_response,
)
from depthlens.analysis.causal.alignment import random_directions
from depthlens.model.edits import derangement
from depthlens.model.hooks import Edit, ablate, run_with_hooks

IDS = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
LAYER = 1


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ p (log p − log q)`` in float64, the direct formula."""
    log_p, log_q = log_p.double().log_softmax(-1), log_q.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_spearman_is_a_rank_statistic_on_nonlinear_monotone_data():
    x = torch.linspace(0, 4, 9, dtype=torch.float64)
    y = torch.exp(3 * x)  # monotone but far from linear
    assert float(spearman(x, y)) == pytest.approx(1.0, abs=1e-12)
    assert np.corrcoef(x.numpy(), y.numpy())[0, 1] < 0.8  # Pearson sees the curvature
    z = torch.tensor([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0])
    w = z**3 - 10 * z
    assert float(spearman(z, w)) == pytest.approx(scipy.stats.spearmanr(z, w).statistic, abs=1e-12)
    tied_x, tied_y = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0]), torch.tensor([4.0, 1.0, 3.0, 3.0, 9.0, 2.0])
    expected = scipy.stats.spearmanr(tied_x, tied_y).statistic  # ties take their average rank
    assert float(spearman(tied_x, tied_y)) == pytest.approx(expected, abs=1e-12)
    assert float(spearman(tied_x.flip(0), tied_y.flip(0))) == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def model():
    """Far-from-uniform predictions, so per-direction KLs are well above float32 rounding."""
    return tiny_model("llama", initializer_range=0.3)


@pytest.fixture(scope="module")
def blind(model):
    """A tuned lens whose translator at ``LAYER`` is ``I − u uᵀ``: it cannot see direction ``u``,
    so erasing ``u`` leaves its output exactly unchanged while the model's changes."""
    lens = TunedLens(model)
    d = lens.parts.d_model
    frame = torch.linalg.qr(torch.randn(d, 5, generator=torch.Generator().manual_seed(4))).Q.T.contiguous()
    with torch.no_grad():
        for translator in lens.translators:
            torch.nn.init.normal_(translator.weight, std=0.1, generator=torch.Generator().manual_seed(9))
        lens.translators[LAYER].weight.copy_(-torch.outer(frame[0], frame[0]))
        lens.translators[LAYER].bias.zero_()
    return lens, frame


@torch.no_grad()
def test_fidelity_in_the_middle_against_direct_ablations_and_scipy(model, blind):
    lens, frame = blind
    states = capture(model, IDS, layers=[LAYER])[LAYER]
    data = prepare(lens, states, LAYER, "mean", group_tokens=8)
    result = causal_fidelity(model, lens, IDS, data, frame, resamples=200)
    h = states.reshape(-1, states.shape[-1]).float()
    clean_model = run_with_hooks(model, IDS).logits.reshape(h.shape[0], -1)
    readout, model_side = [], []
    for v in frame:
        erased = h - ((h - h.mean(0)) @ v)[:, None] * v
        readout.append(float(_kl(lens(h, LAYER), lens(erased, LAYER)).mean()))
        ablated = run_with_hooks(model, IDS, edits=[ablate(f"resid.{LAYER}", v[None], "mean", mean=h.mean(0))]).logits
        model_side.append(float(_kl(clean_model, ablated.reshape(h.shape[0], -1)).mean()))
    readout, model_side = np.array(readout), np.array(model_side)
    # Sums of N = 64 KLs over a 320-token vocabulary in float32: relative error ≲ 1e-4.
    np.testing.assert_allclose(result.readout_kl.numpy(), readout, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(result.model_kl.numpy(), model_side, rtol=1e-3, atol=1e-6)
    assert result.readout_kl[0] < 1e-5 and result.model_kl[0] > 1e-2  # u: blind readout, seeing model
    gaps = np.diff(np.sort(readout)).min(), np.diff(np.sort(model_side)).min()
    assert min(gaps) > 1e-3 * max(readout.max(), model_side.max())  # 10× the rounding: ranks are not ties
    expected = scipy.stats.spearmanr(readout, model_side).statistic
    assert result.rho == pytest.approx(expected, abs=1e-9)
    assert abs(np.corrcoef(readout, model_side)[0, 1] - expected) > 1e-2  # a Pearson ρ would differ
    assert result.low <= result.rho <= result.high


@torch.no_grad()
@torch.no_grad()
def test_model_kl_per_position_in_batches_against_direct_ablations(model, blind):
    """The model side per direction and position, computed one sequence at a time (4 batches,
    each with its own clean distribution), equals the KL of direct ablations position by position.
    Planted bug: every batch compared with the first batch's clean distribution."""
    _, frame = blind
    states = capture(model, IDS, layers=[LAYER])[LAYER]
    data = prepare(blind[0], states, LAYER, "mean", group_tokens=8)
    got = model_kl(model, IDS, data, frame[:2], batch_size=1)
    h = states.reshape(-1, states.shape[-1]).float()
    clean = run_with_hooks(model, IDS).logits.reshape(h.shape[0], -1)
    for index, v in enumerate(frame[:2]):
        ablated = run_with_hooks(model, IDS, edits=[ablate(f"resid.{LAYER}", v[None], "mean", mean=h.mean(0))]).logits
        expected = _kl(clean, ablated.reshape(h.shape[0], -1))
        # KL = Σ p log p − Σ p z + logsumexp z in float32: a few ulp of the largest logit per term,
        # times the depth of a pairwise sum over the vocabulary
        ulps = 4 * math.log2(clean.shape[-1]) * float(clean.abs().max()) * torch.finfo(torch.float32).eps
        torch.testing.assert_close(got[index].double(), expected, rtol=0, atol=ulps)


def _reference_alignment(model, lens, layer, directions, seed, weights):
    """Mean Aitchison similarity, written out: the same derangements, the erasure through
    :func:`run_with_hooks`, the centred log-ratios and the weighted cosine in float64."""
    states = capture(model, IDS, layers=[layer])
    h = states[layer].reshape(-1, states[layer].shape[-1]).float()
    clean = run_with_hooks(model, IDS).logits.reshape(h.shape[0], -1).double().log_softmax(-1)
    w = clean.exp() if weights == "model" else torch.full_like(clean, 1 / clean.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(h.shape[0], dtype=torch.float64)
    for v in random_directions(h.shape[-1], directions, seed + layer):
        reference = h[derangement(h.shape[0], generator)]
        erased = h - ((h - reference) @ v)[:, None] * v
        stimulus = lens(erased, layer).double().log_softmax(-1) - lens(h, layer).double().log_softmax(-1)
        ref = reference.reshape(*IDS.shape, -1)
        edit = Edit(f"resid.{layer}", lambda x, ref=ref, v=v: x - ((x - ref) @ v)[..., None] * v)
        ablated = run_with_hooks(model, IDS, edits=[edit]).logits.reshape(h.shape[0], -1).double().log_softmax(-1)
        response = ablated - clean
        a = stimulus - (w * stimulus).sum(-1, keepdim=True)
        b = response - (w * response).sum(-1, keepdim=True)
        total += (w * a * b).sum(-1) / ((w * a * a).sum(-1) * (w * b * b).sum(-1)).sqrt()
    return float((total / directions).mean())


@pytest.mark.parametrize("weights", ["uniform", "model"])
def test_alignment_in_the_middle_matches_the_written_out_formula(model, blind, weights):
    lens, _ = blind
    layer = 2  # where the model's weights move the mean similarity by ~1e-2 (at layer 1 by ~2e-3)
    result = stimulus_response(model, {"blind": lens}, IDS, [layer], directions=3, weights=weights, seed=2,
                               group_tokens=8)
    expected = _reference_alignment(model, lens, layer, 3, 2, weights)
    # float32 log-probabilities (|x| ≲ 20) over 320 tokens: cosines agree to ~1e-4.
    assert result.similarity["blind"][0] == pytest.approx(expected, abs=2e-4)
    other = _reference_alignment(model, lens, layer, 3, 2, "uniform" if weights == "model" else "model")
    assert abs(other - expected) > 5e-3  # the weights matter on this model: ignoring them fails


@torch.no_grad()
def test_an_edit_the_readout_cannot_see_has_zero_alignment(model, blind):
    """Along ``u`` the blind readout's stimulus is exactly 0, so its similarity is 0 (not NaN)."""
    lens, frame = blind
    states = capture(model, IDS, layers=[LAYER])[LAYER].reshape(-1, frame.shape[1])
    erased = states - (states @ frame[0])[:, None] * frame[0]
    torch.testing.assert_close(lens(erased, LAYER), lens(states, LAYER), atol=1e-4, rtol=1e-5)


def test_fidelity_counts_the_bootstrap_groups_the_data_really_has():
    """10 positions in groups of 4 are 3 groups (4, 4, 2), fewer than the bootstrap's 4: refused,
    naming those 3 groups; 12 positions in groups of 3 are exactly 4: accepted."""
    from depthlens import LogitLens
    from depthlens.errors import CausalError

    model = tiny_model("llama", initializer_range=0.3)
    lens = LogitLens(model)
    frame = torch.eye(model.config.hidden_size)[:3]
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    data = prepare(lens, capture(model, ids[:, :10], layers=[1])[1], 1, "mean", group_tokens=4)
    with pytest.raises(CausalError, match="10 positions make 3 groups of 4 tokens"):
        causal_fidelity(model, lens, ids[:, :10], data, frame)
    data = prepare(lens, capture(model, ids, layers=[1])[1], 1, "mean", group_tokens=3)
    assert causal_fidelity(model, lens, ids, data, frame, resamples=20).readout_kl.shape == (3,)


def test_directions_a_readout_cannot_see_tie_whatever_the_rounding():
    """Three directions the readout sees and three it is blind to, whose mean KLs are rounding noise
    (below 10⁻⁶ nats) in two different orders: ρ and its interval are the same for both, and equal to
    scipy's Spearman ρ with the three blind directions tied. Planted bug: means ranked unrounded
    (the noise decides the order and ρ moves)."""
    from depthlens.analysis.causal.fidelity import rank_correlation

    generator = torch.Generator().manual_seed(3)
    seen = torch.rand(3, 64, generator=generator) + torch.tensor([[2.0], [1.0], [0.5]])
    model_side = torch.rand(6, 64, generator=generator) * 4 + torch.tensor([[0.9], [0.3], [0.6], [0.2], [0.8], [0.1]])
    groups = torch.arange(64) // 8
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        noise = torch.rand(3, 64, generator=generator) * 1e-8 + torch.tensor([[1e-8], [2e-8], [3e-8]])[order]
        results.append(rank_correlation(torch.cat([seen, noise]), model_side, groups, resamples=200))
    assert results[0] == results[1]
    means = torch.cat([seen.mean(-1), torch.zeros(3)])
    expected = scipy.stats.spearmanr(means.numpy(), model_side.mean(-1).numpy()).statistic
    assert results[0][0] == pytest.approx(expected, abs=1e-9)
    assert results[0][1] < results[0][0] < results[0][2]  # resamples reorder the directions the model sees


def test_the_interval_over_directions_is_the_bootstrap_of_scipys_spearman_over_the_same_draws():
    """Each resample draws whole directions, a readout KL with its model KL: the interval is the 2.5%
    and 97.5% quantiles of scipy's Spearman ρ of the pairs :func:`resample_indices` draws, the means
    rounded to the 6 decimals results report (two blind directions, 10⁻⁸ nats apart, tie). Planted
    bugs: the two sides drawn independently (pairs broken), or the means ranked unrounded."""
    from depthlens.stats.bootstrap import resample_indices

    generator = np.random.default_rng(5)
    readout = generator.gamma(1.0, 2.0, 10)
    model_side = readout * generator.uniform(0.3, 3.0, 10)
    readout[[7, 8]] = [3e-8, 1e-8]
    low, high = direction_interval(readout.tolist(), model_side.tolist(), resamples=400, seed=2)
    rounded = np.round(readout, 6), np.round(model_side, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on a resample with one side constant (ρ undefined)
        samples = np.array([scipy.stats.spearmanr(rounded[0][row], rounded[1][row]).statistic
                            for row in resample_indices(10, 400, 2).numpy()])
    expected = np.quantile(samples[np.isfinite(samples)], [0.025, 0.975])
    assert (low, high) == (pytest.approx(expected[0], abs=1e-9), pytest.approx(expected[1], abs=1e-9))
    assert high - low > 0.2  # ten directions leave ρ uncertain


def test_directions_in_one_order_on_both_sides_give_an_interval_of_exactly_one():
    """A known answer: when the readout and the model rank the directions alike, every resample's ρ is
    1 (−1 when they rank them in reverse), whatever the magnitudes; mismatched lengths are refused."""
    from depthlens.errors import CausalError

    readout = [0.001, 0.02, 0.3, 4.0, 50.0, 51.0]
    model_side = [1e-5, 0.1, 0.11, 0.5, 0.9, 7.0]
    assert direction_interval(readout, model_side, resamples=300) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert direction_interval(readout, model_side[::-1], resamples=300) == pytest.approx((-1.0, -1.0), abs=1e-12)
    with pytest.raises(CausalError, match="6 readout KLs against 5 model KLs"):
        direction_interval(readout, model_side[:5])


def test_committed_fidelity_results_state_the_interval_their_reported_means_give():
    """Every causal result under docs/ states, for each layer, the interval over directions that its own
    reported per-direction means give: the number is reproducible from the file alone."""
    import json
    from pathlib import Path

    docs = Path(__file__).parents[1] / "docs"
    files = [path for path in docs.rglob("results.json") if "fidelity" in path.read_text()]
    assert len(files) >= 6
    for path in files:
        for readout in json.loads(path.read_text())["readouts"].values():
            for row in readout["fidelity"]:
                low, high = direction_interval(row["readout_kl_nats"], row["model_kl_nats"])
                assert (row["rho_directions_low"], row["rho_directions_high"]) == (low, high), (path, row["layer"])
