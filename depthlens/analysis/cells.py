"""Per-cell statistics of a readout over captured hidden states, computed chunk by chunk.

A *cell* is one row (a layer ``0 … L``; the last row is always ``L``, read from the model's own
logits), batch item and position. :meth:`Cells.compute` fills every cell's top-``k`` tokens and
probabilities, entropy, ``KL(final ‖ readout)``, cross-entropy to the next token (nats, see
:class:`~depthlens.stats.logit_statistics.LogitStatistics`; in one compiled kernel where the
work is large, :func:`~depthlens.stats.fused.fused_wanted`), the rank of the model's top-1 token
and the top-1 probability. Positions are processed in windows of at most ``chunk_tokens`` tokens,
and within a window one layer at a time, so ``[layers, tokens, vocab]`` never exists. The helpers here
(layer selection, masks, windows) are shared by :mod:`~depthlens.analysis.trajectory` and
:mod:`~depthlens.analysis.compare`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from depthlens.errors import TrajectoryError
from depthlens.lenses.readout import Readout
from depthlens.model.hidden_states import HiddenStates
from depthlens.stats.fused import fused_wanted
from depthlens.stats.logit_statistics import LogitStatistics


@dataclass(frozen=True)
class Statistic:
    """One per-cell statistic of a :class:`Trajectory`."""

    name: str
    """Short name, as in the ``--stat`` option and the tidy table."""
    attribute: str
    """The :class:`Trajectory` field that holds it."""
    title: str
    """What it is and its unit, for titles and hover text."""
    short: str
    """A short form of the title, for colour bars and table headers."""


STATISTICS: dict[str, Statistic] = {
    stat.name: stat
    for stat in (
        Statistic("entropy", "entropy", "entropy of the lens distribution (nats)", "entropy (nats)"),
        Statistic("kl", "kl_to_final", "KL(model ‖ lens) (nats)", "KL(model ‖ lens) (nats)"),
        Statistic("ce", "ce", "cross-entropy to the next token (nats)", "cross-entropy (nats)"),
        Statistic("rank", "final_top1_rank", "rank of the model's top-1 token under the lens", "rank of model's top-1"),
        Statistic("prob", "max_prob", "top-1 probability of the lens", "top-1 probability"),
    )
}
"""The statistics a trajectory holds, by short name."""


def statistic(name: str) -> Statistic:
    """The :class:`Statistic` called ``name``; :class:`TrajectoryError` naming the valid ones if
    there is none."""
    if name not in STATISTICS:
        raise TrajectoryError(f"unknown statistic {name!r}: choose one of {', '.join(STATISTICS)}")
    return STATISTICS[name]


CHUNK_ELEMENTS = 2**26
"""Default chunk size: a chunk holds at most this many ``tokens × vocab`` floats (256 MiB): 1365
tokens of smollm2's 49k vocabulary, 256 of gemma3's 262k. The unembedding of fewer than about
200 tokens at once runs well below the processor's speed (64 tokens of gemma3 cost 1.5× as much
per token as 256), so smaller chunks save memory but cost time."""


@dataclass
class Cells:
    """The per-cell tensors of a trajectory being built, ``[rows, batch, seq]`` (``[..., k]`` for
    the top-k), named as the :class:`Trajectory` fields."""

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    ce: torch.Tensor
    final_top1_rank: torch.Tensor
    max_prob: torch.Tensor

    @classmethod
    def empty(cls, rows: int, batch: int, seq: int, k: int) -> Cells:
        shape = (rows, batch, seq)
        return cls(
            top_ids=torch.empty(*shape, k, dtype=torch.long),
            top_probs=torch.empty(*shape, k),
            **{name: torch.empty(shape) for name in ("entropy", "kl_to_final", "ce", "max_prob")},
            final_top1_rank=torch.empty(shape, dtype=torch.long),
        )

    @classmethod
    def compute(
        cls, readout: Readout, states: HiddenStates, mask: torch.Tensor, rows: Sequence[int], k: int,
        chunk_tokens: int | None = None, kernel: bool | None = None,
    ) -> Cells:
        """Every cell of ``rows`` (from :func:`layer_rows`) for ``states``; ``mask [batch, seq]``
        (bool, on the logits' device) marks real tokens, the others get ``-1`` or NaN. ``kernel``:
        statistics by the compiled kernel (default: :func:`fused_wanted` for this work). Raises
        :class:`TrajectoryError` unless ``1 ≤ k ≤ vocab``."""
        input_ids = states.input_ids.to(states.logits.device)
        vocab = states.logits.shape[-1]
        if not 1 <= k <= vocab:
            raise TrajectoryError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
        targets = torch.full_like(input_ids, -1)
        targets[:, :-1] = torch.where(mask[:, 1:], input_ids[:, 1:], -1)
        cells = cls.empty(len(rows), *input_ids.shape, k)
        if kernel is None:
            kernel = kernel_wanted(states, rows)
        for window in chunk_windows(*input_ids.shape, vocab, chunk_tokens):
            scorer = LogitStatistics(states.logits[:, window], targets[:, window], fused=kernel)
            chunk_states = states.map_states(lambda state, window=window: state[:, window])
            decoded = (logits for _, logits in readout.iter_logits(chunk_states, rows[:-1]))
            for row, logits in enumerate(itertools.chain(decoded, [states.logits[:, window]])):
                cells.fill(row, window, logits, scorer)
        cells.mask(~mask.cpu())
        return cells

    def fill(self, row: int, window: slice, logits: torch.Tensor, scorer: LogitStatistics) -> None:
        """Store row ``row`` at positions ``window`` from one layer's ``logits [batch, width, vocab]``."""
        batch, k = self.top_ids.shape[1], self.top_ids.shape[-1]
        scores = scorer(logits, k=k)
        top_logits, top_ids = scores.top_logits, scores.top_ids
        top_probs = (top_logits - top_logits[:, :1] - scores.log_normaliser[:, None]).exp()
        self.top_ids[row, :, window] = top_ids.view(batch, -1, k).cpu()
        self.top_probs[row, :, window] = top_probs.view(batch, -1, k).cpu()
        values = (scores.entropy, scores.kl, scores.ce, scores.rank, top_probs[:, 0])
        targets = (self.entropy, self.kl_to_final, self.ce, self.final_top1_rank, self.max_prob)
        for value, target in zip(values, targets):
            target[row, :, window] = value.view(batch, -1).cpu()

    def mask(self, padding: torch.Tensor) -> None:
        """Set the cells at ``padding [batch, seq]`` to ``-1`` (ids, ranks) or NaN."""
        for tensor in vars(self).values():
            tensor[:, padding] = -1 if tensor.dtype == torch.long else math.nan


def layer_rows(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Sorted unique ``layers`` (default ``0 … num_layers``) with ``num_layers`` added;
    :class:`TrajectoryError` if one is out of range."""
    chosen = range(num_layers + 1) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer <= num_layers]
    if bad:
        raise TrajectoryError(f"layers {bad} are out of range: this model has layers 0 … {num_layers}")
    return tuple(sorted({*chosen, num_layers}))


def position_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` as ``torch.bool [batch, seq]`` on ``input_ids``' device (all ``True``
    if ``None``)."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.to(input_ids.device).bool()


def kernel_wanted(states: HiddenStates, rows: Sequence[int]) -> bool:
    """Whether the statistics of ``rows`` over ``states`` are work enough for the compiled kernel
    (:func:`~depthlens.stats.fused.fused_wanted`)."""
    return fused_wanted(len(rows) * states.input_ids.numel() * states.logits.shape[-1], states.logits.device)


def chunk_windows(batch: int, seq: int, vocab: int, chunk_tokens: int | None = None) -> list[slice]:
    """Position windows of near-equal width covering ``0 … seq``, each with at most
    ``chunk_tokens`` tokens (over the ``batch``; default :data:`CHUNK_ELEMENTS` ``// vocab``) and
    at least one position. Equal widths keep every window's unembedding efficient: 508 positions
    in windows of at most 341 become 254 + 254, not 341 + 167."""
    most = max(1, (chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)) // batch)
    count = math.ceil(seq / most) if seq else 0
    bounds = [round(index * seq / count) for index in range(count + 1)]
    return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


__all__ = ["CHUNK_ELEMENTS", "Cells", "chunk_windows", "kernel_wanted", "layer_rows", "position_mask"]
