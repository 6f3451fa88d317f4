"""Capture the residual stream at every layer boundary, or half-way through every block.

For a model with ``L`` blocks the residual stream has ``L + 1`` states, each ``[batch, seq, d]``:

- state ``0``: what enters the first block (token embeddings after any scaling and position
  embeddings),
- state ``i``: the output of block ``i - 1``,
- state ``L``: the output of the last block, *before* the final norm.

These are the states at the ``"block"`` site. At the ``"mid"`` site, state ``i < L`` is instead
*mid state* ``i``, ``resid.i + attn.i``: block ``i``'s input plus what its attention branch adds
(after a sandwich norm where the family has one), which is what a sequential block's MLP reads
(through its norm). State ``L`` is the same last state at both sites. Families whose attention
and MLP run in parallel on the block's input (GPT-J, GPT-NeoX with ``use_parallel_residual``,
Falcon, …) have no real point between them: their mid state is defined by the same sum, which
their MLP never sees. Pictures and tables place mid state ``i`` at depth ``i + 0.5``
(:func:`depth`).

``output_hidden_states=True`` is not used on purpose: most families report the last entry after
the final norm, so decoding it again would apply the norm twice. Hooks on the blocks see the true
stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from depthlens.errors import EditError, UnsupportedModelError
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hooks import run_with_hooks

Site = Literal["block", "mid"]
"""Where in each block the states are read: ``"block"`` (block outputs) or ``"mid"`` (after
attention, before the MLP)."""
SITES: tuple[Site, ...] = ("block", "mid")


@dataclass
class HiddenStates:
    """The residual stream of one forward pass at one site, and the model's own logits."""

    states: tuple[torch.Tensor | None, ...]
    """``L + 1`` tensors ``[batch, seq, d]``; see the module docstring for the numbering. A state
    that was not asked for (``capture(..., layers=...)``) is ``None``."""
    logits: torch.Tensor
    """The model's output logits ``[batch, seq, vocab]``."""
    input_ids: torch.Tensor
    """The tokens ``[batch, seq]`` that produced them."""
    site: Site = "block"
    """Which states these are: block outputs, or mid states ``resid.i + attn.i`` (the last state
    is the last block's output either way)."""

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

    def map_states(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> HiddenStates:
        """The same site with ``fn`` applied to every captured state (a window of positions, a
        flattening); ``logits`` and ``input_ids`` are kept as they are."""
        return replace(self, states=tuple(None if state is None else fn(state) for state in self.states))


def depth(layer: int, site: Site, num_layers: int) -> float:
    """Where state ``layer`` of ``site`` sits in the stack: ``layer`` for a block state (or the
    last state, ``L``), ``layer + 0.5`` for mid state ``layer < L``."""
    return layer + 0.5 if site == "mid" and layer < num_layers else layer


def depth_label(value: float, num_layers: int) -> str:
    """How tables and pictures name a depth: ``"output"`` for ``L``, else ``"3"`` or ``"3.5"``."""
    return "output" if value == num_layers else f"{value:g}"


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    parts: ModelParts | None = None,
    layers: Iterable[int] | None = None,
    site: Site = "block",
) -> HiddenStates:
    """Run ``model`` on ``input_ids [batch, seq]`` and return its states at ``site`` and logits.

    ``layers`` (default all ``0 … L``) picks the states to keep; the others are ``None`` and cost
    nothing. States keep the model's dtype and device. ``parts`` defaults to
    :func:`find_parts(model)`. Reading goes through :func:`depthlens.model.hooks.hooked`.
    """
    return capture_sites(model, input_ids, attention_mask, parts=parts, layers=layers, sites=(site,))[site]


@torch.no_grad()
def capture_sites(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    parts: ModelParts | None = None,
    layers: Iterable[int] | None = None,
    sites: Iterable[Site] = ("block",),
) -> dict[Site, HiddenStates]:
    """The states of every site in ``sites`` from one forward pass, by site; the other arguments
    are those of :func:`capture`. A mid state is ``resid.i + attn.i`` in the model's dtype; a
    family with no attention hook point raises :class:`~depthlens.errors.EditError`."""
    parts = parts or find_parts(model)
    last = parts.num_layers
    wanted = range(last + 1) if layers is None else sorted(set(layers))
    sites = tuple(dict.fromkeys(sites))
    unknown = [site for site in sites if site not in SITES]
    if unknown:
        raise EditError(f"unknown site {unknown[0]!r}: use one of {', '.join(SITES)}")
    reads = [f"resid.{layer}" for layer in wanted]
    if "mid" in sites:
        reads += [f"attn.{layer}" for layer in wanted if layer < last]
    run = run_with_hooks(model, input_ids, attention_mask, parts=parts, read=reads)
    missing = [point for point in reads if point not in run.values]
    if missing:
        raise UnsupportedModelError(f"hook points {missing} were not seen during the forward pass of {parts.model_type}")
    values = run.values

    def state(layer: int, site: Site) -> torch.Tensor | None:
        if layer not in wanted:
            return None
        if site == "mid" and layer < last:
            return values[f"resid.{layer}"] + values[f"attn.{layer}"]
        return values[f"resid.{layer}"]

    return {site: HiddenStates(tuple(state(layer, site) for layer in range(last + 1)), run.logits, input_ids, site)
            for site in sites}
