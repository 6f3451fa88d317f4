"""Representational drift: streaming covariances, their similarity, translator transfer."""

import pytest
import scipy.stats
import torch
from tiny_models import random_tuned_lens, tiny_model

from depthlens import capture
from depthlens.analysis.drift import (
    drift_correlation,
    remove_top_components,
    similarity_matrix,
    stream_covariances,
    transfer_matrix,
)
from depthlens.errors import DriftError

IDS = torch.randint(3, 300, (5, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tuned(model):
    return random_tuned_lens(model, seed=2, std=0.1, bias=False)


def test_streaming_covariances_match_direct_ones(model):
    result = stream_covariances(model, IDS, batch_size=2)
    states = capture(model, IDS)
    for index, layer in enumerate(result.layers):
        h = states[layer].reshape(-1, 32).double()
        torch.testing.assert_close(result.covariance[index], torch.cov(h.T, correction=0), atol=1e-8, rtol=1e-6)
    assert result.count == IDS.numel()


def test_similarity_is_a_cosine_matrix(model):
    covariance = stream_covariances(model, IDS).covariance
    for top in (0, 2):
        matrix = similarity_matrix(covariance, top)
        torch.testing.assert_close(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(matrix, matrix.T)
        values, vectors = torch.linalg.eigh(covariance)  # written out: ⟨A, B⟩_F / (‖A‖_F ‖B‖_F) after the removal
        values[..., values.shape[-1] - top :] = 0
        kept = vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2)
        for i in range(4):
            for j in range(4):
                cosine = (kept[i] * kept[j]).sum() / (kept[i].norm() * kept[j].norm())
                assert float(matrix[i, j]) == pytest.approx(float(cosine), abs=1e-9)
    assert float(similarity_matrix(covariance, 2)[0, 3]) != pytest.approx(float(similarity_matrix(covariance)[0, 3]))
    removed = remove_top_components(covariance[1], 2)
    assert torch.linalg.eigvalsh(removed).max() <= torch.linalg.eigvalsh(covariance[1])[-3] + 1e-9


def test_transfer_diagonal_is_zero_and_the_logit_row_is_the_logit_lens(model, tuned):
    transfer = transfer_matrix(model, tuned, IDS, tokens_per_byte=0.5, batch_size=2)
    assert torch.all(transfer.ce_penalty.diagonal() == 0) and torch.all(transfer.kl_penalty.diagonal() == 0)
    assert transfer.kl[-1, -1] == pytest.approx(0, abs=1e-5)  # the last state decoded as the model does
    torch.testing.assert_close(transfer.bits_per_byte(transfer.ce), transfer.ce / 0.6931471805599453 * 0.5)
    similarity = similarity_matrix(stream_covariances(model, IDS).covariance)
    mask = ~torch.eye(4, dtype=torch.bool)
    expected = scipy.stats.spearmanr(similarity[mask], transfer.ce_penalty[mask].double()).statistic
    assert drift_correlation(similarity, transfer.ce_penalty) == pytest.approx(expected, abs=1e-12)


def test_bad_input(model):
    with pytest.raises(DriftError, match="tuned lens"):
        transfer_matrix(model, object(), IDS)
    with pytest.raises(DriftError, match="at least 2 layers"):
        stream_covariances(model, IDS, layers=[1])
