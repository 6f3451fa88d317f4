"""Oracle tests of representational drift: hand-made covariances whose similarities are known
before and after removing principal components, and a transfer matrix checked entry by entry
against a written-out loop, on translators that make it asymmetric (so a transpose shows)."""

import math

import pytest
import scipy.stats
import torch
from tiny_models import random_tuned_lens, tiny_model

from depthlens import capture
from depthlens.analysis.drift import (
    Transfer,
    drift_correlation,
    remove_top_components,
    similarity_matrix,
    transfer_matrix,
)
from depthlens.analysis.drift.transfer import tokens_per_byte

IDS = torch.randint(3, 300, (3, 10), generator=torch.Generator().manual_seed(1))


def _rotated(values: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``U diag(values) Uᵀ`` for a random orthogonal ``U`` (float64), and ``U``."""
    u = torch.linalg.qr(torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64)).Q
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ u.T, u


def test_removing_top_components_zeroes_exactly_those_eigenvalues():
    values = [0.5, 1.0, 2.0, 30.0, 100.0]
    covariance, u = _rotated(values)
    removed = remove_top_components(covariance, 2)
    expected = u @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 0.0, 0.0], dtype=torch.float64)) @ u.T
    torch.testing.assert_close(removed, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(remove_top_components(covariance, 0), covariance)


def test_similarity_after_removal_is_decided_by_what_is_left():
    """Two covariances share one huge rogue direction and nothing else: cosine ≈ 1 before the
    removal, exactly 0 after it; two that differ only in the rogue direction: the reverse."""
    a = torch.diag(torch.tensor([100.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    b = torch.diag(torch.tensor([100.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    c = torch.diag(torch.tensor([0.0, 1.0, 0.0, 50.0], dtype=torch.float64))
    stack = torch.stack([a, b, c])
    before = similarity_matrix(stack, 0)
    assert float(before[0, 1]) == pytest.approx(10000 / 10001, abs=1e-12)
    assert float(before[0, 2]) == pytest.approx(1 / math.sqrt(10001 * 2501), abs=1e-12)
    after = similarity_matrix(stack, 1)
    assert float(after[0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert float(after[0, 2]) == pytest.approx(1.0, abs=1e-12)  # both keep only e₁


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.3)


@torch.no_grad()
def test_transfer_matrix_entry_by_entry(model):
    lens = random_tuned_lens(model, seed=4, std=0.3)
    result = transfer_matrix(model, lens, IDS, batch_size=2)
    states = capture(model, IDS)
    reference = states.logits.double().log_softmax(-1).reshape(-1, states.logits.shape[-1])
    targets = IDS[:, 1:].reshape(-1)
    n = lens.num_layers + 1
    ce, kl = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):  # translator
        for j in range(n):  # state
            logits = lens.parts.decode(lens.transform(states[j], i)).double()
            ce[i, j] = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)
            log_q = logits.log_softmax(-1).reshape(-1, logits.shape[-1])
            kl[i, j] = (reference.exp() * (reference - log_q)).sum(-1).mean()
    # float32 decoding of ~30 positions: cross-entropies (≈ 6 nats) agree to ~1e-5 relative.
    torch.testing.assert_close(result.ce.double(), ce, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.kl.double(), kl, atol=1e-4, rtol=1e-4)
    assert (ce - ce.T).abs().max() > 0.1 and (kl - kl.T).abs().max() > 0.1  # a transpose would fail
    torch.testing.assert_close(result.ce_penalty.double(), ce - ce.diagonal()[None, :], atol=2e-4, rtol=1e-4)


def test_penalties_subtract_the_states_own_translator():
    """``penalty[i, j] = x[i, j] − x[j, j]``: column ``j``'s own diagonal, on an asymmetric matrix."""
    ce = torch.tensor([[1.0, 5.0, 9.0], [2.0, 3.0, 7.0], [4.0, 6.0, 8.0]])
    result = Transfer([0, 1, 2], ce, 2 * ce)
    expected = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, -1.0], [3.0, 3.0, 0.0]])
    torch.testing.assert_close(result.ce_penalty, expected)
    torch.testing.assert_close(result.kl_penalty, 2 * expected)


def test_drift_correlation_is_spearman_over_the_off_diagonal_pairs():
    similarity = torch.tensor([[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.7, 0.3], [0.2, 0.7, 1.0, 0.5], [0.1, 0.3, 0.5, 1.0]])
    # symmetric, as every covariance similarity is: each value is tied with its mirror image
    penalty = torch.exp(-8 * similarity) * 100  # monotone decreasing and nonlinear
    penalty[0, 3], penalty[3, 0] = 0.001, 99.0  # two pairs out of order
    mask = ~torch.eye(4, dtype=torch.bool)
    expected = scipy.stats.spearmanr(similarity[mask], penalty[mask]).statistic
    assert drift_correlation(similarity, penalty) == pytest.approx(expected, abs=1e-12)
    assert abs(scipy.stats.pearsonr(similarity[mask], penalty[mask]).statistic - expected) > 0.05


class _Bytes:
    """A tokenizer whose token ``t`` decodes to ``t`` ASCII letters, so byte counts are known."""

    def decode(self, ids: list[int]) -> str:
        return "".join("x" * t for t in ids)


def test_tokens_per_byte_and_bits_per_byte_by_hand():
    ids = torch.tensor([[1, 2, 3], [4, 1, 1]])  # 6 tokens, 6 + 6 = 12 bytes
    assert tokens_per_byte(_Bytes(), ids) == pytest.approx(0.5, abs=1e-12)
    assert tokens_per_byte(_Bytes(), torch.tensor([[1]])) == 1.0  # one token of one byte
    assert tokens_per_byte(_Bytes(), torch.tensor([[0, 0]])) == 2.0  # no bytes: counted as one
    nats = torch.tensor([math.log(2), 2 * math.log(2)])
    torch.testing.assert_close(Transfer([0], nats, nats, 0.5).bits_per_byte(nats), torch.tensor([0.5, 1.0]))
    assert Transfer([0], nats, nats).bits_per_byte(nats).isnan().all()


def test_similarity_removes_nothing_by_default():
    stack = torch.stack([torch.diag(torch.tensor([100.0, 1.0, 0.0])), torch.diag(torch.tensor([100.0, 0.0, 1.0]))])
    torch.testing.assert_close(similarity_matrix(stack), similarity_matrix(stack, 0))
    assert float(similarity_matrix(stack)[0, 1]) == pytest.approx(10000 / 10001, abs=1e-9)
