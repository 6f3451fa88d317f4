"""The training objective: exact KL per layer and block, and its shortlist estimate."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import TunedLens
from depthlens.training.objective import Shortlist, accumulate_gradients


@pytest.fixture(scope="module")
def setup():
    """A tiny llama, a tuned lens with random translators, 64 positions' states and targets."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=0, initializer_range=0.3)
    lens = TunedLens(model)
    with torch.no_grad():
        for translator in lens.translators:
            translator.weight.normal_(0, 0.2)
    states = [torch.randn(64, lens.parts.d_model) * 2 for _ in range(lens.num_layers + 1)]
    target = lens.parts.decode(states[-1]).float().log_softmax(-1).detach()
    return lens, states, target


def _gradients(lens, states, target, shortlist):
    lens.zero_grad()
    losses = accumulate_gradients(lens, states, target, shortlist=shortlist, block_tokens=32)
    return losses, [p.grad.clone() for p in lens.parameters()]


def test_a_shortlist_covering_the_vocabulary_is_the_exact_kl(setup):
    lens, states, target = setup
    exact, exact_grads = _gradients(lens, states, target, None)
    covered, covered_grads = _gradients(lens, states, target, Shortlist(top_k=VOCAB, negatives=0))
    assert exact.min() > 0.1
    assert torch.allclose(covered, exact, rtol=1e-4)
    for a, b in zip(covered_grads, exact_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_the_shortlist_estimate_is_close_to_the_exact_kl_on_average(setup):
    lens, states, target = setup
    exact, exact_grads = _gradients(lens, states, target, None)
    torch.manual_seed(1)
    draws = [_gradients(lens, states, target, Shortlist(top_k=4, negatives=64)) for _ in range(40)]
    mean_loss = torch.stack([loss for loss, _ in draws]).mean(0)
    assert torch.allclose(mean_loss, exact, rtol=0.1)
    one = draws[0][1][0].flatten()
    average = torch.stack([grads[0] for _, grads in draws]).mean(0).flatten()
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(average, exact_grads[0].flatten(), dim=0) > 0.95
    assert cosine(one, exact_grads[0].flatten(), dim=0) > 0.5


def test_the_shortlist_always_holds_every_positions_top_tokens(setup):
    _, _, target = setup
    sample = Shortlist(top_k=3, negatives=10).sample(target)
    top = set(target.topk(3, dim=-1).indices.flatten().tolist())
    assert top <= set(sample.vocab[: len(sample.vocab) - 10].tolist())
    assert len(sample.vocab) == len(top) + 10
    assert sample.weighted_target.shape == (64, len(sample.vocab))


def test_decoding_a_subset_of_the_vocabulary_matches_the_full_decoding(setup):
    lens, states, _ = setup
    ids = torch.tensor([5, 0, VOCAB - 1, 17])
    assert torch.allclose(lens(states[1], 1, ids), lens(states[1], 1)[:, ids], atol=1e-5)
