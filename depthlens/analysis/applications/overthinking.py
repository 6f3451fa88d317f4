"""Overthinking the truth (Halawi et al. 2023), read through a lens (Belrose et al. 2023, §5.1).

Few-shot prompts whose demonstrations are answered correctly are compared with the same prompts
whose demonstration labels are permuted (label ``g`` shown as ``g + c mod n``). Per layer, each
readout's choice probabilities (softmax over the choices' log-likelihoods at that layer) give a
**calibrated accuracy** (:func:`calibrated_accuracy`): label ``j`` counts as predicted for an
input when its probability beats the ``(n − 1)/n`` quantile of label ``j``'s probability across
inputs, and an input is right when its gold label is predicted. Chance is ``1/n``. The **critical
layer** is the first where the gap ``correct − permuted`` reaches half the gap at the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.applications.features import ChoiceScores, score_choices
from depthlens.analysis.applications.tasks import Task, few_shot
from depthlens.lenses.readout import Readout


def choice_probs(loglik: np.ndarray) -> np.ndarray:
    """Probabilities over the choices ``[..., choices]`` from their log-likelihoods (softmax)."""
    shifted = loglik - loglik.max(-1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(-1, keepdims=True)


def calibrated_accuracy(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Calibrated accuracy per layer ``[layers]`` from ``probs [inputs, layers, choices]`` and
    ``gold [inputs]``: the fraction of inputs whose gold label's probability is strictly above
    that label's ``(n − 1)/n`` quantile across inputs (linear interpolation) at that layer."""
    n = probs.shape[-1]
    thresholds = np.quantile(probs, (n - 1) / n, axis=0)  # [layers, choices]
    gold_probs = np.take_along_axis(probs, gold[:, None, None], -1)[..., 0]  # [inputs, layers]
    gold_thresholds = thresholds[:, gold].T  # [inputs, layers]
    return (gold_probs > gold_thresholds).mean(0)


def critical_layer(gap: np.ndarray) -> int | None:
    """The first layer where ``gap [layers]`` reaches half its final value (for a positive final
    gap); ``None`` if the final gap is not positive."""
    final = float(gap[-1])
    if not final > 0:
        return None
    return int(np.flatnonzero(gap >= final / 2)[0])


@dataclass
class OverthinkingCurves:
    """Per-layer calibrated accuracies of one readout (``[L + 1]`` each)."""

    correct: list[float]
    permuted: list[float]
    gap: list[float]
    critical_layer: int | None


@dataclass
class OverthinkingResult:
    """What :func:`overthinking` measured."""

    task: str
    shots: int
    shift: int
    examples: int
    accuracy_correct: float
    accuracy_permuted: float
    curves: dict[str, OverthinkingCurves]
    num_choices: int = 2

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**{k: v for k, v in vars(self).items() if k != "curves"},
                "curves": {name: vars(c) for name, c in self.curves.items()}}

    def rows(self) -> list[dict]:
        """One row per readout and layer (for CSV)."""
        return [{"task": self.task, "readout": name, "layer": layer, "correct": c.correct[layer],
                 "permuted": c.permuted[layer], "gap": c.gap[layer]}
                for name, c in self.curves.items() for layer in range(len(c.gap))]


def curves_from_scores(correct: ChoiceScores, permuted: ChoiceScores) -> dict[str, OverthinkingCurves]:
    """Per-readout calibrated-accuracy curves of the two prompt sets (same examples, same order)."""
    curves = {}
    for name in correct.loglik:
        good = calibrated_accuracy(choice_probs(correct.loglik[name]), correct.gold)
        bad = calibrated_accuracy(choice_probs(permuted.loglik[name]), permuted.gold)
        curves[name] = OverthinkingCurves(good.tolist(), bad.tolist(), (good - bad).tolist(), critical_layer(good - bad))
    return curves


def overthinking(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readouts: Mapping[str, Readout],
    task: Task,
    *,
    shots: int = 4,
    shift: int = 1,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[OverthinkingResult, ChoiceScores, ChoiceScores]:
    """Score ``task``'s ``shots``-shot prompts with correct and with permuted (``+shift``)
    demonstrations under every readout; returns the curves and both sets of scores.

    ``limit`` examples are evaluated (default: all but ``shots``); the rest supply demonstrations."""
    options = {"batch_size": batch_size, "progress": progress}
    right = few_shot(task, shots, seed=seed, limit=limit)
    wrong = few_shot(task, shots, shift=shift, seed=seed, limit=limit)
    correct = score_choices(model, tokenizer, readouts, right.examples, description=f"{task.name} true demos", **options)
    permuted = score_choices(model, tokenizer, readouts, wrong.examples, description=f"{task.name} permuted", **options)
    result = OverthinkingResult(task.name, shots, shift, len(right.examples), correct.accuracy(), permuted.accuracy(),
                                curves_from_scores(correct, permuted), task.num_choices)
    return result, correct, permuted


__all__ = [
    "OverthinkingCurves", "OverthinkingResult", "calibrated_accuracy", "choice_probs", "critical_layer",
    "curves_from_scores", "overthinking",
]
