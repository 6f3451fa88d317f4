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
:func:`score_texts` fits a detector on a reference corpus and scores a batch of texts against it;
:func:`rank_texts` also puts each score on a stated scale, its **percentile among the reference
texts**: the share of reference texts whose held-out score (from a detector fit on the other
folds of the reference, :func:`held_out_scores`) is lower. Raw scores have no common unit across
detectors (LOF's is near 1 for an inlier, isolation forest's near 0.4–0.5, SRM's is a difference
of squared distances); a percentile near 100 means more anomalous than nearly every reference text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import DataError, ScoreError
from depthlens.lenses.readout import Readout

DETECTORS: tuple[str, ...] = ("isolation-forest", "lof", "srm")
"""The detector names :func:`make_detector` accepts."""
MIN_REFERENCE = 5
"""The fewest reference texts :func:`rank_texts` accepts (5 folds of at least one text)."""
FEW_REFERENCE = 30
"""Below this many reference texts percentiles move in coarse steps (the command warns)."""


class Detector(Protocol):
    """Fit on normal inputs ``[n, features]``; score inputs ``[m, features]`` → ``[m]``, higher =
    more anomalous."""

    def fit(self, features: np.ndarray) -> Detector: ...

    def score(self, features: np.ndarray) -> np.ndarray: ...


class SRM:
    """Simplified relative Mahalanobis distance: ``(x−μ)ᵀ(Σ + λI)⁻¹(x−μ) − (x−μ)ᵀ(D + λI)⁻¹(x−μ)``
    for the training mean ``μ``, covariance ``Σ`` and its diagonal ``D``; the ridge is
    ``λ = ridge · tr(Σ)/d`` (``relative``, the default) or ``λ = ridge`` (absolute, in the
    features' squared units)."""

    def __init__(self, ridge: float = 1e-2, *, relative: bool = True) -> None:
        if not ridge >= 0:
            raise ScoreError(f"SRM ridge {ridge}: must be a number ≥ 0 (e.g. 1e-2 relative, 1e-3 absolute)")
        self.ridge, self.relative = ridge, relative

    def fit(self, features: np.ndarray) -> SRM:
        """Estimate ``μ``, ``(Σ + λI)⁻¹`` and ``1/(diag Σ + λ)`` from ``features [n, d]``."""
        x = np.asarray(features, dtype=np.float64)
        self.mean = x.mean(0)
        centred = x - self.mean
        cov = centred.T @ centred / max(len(x) - 1, 1)
        self.variances = np.diag(cov).copy()
        self.lam = self.ridge * max(np.trace(cov) / cov.shape[0], 1e-12) if self.relative else self.ridge
        self.precision = np.linalg.inv(cov + self.lam * np.eye(cov.shape[0]))
        self.diagonal = 1.0 / (self.variances + self.lam)
        return self

    def parts(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two squared Mahalanobis distances of each row of ``features [m, d]``, full-covariance
        and diagonal, ``([m], [m])``; the score is their difference."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        return np.einsum("nd,de,ne->n", centred, self.precision, centred), (centred**2 * self.diagonal).sum(1)

    def score(self, features: np.ndarray) -> np.ndarray:
        """The SRM score of each row of ``features [m, d]``, ``[m]``."""
        full, diagonal = self.parts(features)
        return full - diagonal

    def spectrum(self) -> dict[str, float]:
        """How the fitted coordinates' variances compare with the ridge: the share of the total
        variance ``tr Σ`` in the 1 and the 10 coordinates of largest variance, ``λ``, and ``λ``
        over the median coordinate variance."""
        ordered = np.sort(self.variances)[::-1]
        total = max(float(ordered.sum()), 1e-300)
        return {"variance_share_top1": float(ordered[:1].sum() / total),
                "variance_share_top10": float(ordered[:10].sum() / total), "lambda": float(self.lam),
                "lambda_over_median_variance": float(self.lam / max(float(np.median(ordered)), 1e-300))}


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


def make_detector(name: str, seed: int = 0, **options: float | bool) -> Detector:
    """A fresh detector by name (:data:`DETECTORS`); ``options`` go to :class:`SRM` (``ridge``,
    ``relative``) and only there. :class:`ScoreError` for another name or options elsewhere."""
    if name == "srm":
        return SRM(**options)
    if name not in DETECTORS:
        raise ScoreError(f"unknown detector {name!r}: choose one of {', '.join(DETECTORS)}")
    if options:
        raise ScoreError(f"detector {name} takes no options ({', '.join(options)}); only srm has a ridge")
    return _Sklearn(name, seed)


def fit_score(name: str, normal: np.ndarray, test: np.ndarray, seed: int = 0, **options: float | bool) -> np.ndarray:
    """Fit detector ``name`` (with ``options``, see :func:`make_detector`) on ``normal [n, f]``
    and score ``test [m, f]`` → ``[m]``."""
    if len(normal) < 2:
        raise ScoreError(f"a detector needs at least 2 normal inputs to fit, got {len(normal)}")
    return make_detector(name, seed, **options).fit(normal).score(test)


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
    bar = tqdm(total=len(texts), desc="text trajectories", unit="text", disable=not progress)
    for begin in range(0, len(texts), batch_size):
        chunk = list(texts[begin: begin + batch_size])
        traj = Trajectory.from_text(model, tokenizer, readout, chunk, k=1, max_tokens=max_tokens)
        mask = traj.attention_mask[None].float()  # [1, batch, seq]
        count = mask.sum(-1).clamp_min(1)

        values = (traj.entropy, traj.kl_to_final, torch.log1p(traj.final_top1_rank.clamp_min(0).float()))
        stats = [(torch.nan_to_num(v.float()) * mask).sum(-1) / count for v in values]  # [rows, batch] each
        rows.append(torch.stack(stats, -1).permute(1, 0, 2).reshape(len(chunk), -1))
        bar.update(len(chunk))
    bar.close()
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


def read_texts(path: str, option: str = "texts") -> list[str]:
    """The non-blank texts of a file: one per line of a ``.txt`` file, else the documents of a
    text source (:func:`depthlens.text.sources.read_documents`: ``.jsonl``, ``.parquet``, …).
    :class:`~depthlens.errors.DataError`, naming ``option``, if it cannot be read or holds none."""
    from pathlib import Path

    from depthlens.text.sources import read_documents

    try:
        if path.lower().endswith(".txt"):
            texts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            texts = [doc.text for doc in read_documents(path) if doc.text.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{option} {path}: cannot read it ({getattr(error, 'strerror', None) or error}); "
                        "give a UTF-8 .txt file (one text per line), .jsonl or .parquet") from None
    if not texts:
        raise DataError(f"{option} {path} holds no text; give a file with one text per line")
    return texts


def held_out_scores(detector: str, normal: np.ndarray, *, seed: int = 0, folds: int = 5) -> np.ndarray:
    """Out-of-sample scores ``[n]`` of the normal rows ``normal [n, f]``: each of ``folds`` random
    folds is scored by a detector fit on the other folds."""
    order = np.random.default_rng(seed).permutation(len(normal))
    scores = np.empty(len(normal))
    for part in np.array_split(order, min(folds, len(normal))):
        scores[part] = fit_score(detector, normal[np.setdiff1d(order, part)], normal[part], seed)
    return scores


def percentile_among(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each of ``scores [m]``, the percentage (0–100) of ``reference [n]`` below it, a tie
    counted half."""
    ordered = np.sort(np.asarray(reference, dtype=np.float64))
    below = np.searchsorted(ordered, scores, "left")
    up_to = np.searchsorted(ordered, scores, "right")
    return 100.0 * (below + up_to) / (2 * len(ordered))


@dataclass
class TextScores:
    """Anomaly scores of texts, and where they fall among the reference texts."""

    scores: np.ndarray
    """The detector's score of each text ``[texts]`` (higher = more anomalous; no common unit)."""
    percentiles: np.ndarray
    """Percentage of reference texts with a lower held-out score ``[texts]``, 0–100."""
    reference: np.ndarray
    """Held-out scores of the reference texts ``[reference]`` (:func:`held_out_scores`)."""


def rank_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readout: Readout,
    reference: Sequence[str],
    texts: Sequence[str],
    *,
    detector: str = "lof",
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> TextScores:
    """Anomaly scores of ``texts`` against ``reference`` (as :func:`score_texts`) with their
    percentiles among the reference texts' held-out scores; needs :data:`MIN_REFERENCE` texts."""
    if len(reference) < MIN_REFERENCE:
        raise ScoreError(f"the reference corpus has {len(reference)} texts: give at least {MIN_REFERENCE} normal "
                         "texts (dozens are better) to put the scores on a scale")
    options = {"max_tokens": max_tokens, "batch_size": batch_size, "progress": progress}
    normal = text_features(model, tokenizer, readout, reference, **options)
    scores = fit_score(detector, normal, text_features(model, tokenizer, readout, texts, **options), seed)
    held_out = held_out_scores(detector, normal, seed=seed)
    return TextScores(scores, percentile_among(scores, held_out), held_out)


__all__ = [
    "DETECTORS", "FEW_REFERENCE", "MIN_REFERENCE", "SRM", "Detector", "TextScores", "fit_score", "held_out_scores",
    "make_detector", "percentile_among", "rank_texts", "read_texts", "score_texts", "text_features",
]
