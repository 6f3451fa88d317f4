"""Divergences between two readouts of one model, at every layer and position.

Divergences need both full distributions at once, so :func:`compare_lenses` computes them from the
hidden states (one layer and one chunk of positions at a time) rather than from two trajectories.
The divergences are those of :mod:`depthlens.stats.divergences`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from depthlens.analysis.cells import chunk_windows, layer_rows, position_mask
from depthlens.errors import TrajectoryError
from depthlens.lenses.readout import Readout
from depthlens.model.hidden_states import HiddenStates
from depthlens.stats.divergences import js, kl, log_probs, tv


@dataclass
class LensDivergence:
    """Per-cell divergences between two readouts' distributions, from :func:`compare_lenses`.

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
    lens_a: Readout,
    lens_b: Readout,
    states: HiddenStates,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
    chunk_tokens: int | None = None,
) -> LensDivergence:
    """KL, Jensen–Shannon and total variation between the distributions of two readouts (any
    :class:`Readout`) of one model at every layer (``layers``, default all; ``L`` always added)
    and position of ``states``, computed in float32 one layer and one chunk of ``chunk_tokens``
    tokens at a time. Raises :class:`TrajectoryError` if the readouts have different depths."""
    if lens_a.num_layers != lens_b.num_layers:
        raise TrajectoryError(
            f"the lenses have {lens_a.num_layers} and {lens_b.num_layers} layers: they belong to "
            "different models; compare two readouts of one model"
        )
    rows = layer_rows(layers, lens_a.num_layers)
    batch, seq = states.input_ids.shape
    out = {name: torch.empty(len(rows), batch, seq) for name in ("kl", "js", "tv")}
    for window in chunk_windows(batch, seq, states.logits.shape[-1], chunk_tokens):
        chunk_states = [state[:, window] for state in states.states]
        pairs = zip(lens_a.iter_logits(chunk_states, rows), lens_b.iter_logits(chunk_states, rows))
        for row, ((_, logits_a), (_, logits_b)) in enumerate(pairs):
            log_p, log_q = log_probs(logits_a), log_probs(logits_b)
            out["kl"][row, :, window] = kl(log_p, log_q).cpu()
            out["js"][row, :, window] = js(log_p, log_q).cpu()
            out["tv"][row, :, window] = tv(log_p, log_q).cpu()
    padding = ~position_mask(attention_mask, states.input_ids).cpu()
    for tensor in out.values():
        tensor[:, padding] = math.nan
    return LensDivergence(layers=rows, **out)


__all__ = ["LensDivergence", "compare_lenses"]
