"""The model side of direct logit attribution: a branch's last projection as float64 tensors, and
norms linearised with a frozen scale (:func:`freeze_norm`). Where the projections and norms are
is the family table's business (``ModelParts.paths``); see :mod:`depthlens.analysis.dla`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from depthlens.errors import AttributionError
from depthlens.model.architecture import ModelParts


@dataclass(frozen=True)
class Projection:
    """A projection ``y = W a + b`` as it runs, in float64 on the CPU: ``weight [out, in]`` and
    ``bias [out]`` (zeros where the layer has none)."""

    weight: torch.Tensor
    bias: torch.Tensor


def projection(parts: ModelParts, kind: str, index: int) -> Projection | None:
    """Block ``index``'s attention output projection (``kind="heads"``) or MLP last projection
    (``"neurons"``), a linear layer or GPT-2's ``Conv1D`` (whose weight is stored transposed);
    ``None`` where the family has none."""
    module = parts.branch(kind, index)
    if module is None:
        return None
    weight = module.weight.detach().double().cpu()
    weight = weight.T if not isinstance(module, nn.Linear) else weight
    if module.bias is None:
        return Projection(weight, torch.zeros(weight.shape[0], dtype=torch.float64))
    return Projection(weight, module.bias.detach().double().cpu())


@dataclass(frozen=True)
class LinearNorm:
    """A norm with its scale frozen: ``c ↦ γ ⊙ P(c) · s`` plus the constant ``β`` (``P`` centres
    for LayerNorm). ``gamma``, ``beta`` ``[d]`` and ``scale`` (a scalar per position) are float64."""

    gamma: torch.Tensor
    beta: torch.Tensor
    centre: bool
    scale: torch.Tensor

    def linear(self, c: torch.Tensor) -> torch.Tensor:
        """The frozen linear part applied to ``c [..., d]``."""
        if self.centre:
            c = c - c.mean(-1, keepdim=True)
        return self.gamma * c * self.scale

    def adjoint(self, u: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`linear` applied to a covector ``u [d]``."""
        v = self.gamma * u * self.scale
        return v - v.mean() if self.centre else v


def freeze_norm(module: nn.Module, x: torch.Tensor) -> LinearNorm:
    """Linearise the norm ``module`` at ``x [d]`` (float64 result), from probes of the module
    itself: ``β = N(0)``, centring iff ``N(3·1) = β``, ``γ`` from ``N(±1 alternating)``, and the
    scale ``s`` by least squares. :class:`AttributionError` if the module is not such a norm."""
    parameter = next(module.parameters(), None)
    dtype = parameter.dtype if parameter is not None else x.dtype
    device = parameter.device if parameter is not None else x.device
    d = x.shape[-1]

    def run(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(v.to(device, dtype)[None]).double()[0].cpu()

    eps = next(
        (
            float(getattr(module, a))
            for a in ("eps", "variance_epsilon", "epsilon")
            if isinstance(getattr(module, a, None), (int, float))
        ),
        0.0,
    )
    beta = run(torch.zeros(d))
    centre = bool(torch.allclose(run(torch.full((d,), 3.0)), beta, atol=1e-4))
    signs = torch.ones(d, dtype=torch.float64)
    signs[1::2] = -1
    gamma = (run(signs) - beta) * signs * (1 + eps) ** 0.5
    x = x.double().cpu()
    direction = gamma * ((x - x.mean()) if centre else x)
    target = run(x) - beta
    scale = (target @ direction) / (direction @ direction).clamp_min(1e-300)
    if d % 2 or (direction * scale - target).abs().max() > 1e-4 * (1 + target.abs().max()):
        raise AttributionError(
            f"{type(module).__name__} is not a LayerNorm or RMSNorm that can be linearised "
            "with a frozen scale, so its logit cannot be attributed"
        )
    return LinearNorm(gamma, beta, centre, scale)


__all__ = ["LinearNorm", "Projection", "freeze_norm", "projection"]
