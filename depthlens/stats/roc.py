"""ROC curves and the area under them (AUROC), with bootstrap intervals.

Scores are anomaly scores: **higher means more anomalous**, and ``labels`` mark the anomalies
(``True``/``1``) among normal inputs (``False``/``0``). The AUROC is the probability that a random
anomaly scores above a random normal input, ties counting one half (the Mann–Whitney U statistic
divided by ``n_pos · n_neg``): a perfect score gives 1, a constant one 0.5, a reversed one 0.

Intervals resample anomalies and normal inputs separately (a stratified bootstrap, so every
resample has both), with :func:`depthlens.stats.bootstrap.resample_counts`; for several seeds of
an experiment, :func:`pooled_interval` pools their bootstrap samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from depthlens.errors import ScoreError
from depthlens.stats.bootstrap import interval, resample_counts


def _check(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """``scores [n]`` float64 and ``labels [n]`` bool; :class:`ScoreError` if they cannot be used."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ScoreError(f"{s.size} scores but {y.size} labels: give one label per score")
    if not np.isfinite(s).all():
        raise ScoreError("the scores contain NaN or infinite values: score every input with a finite number")
    if y.all() or not y.any():
        raise ScoreError("the labels hold one class only: an AUROC needs both anomalies (True) and normal inputs (False)")
    return s, y


def _wins(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``w [n_pos, n_neg]``: 1 where the anomaly scores higher, ½ for a tie, 0 else."""
    pos, neg = s[y][:, None], s[~y][None, :]
    return (pos > neg).astype(np.float64) + 0.5 * (pos == neg)


def auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores [n]`` (higher = more anomalous) for ``labels [n]``,
    between 0 and 1; ties count one half."""
    s, y = _check(scores, labels)
    return float(_wins(s, y).mean())


def roc_curve(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """``(false_positive_rate, true_positive_rate)``, each ``[k]`` from ``(0, 0)`` to ``(1, 1)``,
    one point per distinct threshold (tied scores move both rates at once)."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fps / (~y).sum()], np.r_[0.0, tps / y.sum()]


def bootstrap_auroc(
    scores: np.ndarray | Sequence[float],
    labels: np.ndarray | Sequence[bool],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """The AUROC of ``resamples`` stratified bootstrap resamples, ``[resamples]`` float64.

    Anomalies and normal inputs are resampled separately with replacement; a resample's AUROC is
    ``Σ c_i d_j w_ij / (Σ c_i · Σ d_j)`` for draw counts ``c`` (anomalies) and ``d`` (normal)."""
    s, y = _check(scores, labels)
    wins = torch.from_numpy(_wins(s, y))
    c = resample_counts(int(y.sum()), resamples, seed)
    d = resample_counts(int((~y).sum()), resamples, seed + 1)
    values = ((c @ wins) * d).sum(1) / (c.sum(1) * d.sum(1))
    return values.numpy()


def auroc_interval(
    scores: np.ndarray | Sequence[float],
    labels: np.ndarray | Sequence[bool],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(auroc, low, high)``: the AUROC and its ``level`` stratified-bootstrap interval."""
    samples = bootstrap_auroc(scores, labels, resamples=resamples, seed=seed)
    low, high = interval(torch.from_numpy(samples), level)
    return auroc(scores, labels), low, high


def pooled_interval(samples: Sequence[np.ndarray], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` interval of several seeds' bootstrap samples pooled together: it covers both
    the sampling noise within a seed and the spread between seeds (splits, detector seeds)."""
    pooled = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.float64) for s in samples]))
    return interval(pooled, level)


__all__ = ["ScoreError", "auroc", "auroc_interval", "bootstrap_auroc", "pooled_interval", "roc_curve"]
