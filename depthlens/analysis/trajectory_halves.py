"""Block outputs and mid states in one trajectory, as half-layers: rows 0, 0.5, 1, 1.5, …, output.

A readout of the block outputs (the logit lens, a tuned lens) gives rows ``0 … L``; a lens inside
the blocks (:class:`~depthlens.lenses.mid.MidTunedLens`) gives rows ``0.5 … L − 0.5`` and the
output. :func:`interleave` merges two such trajectories of one text into one whose rows alternate,
so that :func:`~depthlens.analysis.trajectory_grid.trajectory_grid` draws what each block's
attention and then its MLP changed; :func:`half_layer_trajectory` builds both from a text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import TrajectoryError
from depthlens.lenses.mid import site_of
from depthlens.lenses.readout import Readout

_ROW_FIELDS = ("top_ids", "top_probs", "entropy", "kl_to_final", "ce", "final_top1_rank", "max_prob")
"""The :class:`Trajectory` fields with one entry per row."""


def interleave(block: Trajectory, mid: Trajectory, *, lens_name: str | None = None) -> Trajectory:
    """One trajectory with the rows of ``block`` (whole layers) and ``mid`` (half-layers) in depth
    order; the output row, which both share, is taken once. Both must be of the same input.

    Raises :class:`TrajectoryError` if the inputs or models differ, or if ``block`` has a
    half-layer row or ``mid`` a whole-layer row other than the output."""
    if block.input_ids.shape != mid.input_ids.shape or not bool((block.input_ids == mid.input_ids).all()):
        raise TrajectoryError("the two trajectories are of different texts: build both from the same input")
    if block.num_layers != mid.num_layers:
        raise TrajectoryError(f"the trajectories are of models with {block.num_layers} and {mid.num_layers} layers")
    halves = [row for row, layer in enumerate(mid.layers) if layer != mid.num_layers]
    if any(layer % 1 for layer in block.layers) or any(mid.layers[row] % 1 == 0 for row in halves):
        raise TrajectoryError(
            f"interleave takes a block-output trajectory ({block.lens_name}: rows {block.layers}) and one of a lens "
            f"inside the blocks ({mid.lens_name}: rows {mid.layers}); pass them in that order"
        )
    depths = [*block.layers, *(mid.layers[row] for row in halves)]
    order = sorted(range(len(depths)), key=depths.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    taken = torch.tensor(halves, dtype=torch.long)
    rows = {name: torch.cat([getattr(block, name), getattr(mid, name)[taken]])[index] for name in _ROW_FIELDS}
    return replace(
        block,
        layers=tuple(depths[row] for row in order),
        labels={**block.labels, **mid.labels},
        lens_kind=f"{block.lens_kind}+{mid.lens_kind}",
        lens_name=lens_name or f"{block.lens_name} + {mid.lens_name}",
        **rows,
    )


def half_layer_trajectory(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    block: Readout,
    mid: Readout,
    text: str | Sequence[str],
    *,
    lens_name: str | None = None,
    **options: Any,
) -> Trajectory:
    """The trajectory of ``text`` with the rows of the block-output readout ``block`` at layers
    ``0 … L`` and those of the lens inside the blocks ``mid`` at ``0.5 … L − 0.5``
    (:func:`interleave`); ``options`` (``k``, ``layers``, ``max_tokens``, ``dtype``…) go to
    :meth:`Trajectory.from_text` for both. Raises :class:`TrajectoryError` unless ``block`` reads
    block outputs and ``mid`` mid states."""
    if site_of(block) != "block" or site_of(mid) != "mid":
        raise TrajectoryError(
            f"half-layer rows need a readout of the block outputs and a lens inside the blocks, got a {block.kind} "
            f"lens ({site_of(block)} states) and a {mid.kind} lens ({site_of(mid)} states): train the second with "
            "depthlens train --site mid"
        )
    trajectories = [Trajectory.from_text(model, tokenizer, readout, text, **options) for readout in (block, mid)]
    return interleave(*trajectories, lens_name=lens_name)


__all__ = ["half_layer_trajectory", "interleave"]
