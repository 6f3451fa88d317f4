"""Erasure of a subspace of the residual stream: the one definition of zero, mean and resample
ablation, shared by the readout side (causal basis extraction) and the model side (hook edits).

For an orthonormal basis ``B [k, d]`` (rows ``v_1 … v_k``) and states ``h [..., n, d]``:

- ``zero``:     ``h − (h Bᵀ) B`` — the component along the subspace is removed;
- ``mean``:     ``h − ((h − μ) Bᵀ) B`` — the component is set to that of the data mean ``μ [d]``;
- ``resample``: ``h − ((h − h[π]) Bᵀ) B`` — the component is taken from another position ``π(i)``,
  where ``π`` is a permutation of the ``n`` positions without fixed points (:func:`derangement`).

Every mode leaves the orthogonal complement of the subspace untouched.
"""

from __future__ import annotations

from typing import Literal

import torch

from depthlens.errors import EditError

Erasure = Literal["zero", "mean", "resample"]
ERASURES: tuple[str, ...] = ("zero", "mean", "resample")


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed points, ``[n]`` long (``n ≥ 2``).

    Built as a random cyclic shift of a random order, so every position moves."""
    if n < 2:
        raise EditError(f"resample ablation needs at least 2 positions to swap, got {n}")
    order = torch.randperm(n, generator=generator)
    shift = int(torch.randint(1, n, (1,), generator=generator))
    permutation = torch.empty(n, dtype=torch.long)
    permutation[order] = order.roll(shift)
    return permutation


def check_basis(basis: torch.Tensor, d_model: int) -> torch.Tensor:
    """``basis`` as a float ``[k, d]`` tensor; :class:`EditError` if its width is not ``d_model``."""
    basis = basis.unsqueeze(0) if basis.dim() == 1 else basis
    if basis.dim() != 2 or basis.shape[-1] != d_model:
        raise EditError(
            f"an ablation basis must be [k, {d_model}] (k directions of the residual width), "
            f"got shape {tuple(basis.shape)}"
        )
    return basis


def check_erasure(mode: str, mean: torch.Tensor | None) -> None:
    """:class:`EditError` unless ``mode`` is an erasure and, for ``"mean"``, ``mean`` is given."""
    if mode not in ERASURES:
        raise EditError(f"unknown erasure {mode!r}: choose one of {', '.join(ERASURES)}")
    if mode == "mean" and mean is None:
        raise EditError("mean ablation needs the data mean of the states (mean=[d])")


def erase(
    h: torch.Tensor,
    basis: torch.Tensor,
    mode: Erasure = "mean",
    *,
    mean: torch.Tensor | None = None,
    permutation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ablate the span of ``basis [k, d]`` (orthonormal rows) in ``h [..., n, d]``.

    ``mean [d]`` is required for ``"mean"``; ``permutation [n]`` (over the second-to-last axis)
    for ``"resample"``. Returns a tensor shaped like ``h``, in ``h``'s dtype.
    """
    check_erasure(mode, mean)
    basis = check_basis(basis, h.shape[-1]).to(h.device, h.dtype)
    if mode == "zero":
        reference = torch.zeros_like(h[..., :1, :])
    elif mode == "mean":
        reference = mean.to(h.device, h.dtype).expand_as(h[..., :1, :])
    else:
        if permutation is None:
            raise EditError("resample ablation needs a permutation of the positions (see derangement)")
        reference = h[..., permutation.to(h.device), :]
    return h - ((h - reference) @ basis.T) @ basis


__all__ = ["ERASURES", "Erasure", "check_basis", "check_erasure", "derangement", "erase"]
