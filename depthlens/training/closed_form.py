"""A closed-form start for tuned-lens translators: affine ridge regression onto the last state.

For each layer ``l`` we look for ``A_l, b_l`` with ``h_l + A_l h_l + b_l ≈ h_L`` in the least
squares sense (cf. Din et al. 2023, "Jump to Conclusions"). The statistics ``Xᵀ X`` and ``Xᵀ Y``
with ``X = [h_l, 1]`` and ``Y = h_L − h_l`` are accumulated in float64 during ordinary forward
passes, ``O(d²)`` per token and layer, and solved once, on the CPU unless told otherwise (a GPU
holds them for a large model: 2 × 32 × 4097² float64 values are 8.6 GB at width 4096). Tokens from many batches, processes or
machines are combined by adding the statistics (:meth:`LeastSquares.merge`). The states may also be
mid states (:func:`~depthlens.model.hidden_states.capture` with ``site="mid"``): their last state is
the last block's output all the same, so a lens inside the blocks starts the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depthlens.errors import TrainingError
from depthlens.lenses.tuned import TunedLens


class LeastSquares:
    """Running sums for the affine regression of every layer's state onto the last state."""

    def __init__(self, num_layers: int, d_model: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(num_layers, d_model + 1, d_model + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(num_layers, d_model + 1, d_model, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, states: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        """Add one forward pass: ``states`` are ``L + 1`` tensors ``[batch, seq, d]``;
        ``mask [batch, seq]`` (optional) selects the positions to use."""
        device = self.xtx.device
        final = _rows(states[-1], mask, device)
        ones = torch.ones(final.shape[0], 1, dtype=torch.float64, device=device)
        for layer in range(self.xtx.shape[0]):
            x = torch.cat([_rows(states[layer], mask, device), ones], dim=1)
            self.xtx[layer] += x.T @ x
            self.xty[layer] += x.T @ (final - x[:, :-1])
        self.tokens += final.shape[0]

    def merge(self, other: LeastSquares) -> None:
        """Add another accumulator's statistics to this one."""
        self.xtx += other.xtx
        self.xty += other.xty
        self.tokens += other.tokens

    def solve(self, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Translator weights ``A [layers, d, d]`` and biases ``b [layers, d]`` (float32).

        ``ridge`` is the penalty on ``A`` relative to the mean diagonal of ``XᵀX`` (the bias is not
        penalised), which keeps the solve well posed with fewer tokens than dimensions. Raises
        :class:`TrainingError` before any :meth:`update` and for a negative ``ridge``.
        """
        if self.tokens == 0:
            raise TrainingError("no tokens were accumulated for the least-squares start; call update() before solve()")
        if not ridge >= 0:
            raise TrainingError(f"the ridge penalty must be ≥ 0, got {ridge}")
        d = self.xty.shape[-1]
        weights, biases = [], []
        for xtx, xty in zip(self.xtx, self.xty):
            penalty = torch.full((d + 1,), ridge * xtx.diagonal()[:d].mean().item(), dtype=torch.float64,
                                 device=xtx.device)
            penalty[-1] = 0.0
            solution = torch.linalg.solve(xtx + torch.diag(penalty), xty)
            weights.append(solution[:d].T)
            biases.append(solution[d])
        return torch.stack(weights).float(), torch.stack(biases).float()

    def apply(self, lens: TunedLens, ridge: float = 1e-3) -> None:
        """Set every translator of ``lens`` to the ridge solution."""
        weights, biases = self.solve(ridge)
        with torch.no_grad():
            for translator, weight, bias in zip(lens.translators, weights, biases):
                translator.weight.copy_(weight)
                translator.bias.copy_(bias)


def _rows(state: torch.Tensor, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    rows = state.reshape(-1, state.shape[-1]) if mask is None else state[mask.bool()]
    return rows.detach().to(device, torch.float64)
