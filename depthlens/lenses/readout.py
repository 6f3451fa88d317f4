"""The readout protocol: anything that turns residual states into next-token logits, layer by layer.

A :class:`Readout` decodes the ``L + 1`` residual states of one forward pass (each
``[batch, seq, d]``, numbered as in :mod:`depthlens.model.hidden_states`: state ``0`` enters block
0, state ``L`` leaves the last block before the final norm) into logits ``[batch, seq, vocab]``,
one layer at a time through :meth:`Readout.iter_logits`. Trajectories, evaluation and lens
comparison accept any readout; they use only the four members below.

:class:`Lens` is the :class:`torch.nn.Module` base of the built-in readouts
(:class:`~depthlens.lenses.logit.LogitLens`, :class:`~depthlens.lenses.tuned.TunedLens`): a
subclass defines :meth:`Lens.transform`, and decoding is the model's own ``parts.decode``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from depthlens.errors import LayerError
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.precision import full_precision


@runtime_checkable
class Readout(Protocol):
    """Decodes residual states into logits, one layer at a time.

    - ``kind``: a short name, e.g. ``"logit"``, ``"tuned"``;
    - ``parts``: the :class:`~depthlens.model.architecture.ModelParts` of the model it decodes;
    - ``num_layers``: the model's number of blocks ``L``; valid layers are ``0 … L``;
    - ``iter_logits(states, layers=None)``: ``states`` are ``L + 1`` tensors ``[batch, seq, d]``;
      yields ``(layer, logits [batch, seq, vocab])`` for each of ``layers`` (default ``0 … L``) in
      the order given, one layer at a time, so ``[layers, batch, seq, vocab]`` never exists.
      Logits are unnormalised natural-log scores; an out-of-range layer raises
      :class:`~depthlens.errors.LayerError`.

    Optionally ``site``: ``"mid"`` for a readout of the states inside blocks (``resid.i + attn.i``,
    shown at depth ``i + 0.5``; see :mod:`depthlens.lenses.mid`); without it a readout decodes the
    block outputs.
    """

    kind: str
    parts: ModelParts

    @property
    def num_layers(self) -> int:
        """Number of blocks ``L``; valid layers are ``0 … L``."""
        ...

    def iter_logits(
        self, states: Sequence[torch.Tensor], layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer, logits [batch, seq, vocab])`` for each layer, one at a time."""
        ...


def check_layer(layer: int, num_layers: int) -> None:
    """Raise :class:`LayerError` unless ``0 ≤ layer ≤ num_layers``."""
    if not 0 <= layer <= num_layers:
        raise LayerError(
            f"layer {layer} is out of range: this model has layers 0 … {num_layers}; "
            f"pick a layer between 0 and {num_layers}"
        )


def model_parts(model: nn.Module | ModelParts) -> ModelParts:
    """``model``'s :class:`ModelParts` (``model`` itself if it already is one)."""
    return model if isinstance(model, ModelParts) else find_parts(model)


class Lens(nn.Module):
    """Base class of the built-in readouts: subclasses define :meth:`transform`; decoding is the
    model's own. Implements :class:`Readout`."""

    kind = "lens"

    def __init__(self, model: nn.Module | ModelParts) -> None:
        super().__init__()
        self.parts = model_parts(model)

    @property
    def num_layers(self) -> int:
        """Number of blocks ``L``; valid layers are ``0 … L``."""
        return self.parts.num_layers

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Map a state ``[..., d]`` at ``layer`` to the space of the final state ``[..., d]``."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, layer: int, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[..., vocab]`` (natural-log units, unnormalised) for states at ``layer``;
        only those of the token ids ``vocab [k]`` if given (``[..., k]``). The last layer's decoding
        is the model's output head, so it runs in float32 where the family keeps the forward pass
        in float32 (:meth:`~depthlens.model.architecture.ModelParts.forward_dtype`). Raises
        :class:`LayerError` for a layer outside ``0 … L``."""
        check_layer(layer, self.num_layers)
        state = self.transform(hidden, layer)
        if layer == self.num_layers and not self.parts.bfloat16_forward:
            with full_precision(state.device):
                return self.parts.decode(state, vocab)
        return self.parts.decode(state, vocab)

    def iter_logits(
        self, states: Sequence[torch.Tensor], layers: Iterable[int] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(layer, logits [batch, seq, vocab])`` for each layer, one layer at a time.

        ``states`` is a :class:`~depthlens.model.hidden_states.HiddenStates` or any sequence of
        ``L + 1`` tensors ``[batch, seq, d]``.
        """
        for layer in range(len(states)) if layers is None else layers:
            check_layer(layer, self.num_layers)
            yield layer, self(states[layer], layer)

    def stack_logits(self, states: Sequence[torch.Tensor], layers: Iterable[int] | None = None) -> torch.Tensor:
        """All layers' logits at once, ``[layers, batch, seq, vocab]``: mind the memory."""
        return torch.stack([logits for _, logits in self.iter_logits(states, layers)])

    def top_k(
        self, states: Sequence[torch.Tensor], k: int = 1, layers: Iterable[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most likely next tokens at every layer and position.

        Returns ``(log_probs, token_ids)``, both ``[layers, batch, seq, k]``; log-probabilities are
        in nats. Only one layer's logits exist at a time.
        """
        values, indices = [], []
        for _, logits in self.iter_logits(states, layers):
            top = logits.float().log_softmax(-1).topk(k, dim=-1)
            values.append(top.values)
            indices.append(top.indices)
        return torch.stack(values), torch.stack(indices)


__all__ = ["Lens", "Readout", "check_layer", "model_parts"]
