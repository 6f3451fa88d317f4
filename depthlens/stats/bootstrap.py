"""Bootstrap confidence intervals over groups (e.g. groups of documents or chunks).

Tokens of one group are correlated, so intervals resample whole groups: each of ``resamples``
draws picks ``groups`` groups with replacement, giving counts ``c [resamples, groups]``; a
statistic of the count-weighted sums is computed per draw, and the interval is the central
``level`` quantile range of those (:func:`interval`), or that range moved so that its median sits
on the point estimate (:func:`centred_interval`, for plug-in statistics such as a KL between
marginal distributions, which resampling biases upwards). For one ``(groups, resamples, seed)``
every call draws the same counts, so intervals of different metrics over the same groups are
computed from the same draws.

Every group must hold data (a positive weight): a resample made only of empty groups has no
value. Callers make at most as many groups as they have chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

Statistic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``statistic(sums [resamples, ...], totals [resamples]) -> [resamples]`` (or ``[resamples, ...]``,
as :func:`weighted_means`)."""


def ratio(sums: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """``sums / totals`` (``[resamples]`` each): a weighted mean, e.g. summed nats over tokens."""
    return sums / totals


def resample_counts(groups: int, resamples: int, seed: int) -> torch.Tensor:
    """How often each group is drawn in each resample, ``[resamples, groups]`` float64 (each row
    sums to ``groups``); the same for the same arguments. Do not modify the result (it is cached)."""
    return _counts(groups, resamples, seed)


@lru_cache(maxsize=8)
def _counts(groups: int, resamples: int, seed: int) -> torch.Tensor:
    draws = _indices(groups, resamples, seed)
    return torch.zeros(resamples, groups, dtype=torch.float64).scatter_add_(1, draws, torch.ones(draws.shape,
                                                                                               dtype=torch.float64))


def resample_indices(groups: int, resamples: int, seed: int) -> torch.Tensor:
    """The groups drawn (with replacement) in each resample, ``[resamples, groups]`` int64: the
    draws that :func:`resample_counts` counts, so ``resample_counts(...)[r, g]`` is how often ``g``
    appears in row ``r``. Do not modify the result (it is cached)."""
    return _indices(groups, resamples, seed)


@lru_cache(maxsize=8)
def _indices(groups: int, resamples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(torch.ones(groups), groups * resamples, replacement=True, generator=generator)
    return draws.view(resamples, groups)


def bootstrap_samples(
    values: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    resamples: int = 500,
    seed: int = 0,
    statistic: Statistic = ratio,
) -> torch.Tensor:
    """The statistic on every resample, ``[resamples]`` float64.

    ``values [groups, ...]`` are per-group sums (any trailing shape, e.g. ``[groups, vocab]``),
    ``weights [groups]`` per-group totals (default: 1 per group). Each resample passes
    ``c @ values`` (``[resamples, ...]``, in ``values``' dtype) and ``c @ weights``
    (``[resamples]``) to ``statistic``.
    """
    groups = values.shape[0]
    counts = resample_counts(groups, resamples, seed)
    weights = torch.ones(groups, dtype=torch.float64) if weights is None else weights
    flat = values.reshape(groups, -1)
    sums = (counts.to(flat.dtype) @ flat).reshape(resamples, *values.shape[1:])
    totals = counts.to(weights.dtype) @ weights
    return statistic(sums, totals).double()


def weighted_means(sums: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """``sums [resamples, ...] / totals [resamples]``, dividing every trailing entry of a row by
    that row's total: many weighted means at once (e.g. a hit rate per layer, ``sums [resamples,
    layers]``), a :data:`Statistic` returning ``[resamples, ...]``."""
    return sums / totals.reshape(-1, *([1] * (sums.dim() - 1)))


def bootstrap_statistic(
    statistic: Callable[[torch.Tensor], torch.Tensor | np.ndarray],
    groups: int,
    *,
    resamples: int = 500,
    seed: int = 0,
) -> torch.Tensor:
    """``statistic(indices)`` on every resample, stacked: ``[resamples, ...]`` float64.

    ``indices [groups]`` int64 are one row of :func:`resample_indices` (the groups drawn with
    replacement, the same draws as :func:`bootstrap_samples` for these arguments); ``statistic``
    returns an array of any fixed shape ``[...]``. For a statistic that is no function of sums
    (e.g. one with quantile thresholds across the groups), recomputed on each resample. Several
    quantities returned by one statistic come from the same draws, so their difference is a
    paired bootstrap."""
    rows = resample_indices(groups, resamples, seed)
    return torch.stack([torch.as_tensor(statistic(row), dtype=torch.float64) for row in rows])


def group_bootstrap(
    values: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    resamples: int = 500,
    seed: int = 0,
    statistic: Statistic = ratio,
    level: float = 0.95,
) -> tuple[float, float]:
    """A ``level`` confidence interval ``(low, high)`` of ``statistic`` by resampling groups.

    ``values [groups, ...]`` are per-group sums and ``weights [groups]`` per-group totals; with the
    default :func:`ratio` statistic and ``values [groups]`` this is the interval of the weighted
    mean ``Σ values / Σ weights`` (in the units of ``values`` per unit of ``weights``, e.g. nats
    per token). See :func:`bootstrap_samples` for the statistic's arguments.
    """
    samples = bootstrap_samples(values, weights, resamples=resamples, seed=seed, statistic=statistic)
    return interval(samples, level)


def interval(samples: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` quantile range ``(low, high)`` of bootstrap ``samples [resamples]``."""
    tail = (1.0 - level) / 2
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    low, high = torch.quantile(samples.double(), quantiles).tolist()
    return low, high


def intervals(samples: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`interval` of every trailing entry of ``samples [resamples, ...]`` (e.g. one per
    layer of a curve): ``(low [...], high [...])`` float64."""
    tail = (1.0 - level) / 2
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    low, high = torch.quantile(samples.double(), quantiles, dim=0)
    return low, high


def centred_interval(samples: torch.Tensor, point: float, level: float = 0.95) -> tuple[float, float]:
    """:func:`interval` moved by ``point − median(samples)``: the bootstrap's spread around the
    point estimate, so the interval always contains ``point``. For an unbiased statistic (a
    weighted mean) the move is negligible; for a plug-in statistic that resampling biases (the KL
    of two marginal distributions grows when fewer distinct groups are drawn) it removes that
    median bias."""
    low, high = interval(samples, level)
    shift = point - torch.quantile(samples.double(), 0.5).item()
    return low + shift, high + shift


__all__ = ["Statistic", "bootstrap_samples", "bootstrap_statistic", "centred_interval", "group_bootstrap", "interval",
           "intervals", "ratio", "resample_counts", "resample_indices", "weighted_means"]
