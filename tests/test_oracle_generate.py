"""Oracle tests of sampling and of Patchscope generation: token frequencies against
``softmax(logits / T)`` by a chi-square test, and a patched generation against a written-out
loop that reruns the whole sequence with the patch at its one position."""

import numpy as np
import pytest
import scipy.stats
import torch
from tiny_models import tiny_model

from depthlens import LogitLens, capture
from depthlens.analysis.generate import generate_from_layer
from depthlens.analysis.patchscope import IDENTITY_PROMPT, Patch, patchscope_generate
from depthlens.model.hooks import hooked, replace

FALSE_ALARM = 1e-6
"""The chi-square test's significance level: with a fixed seed the draw is fixed, but a correct
sampler would fail it on one seed in a million."""
DRAWS = 4000


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit of ``counts`` to ``probs``, the tokens expected fewer
    than 5 times pooled into one bin (so the χ² approximation holds)."""
    expected = probs * counts.sum()
    rare = expected < 5
    observed = np.r_[counts[~rare], counts[rare].sum()]
    expected = np.r_[expected[~rare], expected[rare].sum()]
    keep = expected > 0
    return float(scipy.stats.chisquare(observed[keep], expected[keep]).pvalue)


@pytest.fixture(scope="module")
def sharp():
    return tiny_model("llama", initializer_range=0.3).eval()


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@torch.no_grad()
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(sharp, temperature):
    lens, layer = LogitLens(sharp), 2
    prompt = torch.tensor([[5, 17, 42, 99, 7]])
    logits = lens(capture(sharp, prompt, layers=[layer])[layer][0, -1], layer).double()
    generated = generate_from_layer(sharp, lens, prompt.expand(DRAWS, -1), layer=layer, max_new_tokens=1,
                                    temperature=temperature, generator=torch.Generator().manual_seed(7))
    counts = np.bincount(generated.tokens[:, 0].numpy(), minlength=logits.shape[-1])
    assert _chi_square_p(counts, (logits / temperature).softmax(-1).numpy()) > FALSE_ALARM
    assert _chi_square_p(counts, logits.softmax(-1).numpy()) < FALSE_ALARM  # T ignored would be rejected
    expected_log_probs = logits.log_softmax(-1)[generated.tokens[:, 0]].float()  # under the readout, T = 1
    torch.testing.assert_close(generated.log_probs[:, 0], expected_log_probs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def _patched_greedy(model, target, layer, position, state, steps):
    """Greedy tokens after ``target [1, seq]``, rerunning the whole sequence at every step with
    ``state`` written at ``(layer, position)`` of the prompt only."""
    parts = LogitLens(model).parts
    ids, out = target, []
    for _ in range(steps):
        with hooked(parts, edits=[replace(f"resid.{layer}", state[:, None], positions=[position])]):
            logits = model(input_ids=ids, use_cache=False).logits
        out.append(int(logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return out


@pytest.mark.parametrize("position", [0, -1])
def test_patchscope_generation_patches_the_prompt_once(sharp, tiny_tokenizer, position):
    source = tiny_tokenizer("When shall we three meet again in thunder", return_tensors="pt").input_ids
    target = tiny_tokenizer(IDENTITY_PROMPT, return_tensors="pt").input_ids
    layer = 1
    state = capture(sharp, source, layers=[layer])[layer][:, 4]
    generated = patchscope_generate(sharp, source, target, Patch(layer, 4, layer, position), max_new_tokens=8)
    where = position % target.shape[1]
    assert generated.tokens[0].tolist() == _patched_greedy(sharp, target, layer, where, state, 8)
    plain = _patched_greedy(sharp, target, layer, where, capture(sharp, target, layers=[layer])[layer][:, where], 8)
    assert generated.tokens[0].tolist() != plain  # the patch changes what is generated


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    """Sorted probabilities 0.4, 0.3, 0.15, 0.1, 0.05 reach p = 0.8 with the third (cumulative
    0.85): those three are drawn in proportion 0.4 : 0.3 : 0.15, the other two never."""
    from depthlens.analysis.generate import sample

    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    draws = sample(probs.log().float().expand(DRAWS, -1), temperature=1.0, top_p=0.8,
                   generator=torch.Generator().manual_seed(3))
    counts = np.bincount(draws.numpy(), minlength=5)
    assert counts[0] == counts[2] == 0
    nucleus = np.array([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    assert _chi_square_p(counts, nucleus) > FALSE_ALARM
