"""The logit lens (nostalgebraist 2020): decode every layer with the model's own final norm and
unembedding, unchanged. Hidden states ``[batch, seq, d]`` at layer ``l`` (``0 ≤ l ≤ L``) become
logits ``[batch, seq, vocab]``; at layer ``L`` this is exactly the model's output."""

from __future__ import annotations

import torch

from depthlens.lenses.readout import Lens


class LogitLens(Lens):
    """Decode every layer with the model's final norm and unembedding, unchanged (nostalgebraist 2020)."""

    kind = "logit"

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """The identity: the state ``[..., d]`` is decoded as it is."""
        return hidden


__all__ = ["LogitLens"]
