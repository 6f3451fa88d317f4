"""Overthinking the truth (Halawi et al. 2023), read through a lens (Belrose et al. 2023, §5.1).

Few-shot prompts whose demonstrations are answered correctly are compared with the same prompts
whose demonstration labels are permuted (label ``g`` shown as ``g + c mod n``). Per layer, each
readout's choice probabilities (softmax over the choices' log-likelihoods at that layer) give a
**calibrated accuracy** (:func:`calibrated_accuracy`): label ``j`` counts as predicted for an
input when its probability beats the ``(n − 1)/n`` quantile of label ``j``'s probability across
inputs (ties at the quantile share the places left), and an input is right when its gold label is
predicted. Chance is ``1/n``. The **critical
layer** is the first where the gap ``correct − permuted`` reaches half the gap at the output.

Every curve carries a 95% percentile-bootstrap interval over the evaluated examples
(:func:`curve_samples`): each resample draws the examples with replacement and recomputes the
calibrated accuracy, thresholds included, on both prompt sets from the same draw, so the gap's
interval is paired (what the two prompt sets share cancels, as it does in the gap itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.applications.features import ChoiceScores, score_choices
from depthlens.analysis.applications.tasks import Task, few_shot
from depthlens.errors import TaskError
from depthlens.lenses.readout import Readout
from depthlens.stats.bootstrap import bootstrap_statistic, intervals

MIN_EVALUATED = 10
"""The fewest evaluated examples the ``overthink`` command accepts: each label's threshold is a
quantile across them."""
FEW_EVALUATED = 40
"""Below this many evaluated examples calibrated accuracy moves in coarse steps (the command warns)."""
RESAMPLES = 1000
"""Bootstrap resamples of the examples behind every curve's interval."""
LEVEL = 0.95
"""The intervals' confidence level."""
INTERVALS = {"level": LEVEL, "resamples": RESAMPLES, "seed": 0,
             "method": "percentile bootstrap over examples, calibrated accuracy recomputed on each resample; "
                       "correct and permuted prompts of the same drawn examples, so the gap's interval is paired"}
"""How the ``*_low`` / ``*_high`` curves were computed (written with them)."""


def choice_probs(loglik: np.ndarray) -> np.ndarray:
    """Probabilities over the choices ``[..., choices]`` from their log-likelihoods (softmax)."""
    shifted = loglik - loglik.max(-1, keepdims=True)
    p = np.exp(shifted)
    return p / p.sum(-1, keepdims=True)


def calibrated_accuracy(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Calibrated accuracy per layer ``[layers]`` from ``probs [inputs, layers, choices]`` and
    ``gold [inputs]``: label ``j`` is predicted for the ``inputs / n`` inputs where its probability
    is highest, i.e. above label ``j``'s ``(n − 1)/n`` quantile across inputs (linear
    interpolation); an input scores 1 when its gold label is predicted.

    Inputs tied at the quantile share the places left among them (the expected score of a random
    tie-break), so a readout that gives every input the same probabilities scores chance, ``1/n``,
    not 0: at layer 0 the answer position holds the same token in every prompt, so a lens has
    little there that tells the inputs apart."""
    inputs, n = probs.shape[0], probs.shape[-1]
    thresholds = np.quantile(probs, (n - 1) / n, axis=0)  # [layers, choices]
    above = probs > thresholds  # [inputs, layers, choices]
    tied = probs == thresholds
    spare = np.clip(inputs / n - above.sum(0), 0.0, None)  # places left at the quantile [layers, choices]
    share = np.minimum(spare / np.maximum(tied.sum(0), 1), 1.0)
    credit = above + tied * share  # [inputs, layers, choices]
    return np.take_along_axis(credit, gold[:, None, None], -1)[..., 0].mean(0)


def critical_layer(gap: np.ndarray) -> int | None:
    """The first layer where ``gap [layers]`` reaches half its final value (for a positive final
    gap); ``None`` if the final gap is not positive."""
    final = float(gap[-1])
    if not final > 0:
        return None
    return int(np.flatnonzero(gap >= final / 2)[0])


@dataclass
class OverthinkingCurves:
    """Per-layer calibrated accuracies of one readout (``[L + 1]`` each, fractions of examples) and
    the bounds of their bootstrap intervals (``*_low``, ``*_high``, ``[L + 1]`` each)."""

    correct: list[float]
    permuted: list[float]
    gap: list[float]
    critical_layer: int | None
    correct_low: list[float]
    correct_high: list[float]
    permuted_low: list[float]
    permuted_high: list[float]
    gap_low: list[float]
    gap_high: list[float]


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
    intervals: dict[str, object] = field(default_factory=lambda: dict(INTERVALS))
    """How the curves' intervals were computed (:data:`INTERVALS` unless set otherwise)."""

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {**{k: v for k, v in vars(self).items() if k != "curves"},
                "curves": {name: vars(c) for name, c in self.curves.items()}}

    def rows(self) -> list[dict]:
        """One row per readout and layer (for CSV), with every curve's interval bounds."""
        return [{"task": self.task, "readout": name, "layer": layer,
                 **{key: values[layer] for key, values in vars(c).items() if key != "critical_layer"}}
                for name, c in self.curves.items() for layer in range(len(c.gap))]


def check_contrast(task: Task, shots: int, shift: int) -> None:
    """Refuse settings under which the correct and the permuted prompts are identical."""
    if shots < 1:
        raise TaskError(f"--shots {shots}: without demonstrations there are no labels to permute, so both runs "
                        "would be the same; use --shots 1 or more (default 4)")
    if shift % task.num_choices == 0:
        raise TaskError(f"--shift {shift} moves each of the {task.num_choices} labels of task {task.name} onto itself, "
                        f"so both runs would be the same; use a shift from 1 to {task.num_choices - 1}")


def curve_samples(
    correct: np.ndarray, permuted: np.ndarray, gold: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0
) -> torch.Tensor:
    """Calibrated accuracies of bootstrap resamples of the examples, ``[resamples, 3, layers]``
    float64 (correct, permuted, gap = correct − permuted), from choice probabilities ``correct`` and
    ``permuted`` ``[examples, layers, choices]`` of the same examples (same order) and their
    ``gold [examples]``. Each resample draws the examples with replacement
    (:func:`~depthlens.stats.bootstrap.bootstrap_statistic`) and scores both prompt sets on that
    same draw, thresholds recomputed, so the gap is paired."""

    def statistic(drawn: torch.Tensor) -> np.ndarray:
        rows = drawn.numpy()
        good = calibrated_accuracy(correct[rows], gold[rows])
        bad = calibrated_accuracy(permuted[rows], gold[rows])
        return np.stack([good, bad, good - bad])

    return bootstrap_statistic(statistic, len(gold), resamples=resamples, seed=seed)


def curves_from_scores(
    correct: ChoiceScores, permuted: ChoiceScores, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, OverthinkingCurves]:
    """Per-readout calibrated-accuracy curves of the two prompt sets (same examples, same order),
    each with its ``level`` bootstrap interval per layer (:func:`curve_samples`); ``ValueError``
    if the two sets hold different examples (a paired interval needs the same ones)."""
    if correct.ids != permuted.ids or not np.array_equal(correct.gold, permuted.gold):
        raise ValueError("the correct and the permuted prompts must score the same examples in the same order")
    curves = {}
    for name in correct.loglik:
        good_probs, bad_probs = choice_probs(correct.loglik[name]), choice_probs(permuted.loglik[name])
        good = calibrated_accuracy(good_probs, correct.gold)
        bad = calibrated_accuracy(bad_probs, correct.gold)
        samples = curve_samples(good_probs, bad_probs, correct.gold, resamples=resamples, seed=seed)
        low, high = (bound.tolist() for bound in intervals(samples, level))
        curves[name] = OverthinkingCurves(good.tolist(), bad.tolist(), (good - bad).tolist(), critical_layer(good - bad),
                                          low[0], high[0], low[1], high[1], low[2], high[2])
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

    ``limit`` examples are evaluated (default: all but ``shots``); the rest supply demonstrations.
    :class:`~depthlens.errors.TaskError` if the two prompt sets would be the same (``shots < 1``,
    or ``shift`` a multiple of the number of choices)."""
    check_contrast(task, shots, shift)
    options = {"batch_size": batch_size, "progress": progress}
    right = few_shot(task, shots, seed=seed, limit=limit)
    wrong = few_shot(task, shots, shift=shift, seed=seed, limit=limit)
    correct = score_choices(model, tokenizer, readouts, right.examples, description=f"{task.name} true demos", **options)
    permuted = score_choices(model, tokenizer, readouts, wrong.examples, description=f"{task.name} permuted", **options)
    result = OverthinkingResult(task.name, shots, shift, len(right.examples), correct.accuracy(), permuted.accuracy(),
                                curves_from_scores(correct, permuted), task.num_choices)
    return result, correct, permuted


__all__ = [
    "FEW_EVALUATED", "INTERVALS", "LEVEL", "MIN_EVALUATED", "RESAMPLES", "OverthinkingCurves", "OverthinkingResult",
    "calibrated_accuracy", "check_contrast", "choice_probs", "critical_layer", "curve_samples", "curves_from_scores",
    "overthinking",
]
