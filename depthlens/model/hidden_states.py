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

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from depthlens.model.architecture import ModelParts, find_parts


@dataclass
class HiddenStates:
    """The residual stream of one forward pass, and the model's own logits."""

    states: tuple[torch.Tensor, ...]
    """``L + 1`` tensors ``[batch, seq, d]``; see the module docstring for the numbering."""
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
        return self.states[layer]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.states)


def _first_tensor(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = getattr(value, "hidden_states", None) or getattr(value, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"a block returned {type(value).__name__}, which holds no hidden-state tensor")


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    parts: ModelParts | None = None,
) -> HiddenStates:
    """Run ``model`` on ``input_ids [batch, seq]`` and return its residual stream and logits.

    States keep the model's dtype and device. ``parts`` defaults to :func:`find_parts(model)`.
    """
    parts = parts or find_parts(model)
    states: list[torch.Tensor | None] = [None] * (parts.num_layers + 1)

    def keep_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        states[0] = _first_tensor(args if args else kwargs.get("hidden_states"))

    def keep_output(index: int):
        def hook(_module: nn.Module, _args: tuple, output: object) -> None:
            states[index + 1] = _first_tensor(output)

        return hook

    handles = [parts.blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [block.register_forward_hook(keep_output(i)) for i, block in enumerate(parts.blocks)]
    try:
        device = parts.embedding.weight.device
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, state in enumerate(states) if state is None]
    if missing:
        raise RuntimeError(f"residual states {missing} were not seen during the forward pass")
    return HiddenStates(states=tuple(states), logits=output.logits, input_ids=input_ids)
