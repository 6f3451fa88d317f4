"""The model side of direct logit attribution: where each branch's projection is, and norms
linearised with a frozen scale (:func:`freeze_norm`). See :mod:`depthlens.analysis.dla`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from depthlens.errors import AttributionError
from depthlens.model.architecture import ATTENTION_NAMES, POST_NORMS, ModelParts

OUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")
"""Names, tried in order inside an attention module, of its output projection."""
DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "fc_out", "w2", "wo")
"""Names, tried in order inside an MLP (or a block, where the MLP is inline), of its last projection."""


@dataclass(frozen=True)
class Projection:
    """A projection ``y = W a + b`` as it runs: ``weight [out, in]``, ``bias [out]`` or ``None``."""

    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None


def projection(module: nn.Module | None, names: Sequence[str]) -> Projection | None:
    """The first submodule of ``module`` named in ``names`` that is a linear layer (or GPT-2's
    ``Conv1D``, whose weight is stored transposed)."""
    if module is None:
        return None
    found = {name.rpartition(".")[2]: child for name, child in module.named_modules() if name}
    for name in names:
        child = found.get(name)
        if isinstance(child, nn.Linear):
            return Projection(child, child.weight, child.bias)
        if type(child).__name__ == "Conv1D":
            return Projection(child, child.weight.T, child.bias)
    return None


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


@contextmanager
def inputs_of(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first positional input ``[batch, seq, in]`` of each module while inside."""
    seen: dict[str, torch.Tensor] = {}

    def record(key: str, args: tuple) -> None:
        value = args[0]
        seen[key] = value.reshape(1, -1, value.shape[-1]) if value.dim() == 2 else value

    handles = [m.register_forward_pre_hook(lambda _m, args, key=key: record(key, args)) for key, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def attention_module(parts: ModelParts, index: int) -> tuple[nn.Module | None, nn.Module | None]:
    """Block ``index``'s attention module and the sandwich norm after it (``None`` if none)."""
    block = parts.blocks[index]
    if parts.paths.get("attn") == POST_NORMS["attn"]:
        inner = next(
            (getattr(block, n) for n in ATTENTION_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
        )
        return inner, getattr(block, POST_NORMS["attn"])
    return parts.branch("attn", index), None


def mlp_module(parts: ModelParts, index: int) -> tuple[nn.Module | None, nn.Module | None]:
    """Block ``index``'s MLP (the block itself where it is inline) and its sandwich norm."""
    block = parts.blocks[index]
    if parts.paths.get("mlp") == POST_NORMS["mlp"]:
        return getattr(block, "mlp", None), getattr(block, POST_NORMS["mlp"])
    module = parts.branch("mlp", index)
    return (module if module is not None else block), None


def num_heads(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


__all__ = [
    "DOWN_PROJECTIONS",
    "OUT_PROJECTIONS",
    "LinearNorm",
    "Projection",
    "attention_module",
    "freeze_norm",
    "inputs_of",
    "mlp_module",
    "num_heads",
    "projection",
]
