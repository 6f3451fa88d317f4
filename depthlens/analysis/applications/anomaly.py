"""Anomaly detectors on prediction trajectories, and generic anomaly scores for free text.

Every detector is fit on normal inputs only and scores new ones, **higher = more anomalous**:

- ``"isolation-forest"``: :class:`sklearn.ensemble.IsolationForest` on standardised features;
- ``"lof"``: :class:`sklearn.neighbors.LocalOutlierFactor` in novelty mode on standardised features;
- ``"srm"``: the simplified relative Mahalanobis distance (Ren et al. 2021), :class:`SRM` — the
  squared Mahalanobis distance under the full covariance minus that under the diagonal one, each
  with a small ridge; the tuned-lens paper's injection-detection baseline on raw hidden states
  (§5.2; the baseline's details are quoted from memory of the full paper, unverified).

:func:`text_features` turns free texts into trajectory features (per layer, the mean over tokens
of the entropy, the KL to the model's output, and ``log(1 + rank)`` of the model's top-1 token);
:func:`score_texts` fits a detector on a reference corpus and scores a batch of texts against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import ScoreError
from depthlens.lenses.readout import Readout

DETECTORS: tuple[str, ...] = ("isolation-forest", "lof", "srm")
"""The detector names :func:`make_detector` accepts."""


class Detector(Protocol):
    """Fit on normal inputs ``[n, features]``; score inputs ``[m, features]`` → ``[m]``, higher =
    more anomalous."""

    def fit(self, features: np.ndarray) -> Detector: ...

    def score(self, features: np.ndarray) -> np.ndarray: ...


class SRM:
    """Simplified relative Mahalanobis distance: ``(x−μ)ᵀ(Σ + λI)⁻¹(x−μ) − (x−μ)ᵀ(D + λI)⁻¹(x−μ)``
    for the training mean ``μ``, covariance ``Σ`` and its diagonal ``D``; ``λ = ridge · tr(Σ)/d``."""

    def __init__(self, ridge: float = 1e-2) -> None:
        self.ridge = ridge

    def fit(self, features: np.ndarray) -> SRM:
        """Estimate ``μ``, ``(Σ + λI)⁻¹`` and ``1/(diag Σ + λ)`` from ``features [n, d]``."""
        x = np.asarray(features, dtype=np.float64)
        self.mean = x.mean(0)
        centred = x - self.mean
        cov = centred.T @ centred / max(len(x) - 1, 1)
        lam = self.ridge * max(np.trace(cov) / cov.shape[0], 1e-12)
        self.precision = np.linalg.inv(cov + lam * np.eye(cov.shape[0]))
        self.diagonal = 1.0 / (np.diag(cov) + lam)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """The SRM score of each row of ``features [m, d]``, ``[m]``."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        full = np.einsum("nd,de,ne->n", centred, self.precision, centred)
        return full - (centred**2 * self.diagonal).sum(1)


class _Sklearn:
    """A scikit-learn novelty detector on standardised features, its score negated."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed

    def fit(self, features: np.ndarray) -> _Sklearn:
        from sklearn.ensemble import IsolationForest
        from sklearn.neighbors import LocalOutlierFactor
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(features)
        x = self.scaler.transform(features)
        if self.name == "isolation-forest":
            self.model = IsolationForest(n_estimators=200, random_state=self.seed).fit(x)
        else:
            self.model = LocalOutlierFactor(n_neighbors=max(1, min(20, len(x) - 1)), novelty=True).fit(x)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        return -self.model.score_samples(self.scaler.transform(features))


def make_detector(name: str, seed: int = 0) -> Detector:
    """A fresh detector by name (:data:`DETECTORS`); :class:`ScoreError` for another name."""
    if name == "srm":
        return SRM()
    if name in DETECTORS:
        return _Sklearn(name, seed)
    raise ScoreError(f"unknown detector {name!r}: choose one of {', '.join(DETECTORS)}")


def fit_score(name: str, normal: np.ndarray, test: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fit detector ``name`` on ``normal [n, f]`` and score ``test [m, f]`` → ``[m]``."""
    if len(normal) < 2:
        raise ScoreError(f"a detector needs at least 2 normal inputs to fit, got {len(normal)}")
    return make_detector(name, seed).fit(normal).score(test)


@torch.no_grad()
def text_features(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: Readout,
    texts: Sequence[str],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Trajectory features of free ``texts``, ``[texts, 3 · (L + 1)]``: for each layer, the mean
    over the text's tokens of the readout's entropy (nats), KL(model ‖ readout) (nats) and
    ``log(1 + rank of the model's top-1 token)``; layer by layer, in that order."""
    rows = []
    for begin in tqdm(range(0, len(texts), batch_size), desc="text trajectories", disable=not progress):
        chunk = list(texts[begin: begin + batch_size])
        traj = Trajectory.from_text(model, tokenizer, readout, chunk, k=1, max_tokens=max_tokens)
        mask = traj.attention_mask[None].float()  # [1, batch, seq]
        count = mask.sum(-1).clamp_min(1)

        def mean(values: torch.Tensor) -> torch.Tensor:
            return (torch.nan_to_num(values.float()) * mask).sum(-1) / count  # [rows, batch]

        stats = [mean(traj.entropy), mean(traj.kl_to_final), mean(torch.log1p(traj.final_top1_rank.clamp_min(0).float()))]
        rows.append(torch.stack(stats, -1).permute(1, 0, 2).reshape(len(chunk), -1))
    return torch.cat(rows).numpy().astype(np.float64)


def score_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: Readout,
    reference: Sequence[str],
    texts: Sequence[str],
    *,
    detector: str = "lof",
    seed: int = 0,
    max_tokens: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Anomaly scores ``[len(texts)]`` of ``texts`` against a ``reference`` corpus of normal texts
    (higher = more anomalous), from their trajectory features (:func:`text_features`)."""
    if len(reference) < 2:
        raise ScoreError(f"the reference corpus has {len(reference)} texts: give at least 2 normal texts (dozens are better)")
    options = {"max_tokens": max_tokens, "progress": progress}
    normal = text_features(model, tokenizer, readout, reference, **options)
    return fit_score(detector, normal, text_features(model, tokenizer, readout, texts, **options), seed)


__all__ = ["DETECTORS", "SRM", "Detector", "fit_score", "make_detector", "score_texts", "text_features"]
