"""Prediction trajectories: what a readout predicts at every layer and position, in bounded memory.

A :class:`Trajectory` holds, for each row (a layer ``0 … L``; the last row is always layer ``L``,
the model's own output; a lens inside the blocks gives half-layer rows ``0.5 … L − 0.5``, see
:mod:`depthlens.analysis.trajectory_halves`), batch item and position:

- the ``k`` most likely next tokens under the readout and their probabilities,
- the entropy of the readout's distribution, its KL divergence from the model's final
  distribution ``KL(final ‖ lens)``, and the cross-entropy to the actual next token, all in nats
  (defined in :mod:`depthlens.stats.divergences`),
- the rank, under the readout, of the model's top-1 token (0 = the readout agrees with the model),
- the readout's top-1 probability.

Only these are stored, about ``rows × tokens × (12 k + 24)`` bytes, never full-vocabulary
distributions. They are computed one chunk of positions at a time, and within a chunk one layer at
a time through :meth:`~depthlens.lenses.readout.Readout.iter_logits`, so ``[layers, tokens, vocab]``
never exists: besides the hidden states and the model's logits, the working memory is about three
float32 buffers ``[chunk_tokens, vocab]``, 256 MiB each by default, and two cache-sized scratch
buffers (:class:`~depthlens.stats.logit_statistics.LogitStatistics`).

Any :class:`~depthlens.lenses.readout.Readout` works, not only lenses. Divergences between two
readouts are in :mod:`depthlens.analysis.compare`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.cells import (
    CHUNK_ELEMENTS,
    STATISTICS,
    Cells,
    Statistic,
    kernel_wanted,
    layer_rows,
    position_mask,
    statistic,
)
from depthlens.atomic import write_file
from depthlens.errors import DataError, TrajectoryError
from depthlens.lenses.mid import check_site, site_of
from depthlens.lenses.readout import Readout
from depthlens.model.architecture import ModelParts
from depthlens.model.hidden_states import HiddenStates, capture, depth, depth_label
from depthlens.model.precision import DtypeName, computing_in, float32_logits, resolve_dtype
from depthlens.model.unwrap import unwrap_model
from depthlens.text.encode import encode
from depthlens.text.tokens import token_label

if TYPE_CHECKING:
    import pandas as pd

LABEL_CHARS = 40
"""Token labels are stored up to this many characters; pictures shorten them further."""


def shorten(label: str, max_chars: int) -> str:
    """``label`` cut to ``max_chars`` characters, the last one ``…``, if it is longer."""
    return label if len(label) <= max_chars else label[: max_chars - 1] + "…"


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
    layers: tuple[float, ...]
    """The depth of each row, increasing; the last is ``num_layers``. Row ``l`` decodes state
    ``l`` (the output of block ``l − 1``); row ``i + 0.5`` decodes mid state ``i``, after block
    ``i``'s attention (:func:`~depthlens.model.hidden_states.depth`)."""
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
    """``kind`` of the readout, e.g. ``"logit"`` or ``"tuned"``."""
    lens_name: str
    """How pictures and tables name the lens."""
    model_name: str
    """The model's name or path."""

    @classmethod
    def from_text(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        lens: Readout,
        text: str | Sequence[str],
        *,
        k: int = 5,
        layers: Sequence[int] | None = None,
        max_tokens: int | None = None,
        chunk_tokens: int | None = None,
        lens_name: str | None = None,
        dtype: DtypeName | torch.dtype = "float32",
    ) -> Trajectory:
        """Tokenize ``text`` (one string or a batch, see :func:`encode`), run ``model`` once and
        build the trajectory of ``lens`` (any :class:`Readout`); the other arguments are those of
        :meth:`from_ids`."""
        input_ids, attention_mask = encode(tokenizer, text, max_tokens)
        return cls.from_ids(
            model, lens, input_ids, attention_mask, tokenizer=tokenizer, k=k, layers=layers,
            chunk_tokens=chunk_tokens, lens_name=lens_name, dtype=dtype,
        )

    @classmethod
    def from_ids(
        cls,
        model: nn.Module,
        lens: Readout,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        k: int = 5,
        layers: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
        lens_name: str | None = None,
        dtype: DtypeName | torch.dtype = "float32",
    ) -> Trajectory:
        """Run ``model`` once on ``input_ids [batch, seq]`` and build the trajectory of ``lens``;
        ``dtype`` sets the precision of the products of the forward pass (unless the family keeps it
        in float32: :meth:`~depthlens.model.architecture.ModelParts.forward_dtype`) and of the
        decoding, as in :meth:`from_states`.

        Raises :class:`DataError` if the text is longer than the model's context window.
        """
        model = unwrap_model(model)
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and input_ids.shape[-1] > limit:
            raise DataError(
                f"the text has {input_ids.shape[-1]} tokens but the model reads at most {limit}; "
                "keep fewer tokens (max_tokens)"
            )
        device = next(model.parameters()).device
        products = resolve_dtype(dtype, device)
        with computing_in(lens.parts.forward_dtype(products), device):
            states = capture(model, input_ids, attention_mask, parts=lens.parts, site=site_of(lens))
        return cls.from_states(
            lens, states, attention_mask, tokenizer=tokenizer, k=k, layers=layers,
            chunk_tokens=chunk_tokens, lens_name=lens_name, dtype=products,
        )

    @classmethod
    @torch.no_grad()
    def from_states(
        cls,
        lens: Readout,
        states: HiddenStates,
        attention_mask: torch.Tensor | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        k: int = 5,
        layers: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
        lens_name: str | None = None,
        dtype: DtypeName | torch.dtype = "float32",
    ) -> Trajectory:
        """Build the trajectory of ``lens`` from captured hidden states of its site (mid states
        for a lens inside the blocks, whose rows are then at depths ``i + 0.5``).

        ``layers`` picks the rows by the readout's layer numbers (default: every layer ``0 … L``);
        layer ``L`` is always added and is read from ``states.logits``. Positions are processed
        ``chunk_tokens`` tokens at a time (default: :data:`CHUNK_ELEMENTS` divided by the
        vocabulary size). ``dtype``
        (``"auto"``, ``"float32"`` or ``"bfloat16"``, see
        :func:`~depthlens.model.precision.resolve_dtype`) sets the precision of the decoding's
        products; statistics are computed in float32 either way, by
        :class:`~depthlens.stats.logit_statistics.LogitStatistics`. Without a ``tokenizer``, labels are
        ``#id``. ``lens`` may be any :class:`Readout`.
        """
        check_site(states, lens)
        rows = layer_rows(layers, lens.num_layers)
        input_ids = states.input_ids.to(states.logits.device)
        mask = position_mask(attention_mask, input_ids)
        products = resolve_dtype(dtype, input_ids.device)
        kernel = kernel_wanted(states, rows)
        readout = lens if products == torch.float32 else _DecodingIn(lens, products, input_ids.device, not kernel)
        cells = Cells.compute(readout, states, mask, rows, k, chunk_tokens, kernel)
        input_ids = input_ids.cpu()
        return cls(
            input_ids=input_ids,
            attention_mask=mask.cpu(),
            layers=tuple(depth(row, states.site, lens.num_layers) for row in rows),
            num_layers=lens.num_layers,
            labels=_labels(tokenizer, torch.cat([input_ids.flatten(), cells.top_ids.flatten()])),
            lens_kind=lens.kind,
            lens_name=lens_name or f"{lens.kind} lens",
            model_name=lens.parts.model_name,
            **vars(cells),
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
        """The rows whose layer (half-layer rows: the layer below) is a multiple of ``step``, plus
        the output row."""
        if step < 1:
            raise TrajectoryError(f"the layer stride must be at least 1, got {step}")
        keep = [i for i, layer in enumerate(self.layers) if math.floor(layer) % step == 0 or i == len(self.layers) - 1]
        return self.select_rows(keep)

    def select_layers(self, layers: Iterable[int]) -> Trajectory:
        """The rows whose layer (half-layer rows: the layer below) is one of ``layers``; the output
        row is layer ``L``. Raises :class:`TrajectoryError` if none is."""
        wanted = set(layers)
        keep = [i for i, layer in enumerate(self.layers) if math.floor(layer) in wanted]
        if not keep:
            raise TrajectoryError(f"none of layers {sorted(wanted)} is a row of this trajectory (rows: "
                                  f"{', '.join(f'{layer:g}' for layer in self.layers)}): pick layers it has")
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
        import pandas as pd

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
            (f"{self.lens_name} on {self.model_name}, {int(mask.sum())} tokens: means over positions "
            "(entropy, kl, ce in nats), median rank, top-1 at the last position"),
            (f"{'layer':>6} {'entropy':>8} {'kl':>8} {'ce':>8} {'rank':>7} {'prob':>6}  "
            f"after {self.label(int(self.input_ids[batch, last]), 12)}"),
        ]
        for row, layer in enumerate(self.layers):
            name = depth_label(layer, self.num_layers)
            lines.append(
                f"{name:>6} {means['entropy'][row]:8.3f} {means['kl'][row]:8.3f} {means['ce'][row]:8.3f} "
                f"{ranks[row]:7.0f} {means['prob'][row]:6.3f}  {self.label(int(self.top_ids[row, batch, last, 0]), 12)}"
            )
        return "\n".join(lines)


@dataclass
class _DecodingIn:
    """``readout`` with its decoding's products in ``dtype`` and its logits handed on in float32
    (:func:`~depthlens.model.precision.float32_logits`; as decoded without ``copy``, for the
    compiled statistics kernel); a :class:`Readout` itself."""

    readout: Readout
    dtype: torch.dtype
    device: torch.device
    copy: bool = True

    @property
    def kind(self) -> str:
        return self.readout.kind

    @property
    def parts(self) -> ModelParts:
        return self.readout.parts

    @property
    def num_layers(self) -> int:
        return self.readout.num_layers

    def iter_logits(
        self, states: Sequence[torch.Tensor], layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The readout's ``(layer, logits [batch, seq, vocab])`` in float32 (with ``copy``), each
        valid until the next."""
        return float32_logits(self.readout.iter_logits(states, layers), self.dtype, self.device, self.copy)


def _labels(tokenizer: PreTrainedTokenizerBase | None, ids: torch.Tensor) -> dict[int, str]:
    unique = [int(t) for t in ids.unique().tolist() if t >= 0]
    if tokenizer is None:
        return {t: f"#{t}" for t in unique}
    return {t: token_label(tokenizer, t, LABEL_CHARS) for t in unique}


__all__ = [
    "CHUNK_ELEMENTS",
    "LABEL_CHARS",
    "STATISTICS",
    "Statistic",
    "Trajectory",
    "TrajectoryError",
    "shorten",
    "statistic",
]
