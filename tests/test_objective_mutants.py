"""The training objective pinned down exactly: what a shortlist holds and weighs, and that
``accumulate_gradients`` honours its layers, blocks, scale and shortlist arguments and returns the
exact per-layer losses (written to kill the surviving mutants of ``training/objective.py``)."""

import math

import pytest
import torch
from tiny_models import tiny_model

from depthlens import TunedLens
from depthlens.stats.divergences import kl
from depthlens.training.objective import Shortlist, accumulate_gradients, layer_loss

TOKENS = 64


@pytest.fixture(scope="module")
def setup():
    """A tiny llama, a tuned lens with random translators, 64 positions' states and targets."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=0, initializer_range=0.3)
    lens = TunedLens(model)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.normal_(0, 0.2)
    states = [torch.randn(TOKENS, lens.parts.d_model) * 2 for _ in range(lens.num_layers + 1)]
    target = lens.parts.decode(states[-1]).float().log_softmax(-1).detach()
    return lens, states, target


def _exact_kl(lens, states, target, layer):
    with torch.no_grad():
        return kl(target, lens(states[layer], layer).float().log_softmax(-1)).sum().item()


def _grads(lens):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in lens.parameters()]


# --- Shortlist.sample ---------------------------------------------------------------------------


def _small_target():
    """Two positions over 5 tokens with the same ranking 4 > 3 > 2 > 1 > 0."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.1, 1.1, 2.2, 3.3, 4.4]])
    return logits.log_softmax(-1)


def test_without_negatives_the_shortlist_is_the_top_tokens_with_weight_one(setup):
    _, _, target = setup
    sample = Shortlist(top_k=2, negatives=0).sample(target)
    top = target.topk(2, dim=-1).indices.unique()
    assert sorted(sample.vocab.tolist()) == sorted(top.tolist())
    assert torch.equal(sample.log_weights, torch.zeros(len(top)))
    assert torch.allclose(sample.weighted_target, target[:, sample.vocab].exp())


def test_negatives_come_only_from_the_other_tokens_with_weight_rest_over_negatives(setup):
    _, _, target = setup
    vocab = target.shape[-1]
    top = set(target.topk(3, dim=-1).indices.flatten().tolist())
    torch.manual_seed(5)
    sample = Shortlist(top_k=3, negatives=200).sample(target)
    head, drawn = sample.vocab[: len(top)], sample.vocab[len(top):]
    assert set(head.tolist()) == top
    assert len(drawn) == 200 and not (set(drawn.tolist()) & top)
    rest = vocab - len(top)
    assert torch.equal(sample.log_weights[: len(top)], torch.zeros(len(top)))
    assert torch.allclose(sample.log_weights[len(top):], torch.full((200,), math.log(rest / 200)))
    expected = target[:, sample.vocab].exp() * sample.log_weights.exp()
    assert torch.allclose(sample.weighted_target, expected)
    assert torch.allclose(sample.weighted_target[:, len(top):], target[:, drawn].exp() * rest / 200)


def test_a_single_negative_is_drawn_and_weighs_the_whole_rest(setup):
    _, _, target = setup
    top = target.topk(2, dim=-1).indices.unique()
    sample = Shortlist(top_k=2, negatives=1).sample(target)
    assert len(sample.vocab) == len(top) + 1
    assert sample.log_weights[-1].item() == pytest.approx(math.log(target.shape[-1] - len(top)))


def test_a_single_remaining_token_is_still_drawn():
    target = _small_target()
    sample = Shortlist(top_k=4, negatives=3).sample(target)
    assert sorted(sample.vocab[:4].tolist()) == [1, 2, 3, 4]
    assert sample.vocab[4:].tolist() == [0, 0, 0]
    assert torch.allclose(sample.log_weights[4:], torch.full((3,), math.log(1 / 3)))


def test_when_the_top_tokens_cover_the_vocabulary_nothing_is_drawn():
    target = _small_target()
    sample = Shortlist(top_k=5, negatives=3).sample(target)
    assert sorted(sample.vocab.tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(sample.log_weights, torch.zeros(5))
    assert sample.kl(target[:, sample.vocab]).item() == pytest.approx(0.0, abs=1e-5)


def test_the_weighted_sample_is_an_unbiased_estimate_of_the_normaliser(setup):
    _, _, target = setup
    z = torch.randn(target.shape[-1], generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    estimates = []
    for _ in range(200):
        sample = Shortlist(top_k=2, negatives=16).sample(target)
        estimates.append((z[sample.vocab].exp() * sample.log_weights.exp()).sum())
    assert torch.stack(estimates).mean().item() == pytest.approx(z.exp().sum().item(), rel=0.03)


# --- layer_loss ----------------------------------------------------------------------------------


def test_cross_entropy_counts_token_zero_and_leaves_out_minus_100():
    log_q = torch.randn(4, 6).log_softmax(-1)
    target = torch.tensor([0, 1, -100, 5])
    expected = -(log_q[0, 0] + log_q[1, 1] + log_q[3, 5])
    assert layer_loss(log_q, target, "ce").item() == pytest.approx(expected.item(), rel=1e-6)


# --- accumulate_gradients ------------------------------------------------------------------------


def test_the_totals_are_the_exact_losses_of_the_layers_asked_for(setup):
    lens, states, target = setup
    lens.zero_grad()
    totals = accumulate_gradients(lens, states, target, layers=[2, 0], block_tokens=24)
    assert totals.dtype == torch.float64 and totals.shape == (2,)
    expected = [_exact_kl(lens, states, target, 2), _exact_kl(lens, states, target, 0)]
    assert totals.tolist() == pytest.approx(expected, rel=1e-5)
    default = accumulate_gradients(lens, states, target, block_tokens=24)
    assert default.tolist() == pytest.approx([_exact_kl(lens, states, target, i) for i in range(lens.num_layers)],
                                              rel=1e-5)


def test_the_gradient_is_scale_times_the_gradient_of_the_summed_loss(setup):
    lens, states, target = setup
    lens.zero_grad()
    loss = sum(kl(target, lens(states[i], i).float().log_softmax(-1)).sum() for i in range(lens.num_layers))
    loss.backward()
    reference = _grads(lens)
    lens.zero_grad()
    accumulate_gradients(lens, states, target, block_tokens=24)
    for got, want in zip(_grads(lens), reference):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    lens.zero_grad()
    accumulate_gradients(lens, states, target, block_tokens=24, scale=2.5)
    for got, want in zip(_grads(lens), reference):
        assert torch.allclose(got, 2.5 * want, atol=1e-5, rtol=1e-4)


def test_blocks_hold_at_most_block_tokens_and_the_default_is_512(setup, monkeypatch):
    lens, _, _ = setup
    torch.manual_seed(4)
    states = [torch.randn(513, lens.parts.d_model) for _ in range(lens.num_layers + 1)]
    target = lens.parts.decode(states[-1]).float().log_softmax(-1).detach()
    sizes = []
    forward = lens.forward

    def spy(hidden, layer, *args, **kwargs):
        sizes.append(hidden.shape[0])
        return forward(hidden, layer, *args, **kwargs)

    monkeypatch.setattr(lens, "forward", spy)
    accumulate_gradients(lens, states, target, layers=[1])
    assert sizes == [512, 1]
    sizes.clear()
    accumulate_gradients(lens, states, target, layers=[1], block_tokens=200)
    assert sizes == [200, 200, 113]
    lens.zero_grad()


def test_with_a_shortlist_the_totals_are_the_estimates_of_the_shared_samples(setup):
    lens, states, target = setup
    shortlist = Shortlist(top_k=2, negatives=16)
    blocks = [slice(0, 32), slice(32, 64)]
    torch.manual_seed(7)
    lens.zero_grad()
    totals = accumulate_gradients(lens, states, target, layers=[1, 2], block_tokens=32, shortlist=shortlist)
    torch.manual_seed(7)
    samples = [shortlist.sample(target[block]) for block in blocks]
    with torch.no_grad():
        expected = [sum(s.kl(lens(states[i][b], i, s.vocab)).item() for s, b in zip(samples, blocks)) for i in (1, 2)]
    assert totals.tolist() == pytest.approx(expected, rel=1e-5)
    exact = [_exact_kl(lens, states, target, i) for i in (1, 2)]
    assert totals.tolist() != pytest.approx(exact, rel=1e-3)


def test_cross_entropy_is_exact_even_with_a_shortlist(setup):
    lens, states, target = setup
    ids = target.argmax(-1)
    ids[::5] = -100
    ids[1::5] = 0
    lens.zero_grad()
    totals = accumulate_gradients(lens, states, ids, objective="ce", layers=[0, 2], block_tokens=24,
                                  shortlist=Shortlist(top_k=2, negatives=8))
    keep = ids >= 0
    with torch.no_grad():
        expected = [-lens(states[i], i).float().log_softmax(-1)[keep, ids[keep]].sum().item() for i in (0, 2)]
    assert totals.tolist() == pytest.approx(expected, rel=1e-5)
