"""The optimizers of tuned-lens training (:func:`make_optimizers`), and a Muon that
orthogonalises in float32, for machines without fast bfloat16.

``torch.optim.Muon`` runs its Newton–Schulz iteration in bfloat16. That is right for GPUs, but on
a CPU without bf16 units it is about 50× slower than the same iteration in float32 (measured
here: 49 s against 0.9 s for one step over 30 matrices of 576 × 576).
:func:`muon` picks ``torch.optim.Muon`` where bf16 is fast and :class:`Float32Muon` elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from depthlens.lenses.tuned import TunedLens
from depthlens.training.config import TrainConfig

__all__ = ["NEWTON_SCHULZ", "Float32Muon", "make_optimizers", "muon", "orthogonalise"]

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
"""Coefficients of the quintic Newton–Schulz iteration (the ones ``torch.optim.Muon`` uses)."""


def orthogonalise(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U Vᵀ`` for ``matrix = U S Vᵀ`` ``[m, n]``, in ``matrix``'s dtype."""
    a, b, c = NEWTON_SCHULZ
    x = matrix / (matrix.norm() + eps)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Float32Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: Nesterov momentum, then an orthogonalised update scaled by
    ``0.2·√max(m, n)`` so that learning rates match AdamW's (as ``adjust_lr_fn="match_rms_adamw"``)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 0.01, momentum: float = 0.95, ns_steps: int = 5) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                buffer = self.state[parameter].setdefault("momentum_buffer", torch.zeros_like(parameter))
                buffer.mul_(group["momentum"]).add_(parameter.grad)
                update = parameter.grad.add(buffer, alpha=group["momentum"])
                scale = 0.2 * math.sqrt(max(parameter.shape))
                parameter.add_(orthogonalise(update, group["ns_steps"]), alpha=-group["lr"] * scale)


def muon(params: list[torch.Tensor] | list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """``torch.optim.Muon`` on CUDA with bf16 support, :class:`Float32Muon` everywhere else;
    ``params`` are tensors or parameter groups."""
    first = params[0]
    device = (first["params"][0] if isinstance(first, dict) else first).device
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.optim.Muon(params, lr=lr, momentum=0.95, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    return Float32Muon(params, lr=lr)


def make_optimizers(lens: TunedLens, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """The paper's SGD for all parameters, Adam for all parameters, or Muon for the translator
    matrices and Adam for the biases (Muon only orthogonalises matrices).

    Every layer's parameters form their own group whose learning rate is scaled by
    ``1 − layer_lr_decay · l / L`` (the ``layer_scale`` of the group): late layers start close to
    the final layer and want smaller steps than early ones.
    """
    def groups(parameters: list[torch.Tensor]) -> list[dict[str, Any]]:
        return [{"params": [p], "layer_scale": 1.0 - config.layer_lr_decay * layer / lens.num_layers}
                for layer, p in enumerate(parameters)]

    weights = groups([t.weight for t in lens.translators])
    biases = groups([t.bias for t in lens.translators])
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return [torch.optim.SGD(weights + biases, lr=lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)]
    if config.optimizer == "adam":
        return [torch.optim.Adam(weights + biases, lr=lr)]
    return [muon(weights, lr), torch.optim.Adam(biases, lr=lr)]
