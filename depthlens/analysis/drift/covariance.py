"""Representational drift (Belrose et al. 2023, introduced in §1): how much the residual stream's geometry
changes from layer to layer.

:func:`stream_covariances` accumulates every layer's residual covariance ``[d, d]`` in one
streaming pass over the data (float64 sums ``Σ h`` and ``Σ h hᵀ``; no layer's states are kept
beyond one batch). :func:`similarity_matrix` compares them by Frobenius cosine similarity
``⟨C_i, C_j⟩_F / (‖C_i‖_F ‖C_j‖_F)`` into a ``[layers, layers]`` matrix, optionally after
removing each covariance's top principal components (which, in many models, are a few rogue
dimensions that would dominate the comparison).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from depthlens.errors import DriftError
from depthlens.lenses.readout import check_layer
from depthlens.model.architecture import find_parts
from depthlens.model.hidden_states import capture


@dataclass
class LayerCovariances:
    """Per-layer residual means and covariances over ``count`` positions."""

    layers: list[int]
    mean: torch.Tensor
    """``[layers, d]`` float64."""
    covariance: torch.Tensor
    """``[layers, d, d]`` float64, the (biased) covariance of the states."""
    count: int


@torch.no_grad()
def stream_covariances(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> LayerCovariances:
    """Covariances of the residual states ``layers`` (default ``0 … L``) over ``input_ids
    [B, T]``, from one pass in batches of ``batch_size`` rows."""
    parts = find_parts(model)
    layers = list(range(parts.num_layers + 1)) if layers is None else sorted(set(layers))
    for layer in layers:
        check_layer(layer, parts.num_layers)
    if input_ids.numel() < 2 or len(layers) < 2:
        raise DriftError(f"drift needs at least 2 layers and 2 tokens, got {len(layers)} layers and "
                         f"{input_ids.numel()} tokens: give more text or layers")
    d = parts.d_model
    sums = torch.zeros(len(layers), d, dtype=torch.float64)
    outer = torch.zeros(len(layers), d, d, dtype=torch.float64)
    count = 0
    for i in tqdm(range(0, input_ids.shape[0], batch_size), desc="covariances", disable=not progress, unit="batch"):
        states = capture(model, input_ids[i : i + batch_size], parts=parts, layers=layers)
        for index, layer in enumerate(layers):
            h = states[layer].reshape(-1, d).double()
            sums[index] += h.sum(0)
            outer[index] += h.T @ h
        count += input_ids[i : i + batch_size].numel()
    mean = sums / count
    covariance = outer / count - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return LayerCovariances(layers, mean, covariance, count)


def remove_top_components(covariance: torch.Tensor, components: int) -> torch.Tensor:
    """``C − Σ_{top components} λ u uᵀ`` for each ``[..., d, d]`` covariance (top by eigenvalue)."""
    if components <= 0:
        return covariance
    values, vectors = torch.linalg.eigh(covariance)
    top_values, top_vectors = values[..., -components:], vectors[..., -components:]
    return covariance - (top_vectors * top_values.unsqueeze(-2)) @ top_vectors.transpose(-1, -2)


def similarity_matrix(covariance: torch.Tensor, remove_top: int = 0) -> torch.Tensor:
    """Frobenius cosine similarity of every pair of ``[n, d, d]`` covariances, ``[n, n]`` float64
    (1 on the diagonal), after removing ``remove_top`` principal components from each."""
    flat = remove_top_components(covariance.double(), remove_top).flatten(1)
    flat = flat / flat.norm(dim=-1, keepdim=True)
    return flat @ flat.T


__all__ = ["LayerCovariances", "remove_top_components", "similarity_matrix", "stream_covariances"]
