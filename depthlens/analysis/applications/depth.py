"""Prediction depth (Baldock et al. 2021, read with a lens as in Belrose et al. 2023, §5.3
and Table 2).

The **prediction depth** of a token (or an example) is the first layer from which the readout's
top-1 prediction equals the final one at every later layer: ``0`` if the top-1 never changes,
``L`` if it changes only at the last layer. The **iteration learned** is the same over training
checkpoints: the first checkpoint after which the model's prediction equals the final
checkpoint's at every later one. Both come from :func:`settling_index`.

Per token:

- :func:`token_depths` — from a :class:`~depthlens.analysis.trajectory.Trajectory`;
- :func:`depth_vs_training` — Spearman ρ between prediction depth (last checkpoint, each readout)
  and iteration learned, per token, over a list of checkpoints (model specs);
- :func:`depth_grid` — a :class:`~depthlens.stats.grid.Grid` of per-token depth over the text
  (like the paper's Figure 11), drawn by :func:`depthlens.viz.pictures.save_figure`.

Per multiple-choice example (the top-1 is the likeliest *choice*, ties going to the lowest choice
index, at every layer and checkpoint alike):

- :func:`example_depths` — prediction depth, from per-layer choice log-likelihoods;
- :func:`iteration_learned` — from the model's choice log-likelihoods at each checkpoint;
- :func:`example_correlation` — Spearman ρ between the two per readout, with a bootstrap
  interval over examples (:func:`spearman_interval`);
- :func:`word_counts`, :func:`frequency_ranked`, :func:`draw_distractors`,
  :func:`next_word_examples` — a next-word task from plain text with a known answer: the true
  next word against distractors of similar corpus frequency.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from depthlens.analysis.applications.tasks import Example
from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import ScoreError
from depthlens.lenses.readout import Readout
from depthlens.model.hidden_states import capture
from depthlens.model.unwrap import unwrap_model
from depthlens.stats.bootstrap import interval, resample_counts
from depthlens.stats.grid import Grid

WORD = re.compile(r"[A-Za-z']+")
"""A word of the text: ASCII letters and apostrophes (``king's`` and ``'tis`` are one word each)."""
NEXT_WORD = re.compile(r" ([a-z]+)(?![A-Za-z'])")
"""A whole all-lowercase word after a space: the answer of a next-word example."""


def settling_index(predictions: torch.Tensor | np.ndarray) -> torch.Tensor:
    """For ``predictions [steps, ...]`` (layers or checkpoints, in order), the first step from
    which every later prediction equals the last one, ``[...]`` long, in ``0 … steps − 1``."""
    p = torch.as_tensor(predictions)
    same = (p == p[-1:]).flip(0).long().cumprod(0)  # 1 while every step from the end agrees
    return p.shape[0] - same.sum(0)


def token_depths(trajectory: Trajectory) -> torch.Tensor:
    """Prediction depth of every token ``[batch, seq]`` (long; ``-1`` at padding). The trajectory
    must hold every layer ``0 … L``."""
    if list(trajectory.layers) != list(range(trajectory.num_layers + 1)):
        raise ScoreError("prediction depth needs every layer 0 … L: build the trajectory without layers=")
    depth = settling_index(trajectory.top_ids[..., 0])
    return torch.where(trajectory.attention_mask, depth, -1)


def example_depths(loglik: np.ndarray) -> np.ndarray:
    """Prediction depth of each example from per-layer choice log-likelihoods
    ``[examples, L + 1, choices]`` (nats), ``[examples]`` int64 in ``0 … L``: the first layer from
    which the likeliest choice (ties: the lowest index) equals layer ``L``'s at every later layer.
    For a lens, layer ``L`` decodes as the model does, so that is the model's own answer."""
    top = torch.as_tensor(np.asarray(loglik).argmax(-1)).T  # [layers, examples]
    return settling_index(top).numpy()


def iteration_learned(loglik: np.ndarray) -> np.ndarray:
    """Iteration learned of each example from the model's own choice log-likelihoods at each
    training checkpoint, ``[checkpoints, examples, choices]`` (in training order): the first
    checkpoint index from which the model's likeliest choice equals the last checkpoint's at every
    later checkpoint, ``[examples]`` int64 in ``0 … checkpoints − 1``."""
    loglik = np.asarray(loglik)
    if loglik.ndim != 3 or loglik.shape[0] < 2:
        raise ScoreError(f"iteration learned needs log-likelihoods [checkpoints ≥ 2, examples, choices], got {loglik.shape}")
    return settling_index(torch.as_tensor(loglik.argmax(-1))).numpy()


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (1-based), ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation ρ of ``x [n]`` and ``y [n]`` (ties at average ranks); NaN if
    either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ScoreError(f"Spearman's ρ needs two equally long lists of at least 2 values, got {x.shape} and {y.shape}")
    rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def _resampled_ranks(x: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The average rank (1-based) of each of the ``n`` values ``x`` within each resample that
    holds value ``i`` ``counts[r, i]`` times, ``[resamples, n]`` float64."""
    values, inverse = np.unique(x, return_inverse=True)
    per_value = np.stack([np.bincount(inverse, weights=row, minlength=len(values)) for row in counts])
    below = per_value.cumsum(1) - per_value
    return (below + (per_value + 1) / 2)[:, inverse]


def spearman_interval(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, resamples: int = 500, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """The ``level`` bootstrap interval ``(low, high)`` of :func:`spearman` of ``x [n]`` and
    ``y [n]`` over their ``n`` pairs: each resample takes the pairs as often as
    :func:`~depthlens.stats.bootstrap.resample_counts` draws them, and its ρ is the Spearman ρ of
    that multiset (ranks recomputed on it, ties at average ranks). Resamples where one side is
    constant have no ρ and are left out; ``(nan, nan)`` if every resample is."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    spearman(x, y)  # checks the shapes
    counts = resample_counts(len(x), resamples, seed).numpy()
    centre = (len(x) + 1) / 2  # the mean rank of every resample of n pairs
    dx, dy = _resampled_ranks(x, counts) - centre, _resampled_ranks(y, counts) - centre
    spread = (counts * dx**2).sum(1) * (counts * dy**2).sum(1)
    samples = torch.from_numpy((counts * dx * dy).sum(1)[spread > 0] / np.sqrt(spread[spread > 0]))
    return interval(samples, level) if len(samples) else (float("nan"), float("nan"))


@dataclass
class ExampleCorrelation:
    """Spearman ρ between per-example prediction depth and iteration learned, per readout."""

    rho: dict[str, float]
    interval: dict[str, tuple[float, float]]
    """The 95% bootstrap interval of each ρ over examples (:func:`spearman_interval`)."""
    mean_depth: dict[str, float]
    """Mean prediction depth per readout, in layers (``0 … L``)."""
    examples: int
    checkpoints: int
    mean_iteration: float
    """Mean iteration learned, as a checkpoint index (``0 … checkpoints − 1``)."""
    agreement: dict[str, float]
    """Per readout, the fraction of examples whose likeliest choice at layer ``L`` is the last
    checkpoint's (1 when both come from the same model, as they should)."""
    depth_counts: dict[str, list[int]]
    """Per readout, how many examples have each prediction depth ``0 … L`` (ties of ρ)."""
    iteration_counts: list[int]
    """How many examples have each iteration learned ``0 … checkpoints − 1``."""

    def to_dict(self) -> dict:
        return {**vars(self), "interval": {name: list(bounds) for name, bounds in self.interval.items()}}


def example_correlation(
    loglik: Mapping[str, np.ndarray], checkpoint_loglik: np.ndarray, *, resamples: int = 500, seed: int = 0
) -> ExampleCorrelation:
    """ρ between each example's prediction depth under each readout (``loglik``: name →
    ``[examples, L + 1, choices]`` of the last checkpoint) and its iteration learned
    (``checkpoint_loglik [checkpoints, examples, choices]``, the model's own output at each
    checkpoint in training order), with bootstrap intervals over examples."""
    learned = iteration_learned(checkpoint_loglik)
    last = np.asarray(checkpoint_loglik)[-1].argmax(-1)
    rho, bounds, mean_depth, agreement, depth_counts = {}, {}, {}, {}, {}
    for name, scores in loglik.items():
        if np.shape(scores)[0] != len(learned):
            raise ScoreError(f"readout {name!r} scored {np.shape(scores)[0]} examples but the checkpoints {len(learned)}")
        depth = example_depths(scores)
        rho[name] = spearman(depth, learned)
        bounds[name] = spearman_interval(depth, learned, resamples=resamples, seed=seed)
        mean_depth[name] = float(depth.mean())
        agreement[name] = float((np.asarray(scores)[:, -1].argmax(-1) == last).mean())
        depth_counts[name] = np.bincount(depth, minlength=np.shape(scores)[1]).tolist()
    return ExampleCorrelation(rho, bounds, mean_depth, len(learned), len(checkpoint_loglik), float(learned.mean()),
                              agreement, depth_counts, np.bincount(learned, minlength=len(checkpoint_loglik)).tolist())


def word_counts(texts: Iterable[str]) -> Counter[str]:
    """How often each all-lowercase :data:`WORD` (``[a-z]+``, no apostrophe) occurs in ``texts``."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word in WORD.findall(text) if word.isalpha() and word.islower())
    return counts


def frequency_ranked(counts: Mapping[str, int], min_count: int = 1) -> list[str]:
    """The words counted at least ``min_count`` times, most frequent first (ties alphabetical)."""
    return sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))


def draw_distractors(ranked: Sequence[str], position: int, k: int, window: int, rng: random.Random) -> list[str]:
    """``k`` distinct words drawn by ``rng`` from the ``2 · window`` words nearest in frequency
    rank to ``ranked[position]`` (``ranked``: distinct words, most frequent first), never that word
    itself. The window of ``2 · window + 1`` ranks is centred on ``position`` and slides inward at
    either end of the list."""
    if not 0 <= position < len(ranked):
        raise ScoreError(f"rank {position} is outside the {len(ranked)} ranked words")
    if not 0 <= k <= 2 * window < len(ranked):
        raise ScoreError(f"cannot draw {k} distractors from ±{window} ranks of {len(ranked)} words: "
                         f"need k ≤ 2·window < words")
    low = min(max(0, position - window), len(ranked) - 2 * window - 1)
    pool = [word for word in ranked[low : low + 2 * window + 1] if word != ranked[position]]
    return rng.sample(pool, k)


def next_word_examples(
    texts: Sequence[str], ranked: Sequence[str], *, count: int, seed: int, choices: int = 4, window: int = 25,
    context_chars: int = 128,
) -> list[Example]:
    """``count`` next-word examples from ``texts``, drawn by ``seed``: at a :data:`NEXT_WORD` whose
    word is in ``ranked`` (see :func:`frequency_ranked`) and has ``context_chars`` characters of
    text before it, the prompt is that text (from its first whitespace on, so it starts with a
    whole word) and the choices are the true word and ``choices − 1`` :func:`draw_distractors`, each
    with its leading space, in a seeded order (``gold`` is the true word's place). Ids are
    ``"<text index>:<character offset>"``."""
    rank = {word: i for i, word in enumerate(ranked)}
    sites = [(t, match.start(), match.group(1)) for t, text in enumerate(texts) for match in NEXT_WORD.finditer(text)
             if match.start() >= context_chars and match.group(1) in rank]
    if len(sites) < count:
        raise ScoreError(f"the texts hold {len(sites)} usable next words but {count} examples were asked for")
    rng = random.Random(seed)
    examples = []
    for t, start, word in sorted(rng.sample(sites, count)):
        before = texts[t][start - context_chars : start]
        space = re.search(r"\s", before)
        options = [word, *draw_distractors(ranked, rank[word], choices - 1, window, rng)]
        rng.shuffle(options)
        examples.append(Example(before[space.end():] if space else before, tuple(f" {w}" for w in options),
                                options.index(word), f"{t}:{start}"))
    return examples


@torch.no_grad()
def model_top1(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's own top-1 next token at every position ``[batch, seq]`` (long)."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.long().to(device)).logits
    return logits.argmax(-1).cpu()


@dataclass
class DepthCorrelation:
    """Spearman ρ between per-token prediction depth and iteration learned, per readout."""

    rho: dict[str, float]
    mean_depth: dict[str, float]
    tokens: int
    checkpoints: int
    mean_iteration: float

    def to_dict(self) -> dict:
        return dict(vars(self))


def depth_vs_training(
    checkpoints: Sequence[str | nn.Module],
    final_model: nn.Module,
    readouts: Mapping[str, Readout],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    load: Callable[[str], nn.Module] | None = None,
    progress: bool = True,
) -> DepthCorrelation:
    """ρ between the prediction depth of every token under each readout (which decode
    ``final_model``, the last checkpoint) and the checkpoint at which the model learned its final
    prediction there.

    ``checkpoints`` are in training order, as models or model specs (loaded one at a time with
    ``load``, default :func:`depthlens.load_model`); ``input_ids``/``attention_mask`` ``[batch, seq]``."""
    if len(checkpoints) < 2:
        raise ScoreError(f"iteration learned needs at least 2 checkpoints, got {len(checkpoints)}")
    if load is None:
        from depthlens.model.load import load_model

        def load(spec: str) -> nn.Module:
            return load_model(spec)[0]

    predictions = []
    for checkpoint in tqdm(checkpoints, desc="checkpoints", disable=not progress):
        model = load(checkpoint) if isinstance(checkpoint, str) else checkpoint
        predictions.append(model_top1(model, input_ids, attention_mask))
    learned = settling_index(torch.stack(predictions))
    keep = attention_mask.bool()
    first = next(iter(readouts.values()))
    states = capture(final_model, input_ids, attention_mask, parts=first.parts)
    rho, mean_depth = {}, {}
    for name, readout in readouts.items():
        depth = settling_index(torch.stack([logits.argmax(-1).cpu() for _, logits in readout.iter_logits(states)]))
        rho[name] = spearman(depth[keep].numpy(), learned[keep].numpy())
        mean_depth[name] = float(depth[keep].float().mean())
    return DepthCorrelation(rho, mean_depth, int(keep.sum()), len(checkpoints), float(learned[keep].float().mean()))


def depth_grid(
    trajectory: Trajectory, *, batch: int = 0, width: int = 16, max_chars: int = 8, name: str | None = None
) -> Grid:
    """Per-token prediction depth over the text of one trajectory row ``batch``: the tokens in
    reading order, ``width`` per grid row (first line at the top), each cell coloured by depth
    and showing its token. Lines are evened out (at most ``width`` tokens, as many lines as
    ``width`` needs, all but the last full), so the last line is nearly full and a text shorter
    than ``width`` is one line of its own length: few empty cells."""
    if width < 1:
        raise ScoreError(f"--width {width}: a line of the depth picture needs at least 1 token; use e.g. --width 16")
    depth = token_depths(trajectory)[batch]
    ids = trajectory.input_ids[batch][trajectory.attention_mask[batch]].tolist()
    depth = depth[trajectory.attention_mask[batch]].tolist()
    lines = max(1, -(-len(ids) // width))
    width = max(1, -(-len(ids) // lines))
    values = np.full((lines, width), np.nan)
    text = [[""] * width for _ in range(lines)]
    for i, (token, d) in enumerate(zip(ids, depth)):
        row, col = lines - 1 - i // width, i % width
        values[row, col] = d
        text[row][col] = trajectory.labels.get(token, f"#{token}")[:max_chars]
    label = name or trajectory.lens_name
    return Grid(
        values=values, row_labels=[f"{(lines - 1 - r) * width}" for r in range(lines)],
        col_labels=[str(c) for c in range(width)], cell_text=text, title=f"prediction depth · {label}",
        name=label, source=trajectory.model_name, quantity="prediction depth", unit="",
        value_range=(0.0, float(trajectory.num_layers)), row_title="first token of line", col_title="token in line",
        value_format=".0f",
    )


__all__ = [
    "NEXT_WORD", "WORD", "DepthCorrelation", "ExampleCorrelation", "depth_grid", "depth_vs_training",
    "draw_distractors", "example_correlation", "example_depths", "frequency_ranked", "iteration_learned", "model_top1",
    "next_word_examples", "settling_index", "spearman", "spearman_interval", "token_depths", "word_counts",
]
