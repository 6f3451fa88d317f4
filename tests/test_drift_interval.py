"""The bootstrap interval of the drift correlation ρ, against ρ recomputed from scratch on each
resampled data set."""

import pytest
import torch
from tiny_models import random_tuned_lens, tiny_model

from depthlens.analysis.drift import (
    drift_correlation,
    rho_interval,
    rho_samples,
    similarity_matrix,
    stream_covariances,
    transfer_matrix,
)
from depthlens.errors import DriftError
from depthlens.stats.bootstrap import centred_interval, resample_counts

IDS = torch.randint(3, 300, (8, 10), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def drift():
    model = tiny_model("llama", seed=1)
    lens = random_tuned_lens(model, seed=3, std=0.2, bias=True)
    return (model, lens, stream_covariances(model, IDS, groups=8, batch_size=3),
            transfer_matrix(model, lens, IDS, groups=8, batch_size=3))


def test_the_group_sums_make_up_the_pooled_ones(drift):
    model, lens, covariances, transfer = drift
    pooled = stream_covariances(model, IDS, batch_size=4)
    torch.testing.assert_close(covariances.covariance, pooled.covariance, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(covariances.resampled(torch.ones(8, dtype=torch.float64)), pooled.covariance,
                               atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(transfer.ce, transfer_matrix(model, lens, IDS).ce)
    assert covariances.group_counts.tolist() == [10.0] * 8 and transfer.group_targets.tolist() == [9.0] * 8


@pytest.mark.parametrize("remove_top", [0, 2])
def test_each_draw_is_rho_of_the_resampled_text_recomputed_from_scratch(drift, remove_top):
    """Draw r holds sequence g counts[r, g] times: ρ of that repeated text, from new covariances
    and a new transfer matrix, is the draw's ρ. Planted bugs: draws weighted by the wrong groups,
    or the penalty's diagonal taken from the pooled matrix."""
    model, lens, covariances, transfer = drift
    samples = rho_samples(covariances, transfer, remove_top, resamples=4, seed=5)
    for draw, counts in enumerate(resample_counts(8, 4, 5)):
        text = IDS.repeat_interleave(counts.long(), dim=0)
        direct = drift_correlation(similarity_matrix(stream_covariances(model, text).covariance, remove_top),
                                   transfer_matrix(model, lens, text).ce_penalty)
        assert samples[draw].item() == pytest.approx(direct, abs=1e-6)
    assert len(set(samples.tolist())) > 1


def test_the_interval_is_the_centred_quantile_range_of_the_draws(drift):
    _, _, covariances, transfer = drift
    point = drift_correlation(similarity_matrix(covariances.covariance), transfer.ce_penalty)
    low, high = rho_interval(covariances, transfer, resamples=50, seed=1)
    assert (low, high) == pytest.approx(centred_interval(rho_samples(covariances, transfer, resamples=50, seed=1), point))
    assert low <= point <= high and high - low > 0


def test_too_few_or_missing_groups_are_one_line_errors(drift):
    model, lens, _covariances, transfer = drift
    with pytest.raises(DriftError, match="per-group sums"):
        rho_samples(stream_covariances(model, IDS), transfer)
    few = stream_covariances(model, IDS, groups=4)
    with pytest.raises(DriftError, match="8 or more groups"):
        rho_samples(few, transfer_matrix(model, lens, IDS, groups=4))
    with pytest.raises(DriftError, match="between 0 and the 8 sequences"):
        stream_covariances(model, IDS, groups=9)
