"""Prediction trajectories: what a lens predicts at every layer and position, in bounded memory.

A :class:`Trajectory` holds, for each row (a layer ``0 … L``; the last row is always layer ``L``,
the model's own output), batch item and position:

- the ``k`` most likely next tokens under the lens and their probabilities,
- the entropy of the lens distribution, its KL divergence from the model's final distribution
  ``KL(final ‖ lens)``, and the cross-entropy to the actual next token, all in nats,
- the rank, under the lens, of the model's top-1 token (0 = the lens agrees with the model),
- the lens's top-1 probability.

Only these are stored, about ``rows × tokens × (12 k + 24)`` bytes, never full-vocabulary
distributions. They are computed one chunk of positions at a time, and within a chunk one layer at
a time through :meth:`~depthlens.lenses.lens.Lens.iter_logits`, so ``[layers, tokens, vocab]`` never
exists: besides the hidden states and the model's logits, the working memory is about six
float32 buffers ``[chunk_tokens, vocab]``, 64 MiB each by default.

Divergences between two lenses need both full distributions at once, so :func:`compare_lenses`
computes them from the hidden states rather than from two trajectories.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.atomic import write_file
from depthlens.errors import DataError, TrajectoryError
from depthlens.model.hidden_states import HiddenStates, capture
from depthlens.lenses.lens import Lens
from depthlens.text.tokens import token_label

CHUNK_ELEMENTS = 2**24
"""Default chunk size: a chunk holds at most this many ``tokens × vocab`` floats (64 MiB). Smaller
chunks use less memory; larger ones run fewer, longer tensor operations, which matters most when
other processes compete for the cores."""

_EXP_FLOOR = -80.0
"""Shifted logits are raised to at least this before ``exp``: ``exp(-80) ≈ 2e-35`` is nothing next
to the top token's 1, and it keeps ``exp`` off the very slow subnormal path."""

LABEL_CHARS = 40
"""Token labels are stored up to this many characters; pictures shorten them further."""


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


def shorten(label: str, max_chars: int) -> str:
    """``label`` cut to ``max_chars`` characters, the last one ``…``, if it is longer."""
    return label if len(label) <= max_chars else label[: max_chars - 1] + "…"


def encode(
    tokenizer: PreTrainedTokenizerBase, text: str | Sequence[str], max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize one text or a batch, keeping at most ``max_tokens`` tokens of each.

    Returns ``(input_ids, attention_mask)``, both ``[batch, seq]``; shorter texts are padded on
    the right and their padding has mask ``False``. Raises :class:`DataError` for an empty text.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or any(not t.strip() for t in texts):
        raise DataError("the text is empty: give at least one non-blank text")
    encoded = [tokenizer(t).input_ids[:max_tokens] for t in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in encoded], dtype=torch.long)
    attention_mask = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in encoded])
    return input_ids, attention_mask


@dataclass
class Trajectory:
    """Top-``k`` predictions and scalar statistics of one lens at every layer and position.

    Rows are :attr:`layers`, whose last entry is always ``num_layers`` (the model's output, taken
    from the model's own logits). Positions where ``attention_mask`` is ``False`` hold NaN (float
    fields) or ``-1`` (integer fields). Build one with :meth:`from_text`, :meth:`from_ids` or
    :meth:`from_states`.
    """

    input_ids: torch.Tensor
    """Input tokens ``[batch, seq]``, ``torch.long``."""
    attention_mask: torch.Tensor
    """Which positions are real tokens, ``[batch, seq]``, ``torch.bool``."""
    layers: tuple[int, ...]
    """The layer of each row, increasing; the last is ``num_layers``."""
    num_layers: int
    """The model's number of blocks ``L``."""
    top_ids: torch.Tensor
    """The lens's ``k`` most likely next tokens ``[rows, batch, seq, k]``, ``torch.long``."""
    top_probs: torch.Tensor
    """Their probabilities ``[rows, batch, seq, k]``, float32."""
    entropy: torch.Tensor
    """Entropy of the lens distribution ``[rows, batch, seq]``, float32, nats."""
    kl_to_final: torch.Tensor
    """``KL(final ‖ lens) = Σ p_final (log p_final − log p_lens)`` ``[rows, batch, seq]``,
    float32, nats; 0 (up to rounding) on the last row."""
    ce: torch.Tensor
    """``−log p_lens(next token)`` ``[rows, batch, seq]``, float32, nats; NaN at a text's last
    position, which has no next token."""
    final_top1_rank: torch.Tensor
    """How many tokens have a strictly higher lens logit than the model's top-1 token
    ``[rows, batch, seq]``, ``torch.long``; 0 where the lens's top-1 is the model's."""
    max_prob: torch.Tensor
    """The lens's top-1 probability ``[rows, batch, seq]``, float32."""
    labels: dict[int, str]
    """A readable label (:func:`~depthlens.text.tokens.token_label`) for every id in
    :attr:`input_ids` and :attr:`top_ids`."""
    lens_kind: str
    """``Lens.kind`` of the lens, e.g. ``"logit"`` or ``"tuned"``."""
    lens_name: str
    """How pictures and tables name the lens."""
    model_name: str
    """The model's name or path."""

    @classmethod
    def from_text(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        lens: Lens,
        text: str | Sequence[str],
        *,
        k: int = 5,
        layers: Sequence[int] | None = None,
        max_tokens: int | None = None,
        chunk_tokens: int | None = None,
        lens_name: str | None = None,
    ) -> Trajectory:
        """Tokenize ``text`` (one string or a batch, see :func:`encode`), run ``model`` once and
        build the trajectory of ``lens``; the other arguments are those of :meth:`from_states`."""
        input_ids, attention_mask = encode(tokenizer, text, max_tokens)
        return cls.from_ids(
            model, lens, input_ids, attention_mask, tokenizer=tokenizer, k=k, layers=layers,
            chunk_tokens=chunk_tokens, lens_name=lens_name,
        )

    @classmethod
    def from_ids(
        cls,
        model: nn.Module,
        lens: Lens,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        k: int = 5,
        layers: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
        lens_name: str | None = None,
    ) -> Trajectory:
        """Run ``model`` once on ``input_ids [batch, seq]`` and build the trajectory of ``lens``.

        Raises :class:`DataError` if the text is longer than the model's context window.
        """
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and input_ids.shape[-1] > limit:
            raise DataError(
                f"the text has {input_ids.shape[-1]} tokens but the model reads at most {limit}; "
                "keep fewer tokens (max_tokens)"
            )
        states = capture(model, input_ids, attention_mask, parts=lens.parts)
        return cls.from_states(
            lens, states, attention_mask, tokenizer=tokenizer, k=k, layers=layers,
            chunk_tokens=chunk_tokens, lens_name=lens_name,
        )

    @classmethod
    @torch.no_grad()
    def from_states(
        cls,
        lens: Lens,
        states: HiddenStates,
        attention_mask: torch.Tensor | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        k: int = 5,
        layers: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
        lens_name: str | None = None,
    ) -> Trajectory:
        """Build the trajectory of ``lens`` from captured hidden states.

        ``layers`` picks the rows (default: every layer ``0 … L``); layer ``L`` is always added
        and is read from ``states.logits``. Positions are processed ``chunk_tokens`` tokens at a
        time (default: :data:`CHUNK_ELEMENTS` divided by the vocabulary size). Statistics are
        computed in float32 from finite logits. Without a ``tokenizer``, labels are ``#id``.
        """
        rows = _rows(layers, lens.num_layers)
        input_ids = states.input_ids.to(states.logits.device)
        batch, seq = input_ids.shape
        vocab = states.logits.shape[-1]
        if not 1 <= k <= vocab:
            raise TrajectoryError(f"k must be between 1 and the vocabulary size {vocab}, got {k}")
        mask = _mask(attention_mask, input_ids)
        targets = torch.full_like(input_ids, -1)
        targets[:, :-1] = torch.where(mask[:, 1:], input_ids[:, 1:], -1)

        shape = (len(rows), batch, seq)
        top_ids = torch.empty(*shape, k, dtype=torch.long)
        top_probs = torch.empty(*shape, k)
        stats = {name: torch.empty(shape) for name in ("entropy", "kl_to_final", "ce", "max_prob")}
        rank = torch.empty(shape, dtype=torch.long)

        positions = max(1, (chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)) // batch)
        for start in range(0, seq, positions):
            window = slice(start, min(seq, start + positions))
            width = window.stop - window.start
            final = _FinalDistribution(states.logits[:, window], targets[:, window])
            chunk_states = [state[:, window] for state in states.states]
            decoded = (logits for _, logits in lens.iter_logits(chunk_states, rows[:-1]))
            for row, logits in enumerate(itertools.chain(decoded, [states.logits[:, window]])):
                cell = final.statistics(logits, k)
                top_ids[row, :, window] = cell.top_ids.view(batch, width, k).cpu()
                top_probs[row, :, window] = cell.top_probs.view(batch, width, k).cpu()
                rank[row, :, window] = cell.rank.view(batch, width).cpu()
                for name in stats:
                    stats[name][row, :, window] = getattr(cell, name).view(batch, width).cpu()

        padding = ~mask.cpu()
        top_ids[:, padding] = -1
        rank[:, padding] = -1
        top_probs[:, padding] = math.nan
        for tensor in stats.values():
            tensor[:, padding] = math.nan
        input_ids = input_ids.cpu()
        return cls(
            input_ids=input_ids,
            attention_mask=mask.cpu(),
            layers=rows,
            num_layers=lens.num_layers,
            top_ids=top_ids,
            top_probs=top_probs,
            final_top1_rank=rank,
            labels=_labels(tokenizer, torch.cat([input_ids.flatten(), top_ids.flatten()])),
            lens_kind=lens.kind,
            lens_name=lens_name or f"{lens.kind} lens",
            model_name=lens.parts.model_name,
            **stats,
        )

    @property
    def k(self) -> int:
        """Number of top tokens kept per cell."""
        return self.top_ids.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the trajectory's tensors."""
        tensors = (self.input_ids, self.attention_mask, self.top_ids, self.top_probs, self.entropy,
                   self.kl_to_final, self.ce, self.final_top1_rank, self.max_prob)
        return sum(t.nelement() * t.element_size() for t in tensors)

    def stat(self, name: str) -> torch.Tensor:
        """Statistic ``name`` (see :data:`STATISTICS`) as float32 ``[rows, batch, seq]``, NaN at
        padding; nats for ``entropy``/``kl``/``ce``, a count for ``rank``, a probability for
        ``prob``."""
        values = getattr(self, statistic(name).attribute).float()
        return values.masked_fill(~self.attention_mask, math.nan)

    def label(self, token_id: int, max_chars: int | None = None) -> str:
        """The readable label of ``token_id`` (empty for ``-1``, the id at padding), shortened to
        ``max_chars`` if given."""
        text = self.labels.get(int(token_id), "") if token_id >= 0 else ""
        return text if max_chars is None else shorten(text, max_chars)

    def input_labels(self, batch: int = 0, max_chars: int | None = None) -> list[str]:
        """Labels of the real (unpadded) input tokens of batch item ``batch``."""
        ids = self.input_ids[batch][self.attention_mask[batch]]
        return [self.label(t, max_chars) for t in ids.tolist()]

    def top1_labels(self, batch: int = 0, max_chars: int | None = None) -> list[list[str]]:
        """Labels of the top-1 prediction ``[rows][positions]`` of batch item ``batch``, real
        positions only."""
        top1 = self.top_ids[:, batch, self.attention_mask[batch], 0]
        return [[self.label(t, max_chars) for t in row] for row in top1.tolist()]

    def strided(self, step: int) -> Trajectory:
        """The rows whose layer is a multiple of ``step``, plus the output row."""
        if step < 1:
            raise TrajectoryError(f"the layer stride must be at least 1, got {step}")
        keep = [i for i, layer in enumerate(self.layers) if layer % step == 0 or i == len(self.layers) - 1]
        return self.select_rows(keep)

    def select_rows(self, rows: Sequence[int]) -> Trajectory:
        """A trajectory with only the given row indices (not layer numbers), in that order."""
        index = torch.tensor(list(rows), dtype=torch.long)
        return replace(
            self,
            layers=tuple(self.layers[i] for i in rows),
            top_ids=self.top_ids[index],
            top_probs=self.top_probs[index],
            entropy=self.entropy[index],
            kl_to_final=self.kl_to_final[index],
            ce=self.ce[index],
            final_top1_rank=self.final_top1_rank[index],
            max_prob=self.max_prob[index],
        )

    def to_dataframe(self) -> pd.DataFrame:
        """A tidy table, one row per layer × batch item × position × statistic (real positions
        only), with columns ``lens, layer, batch, position, token, prediction, statistic, value``:
        ``token`` is the input token at the position, ``prediction`` the lens's top-1 label."""
        rows, batch, seq = self.entropy.shape
        layer, item, position = np.meshgrid(np.array(self.layers), np.arange(batch), np.arange(seq), indexing="ij")
        keep = self.attention_mask.expand(rows, batch, seq).numpy().ravel()
        token = np.array([self.label(t) for t in self.input_ids.flatten().tolist()], dtype=object)
        prediction = [self.label(t) for t in self.top_ids[..., 0].flatten().tolist()]
        cells = pd.DataFrame({
            "lens": self.lens_name,
            "layer": layer.ravel(),
            "batch": item.ravel(),
            "position": position.ravel(),
            "token": np.tile(token, rows),
            "prediction": prediction,
        })[keep]
        frames = [
            cells.assign(statistic=name, value=self.stat(name).numpy().ravel()[keep]) for name in STATISTICS
        ]
        return pd.concat(frames, ignore_index=True)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dataframe` to ``path`` as CSV, atomically; returns the path."""
        return write_file(path, self.to_dataframe().to_csv(index=False).encode())

    def summary(self, batch: int = 0) -> str:
        """A compact text table: per row, the mean of each statistic over the positions of batch
        item ``batch`` (the median for the rank) and the top-1 prediction at its last position."""
        mask = self.attention_mask[batch]
        last = int(mask.nonzero().max())
        means = {name: self.stat(name)[:, batch, mask].nanmean(-1) for name in ("entropy", "kl", "ce", "prob")}
        ranks = self.stat("rank")[:, batch, mask].median(-1).values
        lines = [
            f"{self.lens_name} on {self.model_name}, {int(mask.sum())} tokens: means over positions "
            "(entropy, kl, ce in nats), median rank, top-1 at the last position",
            f"{'layer':>6} {'entropy':>8} {'kl':>8} {'ce':>8} {'rank':>7} {'prob':>6}  "
            f"after {self.label(int(self.input_ids[batch, last]), 12)}",
        ]
        for row, layer in enumerate(self.layers):
            name = "output" if layer == self.num_layers else str(layer)
            lines.append(
                f"{name:>6} {means['entropy'][row]:8.3f} {means['kl'][row]:8.3f} {means['ce'][row]:8.3f} "
                f"{ranks[row]:7.0f} {means['prob'][row]:6.3f}  {self.label(int(self.top_ids[row, batch, last, 0]), 12)}"
            )
        return "\n".join(lines)


@dataclass
class LensDivergence:
    """Per-cell divergences between two lenses' distributions, from :func:`compare_lenses`.

    Tensors are float32 ``[rows, batch, seq]`` with NaN at padding; rows are :attr:`layers`.
    """

    layers: tuple[int, ...]
    kl: torch.Tensor
    """``KL(a ‖ b) = Σ p_a (log p_a − log p_b)``, nats."""
    js: torch.Tensor
    """Jensen–Shannon divergence ``½ KL(a ‖ m) + ½ KL(b ‖ m)`` with ``m = (p_a + p_b) / 2``, nats,
    between 0 and ``ln 2``."""
    tv: torch.Tensor
    """Total variation distance ``½ Σ |p_a − p_b|``, between 0 and 1."""


@torch.no_grad()
def compare_lenses(
    lens_a: Lens,
    lens_b: Lens,
    states: HiddenStates,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
    chunk_tokens: int | None = None,
) -> LensDivergence:
    """KL, Jensen–Shannon and total variation between the distributions of two lenses of one
    model at every layer (``layers``, default all; ``L`` always added) and position of ``states``,
    computed in float32 one layer and one chunk of ``chunk_tokens`` tokens at a time."""
    if lens_a.num_layers != lens_b.num_layers:
        raise TrajectoryError(f"the lenses have {lens_a.num_layers} and {lens_b.num_layers} layers: they belong to different models")
    rows = _rows(layers, lens_a.num_layers)
    batch, seq = states.input_ids.shape
    vocab = states.logits.shape[-1]
    out = {name: torch.empty(len(rows), batch, seq) for name in ("kl", "js", "tv")}
    positions = max(1, (chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)) // batch)
    for start in range(0, seq, positions):
        window = slice(start, min(seq, start + positions))
        chunk_states = [state[:, window] for state in states.states]
        pairs = zip(lens_a.iter_logits(chunk_states, rows), lens_b.iter_logits(chunk_states, rows))
        for row, ((_, logits_a), (_, logits_b)) in enumerate(pairs):
            log_p, log_q = logits_a.float().log_softmax(-1), logits_b.float().log_softmax(-1)
            p, q = log_p.exp(), log_q.exp()
            log_m = torch.logaddexp(log_p, log_q) - math.log(2)
            out["kl"][row, :, window] = _expectation(p, log_p, log_q).cpu()
            js = 0.5 * _expectation(p, log_p, log_m) + 0.5 * _expectation(q, log_q, log_m)
            out["js"][row, :, window] = js.cpu()
            out["tv"][row, :, window] = (0.5 * (p - q).abs().sum(-1)).cpu()
    padding = ~_mask(attention_mask, states.input_ids).cpu()
    for tensor in out.values():
        tensor[:, padding] = math.nan
    return LensDivergence(layers=rows, **out)


def _expectation(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """``Σ p (log p − log r)`` over the last axis, with ``0 · log 0 = 0``, clamped at 0."""
    return torch.where(p > 0, p * (log_p - log_r), 0.0).sum(-1).clamp_min(0.0)


@dataclass
class _Cell:
    """Statistics of one layer for one chunk of ``n`` tokens (every tensor's first axis is ``n``)."""

    top_ids: torch.Tensor
    top_probs: torch.Tensor
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    ce: torch.Tensor
    rank: torch.Tensor
    max_prob: torch.Tensor


class _FinalDistribution:
    """The model's distribution over one chunk of ``n`` tokens, and how each layer is scored
    against it, reusing two scratch buffers ``[n, vocab]``.

    With ``t = z − max z`` (``z`` a layer's logits), ``S = Σ exp t`` and ``q = exp(t) / S``:
    ``H(q) = log S − Σ q t``, ``KL(p ‖ q) = Σ p log p − Σ p t + log S · Σ p`` and
    ``−log q(x) = log S − t_x``; each sum is one pass over the chunk.
    """

    def __init__(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        final = logits.reshape(-1, logits.shape[-1]).float()
        log_final = final.log_softmax(-1)
        self.probs = log_final.exp()
        self.mass = self.probs.sum(-1)
        self.neg_entropy = (self.probs * log_final).sum(-1)
        self.top1 = final.argmax(-1, keepdim=True)
        self.targets = targets.reshape(-1, 1).to(final.device)
        self.shifted = torch.empty_like(final)
        self.work = torch.empty_like(final)

    def statistics(self, logits: torch.Tensor, k: int) -> _Cell:
        """Statistics of one layer's logits ``[..., vocab]`` over this chunk."""
        z = logits.reshape(-1, logits.shape[-1]).float()
        shifted, work = self.shifted, self.work
        top_logits, top_ids = z.topk(k, dim=-1)
        torch.sub(z, top_logits[:, :1], out=shifted)
        log_total = torch.clamp(shifted, min=_EXP_FLOOR, out=work).exp_().sum(-1).log()
        lens_expectation = work.mul_(shifted).sum(-1)
        final_expectation = torch.mul(self.probs, shifted, out=work).sum(-1)
        target_shifted = shifted.gather(-1, self.targets.clamp_min(0)).squeeze(-1)
        rank = torch.gt(z, z.gather(-1, self.top1), out=work).sum(-1)
        top_probs = (top_logits - top_logits[:, :1] - log_total[:, None]).exp()
        return _Cell(
            top_ids=top_ids,
            top_probs=top_probs,
            entropy=log_total - lens_expectation * torch.exp(-log_total),
            kl_to_final=(self.neg_entropy - final_expectation + log_total * self.mass).clamp_min(0.0),
            ce=torch.where(self.targets.squeeze(-1) >= 0, log_total - target_shifted, math.nan),
            rank=rank.long(),
            max_prob=top_probs[:, 0],
        )


def _rows(layers: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """Sorted unique layers with ``num_layers`` added; :class:`TrajectoryError` if out of range."""
    chosen = range(num_layers + 1) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer <= num_layers]
    if bad:
        raise TrajectoryError(f"layers {bad} are out of range: this model has layers 0 … {num_layers}")
    return tuple(sorted({*chosen, num_layers}))


def _mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.to(input_ids.device).bool()


def _labels(tokenizer: PreTrainedTokenizerBase | None, ids: torch.Tensor) -> dict[int, str]:
    unique = [int(t) for t in ids.unique().tolist() if t >= 0]
    if tokenizer is None:
        return {t: f"#{t}" for t in unique}
    return {t: token_label(tokenizer, t, LABEL_CHARS) for t in unique}


__all__ = [
    "CHUNK_ELEMENTS",
    "LABEL_CHARS",
    "STATISTICS",
    "LensDivergence",
    "Statistic",
    "Trajectory",
    "TrajectoryError",
    "compare_lenses",
    "encode",
    "shorten",
    "statistic",
]
