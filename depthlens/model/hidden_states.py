"""Capture the residual stream at every layer boundary.

For a model with ``L`` blocks the residual stream has ``L + 1`` states, each ``[batch, seq, d]``:

- state ``0``: what enters the first block (token embeddings after any scaling and position
  embeddings),
- state ``i``: the output of block ``i - 1``,
- state ``L``: the output of the last block, *before* the final norm.

``output_hidden_states=True`` is not used on purpose: most families report the last entry after
the final norm, so decoding it again would apply the norm twice. Hooks on the blocks see the true
stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from depthlens.errors import EditError, UnsupportedModelError
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hooks import run_with_hooks


@dataclass
class HiddenStates:
    """The residual stream of one forward pass, and the model's own logits."""

    states: tuple[torch.Tensor | None, ...]
    """``L + 1`` tensors ``[batch, seq, d]``; see the module docstring for the numbering. A state
    that was not asked for (``capture(..., layers=...)``) is ``None``."""
    logits: torch.Tensor
    """The model's output logits ``[batch, seq, vocab]``."""
    input_ids: torch.Tensor
    """The tokens ``[batch, seq]`` that produced them."""

    @property
    def num_layers(self) -> int:
        """Number of blocks ``L`` (one less than the number of states)."""
        return len(self.states) - 1

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer: int) -> torch.Tensor:
        state = self.states[layer]
        if state is None:
            raise EditError(f"residual state {layer} was not captured: pass it in capture(..., layers=...)")
        return state

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.states)


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    parts: ModelParts | None = None,
    layers: Iterable[int] | None = None,
) -> HiddenStates:
    """Run ``model`` on ``input_ids [batch, seq]`` and return its residual stream and logits.

    ``layers`` (default all ``0 … L``) picks the states to keep; the others are ``None`` and cost
    nothing. States keep the model's dtype and device. ``parts`` defaults to
    :func:`find_parts(model)`. Reading goes through :func:`depthlens.model.hooks.hooked`.
    """
    parts = parts or find_parts(model)
    wanted = range(parts.num_layers + 1) if layers is None else sorted(set(layers))
    run = run_with_hooks(model, input_ids, attention_mask, parts=parts, read=[f"resid.{layer}" for layer in wanted])
    states = tuple(run.values.get(f"resid.{layer}") for layer in range(parts.num_layers + 1))
    missing = [layer for layer in wanted if states[layer] is None]
    if missing:
        raise UnsupportedModelError(f"residual states {missing} were not seen during the forward pass of {parts.model_type}")
    return HiddenStates(states=states, logits=run.logits, input_ids=input_ids)
