"""A bootstrap interval for the drift correlation ρ (covariance similarity against transfer penalty).

The text is cut into groups of sequences (:func:`~depthlens.analysis.drift.covariance.stream_covariances`
and :func:`~depthlens.analysis.drift.transfer.transfer_matrix` with ``groups``); each draw of
:func:`~depthlens.stats.bootstrap.resample_counts` rebuilds, from the per-group sums, the
covariances and the cross-entropy matrix of the data set that holds each group as often as drawn,
and takes Spearman's ρ of that data set's similarities and penalties
(:func:`~depthlens.analysis.drift.transfer.drift_correlation`). The interval is the central 95% of
those, centred on the point estimate (:func:`~depthlens.stats.bootstrap.centred_interval`). It
covers the sampling of the text within its source, not the choice of source, lens or layers.
"""

from __future__ import annotations

import torch

from depthlens.analysis.drift.covariance import LayerCovariances, similarity_matrix
from depthlens.analysis.drift.transfer import Transfer, drift_correlation
from depthlens.errors import DriftError
from depthlens.stats.bootstrap import centred_interval, resample_counts

MIN_GROUPS = 8
"""Fewest groups of sequences the interval is computed from."""


def rho_samples(covariances: LayerCovariances, transfer: Transfer, remove_top: int = 0, *,
                resamples: int = 200, seed: int = 0) -> torch.Tensor:
    """ρ of each bootstrap draw, ``[resamples]`` float64 (NaN where a draw makes ρ undefined);
    ``remove_top`` principal components are removed from each covariance first, as in
    :func:`~depthlens.analysis.drift.covariance.similarity_matrix`."""
    if covariances.group_counts is None or transfer.group_targets is None:
        raise DriftError("the ρ interval needs per-group sums: pass the same groups= to stream_covariances and "
                         "transfer_matrix")
    groups = len(covariances.group_counts)
    if groups != len(transfer.group_targets) or groups < MIN_GROUPS:
        raise DriftError(f"the ρ interval needs the same {MIN_GROUPS} or more groups on both sides, got "
                         f"{groups} and {len(transfer.group_targets)}: give more sequences (--tokens)")
    counts = resample_counts(groups, resamples, seed)
    return torch.tensor([drift_correlation(similarity_matrix(covariances.resampled(draw), remove_top),
                                           transfer.resampled_ce_penalty(draw)) for draw in counts],
                        dtype=torch.float64)


def rho_interval(covariances: LayerCovariances, transfer: Transfer, remove_top: int = 0, *,
                 resamples: int = 200, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` bootstrap interval of ρ (see the module docstring); raises
    :class:`DriftError` when a draw leaves ρ undefined."""
    point = drift_correlation(similarity_matrix(covariances.covariance, remove_top), transfer.ce_penalty)
    samples = rho_samples(covariances, transfer, remove_top, resamples=resamples, seed=seed)
    if not bool(torch.isfinite(samples).all()):
        raise DriftError("ρ is undefined on some bootstrap draws (constant penalties or similarities): "
                         "check the lens, or give more text")
    return centred_interval(samples, point, level)


__all__ = ["MIN_GROUPS", "rho_interval", "rho_samples"]
