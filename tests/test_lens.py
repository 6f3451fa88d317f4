"""Logit lens and tuned lens on a tiny random-weight model."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LayerError, LogitLens, TunedLens, capture, find_parts


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def states(model):
    torch.manual_seed(1)
    return capture(model, torch.randint(0, VOCAB, (2, 6)))


def test_states_cover_every_layer_boundary(model, states):
    assert len(states) == model.config.num_hidden_layers + 1
    assert all(s.shape == (2, 6, 32) for s in states)
    parts = find_parts(model)
    assert torch.allclose(parts.embed(states.input_ids), states[0])


def test_logit_lens_at_last_layer_is_the_model(model, states):
    logits = LogitLens(model)(states[-1], layer=states.num_layers)
    assert (logits - states.logits).abs().max() <= 1e-5
    assert logits.shape == (2, 6, VOCAB)


def test_untrained_tuned_lens_equals_logit_lens(model, states):
    logit, tuned = LogitLens(model), TunedLens(model)
    assert len(tuned.translators) == model.config.num_hidden_layers
    for layer in range(len(states)):
        assert torch.equal(logit(states[layer], layer), tuned(states[layer], layer))


def test_tuned_lens_applies_affine_translator_residually(model, states):
    lens = TunedLens(model)
    torch.manual_seed(2)
    with torch.no_grad():
        lens.translators[1].weight.normal_(0, 0.1)
        lens.translators[1].bias.normal_(0, 0.1)
    h = states[1]
    a, b = lens.translators[1].weight, lens.translators[1].bias
    expected = find_parts(model).decode(h + h @ a.T + b)
    assert torch.allclose(lens(h, 1), expected, atol=1e-6)
    assert not torch.allclose(lens(h, 1), LogitLens(model)(h, 1), atol=1e-3)


def test_iter_logits_goes_one_layer_at_a_time(model, states):
    lens = LogitLens(model)
    produced = lens.iter_logits(states, layers=[3, 0])
    layer, logits = next(produced)
    assert layer == 3 and logits.shape == (2, 6, VOCAB)
    assert [layer for layer, _ in produced] == [0]
    assert lens.stack_logits(states).shape == (4, 2, 6, VOCAB)


def test_top_k_matches_full_distribution(model, states):
    lens = LogitLens(model)
    values, ids = lens.top_k(states, k=3)
    full = lens.stack_logits(states).log_softmax(-1)
    assert ids.shape == values.shape == (4, 2, 6, 3)
    assert torch.equal(ids, full.topk(3, dim=-1).indices)
    assert torch.allclose(values, full.gather(-1, ids))
    assert (values[..., 0] >= values[..., 1]).all()


def test_layer_out_of_range_is_a_clear_error(model, states):
    with pytest.raises(LayerError, match="layers 0 … 3"):
        LogitLens(model)(states[0], layer=4)
